"""The `sortline` command."""

from __future__ import annotations

import argparse
import logging
import sys

from pipeline.config import EX_CONFIG, ConfigError, load_config
from pipeline.graph import with_recorder

DESCRIPTION = """\
sortline: a streaming pipeline for sensor-based sorting machines.

Every command that runs the machine takes --config FILE, a TOML file that
describes the machine (belt, cameras, valve bar, model) and the graph of
nodes; SORTLINE_* environment variables override it (SORTLINE_BELT__SPEED_M_S=3).
"""


def _config(path: str):
    try:
        return load_config(path)
    except ConfigError as exc:
        for line in exc.lines:
            print(f"sortline: config error: {line}", file=sys.stderr)
        sys.exit(EX_CONFIG)


def cmd_run(args) -> int:
    settings = _config(args.config)
    if args.record:
        return run_rewritten(settings, args, lambda s: with_recorder(s, args.record))
    return _supervise(settings, args.config, args)


def _supervise(settings, config_path, args) -> int:
    from pipeline.supervisor import Supervisor

    print(f"sortline: profile {settings.profile}, graph {settings.graph.name}, "
          f"{len(settings.nodes)} nodes; latency budget {settings.budget_derivation()}", flush=True)
    return Supervisor(settings, config_path, seconds=args.seconds, report=args.report).run()


def run_rewritten(settings, args, rewrite) -> int:
    """Run the graph `rewrite(settings)` under the supervisor (args: seconds,
    report). Node processes read their configuration from a file: the derived
    one is written to the runtime directory for the length of the run."""
    import tempfile

    from pipeline.config import config_toml
    from pipeline.graph import prepare_runtime_dir

    try:
        derived = rewrite(settings)
    except ConfigError as exc:
        for line in exc.lines:
            print(f"sortline: config error: {line}", file=sys.stderr)
        return EX_CONFIG
    run_dir = prepare_runtime_dir(derived.runtime_dir())
    with tempfile.NamedTemporaryFile("w", suffix=".toml", prefix="graph-", dir=run_dir) as fh:
        fh.write(config_toml(derived))
        fh.flush()
        return _supervise(_config(fh.name), fh.name, args)


def cmd_replay(args) -> int:
    from pipeline.graph import replay_graph
    from pipeline.recording import check_mcap

    why = check_mcap(args.file)
    if why:
        print(f"sortline: {args.file}: {why}", file=sys.stderr)
        return EX_CONFIG
    settings = _config(args.config)
    params = {"speed": args.speed, "loop": args.loop}
    params.update({k: v for k, v in (("from_ticks", args.from_ticks), ("to_ticks", args.to_ticks)) if v is not None})
    if args.streams:
        params["streams"] = args.streams.split(",")

    def rewrite(s):
        s = replay_graph(s, args.file, **params)
        return with_recorder(s, args.record) if args.record else s

    return run_rewritten(settings, args, rewrite)


def cmd_simulate(args) -> int:
    """The synthetic belt alone, recorded: both cameras and the truth, for --seconds of belt."""
    from pipeline.config import NodeConfig

    settings = _config(args.config)
    # The config's own simulate node (if any) gives the defaults: the same belt as `sortline run`.
    base = next((n.params for n in settings.nodes.values() if n.kind == "simulate"), {})
    params = {**base, "seconds": args.seconds, "paced": args.paced}
    params.update({k: v for k, v in (("seed", args.seed), ("scene", args.scene), ("speed_m_s", args.speed),
                                     ("occupancy", args.occupancy), ("drop_rate", args.drop_rate)) if v is not None})

    def rewrite(s):
        alone = s.model_copy(update={"nodes": {"belt": NodeConfig(kind="simulate", params=params)}, "edges": []})
        return with_recorder(alone, args.record)

    # --seconds is belt time here; the graph ends by itself when the belt has run that long.
    return run_rewritten(settings, argparse.Namespace(seconds=None, report=args.report), rewrite)


