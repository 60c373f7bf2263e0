"""A checkpoint to ONNX, for one strip size, checked against torch (`sortline export`).

The graph is exported at static shapes: batch 1, the strip with its overlap
(strip_lines + 2 x overlap_lines) x the camera's pixels, and the HSI grid r
times coarser. It takes rgb (1, H, W, 3) uint8 and hsi (1, H/r, W/r, bands)
float16, as the register node makes them (converted to float32 in the graph),
and returns the core lines' classes (int32) and
confidence (float32), per RGB pixel or on the coarser grid of
`model.mask_stride`. The ONNX file's metadata (models.contract) says what it
is for (shapes, classes, overlap, model hash), so a backend can refuse a
mismatched strip.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch

from sortline.models.contract import StripShape, metadata
from sortline.models.net import Deployed

OPSET = 17


def example_inputs(shape: StripShape, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    rgb = rng.integers(0, 256, shape.rgb).astype(np.uint8)
    hsi = rng.uniform(0.02, 0.9, shape.hsi).astype(np.float16)
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
    for key, value in metadata(net.config.to_dict(), meta.get("hash", ""), shape).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(proto)
    onnx.save(proto, str(out))
    return out


def compare(net, onnx_path: str | Path, shape: StripShape, strips: int = 2) -> dict:
    """Run torch and ONNX Runtime on the same strips: largest confidence difference, class agreement."""
    from sortline.models.backends.onnxruntime import OnnxRuntimeBackend

    backend = OnnxRuntimeBackend(onnx_path, threads=1)
    model = Deployed(net.eval(), shape.overlap, shape.stride).eval()
    diff, agree, total = 0.0, 0, 0
    for seed in range(strips):
        rgb, hsi = example_inputs(shape, seed)
        with torch.no_grad():
            classes, conf = (t.numpy() for t in model(torch.from_numpy(rgb), torch.from_numpy(hsi)))
        o_classes, o_conf = backend.infer(rgb, hsi)
        diff = max(diff, float(np.abs(o_conf - conf).max()))
        agree += int((o_classes == classes).sum())
        total += classes.size
    return {"max_abs_diff_confidence": diff, "class_agreement": agree / total}
