"""Inference backends behind one interface: ONNX Runtime, torch, TensorRT.

A backend is opened for one strip shape and runs one strip at a time:

    backend.run(rgb, hsi) -> (classes, confidence)

rgb: (lines, width, 3) uint8 and hsi: (lines/r, width/r, bands) float16 or
float32, the register node's strip with its overlap; classes and confidence:
(core lines, width) uint8, or that divided by the mask stride,
confidence = max softmax x 255. Every backend
knows its model's classes, hash and the shapes it was made for (from the
checkpoint, the ONNX metadata or the engine header), and refuses a model
made for other shapes or classes with a ModelFileError that says so.

TensorRT and pycuda are imported only when the TensorRT backend is opened:
they exist on NVIDIA machines alone.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from models.checkpoint import ModelFileError


class Backend:
    name = "?"

    def __init__(self, meta: dict[str, str]):
        try:
            self.classes = tuple(json.loads(meta["classes"]))
            self.rgb_shape = tuple(json.loads(meta["rgb_shape"]))
            self.hsi_shape = tuple(json.loads(meta["hsi_shape"]))
            self.overlap = int(meta["overlap"])
            self.stride = int(meta.get("mask_stride", "1"))   # models exported before strides: per pixel
        except (KeyError, ValueError, TypeError) as exc:
            raise ModelFileError(f"model metadata incomplete or unreadable ({exc}): not made by `sortline export`?") from None
        self.model_hash = meta.get("model_hash", "")
        self.meta = meta

    def expect(self, rgb_shape, hsi_shape, classes=None, stride: int | None = None) -> None:
        """Refuse a model made for other strips, mask strides or classes (a ModelFileError saying which)."""
        problems = []
        if tuple(rgb_shape) != self.rgb_shape:
            problems.append(f"RGB input {self.rgb_shape}, the strips are {tuple(rgb_shape)}")
        if tuple(hsi_shape) != self.hsi_shape:
            problems.append(f"HSI input {self.hsi_shape}, the strips are {tuple(hsi_shape)}")
        if stride is not None and stride != self.stride:
            problems.append(f"mask stride {self.stride}, model.mask_stride is {stride}")
        if problems:
            problems[-1] += " (export or build it again for this machine config)"
        if classes is not None and tuple(classes) != self.classes:
            problems.append(f"classes {list(self.classes)}, expected {list(classes)} (train it for these classes)")
        if problems:
            raise ModelFileError(f"{self.name} model {self.model_hash} does not fit: " + "; ".join(problems))

    def run(self, rgb: np.ndarray, hsi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if rgb.shape != self.rgb_shape[1:] or hsi.shape != self.hsi_shape[1:]:
            raise ValueError(f"strip rgb {rgb.shape} / hsi {hsi.shape}; the model takes {self.rgb_shape[1:]} / "
                             f"{self.hsi_shape[1:]}")
        classes, conf = self.run_float(rgb[None].astype(np.float32), hsi[None].astype(np.float32))
        return classes[0].astype(np.uint8), np.rint(conf[0] * 255.0).astype(np.uint8)

    def run_float(self, rgb: np.ndarray, hsi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(1, H, W, 3) and (1, h, w, bands) float32 -> classes (1, core, W) int32, confidence float32."""
        raise NotImplementedError

    def close(self) -> None:
        pass


class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"

    def __init__(self, path: str | Path, threads: int = 1, device: str = "cpu"):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if device == "cuda" else ["CPUExecutionProvider"]
        try:
            self.session = ort.InferenceSession(str(path), opts, providers=providers)
        except Exception as exc:   # onnxruntime raises its own exception types for bad files
            raise ModelFileError(f"{path}: not a usable ONNX model ({exc})") from None
        super().__init__(self.session.get_modelmeta().custom_metadata_map)

    def run_float(self, rgb, hsi):
        classes, conf = self.session.run(None, {"rgb": rgb, "hsi": hsi})
        return classes, conf


