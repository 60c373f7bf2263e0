"""TensorRT on an NVIDIA GPU or Jetson: a serialized engine (sortline build-engine), device
buffers allocated once, pinned host buffers, one CUDA stream, asynchronous copies. No torch.

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


def gpu_name() -> str:
    cuda.init()
    return cuda.Device(0).name()


def read_engine(path: str | Path) -> tuple[dict, bytes]:
    """The header and plan of an engine, refused unless this TensorRT and GPU built it."""
    header, offset = read_engine_header(path)
    if header.get("tensorrt") != trt.__version__:
        raise ModelFileError(f"{path}: built with TensorRT {header.get('tensorrt')}, this machine has "
                             f"{trt.__version__}; build the engine again here")
    gpu = gpu_name()
    if header.get("gpu") != gpu:
        raise ModelFileError(f"{path}: built for {header.get('gpu')}, this machine has {gpu}; "
                             "build the engine again here")
    return header, Path(path).read_bytes()[offset:]


class TensorRTBackend(Backend):
    name = "tensorrt"

    def __init__(self, path: str | Path):
        import pycuda.autoinit  # noqa: F401  (creates the CUDA context)

        meta, plan = read_engine(path)
        super().__init__(meta)
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
