"""Inference backends behind one interface: ONNX Runtime, TensorRT, torch.

A backend is opened for one strip shape and runs one strip at a time:

    backend.run(rgb, hsi) -> (classes, confidence)

rgb: (lines, width, 3) uint8 and hsi: (lines/r, width/r, bands) float16,
the register node's strip with its overlap, passed to the model as it is
(the model turns it into float32 on its device); classes and confidence:
(core lines, width) uint8, or that divided by the mask stride,
confidence = max softmax x 255. Every backend knows its model's classes,
hash and the shapes it was made for (from the ONNX metadata, the engine
header or the checkpoint: models.contract), and refuses a model made for
other shapes with a ModelFileError that says so.

Each backend's module imports its library only when opened: ONNX Runtime
(the .[infer] extra) and TensorRT with pycuda (.[gpu], NVIDIA machines) need
no torch; the torch backend and the export of a checkpoint to ONNX need
.[train].

`open_for_machine` is what the infer node uses: where the config asks for a
GPU backend (tensorrt, onnxruntime-cuda) that cannot run here - no engine, no
TensorRT or CUDA provider, no GPU - it opens the model's ONNX file on ONNX
Runtime on the CPU instead and says what was missing.
"""

from __future__ import annotations

import os
from pathlib import Path

from sortline.models.backends.base import Backend
from sortline.models.contract import ModelFileError, StripShape, read_engine_header
from sortline.pipeline.config import cache_dir

GPU_BACKENDS = ("tensorrt", "onnxruntime-cuda")
LIBRARIES = {"onnxruntime": ("onnxruntime",), "tensorrt": ("tensorrt", "pycuda"), "torch": ("torch",)}


def installed() -> list[str]:
    """The backends whose libraries are installed here. Looked up, not imported: every node process asks (for
    sortline_build_info), and importing torch takes seconds."""
    import importlib.util

    return [name for name, libs in LIBRARIES.items() if all(importlib.util.find_spec(lib) for lib in libs)]


def open_backend(kind: str, path: str | Path, shape: StripShape, threads: int = 1, device: int = 0) -> Backend:
    """Open a model file with a backend for strips of `shape`.

    onnxruntime takes an .onnx file, or a checkpoint that it exports first
    (with torch; kept in the cache directory by model hash and shape); torch
    takes a checkpoint; tensorrt an engine from `sortline build-engine`.
    device: the GPU of tensorrt and onnxruntime-cuda.
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
        backend = OnnxRuntimeBackend(path, threads, device="cuda" if kind.endswith("cuda") else "cpu", gpu=device)
    elif kind == "tensorrt":
        from sortline.models.backends.tensorrt import TensorRTBackend

        if path.suffix != ".engine":
            raise ModelFileError(f"{path}: the tensorrt backend takes an engine from `sortline build-engine`")
        backend = TensorRTBackend(path, device)
    else:
        raise ValueError(f"unknown backend {kind!r}")
    backend.expect(shape)
    return backend


def open_for_machine(kind: str, path: str | Path, shape: StripShape, threads: int = 1,
                     device: int = 0) -> tuple[Backend, str]:
    """The backend a machine config asks for, or ONNX Runtime on the CPU where that is a GPU backend
    that cannot run here; returns the backend and what was missing ('' when none was).

    The CPU runs the model file itself when it is an ONNX file or a checkpoint; for an engine, the
    ONNX file it was built from, beside it (build-engine records its name), if that is the same model.
    """
    path = Path(path)
    missing = _gpu_missing(kind, path, device) if kind in GPU_BACKENDS else ""
    if not missing:
        backend = open_backend(kind, path, shape, threads, device)
        if kind == "onnxruntime-cuda" and backend.name != kind:   # ONNX Runtime fell back by itself
            return backend, f"ONNX Runtime could not use GPU {device} (its log above says why)"
        return backend, ""
    cpu_path, model_hash = path, ""
    if path.suffix == ".engine":
        header, _ = read_engine_header(path)
        cpu_path, model_hash = path.parent / header.get("onnx", "?"), header.get("model_hash", "")
        if not header.get("onnx") or not cpu_path.is_file():
            raise ModelFileError(f"{missing}, and the ONNX model the engine {path} was built from is not beside it "
                                 "to run on the CPU instead")
    backend = open_backend("onnxruntime", cpu_path, shape, threads)
    if model_hash and backend.model_hash != model_hash:
        raise ModelFileError(f"{missing}, and {cpu_path} beside the engine is model {backend.model_hash}, not the "
                             f"engine's {model_hash}: no model to run on the CPU instead")
    return backend, missing


def _gpu_missing(kind: str, path: Path, device: int) -> str:
    """What keeps a GPU backend from running this model file here ('' when nothing does)."""
    if kind == "onnxruntime-cuda":
        from sortline.models.backends.onnxruntime import has_cuda

        return "" if has_cuda() else "ONNX Runtime has no CUDA provider here (the onnxruntime-gpu package)"
    if path.suffix != ".engine":
        return f"{path.name} is not a TensorRT engine (build one on this machine: sortline build-engine)"
    try:
        from sortline.models.backends.tensorrt import gpu_missing
    except ImportError as exc:
        return f"no TensorRT here ({exc}; the .[gpu] extra on an NVIDIA machine)"
    return gpu_missing(device)


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
    # "u8": takes the strip as it comes (uint8, float16); files made before that took float32
    name = f"{meta['hash']}-{shape.lines}x{shape.width}-o{shape.overlap}-s{shape.stride}-u8.onnx"
    out = cache_dir() / "onnx" / name
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f"{out.stem}.{os.getpid()}.tmp.onnx")
        try:
            export(net, meta, shape, tmp)
        except ValueError as exc:
            raise ModelFileError(f"{checkpoint_path}: {exc}") from None
        tmp.replace(out)
    return out
