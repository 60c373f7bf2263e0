"""The hardware-in-the-loop latency report: what `sortline hil` measures and how it says it.

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

import cv2
import numpy as np


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
    exposure, sent, deadline, missed = cmds.T
    e2e = (sent - exposure) / 1e6
    lead = (deadline - sent) / 1e6
    refused, left_late = int(missed.sum()), int(((missed == 0) & (lead < 0)).sum())
    figures = {"samples": int(len(cmds)), "budget_ms": budget_ms,
               "deadline_misses": refused + left_late + late_at_valves, "refused_late": refused,
               "sent_after_deadline": left_late, "late_at_valves": late_at_valves,
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
