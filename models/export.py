"""`sortline export`: a checkpoint to ONNX, for one strip size, checked against torch.

The graph is exported at static shapes: batch 1, the strip with its overlap
(strip_lines + 2 x overlap_lines) x the camera's pixels, and the HSI grid r
times coarser. It takes rgb (1, H, W, 3) float32 0..255 and hsi (1, H/r,
W/r, bands) float32 and returns the core lines' classes (int32) and
confidence (float32), per RGB pixel or on the coarser grid of `model.mask_stride`.
The ONNX file's metadata says what it is for (shapes,
classes, overlap, model hash), so a backend can refuse a mismatched strip.
"""

from __future__ import annotations

import json
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from models import checkpoint
from models.net import Deployed

OPSET = 17


@dataclass(frozen=True)
class StripShape:
    lines: int      # RGB lines including both overlaps
    width: int      # RGB pixels
    overlap: int    # RGB lines of context on each side (cropped from the output)
    ratio: int
    bands: int
    stride: int = 1  # the mask's grid: RGB pixels per mask cell, along and across

    @property
    def rgb(self) -> tuple[int, ...]:
        return (1, self.lines, self.width, 3)

    @property
    def hsi(self) -> tuple[int, ...]:
        return (1, self.lines // self.ratio, self.width // self.ratio, self.bands)

    @property
    def core(self) -> tuple[int, int]:
        return ((self.lines - 2 * self.overlap) // self.stride, self.width // self.stride)

    @classmethod
    def from_settings(cls, settings) -> "StripShape":
        m = settings.model
        return cls(m.strip_lines + 2 * m.overlap_lines, settings.cameras.rgb.pixels, m.overlap_lines,
                   settings.hsi_ratio, m.bands, m.mask_stride)


def metadata(net, meta: dict, shape: StripShape) -> dict[str, str]:
    """What an exported model or engine carries so that a mismatch is caught before running it."""
    return {"sortline": "model", "model_hash": meta.get("hash", ""), "classes": json.dumps(list(net.config.classes)),
            "variant": net.config.variant, "size": net.config.size, "rgb_shape": json.dumps(shape.rgb),
            "hsi_shape": json.dumps(shape.hsi), "overlap": str(shape.overlap), "mask_stride": str(shape.stride)}


def example_inputs(shape: StripShape, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    rgb = rng.integers(0, 256, shape.rgb).astype(np.float32)
    hsi = rng.uniform(0.02, 0.9, shape.hsi).astype(np.float32)
    return rgb, hsi


def export(net, meta: dict, shape: StripShape, out: str | Path, opset: int = OPSET) -> Path:
    import onnx

    net.config.check_strip(shape.lines, shape.width)
    if net.config.ratio != shape.ratio or net.config.bands != shape.bands:
        raise ValueError(f"the model is for ratio {net.config.ratio} and {net.config.bands} bands; "
                         f"the strip has ratio {shape.ratio} and {shape.bands} bands")
    out = Path(out)
    model = Deployed(net.eval(), shape.overlap, shape.stride).eval()
    rgb, hsi = example_inputs(shape)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")   # shapes taken as Python ints are meant to be constants
        torch.onnx.export(model, (torch.from_numpy(rgb), torch.from_numpy(hsi)), str(out), dynamo=False,
                          opset_version=opset, input_names=["rgb", "hsi"], output_names=["classes", "confidence"],
                          do_constant_folding=True)
    proto = onnx.load(str(out))
    for key, value in metadata(net, meta, shape).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(proto)
    onnx.save(proto, str(out))
    return out


def compare(net, onnx_path: str | Path, shape: StripShape, strips: int = 2) -> dict:
    """Run torch and ONNX Runtime on the same strips: largest confidence difference, class agreement."""
    from models.backends import OnnxRuntimeBackend

    backend = OnnxRuntimeBackend(onnx_path, threads=1)
    model = Deployed(net.eval(), shape.overlap, shape.stride).eval()
    diff, agree, total = 0.0, 0, 0
    for seed in range(strips):
        rgb, hsi = example_inputs(shape, seed)
        with torch.no_grad():
            classes, conf = (t.numpy() for t in model(torch.from_numpy(rgb), torch.from_numpy(hsi)))
        o_classes, o_conf = backend.run_float(rgb, hsi)
        diff = max(diff, float(np.abs(o_conf - conf).max()))
        agree += int((o_classes == classes).sum())
        total += classes.size
    return {"max_abs_diff_confidence": diff, "class_agreement": agree / total}


def main(args) -> int:
    from pipeline.config import ConfigError, load_config

    torch.set_num_threads(1)
    try:
        settings = load_config(args.config)
    except ConfigError as exc:
        print("\n".join(exc.lines), file=sys.stderr)
        return 78
    net, meta = checkpoint.load(args.model)
    shape = StripShape.from_settings(settings)
    out = Path(args.out or Path(args.model).with_suffix(".onnx"))
    try:
        export(net, meta, shape, out, args.opset)
    except ValueError as exc:
        print(f"sortline: cannot export {args.model} for {args.config}: {exc}", file=sys.stderr)
        return 2
    check = compare(net, out, shape)
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB): rgb {shape.rgb}, hsi {shape.hsi}, model {meta.get('hash')}")
    print(f"ONNX Runtime vs torch: max abs difference in confidence {check['max_abs_diff_confidence']:.2e}, "
          f"classes agree on {check['class_agreement'] * 100:.4f} % of pixels")
    return 0