def _belt_run(settings, kinds, args, speed, occupancy, score_path, samples_path=None):
    """The rewrite for a scored run of the synthetic belt: seed, length, speed, pacing, report paths."""
    def rewrite(s):
        nodes = dict(s.nodes)
        sim = nodes[kinds["simulate"]]
        params = {**sim.params, "seed": args.seed, "seconds": args.seconds, "paced": not args.unpaced,
                  "speed_m_s": speed}
        if occupancy is not None:
            params["occupancy"] = occupancy
        nodes[kinds["simulate"]] = sim.model_copy(update={"params": params})
        vs = nodes[kinds["valve_sim"]]
        nodes[kinds["valve_sim"]] = vs.model_copy(update={"params": {
            **vs.params, "report": str(score_path), "by_position": args.unpaced}})
        for name, node in nodes.items():
            if args.unpaced and node.kind in ("ejector", "eject_plan"):   # no clock to keep: by position
                nodes[name] = node.model_copy(update={"params": {**node.params, "timing": False}})
            if samples_path and node.kind == "ejector":
                nodes[name] = nodes[name].model_copy(update={"params": {**nodes[name].params,
                                                                          "samples": str(samples_path)}})
        # The machine runs at this speed: the nominal figures (budget, first speed estimate) follow.
        belt = s.belt.model_copy(update={"speed_m_s": speed})
        edges = s.edges
        if args.unpaced:   # the belt waits: every edge must hold it back instead of dropping
            edges = [e.model_copy(update={"policy": "lossless", "pattern": "pushpull"}) for e in edges]
        return s.model_copy(update={"nodes": nodes, "belt": belt, "edges": edges})
    return rewrite


def _belt_graph_kinds(settings, config_path):
    kinds = {n.kind: name for name, n in settings.nodes.items()}
    missing = [k for k in ("simulate", "valve_sim", "ejector") if k not in kinds]
    if missing:
        print(f"sortline: this needs a graph with simulate, ejector and valve_sim nodes; {config_path} has no "
              f"{', '.join(missing)} (configs/demo.toml has them)", file=sys.stderr)
        return None
    return kinds


def cmd_hil(args) -> int:
    """Latency of the real processes at the real line rate, from exposure to the command leaving."""
    import json
    import tempfile
    from pathlib import Path

    from pipeline import hil

    settings = _config(args.config)
    kinds = _belt_graph_kinds(settings, args.config)
    if kinds is None:
        return EX_CONFIG
    if args.quick:
        args.seconds = 10.0
    args.unpaced = False
    speed = args.speed or settings.belt.speed_m_s
    budget = settings.budget_ms(speed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="sortline-hil-") as tmp:
        samples, score = Path(tmp) / "samples.npz", Path(tmp) / "score.json"
        rc = run_rewritten(settings, argparse.Namespace(seconds=args.seconds + 30, report=str(out / "run.json")),
                           _belt_run(settings, kinds, args, speed, None, score, samples))
        if rc != 0 or not samples.exists():
            print(f"sortline: hil: the run failed (exit {rc})", file=sys.stderr)
            return rc or 1
        late_at_valves = json.loads(score.read_text()).get("late_arrivals", 0) if score.exists() else 0
        figures, arrays = hil.analyse(str(samples), budget, args.seconds, late_at_valves)
    command = (f"sortline hil --config {args.config} --speed {speed:g} --seconds {args.seconds:g} --seed {args.seed}")
    figures.update(speed_m_s=speed, seconds=args.seconds, budget_derivation=settings.budget_derivation(speed))
    hil.draw(figures, arrays, str(out / "hil.png"))
    (out / "hil.md").write_text(hil.markdown(figures, command) + f"\nBudget: {settings.budget_derivation(speed)}\n")
    (out / "hil.json").write_text(json.dumps(figures, indent=2) + "\n")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")
    print(hil.markdown(figures, command))
    print(f"budget: {settings.budget_derivation(speed)}")
    print(f"report: {out}/hil.md, hil.png, hil.json")
    if args.quick and figures["samples"] < 10_000:
        print(f"(--quick: {figures['samples']} samples; a full run gives at least 10,000)")
    return 0 if figures["within_budget"] else 1


