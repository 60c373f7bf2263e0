"""TensorRT on a GPU: build the engine, check it against ONNX Runtime, time it.

Needs an NVIDIA machine with the .[gpu] extra (TensorRT, pycuda); on any other
machine it says so and exits 2, unless --cpu-only. One prepared run:

1. export the checkpoint to ONNX at the config's strip size (`sortline export`),
   or take the one --onnx names;
2. build an FP16 engine with a timing cache (`sortline build-engine`) on GPU
   model.device (or --device), or take the one --engine names; with --int8 also
   an INT8 engine calibrated on held-out synthetic strips;
3. run ONNX Runtime on the CPU (the reference) on held-out strips, and time it;
4. run each engine on the same strips: share of pixels whose class agrees with
   ONNX Runtime, largest confidence difference; below --min-agreement it is a
   failure (exit 1);
5. time each engine's backend.run (host strip in as the register node makes it,
   host mask out: the copies are included) and report strips/s and p99 against
   the belt's need at --speed.

--cpu-only does 1 and 3 alone, on any machine: the dry run of benchmarks/gpu_check.sh.

    python benchmarks/tensorrt.py [--quick] [--json PATH] [--int8] [--config configs/production.toml]
        [--onnx model.onnx] [--engine model.engine] [--cpu-only]
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from benchmarks.infer import arguments, held_out_strips, time_backend  # noqa: E402
from sortline.models.contract import StripShape  # noqa: E402
from sortline.pipeline.graph import load_config  # noqa: E402

if hasattr(os, "sched_setaffinity"):   # benchmarks.infer pins to CPU 0 (its one-core figure); the reference takes 4
    os.sched_setaffinity(0, range(os.cpu_count() or 1))


def timing(times: list[float], needed: float, prefix: str) -> dict:
    rate = 1 / statistics.median(times)
    return {f"{prefix}_ms_p50": round(statistics.median(times) * 1000, 3),
            f"{prefix}_ms_p99": round(float(np.percentile(times, 99)) * 1000, 3),
            f"{prefix}_strips_per_s": round(rate, 1), f"{prefix}_realtime_factor": round(rate / needed, 3)}


def agreement(backend, strips, expected) -> tuple[float, int]:
    """Share of pixels whose class is the reference's, and the largest confidence difference (of 255)."""
    agree, diff = 0.0, 0
    for (rgb, hsi), (classes, conf) in zip(strips, expected):
        got_classes, got_conf = backend.run(rgb, hsi)
        agree += float((got_classes == classes).mean()) / len(strips)
        diff = max(diff, int(np.abs(got_conf.astype(int) - conf.astype(int)).max()))
    return agree, diff


def main() -> int:
    parser = arguments(__doc__)
    parser.add_argument("--int8", action="store_true", help="also build and check an INT8 engine")
    parser.add_argument("--workdir", default="", help="where the ONNX file, engines and timing cache go")
    parser.add_argument("--onnx", default="", help="an ONNX model from `sortline export` (default: export --model)")
    parser.add_argument("--engine", default="", help="an FP16 engine built from --onnx (default: build one)")
    parser.add_argument("--device", type=int, default=None, help="the GPU (default: the config's model.device)")
    parser.add_argument("--cpu-only", action="store_true", help="no TensorRT: the export and ONNX Runtime only")
    parser.add_argument("--min-agreement", type=float, default=0.99,
                        help="an engine whose classes agree with ONNX Runtime on fewer pixels fails (default 0.99)")
    args = parser.parse_args()
    if not args.cpu_only:
        try:
            import pycuda  # noqa: F401
            import tensorrt  # noqa: F401
        except ImportError as exc:
            print(f"benchmarks/tensorrt.py needs TensorRT and pycuda on an NVIDIA GPU (pip install -e '.[gpu]'), "
                  f"or --cpu-only: {exc}", file=sys.stderr)
            return 2
    from sortline.models.backends.onnxruntime import OnnxRuntimeBackend

    settings = load_config(args.config)
    shape = StripShape.from_machine(settings)
    device = settings.model.device if args.device is None else args.device
    work = Path(args.workdir or tempfile.mkdtemp(prefix="sortline-trt-"))
    work.mkdir(parents=True, exist_ok=True)
    onnx_path = Path(args.onnx) if args.onnx else export_model(args.model, shape, work / "model.onnx")
    strips = held_out_strips(settings, 4 if args.quick else 16)
    reference = OnnxRuntimeBackend(onnx_path, threads=4)
    reference.expect(shape)
    expected = [reference.run(rgb, hsi) for rgb, hsi in strips]
    needed = settings.line_rate_hz("rgb", args.speed) / settings.model.strip_lines
    figures: dict = {"profile": settings.profile, "strip": f"{shape.lines}x{shape.width}", "mask_stride": shape.stride,
                     "model_hash": reference.model_hash, "onnx_mb": round(onnx_path.stat().st_size / 1e6, 2),
                     "strips_per_s_needed": round(needed, 2), "strips": len(strips)}
    figures.update(timing(time_backend(reference, strips, 4 if args.quick else 16), needed, "ort_cpu"))
    print(f"ONNX Runtime (CPU, 4 threads): {figures['ort_cpu_ms_p50']:.1f} ms p50 a strip of {figures['strip']} "
          f"({figures['onnx_mb']} MB model {figures['model_hash']}); the belt needs {needed:.1f} strips/s at "
          f"{args.speed:g} m/s")
    failed = []
    if not args.cpu_only:
        failed = run_engines(args, settings, onnx_path, work, device, strips, expected, needed, figures)
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")
    for line in failed:
        print(f"benchmarks/tensorrt.py: {line}", file=sys.stderr)
    return 1 if failed else 0


