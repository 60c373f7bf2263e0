"""`sortline replay`: the graph with its sources replaced by a recording."""

from __future__ import annotations

import argparse
import math
import sys
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
    parameter. With speed 0 ("as fast as accepted") those edges become
    lossless, since only back-pressure makes that mean every message.
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
        update = {"src": f"{node}.{stream}"}
        if params.get("speed", 1.0) == 0:
            update.update(policy="lossless", pattern="pushpull")
        new_edges.append(edge.model_copy(update=update))
    if problems:
        raise ConfigError(problems)
    nodes = {name: cfg for name, cfg in settings.nodes.items() if name not in sources}
    nodes[node] = NodeConfig(kind="replay", params={"path": str(Path(path).absolute()), **params})
    return settings.model_copy(update={"nodes": nodes, "edges": new_edges})


def replay(args) -> int:
    from sortline.pipeline.recording import check_mcap

    why = check_mcap(args.file)
    if why:
        print(f"sortline: {args.file}: {why}", file=sys.stderr)
        return EX_CONFIG
    settings = common.load(args.config)
    params = {"speed": args.speed, "loop": args.loop}
    params.update({k: v for k, v in (("from_ticks", args.from_ticks), ("to_ticks", args.to_ticks)) if v is not None})
    if args.streams:
        params["streams"] = args.streams.split(",")

    def rewrite(s):
        s = replay_graph(s, args.file, **params)
        return with_recorder(s, args.record) if args.record else s

    return common.run_rewritten(settings, rewrite, args.seconds, args.report)


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
                   help="1: as recorded (default); a factor; 0: as fast as the graph accepts, lossless")
    p.add_argument("--from", dest="from_ticks", type=int, default=None, help="first belt position (encoder ticks)")
    p.add_argument("--to", dest="to_ticks", type=int, default=None, help="belt position to stop before")
    p.add_argument("--loop", action="store_true", help="start again at the end (until --seconds or a signal)")
    p.add_argument("--streams", default="", help="comma-separated recorded streams to publish (default: all)")
    p.set_defaults(func=replay)
