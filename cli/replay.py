"""`sortline replay`: the graph with its sources replaced by a recording."""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
from pathlib import Path

from sortline.cli import common
from sortline.cli.run import with_recorder
from sortline.pipeline.config import EX_CONFIG, ConfigError, NodeConfig, Settings
from sortline.pipeline.graph import source_nodes


def replay_graph(settings: Settings, path: str, node: str = "replay", **params) -> Settings:
    """The graph with its source nodes replaced by one replay of `path`.

    Each edge that left a source now leaves the replay output of the stream
    that source produced: the source's port name when it is one of the
    replay's outputs ("rgb", "hsi", "truth"), else its `stream` or `camera`
    parameter. With speed 0 ("as fast as accepted") the belt waits for the
    graph: every edge becomes lossless (only back-pressure makes that mean
    every message) and the nodes that act on time decide by belt position
    (`common.by_position`), so the graph makes the decisions the line would
    have made with time to spare, and the same ones on every replay.
    """
    from sortline.nodes.replay import Replay

    sources = set(source_nodes(settings))
    if not sources:
        raise ConfigError(["the graph has no source node for the replay to replace"])
    new_edges, problems = [], []
    for i, edge in enumerate(settings.edges):
        src, port = edge.src.split(".")
        if src not in sources:
            new_edges.append(edge)
            continue
        src_params = settings.nodes[src].params
        stream = port if port in Replay.outputs else src_params.get("stream") or src_params.get("camera")
        if stream not in Replay.outputs:
            problems.append(f"edges[{i}].from = '{edge.src}': no recorded stream to take its place "
                            f"(a replay publishes {', '.join(Replay.outputs)})")
            continue
        new_edges.append(edge.model_copy(update={"src": f"{node}.{stream}"}))
    if problems:
        raise ConfigError(problems)
    nodes = {name: cfg for name, cfg in settings.nodes.items() if name not in sources}
    nodes[node] = NodeConfig(kind="replay", params={"path": str(Path(path).absolute()), **params})
    replayed = settings.model_copy(update={"nodes": nodes, "edges": new_edges})
    return common.by_position(replayed) if params.get("speed", 1.0) == 0 else replayed


def sent_windows(path: str):
    """The commands an ejector's samples file says were sent: rows of (valve, open, close, object id)."""
    import numpy as np

    with np.load(path) as z:
        if "windows" not in z:
            raise ValueError("no sent commands in it (written by `sortline run` or `replay` with --commands?)")
        return z["windows"].reshape(-1, 4)


def compare(this, other) -> dict:
    """How this run's commands reproduce another run's, both as (valve, open, close, object id) rows.

    An object the other run ejected is ejected again when this run sent commands for the same object id (the
    belt position and column where it starts) and each of the other run's commands for it opens inside this
    run's air for it on that valve: a live command may open later (its front clipped, decided late) or close
    later (merged with the next window on that valve), never elsewhere on the belt.
    """
    air: dict[tuple[int, int], list[tuple[int, int]]] = {}
    for valve, a, b, obj in this.tolist():
        air.setdefault((obj, valve), []).append((a, b))
    objects = set(other[:, 3].tolist())
    elsewhere = {obj for valve, a, _, obj in other.tolist()
                 if not any(a0 <= a < b0 for a0, b0 in air.get((obj, valve), ()))}
    return {"commands": len(this), "other_commands": len(other), "other_objects": len(objects),
            "ejected_again": len(objects - elsewhere),
            "ejected_again_share": len(objects - elsewhere) / len(objects) if objects else None,
            "identical": sorted(map(tuple, this.tolist())) == sorted(map(tuple, other.tolist()))}


def replay(args) -> int:
    from sortline.pipeline.recording import check_mcap

    why = check_mcap(args.file)
    if why:
        print(f"sortline: {args.file}: {why}", file=sys.stderr)
        return EX_CONFIG
    if args.compare:
        try:
            other = sent_windows(args.compare)
        except (OSError, ValueError) as exc:
            print(f"sortline: --compare {args.compare}: {exc}", file=sys.stderr)
            return EX_CONFIG
    settings = common.load(args.config)
    params = {"speed": args.speed, "loop": args.loop}
    params.update({k: v for k, v in (("from_ticks", args.from_ticks), ("to_ticks", args.to_ticks)) if v is not None})
    if args.streams:
        params["streams"] = args.streams.split(",")
    with tempfile.TemporaryDirectory(prefix="sortline-replay-") as tmp:
        commands = args.commands or (str(Path(tmp) / "commands.npz") if args.compare else None)

        def rewrite(s):
            s = replay_graph(s, args.file, **params)
            s = with_recorder(s, args.record) if args.record else s
            return common.with_commands(s, commands) if commands else s

        rc = common.run_rewritten(settings, rewrite, args.seconds, args.report)
        if rc != 0 or not args.compare:
            return rc
        try:
            c = compare(sent_windows(commands), other)
        except (OSError, ValueError) as exc:
            print(f"sortline: --compare: the ejector's commands of this replay: {exc}", file=sys.stderr)
            return 1
    share = "–" if c["ejected_again_share"] is None else f"{100 * c['ejected_again_share']:.1f} %"
    print(f"compared with {args.compare}: {c['other_objects']} objects ejected there, {c['ejected_again']} "
          f"({share}) ejected again at the same belt position; {c['other_commands']} commands there, "
          f"{c['commands']} here; identical: {'yes' if c['identical'] else 'no'}")
    return 0


def pace(text: str) -> float:
    value = float(text)
    if not 0 <= value < math.inf:
        raise argparse.ArgumentTypeError(f"{text!r}: give a factor of 0 or more (0: as fast as accepted)")
    return value


def add(sub) -> None:
    p = sub.add_parser("replay", help="run the graph with its sources replaced by a recording",
                       description="Run the configured graph with its source nodes (cameras, simulator, "
                       "test patterns) replaced by one replay of FILE, whose outputs rgb, hsi and truth take "
                       "their edges. A damaged file replays up to the damage, then the graph ends.")
    p.add_argument("file", help="the recording (MCAP)")
    common.add_run_options(p, "record the replayed streams again to FILE")
    p.add_argument("--speed", type=pace, default=1.0,
                   help="1: as recorded, the graph as configured, as on the line (default); a factor; 0: as fast "
                   "as the graph accepts, every edge lossless, decided by belt position: every message, the same "
                   "commands each time")
    p.add_argument("--from", dest="from_ticks", type=int, default=None, help="first belt position (encoder ticks)")
    p.add_argument("--to", dest="to_ticks", type=int, default=None, help="belt position to stop before")
    p.add_argument("--loop", action="store_true", help="start again at the end (until --seconds or a signal)")
    p.add_argument("--streams", default="", help="comma-separated recorded streams to publish (default: all)")
    p.add_argument("--compare", metavar="FILE", default=None,
                   help="another run's --commands file (the live run's, an earlier replay's): print how many of "
                   "the objects it ejected this replay ejected again at the same belt position, and whether "
                   "the commands are identical")
    p.set_defaults(func=replay)