def cmd_score(args) -> int:
    """The whole pipeline on the synthetic belt, scored against its truth by the valve-bar simulator."""
    import json
    import tempfile
    from pathlib import Path

    settings = _config(args.config)
    kinds = _belt_graph_kinds(settings, args.config)
    if kinds is None:
        return EX_CONFIG
    speeds = [float(v) for v in args.speeds.split(",")] if args.speeds else [args.speed or settings.belt.speed_m_s]
    occupancies = [float(v) for v in args.occupancies.split(",")] if args.occupancies else [args.occupancy]
    rows = []
    for speed in speeds:
        for occupancy in occupancies:
            with tempfile.TemporaryDirectory(prefix="sortline-score-") as tmp:
                score_path, run_path = Path(tmp) / "score.json", Path(tmp) / "run.json"
                rewrite = _belt_run(settings, kinds, args, speed, occupancy, score_path)
                rc = run_rewritten(settings, argparse.Namespace(seconds=args.seconds + 30, report=str(run_path)),
                                   rewrite)
                if rc != 0 or not score_path.exists():
                    print(f"sortline: score: the run at {speed:g} m/s failed (exit {rc})", file=sys.stderr)
                    return rc or 1
                rows.append(_score_row(json.loads(score_path.read_text()), json.loads(run_path.read_text()),
                                       speed, occupancy, args))
    print(_score_table(rows))
    for r in rows:
        looks = {k[len("recovery_look_"):]: v for k, v in r.items() if k.startswith("recovery_look_")}
        print(f"recovery by look at {r['speed_m_s']:g} m/s: "
              + ", ".join(f"{look} {100 * v:.0f} %" for look, v in looks.items()))
        others = {k[len("hit_other_"):]: v for k, v in r.items() if k.startswith("hit_other_")}
        print(f"other objects hit at {r['speed_m_s']:g} m/s: "
              + (", ".join(f"{cls} {n}" for cls, n in others.items()) or "none"))
    if args.unpaced:
        print("UNPACED: the belt waited for the pipeline; these figures score decisions, not timing.")
    if args.json:
        Path(args.json).write_text(json.dumps(rows[0] if len(rows) == 1 else {"runs": rows}, indent=2) + "\n")
    return 0


def _score_row(score: dict, run: dict, speed: float, occupancy, args) -> dict:
    """One flat row: the valve-bar simulator's score, the ejector's late commands, latency."""
    nodes = run.get("nodes", {})
    ejector = next((n["status"] for n in nodes.values() if "late" in n.get("status", {})), {})
    row = {"speed_m_s": speed, "occupancy": occupancy, "seconds": args.seconds, "seed": args.seed,
           "paced": not args.unpaced, **{k: v for k, v in score.items() if not isinstance(v, (dict, list))},
           "late": ejector.get("late", 0) + score.get("late_arrivals", 0),
           "decision_p50_ms": ejector.get("decision_p50_ms"), "decision_p99_ms": ejector.get("decision_p99_ms"),
           "lead_p50_ms": ejector.get("lead_p50_ms"), "lead_min_ms": ejector.get("lead_min_ms"),
           **{f"recovery_look_{look}": v for look, v in score.get("recovery_by_look", {}).items()},
           **{f"hit_other_{cls}": n for cls, n in score.get("hit_others_by_class", {}).items()}}
    return row


