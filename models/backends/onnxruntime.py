"""ONNX Runtime: the CPU backend (and CUDA where onnxruntime-gpu is installed). No torch."""

from __future__ import annotations

from pathlib import Path

import onnxruntime as ort

from sortline.models.backends.base import Backend
from sortline.models.contract import ModelFileError


class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"

    def __init__(self, path: str | Path, threads: int = 1, device: str = "cpu", profile: str = ""):
        """profile: a file-name prefix to write ONNX Runtime's per-operator profile to (off by default)."""
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.enable_profiling = bool(profile)
        if profile:
            opts.profile_file_prefix = profile
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if device == "cuda" else ["CPUExecutionProvider"]
        try:
            self.session = ort.InferenceSession(str(path), opts, providers=providers)
        except Exception as exc:   # onnxruntime raises its own exception types for bad files
            raise ModelFileError(f"{path}: not a usable ONNX model ({exc})") from None
        super().__init__(self.session.get_modelmeta().custom_metadata_map)

    def run_float(self, rgb, hsi):
        classes, conf = self.session.run(None, {"rgb": rgb, "hsi": hsi})
        return classes, conf

    def end_profiling(self) -> str:
        """Write the profile (when asked for one); returns its file name."""
        return self.session.end_profiling()
