"""Simulator speed: lines generated per second against the lines per second a belt needs.

The synthetic belt must run at least in real time on one core (the other is
the pipeline's), at the stress speed of 3 m/s for the demo profile. This
generates RGB frames, HSI frames and the ground truth for a stretch of belt,
as the simulate node does, in this process pinned to CPU 0, and divides the
belt time simulated by the wall time it took.

The baseline is the belt itself: the line rate the profile needs at that
speed (RGB lines/s = speed / RGB line pitch, HSI likewise), computed from
the same config. The production profile is reported too (it is meant for a
GPU box with more cores; one core there is not the target), and each of
its cameras alone, as the twin plays them: one simulate node per camera
(`cameras = ["rgb"]` with the truth, `cameras = ["hsi"]`), one core each.

    python benchmarks/simulate.py [--quick] [--json PATH] [--speed 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
# One core, as on the machine: pin before numpy starts its BLAS threads.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
if hasattr(os, "sched_setaffinity"):
    os.sched_setaffinity(0, {0})

from sortline.nodes.simulate import Simulation  # noqa: E402
from sortline.pipeline.graph import load_config  # noqa: E402


def measure(config: Path, speed: float, belt_m: float, cameras: tuple[str, ...] = ("rgb", "hsi")) -> dict:
    """Generate `belt_m` of belt for these cameras (the truth with RGB) as one simulate node does."""
    settings = load_config(config)
    sim = Simulation(settings, seed=1, speed_m_s=speed, cameras=cameras)
    rgb, hsi, tpm = settings.cameras.rgb, settings.cameras.hsi, settings.belt.ticks_per_mm
    rgb_span, hsi_span = rgb.lines_per_frame * rgb.ticks_per_line, hsi.lines_per_frame * hsi.ticks_per_line
    end = int(belt_m * 1000 * tpm)
    # Warm-up (noise bank, first tiles) with frame 0; a camera not played is done from the start.
    f_rgb, f_hsi = 1, 1
    for camera in cameras:
        getattr(sim, camera)(0)
    if "rgb" not in cameras:
        f_rgb = end // rgb_span + 1
    if "hsi" not in cameras:
        f_hsi = end // hsi_span + 1
    first_rgb, first_hsi = f_rgb, f_hsi
    t0, c0 = time.perf_counter(), time.process_time()
    while f_rgb * rgb_span < end or f_hsi * hsi_span < end:
        # Interleaved by belt position, as the node emits them.
        if f_rgb * rgb_span <= f_hsi * hsi_span:
            sim.rgb(f_rgb)
            sim.truth(f_rgb)
            f_rgb += 1
        else:
            sim.hsi(f_hsi)
            f_hsi += 1
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    belt_s = (end - rgb_span) / tpm / 1000 / speed
    return {
        "wall_s": wall,
        "belt_s": belt_s,
        "rgb_lines_per_s": (f_rgb - first_rgb) * rgb.lines_per_frame / wall,
        "hsi_lines_per_s": (f_hsi - first_hsi) * hsi.lines_per_frame / wall,
        "rgb_lines_per_s_needed": settings.line_rate_hz("rgb", speed),
        "hsi_lines_per_s_needed": settings.line_rate_hz("hsi", speed),
        "realtime_factor": belt_s / wall,
        "realtime_factor_cpu": belt_s / cpu,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a short run (under a minute)")
    parser.add_argument("--json", metavar="PATH", help="write the figures as one flat JSON object")
    parser.add_argument("--speed", type=float, default=3.0, help="belt speed, m/s (default 3: the stress case)")
    parser.add_argument("--runs", type=int, default=3, help="runs; medians are reported (default 3)")
    args = parser.parse_args()
    belt_m, split_m = (6.0, 2.0) if args.quick else (30.0, 15.0)
    runs = 1 if args.quick else args.runs

    figures: dict[str, float] = {"speed_m_s": args.speed, "belt_m": belt_m}
    for profile in ("demo", "production"):
        results = [measure(ROOT / "configs" / f"{profile}.toml", args.speed, belt_m) for _ in range(runs)]
        med = {k: statistics.median(r[k] for r in results) for k in results[0]}
        prefix = "" if profile == "demo" else "production_"
        for k in ("rgb_lines_per_s", "hsi_lines_per_s", "rgb_lines_per_s_needed", "hsi_lines_per_s_needed"):
            figures[f"{prefix}{k}"] = round(med[k], 1)
        figures[f"{prefix}simulate_realtime_factor"] = round(med["realtime_factor"], 3)
        figures[f"{prefix}simulate_realtime_factor_cpu"] = round(med["realtime_factor_cpu"], 3)
        print(f"{profile:10s} at {args.speed:g} m/s: RGB {med['rgb_lines_per_s']:,.0f} lines/s generated "
              f"(needs {med['rgb_lines_per_s_needed']:,.0f}), HSI {med['hsi_lines_per_s']:,.0f} "
              f"(needs {med['hsi_lines_per_s_needed']:,.0f}): {med['realtime_factor']:.2f}x real time on one core "
              f"({belt_m:g} m of belt in {med['wall_s']:.2f} s, median of {runs}); {med['realtime_factor_cpu']:.2f}x "
              f"per CPU second used")
    # The twin's split: one node (one core) per camera, the truth with the RGB one.
    for camera in ("rgb", "hsi"):
        results = [measure(ROOT / "configs" / "production.toml", args.speed, split_m, (camera,)) for _ in range(runs)]
        med = {k: statistics.median(r[k] for r in results) for k in results[0]}
        figures[f"production_{camera}_lines_per_s"] = round(med[f"{camera}_lines_per_s"], 1)
        figures[f"production_{camera}_realtime_factor"] = round(med["realtime_factor"], 3)
        figures[f"production_{camera}_realtime_factor_cpu"] = round(med["realtime_factor_cpu"], 3)
        print(f"production {camera} alone{' (and the truth)' if camera == 'rgb' else ''}: "
              f"{med[f'{camera}_lines_per_s']:,.0f} lines/s generated "
              f"(needs {med[f'{camera}_lines_per_s_needed']:,.0f}): "
              f"{med['realtime_factor']:.2f}x real time on one core ({split_m:g} m of belt in {med['wall_s']:.2f} s); "
              f"{med['realtime_factor_cpu']:.2f}x per CPU second used")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
