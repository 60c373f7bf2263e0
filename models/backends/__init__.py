"""Inference backends behind one interface: ONNX Runtime, TensorRT, torch.

A backend is opened for one strip shape and runs one strip at a time:

    backend.run(rgb, hsi) -> (classes, confidence)

rgb: (lines, width, 3) uint8 and hsi: (lines/r, width/r, bands) float16 or
float32, the register node's strip with its overlap; classes and confidence:
(core lines, width) uint8, or that divided by the mask stride,
confidence = max softmax x 255. Every backend knows its model's classes,
hash and the shapes it was made for (from the ONNX metadata, the engine
header or the checkpoint: models.contract), and refuses a model made for
other shapes with a ModelFileError that says so.

Each backend's module imports its library only when opened: ONNX Runtime
(the .[infer] extra) and TensorRT with pycuda (.[gpu], NVIDIA machines) need
no torch; the torch backend and the export of a checkpoint to ONNX need
.[train].
"""

from __future__ import annotations

import os
from pathlib import Path

from sortline.models.backends.base import Backend
from sortline.models.contract import ModelFileError, StripShape
from sortline.pipeline.config import cache_dir


def open_backend(kind: str, path: str | Path, shape: StripShape, threads: int = 1) -> Backend:
    """Open a model file with a backend for strips of `shape`.

    onnxruntime takes an .onnx file, or a checkpoint that it exports first
    (with torch; kept in the cache directory by model hash and shape); torch
    takes a checkpoint; tensorrt an engine from `sortline build-engine`.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"{path}: no such model file")
    if kind == "torch":
        from sortline.models.backends.torch import TorchBackend

        if path.suffix != ".safetensors":
            raise ModelFileError(f"{path}: the torch backend takes a checkpoint (.safetensors)")
        backend: Backend = TorchBackend(path, shape, threads)
    elif kind in ("onnxruntime", "onnxruntime-cuda"):
        from sortline.models.backends.onnxruntime import OnnxRuntimeBackend

        if path.suffix == ".safetensors":
            path = exported(path, shape)
        backend = OnnxRuntimeBackend(path, threads, device="cuda" if kind.endswith("cuda") else "cpu")
    elif kind == "tensorrt":
        from sortline.models.backends.tensorrt import TensorRTBackend

        if path.suffix != ".engine":
            raise ModelFileError(f"{path}: the tensorrt backend takes an engine from `sortline build-engine`")
        backend = TensorRTBackend(path)
    else:
        raise ValueError(f"unknown backend {kind!r}")
    backend.expect(shape)
    return backend


def exported(checkpoint_path: Path, shape: StripShape) -> Path:
    """The ONNX export of a checkpoint for a strip shape, made once and kept by hash."""
    try:
        from sortline.models.training import checkpoint
        from sortline.models.training.export import export
    except ImportError as exc:
        raise ModelFileError(f"{checkpoint_path}: a checkpoint is exported to ONNX before ONNX Runtime runs it, "
                             f"which needs torch ({exc}); export it where torch is (sortline export, .[train]) "
                             "and name the .onnx file") from None
    net, meta = checkpoint.load(checkpoint_path)
    out = cache_dir() / "onnx" / f"{meta['hash']}-{shape.lines}x{shape.width}-o{shape.overlap}-s{shape.stride}.onnx"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f"{out.stem}.{os.getpid()}.tmp.onnx")
        try:
            export(net, meta, shape, tmp)
        except ValueError as exc:
            raise ModelFileError(f"{checkpoint_path}: {exc}") from None
        tmp.replace(out)
    return out
