"""`sortline score`: the whole pipeline on the synthetic belt, scored against its truth by the valve-bar simulator."""

from __future__ import annotations

import importlib.util
import json
import sys
import tempfile
from pathlib import Path

from sortline.cli import common
from sortline.pipeline.config import EX_CONFIG, Settings

NEEDED = ("simulate", "valve_sim", "ejector")
UNPACED_SLOWDOWN = 60   # unpaced: wall time allowed per second of belt


def belt_kinds(settings: Settings, config_path: str) -> dict[str, str] | None:
    """kind -> node name for the belt graph's nodes; None (and a line saying why) if one is missing."""
    kinds = {n.kind: name for name, n in settings.nodes.items()}
    missing = [k for k in NEEDED if k not in kinds]
    if missing:
        print(f"sortline: this needs a graph with simulate, ejector and valve_sim nodes; {config_path} has no "
              f"{', '.join(missing)} (configs/demo.toml has them)", file=sys.stderr)
        return None
    return kinds


PRIORITIES = ("recovery", "balanced", "purity")   # --sweep priority: the recipe's knob, one run each


def belt_run(kinds: dict[str, str], args, speed: float, occupancy: float | None, score_path: Path,
             samples_path: Path | None = None, priority: str | None = None):
    """The rewrite for a scored run of the synthetic belt: seed, length, speed, pacing, report paths, and
    the recipe's priority if given."""
    def rewrite(s: Settings) -> Settings:
        sim = {"seed": args.seed, "seconds": args.seconds, "paced": not args.unpaced, "speed_m_s": speed}
        if occupancy is not None:
            sim["occupancy"] = occupancy
        for name in common.nodes_of_kind(s, "simulate"):   # all of them: one belt, maybe split by camera
            s = common.with_params(s, name, **sim)
        s = common.with_params(s, kinds["valve_sim"], report=str(score_path))
        if samples_path:
            for name in common.nodes_of_kind(s, "ejector"):
                s = common.with_params(s, name, samples=str(samples_path))
        # The machine runs at this speed: the nominal figures (budget, first speed estimate) follow. A scored
        # run is no machine for a PLC to watch: no OPC UA server (its port may be the running machine's).
        update = {"belt": s.belt.model_copy(update={"speed_m_s": speed}),
                  "opcua": s.opcua.model_copy(update={"enabled": False})}
        if priority is not None:
            update["recipe"] = s.recipe.model_copy(update={"priority": priority})
        s = s.model_copy(update=update)
        return common.by_position(s) if args.unpaced else s   # the belt waits: decide and send by position
    return rewrite


def ejector_status(run: dict) -> dict:
    """The ejector's final status in a supervisor report."""
    return next((n["status"] for n in run.get("nodes", {}).values() if n.get("kind") == "ejector"), {})


def score_row(score: dict, run: dict, speed: float, occupancy, priority: str, args) -> dict:
    """One flat row: the valve-bar simulator's score, the ejector's late commands, latency, and the air
    per recovered target (valve-open ms)."""
    ejector = ejector_status(run)
    hit = score.get("hit_targets", 0)
    return {"speed_m_s": speed, "occupancy": occupancy, "priority": priority, "seconds": args.seconds,
            "seed": args.seed, "paced": not args.unpaced,
            **{k: v for k, v in score.items() if not isinstance(v, (dict, list))},
            "air_per_recovered_ms": round(1000 * score["air_valve_s"] / hit, 2) if hit else None,
            "late": ejector.get("late", 0) + score.get("late_arrivals", 0),
            "decision_p50_ms": ejector.get("decision_p50_ms"), "decision_p99_ms": ejector.get("decision_p99_ms"),
            "lead_p50_ms": ejector.get("lead_p50_ms"), "lead_min_ms": ejector.get("lead_min_ms"),
            **{f"recovery_look_{look}": v for look, v in score.get("recovery_by_look", {}).items()},
            **{f"hit_other_{cls}": n for cls, n in score.get("hit_others_by_class", {}).items()}}