class TorchBackend(Backend):
    """The checkpoint in torch eager mode (reference, and for machines without ONNX Runtime)."""

    name = "torch"

    def __init__(self, path: str | Path, shape, threads: int = 1):
        import torch

        from models import checkpoint
        from models.export import metadata
        from models.net import Deployed

        torch.set_num_threads(threads)
        net, meta = checkpoint.load(path)
        try:
            net.config.check_strip(shape.lines, shape.width)
        except ValueError as exc:
            raise ModelFileError(f"{path}: {exc}") from None
        self._torch = torch
        self.model = Deployed(net, shape.overlap, shape.stride).eval()
        super().__init__(metadata(net, meta, shape))
        if net.config.ratio != shape.ratio or net.config.bands != shape.bands:
            raise ModelFileError(f"{path}: the model is for ratio {net.config.ratio} and {net.config.bands} bands, "
                                 f"the strips have ratio {shape.ratio} and {shape.bands} bands")

    def run_float(self, rgb, hsi):
        with self._torch.no_grad():
            classes, conf = self.model(self._torch.from_numpy(rgb), self._torch.from_numpy(hsi))
        return classes.numpy(), conf.numpy()


class TensorRTBackend(Backend):
    """A serialized engine (see models.engine) on the GPU: device buffers allocated
    once, pinned host buffers, one CUDA stream, asynchronous copies."""

    name = "tensorrt"

    def __init__(self, path: str | Path):
        from models.engine import read_engine

        import pycuda.autoinit  # noqa: F401  (creates the CUDA context)
        import pycuda.driver as cuda
        import tensorrt as trt

        meta, plan = read_engine(path)
        super().__init__(meta)
        self._cuda = cuda
        self.runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = self.runtime.deserialize_cuda_engine(plan)
        if self.engine is None:
            raise ModelFileError(f"{path}: TensorRT could not load this engine (built for another GPU or version?)")
        self.context = self.engine.create_execution_context()
        self.stream = cuda.Stream()
        self.host, self.device = {}, {}
        for i in range(self.engine.num_io_tensors):
            name = self.engine.get_tensor_name(i)
            shape = tuple(self.engine.get_tensor_shape(name))
            dtype = trt.nptype(self.engine.get_tensor_dtype(name))
            self.host[name] = cuda.pagelocked_empty(shape, dtype)
            self.device[name] = cuda.mem_alloc(self.host[name].nbytes)
            self.context.set_tensor_address(name, int(self.device[name]))

    def run_float(self, rgb, hsi):
        cuda = self._cuda
        np.copyto(self.host["rgb"], rgb)
        np.copyto(self.host["hsi"], hsi)
        for name in ("rgb", "hsi"):
            cuda.memcpy_htod_async(self.device[name], self.host[name], self.stream)
        self.context.execute_async_v3(self.stream.handle)
        for name in ("classes", "confidence"):
            cuda.memcpy_dtoh_async(self.host[name], self.device[name], self.stream)
        self.stream.synchronize()
        return self.host["classes"], self.host["confidence"]

    def close(self) -> None:
        for buf in self.device.values():
            buf.free()
        self.device.clear()


def open_backend(kind: str, path: str | Path, shape, threads: int = 1) -> Backend:
    """Open a model file with a backend for strips of `shape` (models.export.StripShape).

    onnxruntime takes an .onnx file, or a checkpoint that it exports first
    (cached under .cache/onnx/ by model hash and shape); torch takes a
    checkpoint; tensorrt an engine from `sortline build-engine`.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"{path}: no such model file")
    if kind == "torch":
        if path.suffix != ".safetensors":
            raise ModelFileError(f"{path}: the torch backend takes a checkpoint (.safetensors)")
        backend = TorchBackend(path, shape, threads)
    elif kind in ("onnxruntime", "onnxruntime-cuda"):
        if path.suffix == ".safetensors":
            path = exported(path, shape)
        backend = OnnxRuntimeBackend(path, threads, device="cuda" if kind.endswith("cuda") else "cpu")
    elif kind == "tensorrt":
        if path.suffix != ".engine":
            raise ModelFileError(f"{path}: the tensorrt backend takes an engine from `sortline build-engine`")
        backend = TensorRTBackend(path)
    else:
        raise ValueError(f"unknown backend {kind!r}")
    backend.expect(shape.rgb, shape.hsi, stride=shape.stride)
    return backend


def exported(checkpoint_path: Path, shape) -> Path:
    """The ONNX export of a checkpoint for a strip shape, made once and kept by hash."""
    from models import checkpoint
    from models.data import CACHE
    from models.export import export

    net, meta = checkpoint.load(checkpoint_path)
    out = CACHE / "onnx" / f"{meta['hash']}-{shape.lines}x{shape.width}-o{shape.overlap}-s{shape.stride}.onnx"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f"{out.stem}.{os.getpid()}.tmp.onnx")
        try:
            export(net, meta, shape, tmp)
        except ValueError as exc:
            raise ModelFileError(f"{checkpoint_path}: {exc}") from None
        tmp.replace(out)
    return out
