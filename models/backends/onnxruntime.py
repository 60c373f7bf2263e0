"""ONNX Runtime: the CPU backend (and CUDA where onnxruntime-gpu is installed). No torch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

from sortline.models.backends.base import Backend
from sortline.models.contract import ModelFileError

DTYPES = {"tensor(uint8)": np.uint8, "tensor(float16)": np.float16, "tensor(float)": np.float32}


def has_cuda() -> bool:
    """Whether this ONNX Runtime has its CUDA provider (the onnxruntime-gpu package)."""
    return "CUDAExecutionProvider" in ort.get_available_providers()


class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"

    def __init__(self, path: str | Path, threads: int = 1, device: str = "cpu", profile: str = "", gpu: int = 0):
        """device: cpu or cuda (on GPU `gpu`; where ONNX Runtime cannot use it, it runs on the CPU and
        `name` says onnxruntime, not onnxruntime-cuda); profile: a file-name prefix to write ONNX
        Runtime's per-operator profile to (off by default)."""
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.enable_profiling = bool(profile)
        if profile:
            opts.profile_file_prefix = profile
        providers: list = ["CPUExecutionProvider"]
        if device == "cuda":
            providers.insert(0, ("CUDAExecutionProvider", {"device_id": gpu}))
        try:
            self.session = ort.InferenceSession(str(path), opts, providers=providers)
        except Exception as exc:   # onnxruntime raises its own exception types for bad files
            raise ModelFileError(f"{path}: not a usable ONNX model ({exc})") from None
        if "CUDAExecutionProvider" in self.session.get_providers():
            self.name = "onnxruntime-cuda"
        try:
            inputs = {i.name: DTYPES[i.type] for i in self.session.get_inputs()}
        except KeyError as exc:
            raise ModelFileError(f"{path}: an input of type {exc}, not one sortline makes") from None
        super().__init__(self.session.get_modelmeta().custom_metadata_map, inputs)

    def infer(self, rgb, hsi):
        classes, conf = self.session.run(None, {"rgb": rgb, "hsi": hsi})
        return classes, conf

    def end_profiling(self) -> str:
        """Write the profile (when asked for one); returns its file name."""
        return self.session.end_profiling()
