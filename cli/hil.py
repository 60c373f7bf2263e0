"""`sortline hil`: the hardware-in-the-loop latency report, what it measures and how it says it.

Every command the ejector sends (or refuses) is one sample: the exposure time
of the last camera line it was decided on (the first entry of its trace: the
source's acquisition time on the host clock, not when some reader loop ran),
the time it left for the driver, and its deadline. End-to-end latency is
exposure → command sent. By design a command is held until `send_ahead_ms`
before its deadline (so that a change of belt speed is still followed), so
the report also gives the decision latency (exposure → the ejector has the
command ready) and per-stage times from the traces, and how far ahead of its
deadline each command left. A command that left after its deadline (or was
refused for it) is a deadline miss.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from sortline.pipeline import metrics
from sortline.cli import common
from sortline.cli.score import belt_kinds, belt_run
from sortline.pipeline.config import EX_CONFIG


def _stats(ms: np.ndarray, prefix: str) -> dict:
    if len(ms) == 0:
        return {}
    p = np.percentile(ms, [10, 50, 90, 95, 99, 99.9, 100])
    return {f"{prefix}_p50_ms": p[1], f"{prefix}_p99_ms": p[4], f"{prefix}_p999_ms": p[5], f"{prefix}_max_ms": p[6],
            f"{prefix}_tail_ms": p[6] - p[3], f"{prefix}_flatness_ms": p[2] - p[0]}


def analyse(samples_path: str, budget_ms: float, seconds: float, late_at_valves: int = 0) -> tuple[dict, dict]:
    """(flat figures, arrays for the pictures) from the ejector's samples file.

    Deadline misses: commands the ejector refused, commands that left after their deadline (the
    sender was held up between deciding to send and sending), and, where the valve bar reports
    it (the valve-bar simulator's kernel receive times), datagrams that reached it too late.
    """
    z = np.load(samples_path)
    cmds, traces, stages = z["commands"], z["traces"], [str(s) for s in z["stages"]]
    exposure, sent, deadline, missed, objects = cmds.T
    e2e = (sent - exposure) / 1e6
    lead = (deadline - sent) / 1e6
    refused, left_late = int(missed.sum()), int(((missed == 0) & (lead < 0)).sum())
    figures = {"samples": int(len(cmds)), "budget_ms": budget_ms,
               "deadline_misses": refused + left_late + late_at_valves, "refused_late": refused,
               "sent_after_deadline": left_late, "late_at_valves": late_at_valves,
               # the objects commands went out for: ids are unique within a run
               "ejected_objects": int(len(np.unique(objects[missed == 0]))),
               "commands_per_s": round(len(cmds) / seconds, 1) if seconds else None}
    figures.update(_stats(e2e, "e2e"))
    figures.update(_stats(lead[missed == 0], "lead"))
    if (missed == 0).any():
        figures["lead_min_ms"] = float(lead[missed == 0].min())
    if len(traces):
        arrival, t = traces[:, 0], traces[:, 1:]
        figures.update(_stats((arrival - t[:, 0]) / 1e6, "decision"))
        figures["decisions"] = int(len(traces))
        for i, name in enumerate(stages):
            work = (t[:, 2 * i + 1] - t[:, 2 * i]) / 1e6
            figures[f"stage_{name}_p50_ms"] = float(np.percentile(work, 50))
            figures[f"stage_{name}_p99_ms"] = float(np.percentile(work, 99))
            if i + 1 < len(stages):   # waiting in the queue (and the hop) to the next stage
                wait = (t[:, 2 * i + 2] - t[:, 2 * i + 1]) / 1e6
                figures[f"queue_{name}_p99_ms"] = float(np.percentile(wait, 99))
    figures = {k: (round(float(v), 3) if isinstance(v, (float, np.floating)) else v) for k, v in figures.items()}
    # No commands at all is no evidence of anything: it fails too.
    figures["within_budget"] = bool(len(cmds) > 0 and figures["deadline_misses"] == 0
                                    and figures["e2e_p999_ms"] <= budget_ms)
    return figures, {"e2e": e2e, "lead": lead, "t": (sent - sent.min()) / 1e9 if len(sent) else sent}


def draw(figures: dict, arrays: dict, path: str) -> None:
    """Histogram of end-to-end latency (budget marked) above a timeline of it."""
    import cv2

    w, h, pad = 1000, 640, 60
    img = np.full((h, w, 3), 255, np.uint8)
    e2e, t = arrays["e2e"], arrays["t"]
    top = max(figures["budget_ms"] * 1.1, float(np.max(e2e)) if len(e2e) else 1.0)
    # Histogram.
    hist, edges = np.histogram(e2e, bins=100, range=(0, top))
    hh = 240
    scale = hh / max(hist.max(), 1) if len(hist) else 1
    for i, n in enumerate(hist):
        x0 = pad + int(i / 100 * (w - 2 * pad))
        x1 = pad + int((i + 1) / 100 * (w - 2 * pad))
        cv2.rectangle(img, (x0, 40 + hh - int(n * scale)), (max(x1 - 1, x0), 40 + hh), (180, 120, 40), -1)
    bx = pad + int(figures["budget_ms"] / top * (w - 2 * pad))
    cv2.line(img, (bx, 30), (bx, 40 + hh), (0, 0, 220), 2)
    cv2.putText(img, f"end-to-end ms (exposure -> command sent), {figures['samples']} commands; red: budget "
                f"{figures['budget_ms']:.0f} ms", (pad, 25), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 1)
    for ms in np.linspace(0, top, 6):
        x = pad + int(ms / top * (w - 2 * pad))
        cv2.putText(img, f"{ms:.0f}", (x - 10, 40 + hh + 18), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1)
    # Timeline.
    y0, y1 = 340, h - 40
    cv2.rectangle(img, (pad, y0), (w - pad, y1), (0, 0, 0), 1)
    span = float(t.max()) if len(t) else 1.0
    if len(t):
        xs = (pad + t / max(span, 1e-9) * (w - 2 * pad)).astype(int)
        ys = (y1 - np.clip(e2e / top, 0, 1) * (y1 - y0)).astype(int)
        img[np.clip(ys, y0, y1 - 1), np.clip(xs, pad, w - pad - 1)] = (180, 120, 40)
    by = int(y1 - figures["budget_ms"] / top * (y1 - y0))
    cv2.line(img, (pad, by), (w - pad, by), (0, 0, 220), 1)
    cv2.putText(img, f"end-to-end ms over the run ({span:.0f} s)", (pad, y0 - 8), cv2.FONT_HERSHEY_SIMPLEX, 0.5,
                (0, 0, 0), 1)
    cv2.imwrite(path, img)


def markdown(figures: dict, command: str) -> str:
    verdict = "**within budget**" if figures["within_budget"] else "**OUT OF BUDGET**"
    rows = [("end-to-end (exposure → command sent)", "e2e"), ("decision (exposure → command ready)", "decision"),
            ("lead (command sent → its deadline)", "lead")]
    out = [f"# Latency report: {verdict}", "", f"`{command}`", "",
           f"{figures['samples']} commands, {figures['deadline_misses']} deadline misses "
           f"({figures.get('refused_late', 0)} refused, {figures.get('sent_after_deadline', 0)} sent after their "
           f"deadline, {figures.get('late_at_valves', 0)} late at the valve bar), budget "
           f"{figures['budget_ms']:.1f} ms; least lead {figures.get('lead_min_ms', float('nan')):.1f} ms.", "",
           "| | p50 | p99 | p99.9 | max | tail (max − p95) | flatness (p90 − p10) |", "|---|---|---|---|---|---|---|"]
    for label, key in rows:
        if f"{key}_p50_ms" in figures:
            out.append(f"| {label} | " + " | ".join(f"{figures[f'{key}_{s}_ms']:.1f}" for s in
                                                     ("p50", "p99", "p999", "max", "tail", "flatness")) + " |")
    stages = [k[len("stage_"):-len("_p50_ms")] for k in figures if k.startswith("stage_") and k.endswith("_p50_ms")]
    if stages:
        out += ["", "| stage | work p50 ms | work p99 ms | queue to next p99 ms |", "|---|---|---|---|"]
        for s in stages:
            q = figures.get(f"queue_{s}_p99_ms")
            out.append(f"| {s} | {figures[f'stage_{s}_p50_ms']:.2f} | {figures[f'stage_{s}_p99_ms']:.2f} | "
                       f"{'' if q is None else f'{q:.2f}'} |")
    return "\n".join(out) + "\n"


def default_out() -> Path:
    """Reports go outside the checkout unless --out says otherwise: the XDG state directory."""
    state = Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state")
    return state / "sortline" / "reports" / time.strftime("hil-%Y%m%d-%H%M%S")


def hil(args) -> int:
    """Latency of the real processes at the real line rate, from exposure to the command leaving."""
    settings = common.load(args.config)
    kinds = belt_kinds(settings, args.config)
    if kinds is None:
        return EX_CONFIG
    if args.quick:
        args.seconds = 10.0
    args.unpaced = False
    speed = args.speed or settings.belt.speed_m_s
    budget = settings.budget_ms(speed)
    out = Path(args.out) if args.out else default_out()
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="sortline-hil-") as tmp:
        samples, score = Path(tmp) / "samples.npz", Path(tmp) / "score.json"
        rc = common.run_rewritten(settings, belt_run(kinds, args, speed, None, score, samples), args.seconds + 30,
                                  str(out / "run.json"))
        if rc != 0 or not samples.exists():
            print(f"sortline: hil: the run failed (exit {rc})", file=sys.stderr)
            return rc or 1
        late_at_valves = json.loads(score.read_text()).get("late_arrivals", 0) if score.exists() else 0
        figures, arrays = analyse(str(samples), budget, args.seconds, late_at_valves)
    run = json.loads((out / "run.json").read_text())
    figures["ejections_total"] = sum(metrics.total(n.get("metrics", {}), "sortline_ejections_total")
                                     for n in run["nodes"].values())
    command = (f"sortline hil --config {args.config} --speed {speed:g} --seconds {args.seconds:g} --seed {args.seed}")
    figures.update(speed_m_s=speed, seconds=args.seconds, budget_derivation=settings.budget_derivation(speed))
    draw(figures, arrays, str(out / "hil.png"))
    (out / "hil.md").write_text(markdown(figures, command) + f"\nBudget: {settings.budget_derivation(speed)}\n")
    (out / "hil.json").write_text(json.dumps(figures, indent=2) + "\n")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")
    print(markdown(figures, command))
    print(f"budget: {settings.budget_derivation(speed)}")
    print(f"report: {out}/hil.md, hil.png, hil.json")
    if args.quick and figures["samples"] < 10_000:
        print(f"(--quick: {figures['samples']} samples; a full run gives at least 10,000)")
    return 0 if figures["within_budget"] else 1


def add(sub) -> None:
    p = sub.add_parser("hil", help="latency from exposure to valve command, at the real line rate, with a report",
                       description="Feed the synthetic belt at its real line rate through the config's graph "
                       "(real processes, to the valve driver) and measure, for every command, the time from the "
                       "exposure of the last line it was decided on to the command leaving for the driver, how "
                       "far ahead of its deadline it left, and per-stage times. Writes hil.json, hil.png and "
                       "hil.md to --out; exit 1 when the budget is exceeded or a deadline missed. "
                       "See docs/latency.md for the same test on a real machine.")
    common.add_config(p)
    p.add_argument("--seconds", type=common.seconds, default=120.0, help="belt time (default 120: >10,000 commands)")
    p.add_argument("--quick", action="store_true", help="a short run (10 s)")
    p.add_argument("--speed", type=common.belt_speed, default=None, help="belt speed, m/s (default: the config's)")
    p.add_argument("--seed", type=int, default=1, help="the synthetic belt's seed (default 1)")
    p.add_argument("--out", default=None, help="folder for the report (default: a new folder under "
                   "$XDG_STATE_HOME/sortline/reports, ~/.local/state when unset)")
    p.add_argument("--json", default=None, help="also write the figures here")
    p.set_defaults(func=hil)
