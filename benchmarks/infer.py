"""Inference speed on CPU: strips/s of the infer node's model call against the belt's need.

The infer node spends its time in one call per strip: backend.run(rgb, hsi),
which converts the strip, runs the model and converts the mask back. This
times that call for the demo-profile strip (64 lines + 2 x 16 overlap, 640
pixels; HSI 24 x 160 x 32 bands; the mask on 4 x 4 pixel cells) with the
config's model on held-out synthetic strips, in this
process pinned to CPU 0 with one thread (the other core runs the rest of the
pipeline), for two backends in the same run:

- ONNX Runtime (the CPU backend the node uses), one intra-op thread;
- torch eager, one thread (the baseline).

The need is the belt's: at 3 m/s the demo RGB camera runs 3200 lines/s, so
3200 / 64 = 50 strips/s. `infer_cpu_realtime_factor` is ONNX Runtime's
strips/s over that; `ort_vs_torch` is ONNX Runtime's strips/s over torch's.

    python benchmarks/infer.py [--quick] [--json PATH] [--model CKPT] [--speed 3] [--profile DIR]

--profile DIR writes ONNX Runtime's per-operator profile there (off unless asked for).
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

from sortline.calibration.spectral import bin_bands  # noqa: E402
from sortline.models.backends import open_backend  # noqa: E402
from sortline.models.contract import StripShape, model_file  # noqa: E402
from sortline.nodes.simulate import Simulation  # noqa: E402
from sortline.pipeline.graph import load_config  # noqa: E402



def held_out_strips(settings, count: int):
    m = settings.model
    lines = m.strip_lines + 2 * m.overlap_lines
    sim = Simulation(settings, seed=1100, occupancy=0.5)
    out = []
    for i in range(count):
        s = sim.strip(i * m.strip_lines, lines)
        out.append((s["rgb"], bin_bands(s["hsi"], m.bands, dtype=np.float16)))
    return out


def arguments(doc: str) -> argparse.ArgumentParser:
    """What the model benchmarks share: --quick, --json, the model, the machine, the belt speed."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a short run (under a minute)")
    parser.add_argument("--json", metavar="PATH", help="write the figures as one flat JSON object")
    parser.add_argument("--model", default="shipped:belt-fusion-nano.safetensors",
                        help="checkpoint (default: the demo profile's, shipped with sortline)")
    parser.add_argument("--config", default=str(ROOT / "configs" / "demo.toml"), help="machine config (strip size)")
    parser.add_argument("--speed", type=float, default=3.0, help="belt speed, m/s (default 3: the stress case)")
    return parser


def time_backend(backend, strips, runs: int) -> list[float]:
    for rgb, hsi in strips[:2]:            # warm-up: allocations, first-run kernel choices
        backend.run(rgb, hsi)
    times = []
    for i in range(runs):
        rgb, hsi = strips[i % len(strips)]
        t0 = time.perf_counter()
        backend.run(rgb, hsi)
        times.append(time.perf_counter() - t0)
    return times


def gmac(path: Path, shape: StripShape) -> float:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from sortline.models.training import checkpoint
    from sortline.models.net import Deployed

    net, _ = checkpoint.load(path)
    rgb = torch.zeros(shape.rgb)
    hsi = torch.zeros(shape.hsi)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        Deployed(net, shape.overlap, shape.stride)(rgb, hsi)
    return counter.get_total_flops() / 2e9


def main() -> int:
    parser = arguments(__doc__)
    parser.add_argument("--profile", metavar="DIR", default="", help="write ONNX Runtime's profile here")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)
    settings = load_config(args.config)
    model = model_file(args.model)
    shape = StripShape.from_machine(settings)
    strips = held_out_strips(settings, 4 if args.quick else 8)
    runs_ort, runs_torch = (40, 15) if args.quick else (200, 60)

    ort = open_backend("onnxruntime", model, shape, threads=1)
    if args.profile:
        from sortline.models.backends import exported
        from sortline.models.backends.onnxruntime import OnnxRuntimeBackend

        Path(args.profile).mkdir(parents=True, exist_ok=True)
        ort = OnnxRuntimeBackend(exported(model, shape), threads=1, profile=str(Path(args.profile) / "ort"))
    t_ort = time_backend(ort, strips, runs_ort)
    if args.profile:
        print(f"ONNX Runtime profile: {ort.end_profiling()}")
    ref = open_backend("torch", model, shape, threads=1)
    t_torch = time_backend(ref, strips, runs_torch)

    needed = settings.line_rate_hz("rgb", args.speed) / settings.model.strip_lines
    ort_rate, torch_rate = 1 / statistics.median(t_ort), 1 / statistics.median(t_torch)
    figures = {
        "speed_m_s": args.speed,
        "strip_lines": settings.model.strip_lines,
        "overlap_lines": settings.model.overlap_lines,
        "width": shape.width,
        "model": ort.model_hash,
        "gmac": round(gmac(model, shape), 3),
        "strips_per_s_needed": round(needed, 2),
        "ort_ms_p50": round(statistics.median(t_ort) * 1000, 2),
        "ort_ms_p90": round(float(np.percentile(t_ort, 90)) * 1000, 2),
        "ort_strips_per_s": round(ort_rate, 2),
        "torch_ms_p50": round(statistics.median(t_torch) * 1000, 2),
        "torch_ms_p90": round(float(np.percentile(t_torch, 90)) * 1000, 2),
        "torch_strips_per_s": round(torch_rate, 2),
        "infer_cpu_realtime_factor": round(ort_rate / needed, 3),
        "ort_vs_torch": round(ort_rate / torch_rate, 3),
        "runs_ort": runs_ort,
        "runs_torch": runs_torch,
    }
    print(f"demo strip {shape.rgb[1]}x{shape.rgb[2]} (+HSI {shape.hsi[1]}x{shape.hsi[2]}x{shape.hsi[3]}), "
          f"{figures['gmac']:.2f} GMAC, one thread on one core:")
    print(f"  ONNX Runtime: {figures['ort_ms_p50']:.1f} ms p50, {figures['ort_ms_p90']:.1f} ms p90 -> "
          f"{ort_rate:.1f} strips/s; need {needed:.1f} at {args.speed:g} m/s: "
          f"{figures['infer_cpu_realtime_factor']:.2f}x real time")
    print(f"  torch eager:  {figures['torch_ms_p50']:.1f} ms p50, {figures['torch_ms_p90']:.1f} ms p90 -> "
          f"{torch_rate:.1f} strips/s; ONNX Runtime / torch = {figures['ort_vs_torch']:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
