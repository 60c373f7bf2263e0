"""`sortline build-engine`: a TensorRT engine from an exported ONNX model.

An engine is tied to the GPU model and the TensorRT version that built it,
so it is built on the machine that runs it (a Jetson builds its own, with
JetPack's TensorRT). The file is a small header and the serialized plan (models.contract): the
ONNX model's metadata (input shapes, classes, overlap, model hash) and the
TensorRT version, GPU and precision, which the tensorrt backend checks.

Precision: FP16 by default (FP32 layers where TensorRT prefers them); INT8
with an entropy calibrator over real strips (`--calib FILE.npz` with arrays
rgb (N, H, W, 3) and hsi (N, h, w, bands), e.g. held-out synthetic strips);
`--fp32` for checking. A timing cache beside the engine makes rebuilds fast;
one that this TensorRT or GPU cannot use is said so (a warning naming the
file) and rebuilt, never dropped silently.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from sortline.models.contract import ModelFileError, write_engine

log = logging.getLogger("sortline.engine")


class _Calibrator:
    """INT8 entropy calibration over real strips (created lazily: it subclasses TensorRT's class)."""

    @staticmethod
    def make(strips: dict[str, np.ndarray], dtypes: dict[str, np.dtype], cache: Path):
        """dtypes: the network's input types (uint8 RGB, float16 HSI): the strips go in as those."""
        import pycuda.driver as cuda
        import tensorrt as trt

        class Calibrator(trt.IInt8EntropyCalibrator2):
            def __init__(self):
                super().__init__()
                self.strips, self.i = strips, 0
                self.device = {k: cuda.mem_alloc(v[0:1].astype(dtypes[k]).nbytes) for k, v in strips.items()}

            def get_batch_size(self):
                return 1

            def get_batch(self, names):
                if self.i >= len(self.strips["rgb"]):
                    return None
                for k in names:
                    cuda.memcpy_htod(self.device[k], np.ascontiguousarray(self.strips[k][self.i:self.i + 1], dtypes[k]))
                self.i += 1
                return [int(self.device[k]) for k in names]

            def read_calibration_cache(self):
                return cache.read_bytes() if cache.exists() else None

            def write_calibration_cache(self, data):
                cache.write_bytes(bytes(data))

        return Calibrator()


def use_timing_cache(config, path: Path):
    """Attach the timing cache in `path` to a builder config, or an empty one where there is none, or
    where this TensorRT cannot read it or refuses it (another version or GPU): then with a warning
    naming the file, which the build writes anew."""
    blob = path.read_bytes() if path.exists() else b""
    if blob:
        try:
            cache = config.create_timing_cache(blob)
        except (RuntimeError, TypeError, ValueError) as exc:   # a damaged file can raise rather than return None
            log.warning("timing cache %s is unreadable (%s)", path, exc)
            cache = None
        if cache is not None and config.set_timing_cache(cache, ignore_mismatch=False):
            return
        log.warning("timing cache %s does not match this TensorRT version and GPU (or is damaged): not used; "
                    "it will be rebuilt, and this build times every layer again", path)
    if not config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False):
        raise ModelFileError("TensorRT refused an empty timing cache")


def build(onnx_path: str | Path, out: str | Path, *, int8: bool = False, fp32: bool = False,
          calib: str | Path = "", timing_cache: str | Path = "", workspace_mb: int = 1024, device: int = 0) -> Path:
    """Build the engine on GPU `device` (the machine config's model.device)."""
    import pycuda.driver as cuda

    from sortline.models.backends.tensorrt import gpu_missing

    missing = gpu_missing(device)
    if missing:
        raise ModelFileError(f"cannot build an engine: {missing}")
    context = cuda.Device(device).make_context()
    try:
        return _build(Path(onnx_path), Path(out), int8, fp32, calib, timing_cache, workspace_mb, device)
    finally:
        context.pop()
        context.detach()


def _build(onnx_path: Path, out: Path, int8: bool, fp32: bool, calib, timing_cache, workspace_mb: int,
           device: int) -> Path:
    import onnx
    import tensorrt as trt

    from sortline.models.backends.tensorrt import gpu_name

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
    use_timing_cache(config, cache_path)
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
        inputs = [network.get_input(i) for i in range(network.num_inputs)]
        dtypes = {t.name: np.dtype(trt.nptype(t.dtype)) for t in inputs}
        config.int8_calibrator = _Calibrator.make(strips, dtypes, out.with_suffix(".calib"))
        precision = "int8"
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise ModelFileError(f"{onnx_path}: TensorRT could not build an engine (see its log above)")
    cache_path.write_bytes(memoryview(config.get_timing_cache().serialize()))
    header = {**meta, "tensorrt": trt.__version__, "gpu": gpu_name(device), "precision": precision,
              "onnx": onnx_path.name}
    return write_engine(out, header, bytes(plan))