def export_model(model: str, shape: StripShape, out: Path) -> Path:
    import torch

    from sortline.models.contract import model_file
    from sortline.models.training import checkpoint
    from sortline.models.training.export import export

    torch.set_num_threads(1)
    net, meta = checkpoint.load(model_file(model))
    return export(net, meta, shape, out)


def run_engines(args, settings, onnx_path: Path, work: Path, device: int, strips, expected, needed: float,
                figures: dict) -> list[str]:
    """Build (or take) each engine, check it against ONNX Runtime and time it; the failures, one line each."""
    import tensorrt

    from sortline.models.backends.tensorrt import TensorRTBackend, gpu_name
    from sortline.models.training.engine import build

    figures.update({"gpu": gpu_name(device), "device": device, "tensorrt": tensorrt.__version__})
    failed = []
    for precision in ["fp16"] + (["int8"] if args.int8 else []):
        given = precision == "fp16" and bool(args.engine)
        engine = Path(args.engine) if given else work / f"model-{precision}.engine"
        if not given:
            calib = ""
            if precision == "int8":   # the strips as the register node makes them; the calibrator casts to the inputs
                calib = work / "calib.npz"
                np.savez(calib, rgb=np.stack([s[0] for s in strips]), hsi=np.stack([s[1] for s in strips]))
            t0 = time.perf_counter()
            build(onnx_path, engine, int8=precision == "int8", calib=calib, timing_cache=work / "timing.cache",
                  device=device)
            figures[f"{precision}_build_s"] = round(time.perf_counter() - t0, 1)
        backend = TensorRTBackend(engine, device)
        backend.expect(StripShape.from_machine(settings))
        agree, diff = agreement(backend, strips, expected)
        figures.update({f"{precision}_class_agreement_vs_ort": round(agree, 5),
                        f"{precision}_max_confidence_diff_vs_ort_of_255": diff,
                        **timing(time_backend(backend, strips, 100 if args.quick else 1000), needed, precision)})
        backend.close()
        print(f"{precision}: {figures[f'{precision}_ms_p50']:.2f} ms p50, {figures[f'{precision}_ms_p99']:.2f} ms p99, "
              f"{figures[f'{precision}_strips_per_s']:.0f} strips/s ({figures[f'{precision}_realtime_factor']:.1f}x "
              f"the need at {args.speed:g} m/s); classes agree with ONNX Runtime on {agree * 100:.3f} % of pixels")
        if agree < args.min_agreement:
            failed.append(f"the {precision} engine's classes agree with ONNX Runtime on {agree * 100:.3f} % of "
                          f"pixels, under --min-agreement {args.min_agreement * 100:g} %")
    print(f"GPU {figures['gpu']} (device {device}), TensorRT {figures['tensorrt']}, profile {settings.profile}")
    return failed


if __name__ == "__main__":
    sys.exit(main())
