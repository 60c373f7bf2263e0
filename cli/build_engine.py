"""`sortline build-engine`: a TensorRT engine from an exported ONNX model, on the GPU that will run it."""

from __future__ import annotations

import sys
from pathlib import Path


def build_engine(args) -> int:
    out = Path(args.out or Path(args.onnx).with_suffix(".engine"))
    try:
        import pycuda  # noqa: F401
        import tensorrt  # noqa: F401
    except ImportError as exc:
        print(f"sortline: build-engine needs TensorRT and pycuda (pip install '.[gpu]' on an NVIDIA machine): {exc}",
              file=sys.stderr)
        return 2
    from sortline.models.contract import ModelFileError, read_engine_header
    from sortline.models.training.engine import build

    try:
        build(args.onnx, out, int8=args.int8, fp32=args.fp32, calib=args.calib, timing_cache=args.timing_cache,
              workspace_mb=args.workspace_mb, device=args.device)
    except (ModelFileError, ValueError) as exc:
        print(f"sortline: {exc}", file=sys.stderr)
        return 2
    header, _ = read_engine_header(out)
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB): {header['precision']}, TensorRT {header['tensorrt']}, "
          f"{header['gpu']}, rgb {header['rgb_shape']}, model {header['model_hash']}")
    return 0


def add(sub) -> None:
    p = sub.add_parser("build-engine", help="build a TensorRT engine from an ONNX model (on the GPU that will run it)",
                       description="Build a TensorRT engine (FP16, or INT8 with calibration strips) with a timing "
                       "cache and metadata; needs the .[gpu] extra on an NVIDIA machine.")
    p.add_argument("onnx", help="ONNX model from `sortline export`")
    p.add_argument("--out", default="", help="engine file (default: beside the ONNX file, .engine)")
    p.add_argument("--int8", action="store_true", help="INT8 (with FP16 fallback), calibrated on --calib strips")
    p.add_argument("--calib", default="", help="INT8: a .npz of calibration strips (arrays rgb, hsi "
                   "at the model's input shapes); benchmarks/tensorrt.py writes one from held-out synthetic strips")
    p.add_argument("--fp32", action="store_true", help="no reduced precision (for checking)")
    p.add_argument("--timing-cache", default="", help="timing cache file (default: beside the engine)")
    p.add_argument("--workspace-mb", type=int, default=1024)
    p.add_argument("--device", type=int, default=0, help="the GPU to build on: model.device of the machine config "
                   "that will run it (default 0)")
    p.set_defaults(func=build_engine)