def _score_table(rows: list[dict]) -> str:
    def pct(v):
        return "–" if v is None else f"{100 * v:.1f} %"
    out = ["| speed m/s | occupancy | targets | recovery | recovery, black excluded | purity | purity (area) | late "
           "| missed | air valve-s | decision p50/p99 ms |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        occ = "default" if r["occupancy"] is None else f"{r['occupancy']:g}"
        out.append(f"| {r['speed_m_s']:g} | {occ} | {r['targets']} | {pct(r['recovery'])} | "
                   f"{pct(r.get('recovery_not_black'))} ({r.get('black_targets', 0)} black) | {pct(r['purity'])} | "
                   f"{pct(r['purity_area'])} | {r['late']} | {r['missed']} | {r['air_valve_s']:.1f} | "
                   f"{r['decision_p50_ms']} / {r['decision_p99_ms']} |")
    return "\n".join(out)


def cmd_calibrate(args) -> int:
    from calibration import commands
    from calibration.spectral import CalibrationError

    settings = _config(args.config)
    try:
        if args.what == "spectral":
            return commands.spectral(settings, args.dark, args.white, args.out, args.white_reflectance,
                                     args.exposure_us)
        if args.what == "spatial":
            return commands.spatial(settings, args.recording, args.out, args.png)
        return commands.check(settings, args.recording, args.png, args.max_across_hsi_px, args.max_along_lines)
    except (CalibrationError, OSError) as exc:
        print(f"sortline: calibrate {args.what}: {exc}", file=sys.stderr)
        return 2


def cmd_inspect(args) -> int:
    from pipeline import recording

    why = recording.check_mcap(args.file)
    if why:
        print(f"sortline: {args.file}: {why}", file=sys.stderr)
        return 1
    info = recording.contents(args.file, verify=args.verify)
    print(describe(info))
    if args.png:
        from pipeline.belt_image import save

        start = args.from_ticks
        if start is None:
            firsts = [s.first_position for s in info.streams.values() if s.first_position is not None]
            start = min(firsts) if firsts else 0
        try:
            saved = save(args.file, args.png, start, args.length_mm)
        except (ValueError, OSError) as exc:
            print(f"sortline: {exc}", file=sys.stderr)
            return 1
        print(f"picture: {args.png}, {saved['rows']} RGB lines from position {start} "
              f"({args.length_mm:g} mm), streams {', '.join(saved['streams']) or 'none'}")
    return 2 if info.damage else 0


def describe(info) -> str:
    """What `sortline inspect` prints about a recording."""
    from pipeline import recording

    meta = info.metadata.get(recording.META_RUN, {})
    cfg = info.config()
    ticks_per_mm = float(cfg.get("belt", {}).get("ticks_per_mm") or meta.get("belt_ticks_per_mm") or 0)
    out = [f"{info.path}: {info.size / 1e6:.1f} MB, "
           + ("figures from the recorder's summary" if info.from_summary else "figures from a scan of every message")]
    if meta:
        out.append("  recorded by sortline {sortline_version}, profile {profile}, graph {graph}, "
                   "started {start_time}, {compression}".format_map({k: meta.get(k, "?") for k in (
                       "sortline_version", "profile", "graph", "start_time", "compression")}))
    if info.damage:
        out.append(f"  DAMAGED: {info.damage}")
    for name, s in sorted(info.streams.items()):
        duration = (s.last_time_ns - s.first_time_ns) / 1e9
        belt = ""
        if ticks_per_mm and s.first_position is not None:
            belt = f", belt {(s.end_position - s.first_position) / ticks_per_mm / 1000:.2f} m " \
                   f"(positions {s.first_position}..{s.end_position})"
        gaps = f"{s.gap_count} gaps" + (f" at {', '.join(map(str, s.gaps[:10]))}"
                                        + (" ..." if s.gap_count > 10 else "") if s.gap_count else "")
        out.append(f"  stream {name}: {s.messages} messages, {s.lines} lines, {s.bytes / 1e6:.1f} MB, "
                   f"{duration:.2f} s{belt}, seq {s.first_seq}..{s.last_seq}, {gaps}")
    if not info.streams:
        out.append("  no messages")
    else:
        streams = info.streams.values()
        first = min(s.first_time_ns for s in streams)
        duration = (max(s.last_time_ns for s in streams) - first) / 1e9
        total = f"  all: {sum(s.messages for s in streams)} messages, {duration:.2f} s"
        placed = [s for s in streams if s.first_position is not None]
        if ticks_per_mm and placed:
            span = max(s.end_position for s in placed) - min(s.first_position for s in placed)
            total += f", belt {span / ticks_per_mm / 1000:.2f} m"
        out.append(total)
    for name, data in sorted(info.attachments.items()):
        out.append(f"  attachment {name}: {len(data)} bytes")
    return "\n".join(out)


def cmd_node(args) -> int:
    from pipeline.node import main

    settings = _config(args.config)
    if args.name not in settings.nodes:
        print(f"sortline: config error: no node named {args.name!r}; the graph has {', '.join(settings.nodes)}",
              file=sys.stderr)
        return EX_CONFIG
    return main(settings, args.name, args.heartbeat, args.metrics_port)


def cmd_install_service(args) -> int:
    from pipeline.install import install

    def names(text: str | None) -> list[str] | None:
        return None if text is None else [n for n in text.split(",") if n]

    try:
        written = install(args.config, args.root, args.prefix, names(args.nodes), names(args.realtime),
                          args.realtime_cpus)
    except OSError as exc:
        print(f"sortline: install-service: {exc}", file=sys.stderr)
        return 1
    for path in written:
        print(f"  {path}")
    print(f"installed {len(written)} files under {args.root}")
    if args.root == "/":
        print("next: systemd-sysusers && systemctl daemon-reload && systemctl enable --now sortline.target"
              "   (docs/service.md)")
    return 0


def cmd_keys(args) -> int:
    from pipeline.curve import make_keys

    try:
        public, secret = make_keys(args.out, args.name)
    except OSError as exc:
        print(f"sortline: keys: {exc}", file=sys.stderr)
        return 1
    print(f"public certificate: {public}\n  copy it into security.authorized of every host this one connects to,\n"
          f"  and name it as server_key on the edges whose producer runs here")
    print(f"secret certificate: {secret}\n  stays on this host: security.key (readable by the service's group only)")
    return 0


def cmd_status(args) -> int:
    from pipeline.status import render, rows

    settings = _config(args.config)
    if not settings.metrics.port_base:
        print(f"sortline: status: metrics.port_base is 0 in {args.config}: the nodes serve no metrics to read",
              file=sys.stderr)
        return EX_CONFIG
    table = rows(settings, args.interval)
    print(render(table))
    return 3 if any(row[1] == "down" for row in table) else 0  # as `systemctl status` does for a stopped unit


def cmd_check(args) -> int:
    from pipeline.graph import edges, topo_order

    settings = _config(args.config)
    print(f"{args.config}: valid (profile {settings.profile})")
    for cam in ("rgb", "hsi"):
        print(f"  {cam} line rate: {settings.line_rate_hz(cam):.0f} lines/s at {settings.belt.speed_m_s:g} m/s")
    print(f"  RGB:HSI ratio: {settings.hsi_ratio}")
    print(f"  latency budget: {settings.budget_derivation()}")
    print(f"  runtime directory: {settings.runtime_dir()}")
    print(f"  nodes (data-flow order): {', '.join(topo_order(settings))}")
    for e in edges(settings):
        print(f"  edge {e.name}: {e.policy}, {'shared memory' if e.shm else 'inline'}, {e.address}")
    return 0


def _run_options(p: argparse.ArgumentParser, record_help: str) -> None:
    """What every command that runs a graph takes."""
    p.add_argument("--config", required=True, help="machine configuration (TOML)")
    p.add_argument("--seconds", type=float, default=None, help="stop after this long (default: run until stopped)")
    p.add_argument("--report", default=None, help="write each node's final metrics and status here (JSON)")
    p.add_argument("--record", metavar="FILE", default=None, help=record_help)


def cmd_cameras(args) -> int:
    from nodes.acquire.listing import list_cameras, producers_of, selections_of

    if args.config:
        settings = _config(args.config)
        return list_cameras(args.cti or producers_of(settings), selections_of(settings))
    from nodes.acquire.device import default_cti

    return list_cameras(args.cti or default_cti())


def _lazy(module: str):
    """A command whose module (and torch with it) is imported only when it runs."""
    def run(args) -> int:
        from importlib import import_module

        return import_module(module).main(args)
    return run


def _model_commands(sub) -> None:
    """train, evaluate, export, build-engine: their modules import torch only when run."""
    from models import cli_args

    for name, module, add, short, long in (
        ("train", "models.train", cli_args.add_train,
         "train a segmentation model (synthetic belt or SpectralWaste)",
         "Train a model; seeded, resumable (--resume), safetensors checkpoints."),
        ("evaluate", "models.evaluate", cli_args.add_evaluate,
         "mIoU, per-class IoU and confusion matrix of a model on held-out data",
         "Evaluate a checkpoint on held-out data: mIoU, per-class IoU, a confusion matrix as a table and "
         "a PNG; --json PATH for the figures."),
        ("export", "models.export", cli_args.add_export,
         "export a checkpoint to ONNX for a strip size, checked against torch",
         "Export a checkpoint to ONNX at the configured strip size (strip + overlap), run it in ONNX "
         "Runtime and report the largest difference from torch."),
        ("build-engine", "models.engine", cli_args.add_build_engine,
         "build a TensorRT engine from an ONNX model (on the GPU that will run it)",
         "Build a TensorRT engine (FP16, or INT8 with calibration strips) with a timing cache and "
         "metadata; needs the .[gpu] extra on an NVIDIA machine."),
    ):
        p = sub.add_parser(name, help=short, description=long)
        add(p)
        p.set_defaults(func=_lazy(module))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sortline", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("run", help="run every node of the graph, each as its own supervised process",
                       description="Start every node of the configured graph as its own process, restart "
                       "one that dies (with backoff), print a status table, stop them all cleanly on "
                       "SIGTERM/SIGINT or after --seconds.")
    _run_options(p, "also record every source's output to this MCAP file (adds a record node)")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("replay", help="run the graph with its sources replaced by a recording",
                       description="Run the configured graph with its source nodes (cameras, simulator, "
                       "test patterns) replaced by one replay of FILE, whose outputs rgb, hsi and truth take "
                       "their edges. A damaged file replays up to the damage, then the graph ends.")
    p.add_argument("file", help="the recording (MCAP)")
    _run_options(p, "record the replayed streams again to FILE")
    p.add_argument("--speed", type=float, default=1.0,
                   help="1: as recorded (default); a factor; 0: as fast as the graph accepts, lossless")
    p.add_argument("--from", dest="from_ticks", type=int, default=None, help="first belt position (encoder ticks)")
    p.add_argument("--to", dest="to_ticks", type=int, default=None, help="belt position to stop before")
    p.add_argument("--loop", action="store_true", help="start again at the end (until --seconds or a signal)")
    p.add_argument("--streams", default="", help="comma-separated recorded streams to publish (default: all)")
    p.set_defaults(func=cmd_replay)

    p = sub.add_parser("simulate", help="record the synthetic belt: both cameras and the ground truth",
                       description="Run the synthetic belt (the config's simulate node settings, if it has "
                       "one, else the defaults) for --seconds of belt time and record its rgb, hsi and truth "
                       "streams to an MCAP file. Unpaced unless --paced: as fast as the recorder writes.")
    p.add_argument("--config", required=True, help="machine configuration (TOML)")
    p.add_argument("--seconds", type=float, required=True, help="belt time to simulate")
    p.add_argument("--record", metavar="FILE", required=True, help="the MCAP file to write")
    p.add_argument("--report", default=None, help="write each node's final metrics and status here (JSON)")
    p.add_argument("--seed", type=int, default=None, help="same seed, same bytes (default: the config's, else 1)")
    p.add_argument("--scene", choices=["belt", "target", "white", "dark"], default=None,
                   help="belt (objects), target (calibration board), white or dark (spectral references)")
    p.add_argument("--speed", type=float, default=None, help="belt speed, m/s (default: the config's)")
    p.add_argument("--occupancy", type=float, default=None, help="fraction of the belt covered")
    p.add_argument("--drop-rate", type=float, default=None, help="chance a frame is lost (a gap)")
    p.add_argument("--paced", action="store_true", help="at the belt's own pace instead of as fast as possible")
    p.set_defaults(func=cmd_simulate)

    p = sub.add_parser("score", help="run the whole pipeline on the synthetic belt and score the air against the truth",
                       description="Run the config's graph (it needs a simulate and a valve_sim node, as "
                       "configs/demo.toml has) for --seconds of belt at the belt's own pace, then print what the "
                       "valve-bar simulator measured: recovery (targets hit by air over enough of their area), "
                       "purity (hit objects that are targets, by count and by area), late and missed commands, "
                       "air use, and the decision latency. --speeds and --occupancies make a table of runs.")
    p.add_argument("--config", required=True, help="machine configuration (TOML)")
    p.add_argument("--seconds", type=float, default=20.0, help="belt time per run (default 20)")
    p.add_argument("--speed", type=float, default=None, help="belt speed, m/s (default: the config's)")
    p.add_argument("--seed", type=int, default=1, help="the synthetic belt's seed (default 1)")
    p.add_argument("--occupancy", type=float, default=None, help="belt occupancy (default: the config's)")
    p.add_argument("--speeds", default="", help="comma-separated speeds: one run each (a table)")
    p.add_argument("--occupancies", default="", help="comma-separated occupancies: one run each (a table)")
    p.add_argument("--unpaced", action="store_true",
                   help="let the belt wait for the pipeline: scores decisions alone, not timing (says so)")
    p.add_argument("--json", default=None, help="write the figures here (one flat object; {runs: [...]} for a table)")
    p.set_defaults(func=cmd_score)

    p = sub.add_parser("hil", help="latency from exposure to valve command, at the real line rate, with a report",
                       description="Feed the synthetic belt at its real line rate through the config's graph "
                       "(real processes, to the valve driver) and measure, for every command, the time from the "
                       "exposure of the last line it was decided on to the command leaving for the driver, how "
                       "far ahead of its deadline it left, and per-stage times. Writes hil.json, hil.png and "
                       "hil.md to --out; exit 1 when the budget is exceeded or a deadline missed. "
                       "See docs/latency.md for the same test on a real machine.")
    p.add_argument("--config", required=True, help="machine configuration (TOML)")
    p.add_argument("--seconds", type=float, default=120.0, help="belt time (default 120: >10,000 commands)")
    p.add_argument("--quick", action="store_true", help="a short run (10 s)")
    p.add_argument("--speed", type=float, default=None, help="belt speed, m/s (default: the config's)")
    p.add_argument("--seed", type=int, default=1, help="the synthetic belt's seed (default 1)")
    p.add_argument("--out", default="hil-report", help="folder for the report (default hil-report)")
    p.add_argument("--json", default=None, help="also write the figures here")
    p.set_defaults(func=cmd_hil)

    p = sub.add_parser("calibrate", help="make or check calibration files from recordings",
                       description="spectral: dark and white references of the HSI camera; spatial: the "
                       "RGB-HSI co-registration from a recording of the calibration target; check: measure "
                       "the residuals of the config's spatial calibration on a new target recording "
                       "(exit 1: out of limits, recalibrate). See docs/calibration.md.")
    csub = p.add_subparsers(dest="what", required=True, metavar="WHAT")
    c = csub.add_parser("spectral", help="dark and white references -> spectral calibration file")
    c.add_argument("--config", required=True, help="machine configuration (TOML)")
    c.add_argument("--dark", required=True, help="recording with the lamp off (MCAP)")
    c.add_argument("--white", required=True, help="recording of a white tile under the whole line (MCAP)")
    c.add_argument("--white-reflectance", type=float, default=0.92, help="the tile's reflectance (default 0.92)")
    c.add_argument("--exposure-us", type=float, default=None,
                   help="the HSI exposure time the references were taken at, kept in the file "
                   "(default: what the recording's frames say, if anything)")
    c.add_argument("--out", required=True, help="the calibration file to write (.npz)")
    c = csub.add_parser("spatial", help="target recording -> spatial calibration file")
    c.add_argument("recording", help="recording of the calibration target passing under both cameras (MCAP)")
    c.add_argument("--config", required=True, help="machine configuration (TOML)")
    c.add_argument("--out", required=True, help="the calibration file to write (.json)")
    c.add_argument("--png", default=None, help="draw the residuals across the belt here")
    c = csub.add_parser("check", help="residuals of the config's spatial calibration on a new target recording")
    c.add_argument("recording", help="recording of the calibration target (MCAP)")
    c.add_argument("--config", required=True, help="machine configuration (TOML), with calibration.spatial set")
    c.add_argument("--png", default=None, help="draw the residuals across the belt here")
    c.add_argument("--max-across-hsi-px", type=float, default=0.3, help="limit across the belt (default 0.3)")
    c.add_argument("--max-along-lines", type=float, default=1.0, help="limit along the belt (default 1)")
    p.set_defaults(func=cmd_calibrate)

    p = sub.add_parser("inspect", help="print what a recording holds; draw a stretch of belt",
                       description="Print a recording's streams (messages, lines, duration, belt length, "
                       "gaps) and attachments; with --png, save a picture of a stretch of belt: RGB, a "
                       "false-colour HSI view and the labels. Exit code 2: the file is damaged.")
    p.add_argument("file", help="the recording (MCAP)")
    p.add_argument("--verify", action="store_true",
                   help="read every message and check every chunk's checksum (default: trust the summary)")
    p.add_argument("--png", default=None, help="save a picture of the belt here")
    p.add_argument("--from", dest="from_ticks", type=int, default=None,
                   help="first belt position of the picture (encoder ticks; default: the start)")
    p.add_argument("--length-mm", type=float, default=500.0, help="length of belt in the picture (default 500)")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("node", help="run one node in this process (what a systemd unit starts)",
                       description="Run one node of the configured graph in the foreground.")
    p.add_argument("name", help="the node's name in the configuration")
    p.add_argument("--config", required=True, help="machine configuration (TOML)")
    p.add_argument("--heartbeat", default=None, help="ZeroMQ address of a supervisor's heartbeat socket")
    p.add_argument("--metrics-port", type=int, default=None,
                   help="serve Prometheus metrics on this port (0: off; default: metrics.port_base + the "
                   "node's place in data-flow order, off when port_base is 0)")
    p.set_defaults(func=cmd_node)

    p = sub.add_parser("install-service", help="install the systemd units and the configuration (/etc/sortline)",
                       description="Copy the configuration to ROOT/etc/sortline/sortline.toml (with the calibration "
                       "files it names by relative path), install sortline.target and the template unit "
                       "sortline@.service for the nodes of this host, each ordered after the nodes it sends to, "
                       "and enable them. See docs/service.md.")
    p.add_argument("--config", required=True, help="machine configuration (TOML)")
    p.add_argument("--root", default="/", help="install under this directory instead of / (an image, a test)")
    p.add_argument("--prefix", default=sys.prefix,
                   help="the virtual environment whose bin/sortline the units run (default: this one)")
    p.add_argument("--nodes", default=None, help="comma-separated nodes that run on this host (default: all)")
    p.add_argument("--realtime", default=None,
                   help="comma-separated nodes given real-time priority (default: the ejector nodes)")
    p.add_argument("--realtime-cpus", default="", help="pin those nodes to these CPUs (systemd CPUAffinity=, e.g. 3)")
    p.set_defaults(func=cmd_install_service)

    p = sub.add_parser("status", help="every node's rates, losses and latency at a glance (from their metrics)",
                       description="Read each node's Prometheus endpoint (metrics.port_base + its place in "
                       "data-flow order) twice, --interval apart, and print a table: state, messages in and "
                       "out per second, camera lines per second, drops, malformed messages, refused "
                       "connections, end-to-end latency (bucket bounds) and what cameras and ejectors report. "
                       "Exit code 3: a node does not answer.")
    p.add_argument("--config", required=True, help="machine configuration (TOML)")
    p.add_argument("--interval", type=float, default=1.0, help="seconds between the two readings (default 1)")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("keys", help="make this host's CURVE certificate for tcp edges",
                       description="Write NAME.key (public) and NAME.key_secret (secret) into --out: the keys "
                       "that authenticate and encrypt tcp edges between hosts (security.curve). See docs/service.md.")
    p.add_argument("name", help="the host's name (the files' names)")
    p.add_argument("--out", default="/etc/sortline/keys", help="directory (default /etc/sortline/keys)")
    p.set_defaults(func=cmd_keys)

    p = sub.add_parser("check", help="validate a configuration and print the figures derived from it",
                       description="Validate a configuration; print line rates, the latency budget and "
                       "its derivation, and the graph's edges.")
    p.add_argument("--config", required=True, help="machine configuration (TOML)")
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("cameras", help="list the cameras the GenTL producers offer, with their key features",
                       description="List the devices of the GenTL producers named by --config (its [genicam] "
                       "section and acquire nodes) or by --cti: vendor, model, serial, and the features a camera "
                       "configuration needs (size, pixel formats, rates, trigger, chunks). With --config, also "
                       "which device each acquire node selects.")
    p.add_argument("--config", help="machine configuration (TOML)")
    p.add_argument("--cti", action="append", default=[], metavar="PATH",
                   help="a GenTL producer (.cti); repeat for several (default: GENICAM_GENTL64_PATH)")
    p.set_defaults(func=cmd_cameras)


    _model_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s", stream=sys.stderr)
    try:
        return args.func(args)
    except ConfigError as exc:  # found after loading: a directory, a file the config names
        for line in exc.lines:
            print(f"sortline: config error: {line}", file=sys.stderr)
        return EX_CONFIG


if __name__ == "__main__":
    sys.exit(main())
