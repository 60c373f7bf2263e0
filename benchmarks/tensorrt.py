"""TensorRT on a GPU: build the engine, check it against ONNX Runtime, time it.

Needs an NVIDIA machine with the .[gpu] extra (TensorRT, pycuda); on any other
machine it says so and exits 2. One prepared run:

1. export the checkpoint to ONNX at the config's strip size (`sortline export`);
2. build an FP16 engine with a timing cache (`sortline build-engine`); with
   --int8 also an INT8 engine calibrated on held-out synthetic strips;
3. run each engine and ONNX Runtime (CPU, the reference) on the same held-out
   strips: share of pixels whose class agrees, largest confidence difference;
4. time each engine's backend.run (host strip in, host mask out: the copies
   are included) and report strips/s against the belt's need at --speed.

    python benchmarks/tensorrt.py [--quick] [--json PATH] [--int8] [--config configs/production.toml]
"""

from __future__ import annotations

import json
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


def main() -> int:
    parser = arguments(__doc__)
    parser.add_argument("--int8", action="store_true", help="also build and check an INT8 engine")
    parser.add_argument("--workdir", default="", help="where the ONNX file, engines and timing cache go")
    args = parser.parse_args()
    try:
        import pycuda  # noqa: F401
        import tensorrt
    except ImportError as exc:
        print(f"benchmarks/tensorrt.py needs TensorRT and pycuda on an NVIDIA GPU (pip install -e '.[gpu]'): {exc}",
              file=sys.stderr)
        return 2
    import torch

    from sortline.models.backends.onnxruntime import OnnxRuntimeBackend
    from sortline.models.backends.tensorrt import TensorRTBackend, gpu_name
    from sortline.models.contract import model_file
    from sortline.models.training import checkpoint
    from sortline.models.training.engine import build
    from sortline.models.training.export import export

    torch.set_num_threads(1)
    settings = load_config(args.config)
    shape = StripShape.from_machine(settings)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="sortline-trt-"))
    work.mkdir(parents=True, exist_ok=True)
    net, meta = checkpoint.load(model_file(args.model))
    onnx_path = export(net, meta, shape, work / "model.onnx")
    strips = held_out_strips(settings, 4 if args.quick else 16)
    reference = OnnxRuntimeBackend(onnx_path, threads=4)
    expected = [reference.run(rgb, hsi) for rgb, hsi in strips]
    needed = settings.line_rate_hz("rgb", args.speed) / settings.model.strip_lines
    figures: dict = {"gpu": gpu_name(), "tensorrt": tensorrt.__version__, "profile": settings.profile,
                     "strip": f"{shape.lines}x{shape.width}", "strips_per_s_needed": round(needed, 2)}
    precisions = ["fp16"] + (["int8"] if args.int8 else [])
    for precision in precisions:
        engine = work / f"model-{precision}.engine"
        calib = ""
        if precision == "int8":
            calib = work / "calib.npz"
            rgb = np.stack([s[0] for s in strips]).astype(np.float32)
            hsi = np.stack([s[1] for s in strips]).astype(np.float32)
            np.savez(calib, rgb=rgb, hsi=hsi)
        t0 = time.perf_counter()
        build(onnx_path, engine, int8=precision == "int8", calib=calib, timing_cache=work / "timing.cache")
        figures[f"{precision}_build_s"] = round(time.perf_counter() - t0, 1)
        backend = TensorRTBackend(engine)
        agree, diff = 0.0, 0
        for (rgb, hsi), (classes, conf) in zip(strips, expected):
            got_classes, got_conf = backend.run(rgb, hsi)
            agree += float((got_classes == classes).mean()) / len(strips)
            diff = max(diff, int(np.abs(got_conf.astype(int) - conf.astype(int)).max()))
        times = time_backend(backend, strips, 100 if args.quick else 1000)
        rate = 1 / statistics.median(times)
        figures.update({f"{precision}_class_agreement_vs_ort": round(agree, 5),
                        f"{precision}_max_confidence_diff_vs_ort_of_255": diff,
                        f"{precision}_ms_p50": round(statistics.median(times) * 1000, 3),
                        f"{precision}_ms_p99": round(float(np.percentile(times, 99)) * 1000, 3),
                        f"{precision}_strips_per_s": round(rate, 1),
                        f"{precision}_realtime_factor": round(rate / needed, 2)})
        backend.close()
        print(f"{precision}: {figures[f'{precision}_ms_p50']:.2f} ms p50, {figures[f'{precision}_ms_p99']:.2f} ms p99, "
              f"{rate:.0f} strips/s ({rate / needed:.1f}x the need at {args.speed:g} m/s); classes agree with "
              f"ONNX Runtime on {agree * 100:.3f} % of pixels; built in {figures[f'{precision}_build_s']:.0f} s")
    print(f"GPU {figures['gpu']}, TensorRT {figures['tensorrt']}, profile {settings.profile}")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
