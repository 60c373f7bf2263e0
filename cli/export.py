"""`sortline export`: a checkpoint to ONNX for the configured strip size, checked against torch."""

from __future__ import annotations

import sys
from pathlib import Path

from sortline.cli import common


def export(args) -> int:
    import torch

    from sortline.models.contract import StripShape, model_file
    from sortline.models.training import checkpoint
    from sortline.models.training.export import compare, export as run

    torch.set_num_threads(1)
    settings = common.load(args.config)
    path = model_file(args.model)
    net, meta = checkpoint.load(path)
    shape = StripShape.from_machine(settings)
    out = Path(args.out or path.with_suffix(".onnx"))
    try:
        run(net, meta, shape, out, args.opset)
    except ValueError as exc:
        print(f"sortline: cannot export {args.model} for {args.config}: {exc}", file=sys.stderr)
        return 2
    check = compare(net, out, shape)
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB): rgb {shape.rgb}, hsi {shape.hsi}, model {meta.get('hash')}")
    print(f"ONNX Runtime vs torch: max abs difference in confidence {check['max_abs_diff_confidence']:.2e}, "
          f"classes agree on {check['class_agreement'] * 100:.4f} % of pixels")
    return 0


def add(sub) -> None:
    p = sub.add_parser("export", help="export a checkpoint to ONNX for a strip size, checked against torch",
                       description="Export a checkpoint to ONNX at the configured strip size (strip + overlap), run "
                       "it in ONNX Runtime and report the largest difference from torch. Needs the .[train] extra.")
    p.add_argument("model", help="checkpoint (.safetensors, or shipped:NAME)")
    p.add_argument("--out", default="", help="ONNX file (default: beside the checkpoint, .onnx)")
    common.add_config(p, help="machine config: strip size, overlap, width")
    p.add_argument("--opset", type=int, default=17)
    p.set_defaults(func=export)
