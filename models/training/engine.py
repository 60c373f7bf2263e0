"""`sortline build-engine`: a TensorRT engine from an exported ONNX model.

An engine is tied to the GPU model and the TensorRT version that built it,
so it is built on the machine that runs it (a Jetson builds its own, with
JetPack's TensorRT). The file is a small header and the serialized plan (models.contract): the
ONNX model's metadata (input shapes, classes, overlap, model hash) and the
TensorRT version, GPU and precision, which the tensorrt backend checks.

Precision: FP16 by default (FP32 layers where TensorRT prefers them); INT8
with an entropy calibrator over real strips (`--calib FILE.npz` with arrays
rgb (N, H, W, 3) and hsi (N, h, w, bands), e.g. held-out synthetic strips);
`--fp32` for checking. A timing cache beside the engine makes rebuilds fast.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from sortline.models.contract import ModelFileError, write_engine


class _Calibrator:
    """INT8 entropy calibration over real strips (created lazily: it subclasses TensorRT's class)."""

    @staticmethod
    def make(strips: dict[str, np.ndarray], cache: Path):
        import pycuda.driver as cuda
        import tensorrt as trt

        class Calibrator(trt.IInt8EntropyCalibrator2):
            def __init__(self):
                super().__init__()
                self.strips, self.i = strips, 0
                self.device = {k: cuda.mem_alloc(v[0:1].astype(np.float32).nbytes) for k, v in strips.items()}

            def get_batch_size(self):
                return 1

            def get_batch(self, names):
                if self.i >= len(self.strips["rgb"]):
                    return None
                for k in names:
                    cuda.memcpy_htod(self.device[k], np.ascontiguousarray(self.strips[k][self.i:self.i + 1], np.float32))
                self.i += 1
                return [int(self.device[k]) for k in names]

            def read_calibration_cache(self):
                return cache.read_bytes() if cache.exists() else None

            def write_calibration_cache(self, data):
                cache.write_bytes(bytes(data))

        return Calibrator()


def build(onnx_path: str | Path, out: str | Path, *, int8: bool = False, fp32: bool = False,
          calib: str | Path = "", timing_cache: str | Path = "", workspace_mb: int = 1024) -> Path:
    import onnx
    import pycuda.autoinit  # noqa: F401
    import tensorrt as trt

    from sortline.models.backends.tensorrt import gpu_name

    onnx_path, out = Path(onnx_path), Path(out)
    meta = {p.key: p.value for p in onnx.load(str(onnx_path), load_external_data=False).metadata_props}
    if meta.get("sortline") != "model":
        raise ModelFileError(f"{onnx_path}: not exported by `sortline export` (no sortline metadata)")
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)   # explicit batch is the only mode in TensorRT 10
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_path.read_bytes()):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ModelFileError(f"{onnx_path}: TensorRT cannot parse it: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mb << 20)
    cache_path = Path(timing_cache or out.with_suffix(".timing"))
    cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.exists() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    precision = "fp32"
    if not fp32:
        config.set_flag(trt.BuilderFlag.FP16)
        precision = "fp16"
    if int8:
        if not calib:
            raise ValueError("INT8 needs calibration strips: --calib FILE.npz (arrays rgb and hsi)")
        with np.load(calib) as z:
            strips = {"rgb": z["rgb"], "hsi": z["hsi"]}
        config.set_flag(trt.BuilderFlag.INT8)
        config.int8_calibrator = _Calibrator.make(strips, out.with_suffix(".calib"))
        precision = "int8"
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise ModelFileError(f"{onnx_path}: TensorRT could not build an engine (see its log above)")
    cache_path.write_bytes(memoryview(config.get_timing_cache().serialize()))
    header = {**meta, "tensorrt": trt.__version__, "gpu": gpu_name(), "precision": precision,
              "onnx": onnx_path.name}
    return write_engine(out, header, bytes(plan))


