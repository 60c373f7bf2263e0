"""TensorRT on an NVIDIA GPU or Jetson: a serialized engine (sortline build-engine), device
buffers allocated once, pinned host buffers, one CUDA stream, asynchronous copies. No torch.

The strip goes to the GPU as the register node made it (uint8 RGB, float16 HSI:
5 bytes a pixel); the engine converts it to float. The GPU is `model.device`;
the backend keeps its own CUDA context on it and makes it current around each
call, so that any thread may run it.

An engine is tied to the GPU model and the TensorRT version that built it:
`read_engine` refuses one built elsewhere with a message saying which, rather
than letting TensorRT fail obscurely.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pycuda.driver as cuda
import tensorrt as trt

from sortline.models.backends.base import Backend
from sortline.models.contract import ModelFileError, read_engine_header


class EnqueueError(RuntimeError):
    """TensorRT did not run a strip: its outputs would be the previous strip's."""


def gpu_missing(device: int = 0) -> str:
    """Why GPU `device` cannot be used here ('' when it can)."""
    try:
        cuda.init()
        count = cuda.Device.count()
    except cuda.Error as exc:
        return f"no usable GPU (CUDA: {exc})"
    if device >= count:
        return f"no GPU {device} (model.device): this machine has {count}"
    return ""


def gpu_name(device: int = 0) -> str:
    cuda.init()
    return cuda.Device(device).name()


def read_engine(path: str | Path, device: int = 0) -> tuple[dict, bytes]:
    """The header and plan of an engine, refused unless this TensorRT and GPU built it."""
    header, offset = read_engine_header(path)
    if header.get("tensorrt") != trt.__version__:
        raise ModelFileError(f"{path}: built with TensorRT {header.get('tensorrt')}, this machine has "
                             f"{trt.__version__}; build the engine again here")
    gpu = gpu_name(device)
    if header.get("gpu") != gpu:
        raise ModelFileError(f"{path}: built for {header.get('gpu')}, GPU {device} of this machine is {gpu}; "
                             "build the engine again here")
    return header, Path(path).read_bytes()[offset:]


class TensorRTBackend(Backend):
    name = "tensorrt"

    def __init__(self, path: str | Path, device: int = 0):
        meta, plan = read_engine(path, device)
        self.cuda_context = cuda.Device(device).make_context()   # current on this thread until popped
        try:
            self._open(path, meta, plan)
        except BaseException:
            self.cuda_context.pop()
            self.cuda_context.detach()
            del self.cuda_context
            raise
        self.cuda_context.pop()

    def _open(self, path, meta: dict, plan: bytes) -> None:
        self.runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = self.runtime.deserialize_cuda_engine(plan)
        if self.engine is None:
            raise ModelFileError(f"{path}: TensorRT could not load this engine (built for another GPU or version?)")
        self.context = self.engine.create_execution_context()
        if self.context is None:
            raise ModelFileError(f"{path}: TensorRT could not make an execution context (out of GPU memory?)")
        self.stream = cuda.Stream()
        self.host, self.device = {}, {}
        for i in range(self.engine.num_io_tensors):
            name = self.engine.get_tensor_name(i)
            shape = tuple(self.engine.get_tensor_shape(name))
            dtype = trt.nptype(self.engine.get_tensor_dtype(name))
            self.host[name] = cuda.pagelocked_empty(shape, dtype)
            self.device[name] = cuda.mem_alloc(self.host[name].nbytes)
            if not self.context.set_tensor_address(name, int(self.device[name])):
                raise ModelFileError(f"{path}: TensorRT refused the buffer of tensor {name!r}")
        missing = {"rgb", "hsi", "classes", "confidence"} - set(self.host)
        if missing:
            raise ModelFileError(f"{path}: the engine has no tensor {', '.join(sorted(missing))}: not a sortline model")
        super().__init__(meta, {"rgb": self.host["rgb"].dtype, "hsi": self.host["hsi"].dtype})

    def infer(self, rgb, hsi):
        self.cuda_context.push()
        try:
            np.copyto(self.host["rgb"], rgb)
            np.copyto(self.host["hsi"], hsi)
            for name in ("rgb", "hsi"):
                cuda.memcpy_htod_async(self.device[name], self.host[name], self.stream)
            if not self.context.execute_async_v3(self.stream.handle):
                self.stream.synchronize()   # the copies already queued must not land in a buffer reused later
                raise EnqueueError("TensorRT did not enqueue the strip (execute_async_v3 returned False; its log above "
                                   "says why): no mask for it")
            for name in ("classes", "confidence"):
                cuda.memcpy_dtoh_async(self.host[name], self.device[name], self.stream)
            self.stream.synchronize()
        finally:
            self.cuda_context.pop()
        return self.host["classes"], self.host["confidence"]   # overwritten by the next strip (run() converts)

    def close(self) -> None:
        if not hasattr(self, "cuda_context"):
            return
        self.cuda_context.push()
        try:
            for buf in self.device.values():
                buf.free()
            self.device.clear()
            self.context = self.engine = None
        finally:
            self.cuda_context.pop()
        self.cuda_context.detach()
        del self.cuda_context