def score_table(rows: list[dict]) -> str:
    def pct(v):
        return "–" if v is None else f"{100 * v:.1f} %"
    out = ["| speed m/s | occupancy | priority | targets | recovery | recovery, black excluded | purity "
           "| purity (area) | late | missed | air valve-s | air ms per recovered | decision p50/p99 ms |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        occ = "default" if r["occupancy"] is None else f"{r['occupancy']:g}"
        out.append(f"| {r['speed_m_s']:g} | {occ} | {r['priority']} | {r['targets']} | {pct(r['recovery'])} | "
                   f"{pct(r.get('recovery_not_black'))} ({r.get('black_targets', 0)} black) | {pct(r['purity'])} | "
                   f"{pct(r['purity_area'])} | {r['late']} | {r['missed']} | {r['air_valve_s']:.1f} | "
                   f"{r['air_per_recovered_ms']} | {r['decision_p50_ms']} / {r['decision_p99_ms']} |")
    return "\n".join(out)


def score(args) -> int:
    settings = common.load(args.config)
    kinds = belt_kinds(settings, args.config)
    if kinds is None:
        return EX_CONFIG
    speeds = args.speeds or [args.speed or settings.belt.speed_m_s]
    occupancies = [float(v) for v in args.occupancies.split(",")] if args.occupancies else [args.occupancy]
    priorities = PRIORITIES if args.sweep == "priority" else [None]
    if args.plot and len(priorities) == 1:
        print("sortline: score: --plot draws the curve of a --sweep", file=sys.stderr)
        return 2
    if args.plot and importlib.util.find_spec("matplotlib") is None:   # before the runs, not after them
        print("sortline: score: --plot needs matplotlib: pip install 'sortline[plots]'", file=sys.stderr)
        return 2
    rows = []
    for speed, occupancy, priority in ((s, o, p) for s in speeds for o in occupancies for p in priorities):
        with tempfile.TemporaryDirectory(prefix="sortline-score-") as tmp:
            score_path, run_path = Path(tmp) / "score.json", Path(tmp) / "run.json"
            # Paced, the belt takes its own time; unpaced, it waits for the slowest stage, which on a CPU
            # can be far slower than the belt (the production twin's model).
            limit = args.seconds * (UNPACED_SLOWDOWN if args.unpaced else 1) + 30
            rc = common.run_rewritten(settings, belt_run(kinds, args, speed, occupancy, score_path,
                                                         priority=priority), limit, str(run_path))
            if rc != 0 or not score_path.exists():
                print(f"sortline: score: the run at {speed:g} m/s failed (exit {rc})", file=sys.stderr)
                return rc or 1
            run = json.loads(run_path.read_text())
            states = {name: run.get("nodes", {}).get(name, {}).get("state")
                      for name in common.nodes_of_kind(settings, "simulate")}
            unfinished = ", ".join(f"{name} {state}" for name, state in states.items() if state != "finished")
            if unfinished:
                print(f"sortline: score: the run at {speed:g} m/s was stopped after {limit:g} s, before its "
                      f"{args.seconds:g} s of belt were through ({unfinished}): no score", file=sys.stderr)
                return 1
            rows.append(score_row(json.loads(score_path.read_text()), run, speed, occupancy,
                                  priority or settings.recipe.priority, args))
    print(score_table(rows))
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
    if args.plot:
        plot_curve(rows, Path(args.plot))
        print(f"the recovery-purity-air curve: {args.plot}")
    return 0


def plot_curve(rows: list[dict], path: Path) -> None:
    """Left: recovery against purity, one line per speed and occupancy through the priorities; right: the
    air each recovered target cost, by priority."""
    import matplotlib
    matplotlib.use("Agg")       # files only: no display on a machine's controller
    import matplotlib.pyplot as plt

    fig, (curve, air) = plt.subplots(1, 2, figsize=(12, 5), dpi=100)
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if r["recovery"] is not None and r["purity"] is not None:
            groups.setdefault((r["speed_m_s"], r["occupancy"]), []).append(r)
    for (speed, occ), runs in groups.items():
        label = f"{speed:g} m/s, occupancy {'default' if occ is None else f'{occ:g}'}"
        line, = curve.plot([100 * r["purity"] for r in runs], [100 * r["recovery"] for r in runs], "o-", label=label)
        for i, r in enumerate(runs):   # staggered: settings that score the same would print over each other
            curve.annotate(r["priority"], (100 * r["purity"], 100 * r["recovery"]), textcoords="offset points",
                           xytext=(6, 6 - 11 * i), fontsize=8, color=line.get_color())
        air.plot([r["priority"] for r in runs], [r["air_per_recovered_ms"] for r in runs], "o-", label=label)
    curve.set_xlabel("purity, % of hit objects that are targets")
    curve.set_ylabel("recovery, % of targets hit")
    air.set_xlabel("recipe priority")
    air.set_ylabel("air per recovered target, valve-open ms")
    first = rows[0]
    fig.suptitle(f"sortline score --sweep priority: {first['seconds']:g} s of belt, seed {first['seed']}"
                 f"{', paced' if first['paced'] else ', unpaced (decisions alone)'}")
    for ax in (curve, air):
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def add(sub) -> None:
    p = sub.add_parser("score", help="run the whole pipeline on the synthetic belt and score the air against the truth",
                       description="Run the config's graph (it needs a simulate and a valve_sim node, as "
                       "configs/demo.toml has) for --seconds of belt at the belt's own pace, then print what the "
                       "valve-bar simulator measured: recovery (targets hit by air over enough of their area), "
                       "purity (hit objects that are targets, by count and by area), late and missed commands, "
                       "air use, and the decision latency. --speeds and --occupancies make a table of runs.")
    common.add_config(p)
    p.add_argument("--seconds", type=common.seconds, default=20.0, help="belt time per run (default 20)")
    p.add_argument("--speed", type=common.belt_speed, default=None, help="belt speed, m/s (default: the config's)")
    p.add_argument("--seed", type=int, default=1, help="the synthetic belt's seed (default 1)")
    p.add_argument("--occupancy", type=float, default=None, help="belt occupancy (default: the config's)")
    p.add_argument("--speeds", type=lambda text: [common.belt_speed(v) for v in text.split(",")], default=[],
                   help="comma-separated speeds: one run each (a table)")
    p.add_argument("--occupancies", default="", help="comma-separated occupancies: one run each (a table)")
    p.add_argument("--unpaced", action="store_true",
                   help="let the belt wait for the pipeline: scores decisions alone, not timing (says so)")
    p.add_argument("--sweep", choices=["priority"], default=None,
                   help="priority: one run per recipe priority (recovery, balanced, purity) at each speed and "
                   "occupancy: the recovery-purity-air curve")
    p.add_argument("--plot", default=None, help="with --sweep: draw the curve into this PNG file")
    p.add_argument("--json", default=None, help="write the figures here (one flat object; {runs: [...]} for a table)")
    p.set_defaults(func=score)
