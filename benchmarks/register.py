"""Register node speed and co-registration accuracy, demo profile.

Speed: the register node's work (HSI counts → reflectance → binned bands,
pairing by position, RGB strip assembly, HSI resampling onto the RGB grid)
for a stretch of simulated belt, frames generated beforehand, timed alone in
this process pinned to one core. The baseline is the belt: strips per second
the profile needs at 3 m/s (RGB lines/s over strip_lines).

Accuracy: the spatial calibration fitted on the simulated target, against
the simulator's true geometry at every HSI pixel: the worst cross-belt error
in HSI pixels and the worst along-belt error in RGB lines.

    python benchmarks/register.py [--quick] [--json PATH]
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
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
if hasattr(os, "sched_setaffinity"):
    os.sched_setaffinity(0, {0})

import numpy as np  # noqa: E402

from sortline.calibration.spatial import Geometry, blobs_from_frames, fit  # noqa: E402
from sortline.calibration.spectral import SpectralReference  # noqa: E402
from sortline.nodes.register import StripCutter  # noqa: E402
from sortline.nodes.simulate import Simulation  # noqa: E402
from sortline.nodes.simulate.cameras import Misregistration  # noqa: E402
from sortline.pipeline.graph import load_config  # noqa: E402


def calibrate(settings, mis: Misregistration, frames: int = 64):
    rgb, hsi, tpm = settings.cameras.rgb, settings.cameras.hsi, settings.belt.ticks_per_mm
    target = Simulation(settings, seed=2, scene="target", misregistration=mis)
    rf = [(target.position("rgb", f), target.rgb(f)) for f in range(frames)]
    hf = [(target.position("hsi", f), target.hsi(f)) for f in range(frames)]
    spatial = fit(blobs_from_frames(rf, rgb.ticks_per_line, rgb.mm_per_pixel, rgb.ticks_per_line / tpm),
                  blobs_from_frames(hf, hsi.ticks_per_line, hsi.mm_per_pixel, hsi.ticks_per_line / tpm),
                  Geometry.from_machine(settings))
    dark = np.concatenate([Simulation(settings, seed=2, scene="dark").hsi(f) for f in range(8)])
    white = np.concatenate([Simulation(settings, seed=2, scene="white").hsi(f) for f in range(8)])
    return SpectralReference.from_frames(dark, white, white_reflectance=0.92), spatial


def true_error(settings, mis: Misregistration, spatial) -> tuple[float, float]:
    rgb, hsi, belt = settings.cameras.rgb, settings.cameras.hsi, settings.belt
    u = np.arange(hsi.pixels) + 0.5
    d = (u - hsi.pixels / 2) / (hsi.pixels / 2)
    x = belt.width_mm / 2 + mis.offset_mm + mis.scale * (u - hsi.pixels / 2) * hsi.mm_per_pixel * (1 + mis.distortion * d * d)
    scan = hsi.scan_line_mm - rgb.scan_line_mm + mis.scan_line_error_mm
    along = (-scan + np.tan(np.deg2rad(mis.rotation_deg)) * (x - belt.width_mm / 2)) * belt.ticks_per_mm
    across_hsi_px = np.abs(spatial.rgb_col(u) - x / rgb.mm_per_pixel).max() / (settings.hsi_ratio * mis.scale)
    along_lines = np.abs(spatial.along_ticks(u) - along).max() / rgb.ticks_per_line
    return float(across_hsi_px), float(along_lines)


def measure(settings, spectral, spatial, rgb_frames, hsi_frames, sim) -> float:
    cut = StripCutter(settings, spectral, spatial)
    strips = 0
    t0 = time.perf_counter()
    for f in range(len(rgb_frames)):
        cut.hsi(sim.position("hsi", f), hsi_frames[f], False)
        cut.rgb(sim.position("rgb", f), rgb_frames[f], False)
        strips += sum(1 for _ in cut.strips())
    return strips / (time.perf_counter() - t0), strips


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a short run (under a minute)")
    parser.add_argument("--json", metavar="PATH", help="write the figures as one flat JSON object")
    parser.add_argument("--runs", type=int, default=3, help="runs; medians are reported (default 3)")
    args = parser.parse_args()
    settings = load_config(ROOT / "configs" / "demo.toml")
    speed = 3.0
    needed = settings.line_rate_hz("rgb", speed) / settings.model.strip_lines

    mis = Misregistration()
    spectral, spatial = calibrate(settings, mis)
    across, along = true_error(settings, mis, spatial)

    frames = 48 if args.quick else 160
    sim = Simulation(settings, seed=3, misregistration=mis)
    rgb_frames = [sim.rgb(f) for f in range(frames)]
    hsi_frames = [sim.hsi(f) for f in range(frames)]
    runs = [measure(settings, spectral, spatial, rgb_frames, hsi_frames, sim) for _ in range(1 if args.quick else args.runs)]
    rate = statistics.median(r for r, _ in runs)
    figures = {
        "register_strips_per_s": round(rate, 1),
        "register_ms_per_strip": round(1000 / rate, 2),
        "register_strips_per_s_needed": round(needed, 2),
        "register_realtime_factor": round(rate / needed, 2),
        "residual_hsi_px": round(across, 3),
        "residual_along_rgb_lines": round(along, 3),
        "strips": runs[0][1],
    }
    print(f"register: {rate:.1f} strips/s ({1000 / rate:.2f} ms per strip of {settings.model.strip_lines}+2x"
          f"{settings.model.overlap_lines} lines) on one core; the demo profile at {speed:g} m/s needs {needed:.1f}: "
          f"{rate / needed:.1f}x real time")
    print(f"co-registration against the simulator's truth: worst across {across:.3f} HSI px, "
          f"worst along {along:.3f} RGB lines ({spatial.residuals['matches']} target marks)")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
