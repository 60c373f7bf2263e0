"""The infer node: strips in, per-pixel class masks with confidence out.

Input (stream "strip", from the register node): rgb (strip + 2 x overlap
lines, W, 3) uint8 and hsi (those lines / r, W / r, bands) float16
reflectance; `position` is the encoder position of the strip's first line
(the top of the overlap), `meta` {"overlap", "ratio"}.

Output (stream "mask"): classes and confidence (max softmax x 255), both
(strip lines, W) uint8, for the core lines only; or, with model.mask_stride
k > 1, (strip lines / k, W / k), one value per k x k RGB pixels, and
`ticks_per_line` k times the strip's. `position` moves to the first core
line; the trace and the other header fields are carried over; `meta`
{"classes": names, "model": model hash, "stride": k, "valid_lines": mask lines
with real data (a strip the register node ended early at a gap has fewer)}.

The model is opened once in setup with the configured backend (see
models.backends). A model file that is missing or made for other strips or
classes is a ConfigError: a restart would not fix it. A strip that does not
fit the model is dropped, counted and logged (the runner's "process" kind).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import Field

from pipeline.config import ConfigError, Section
from pipeline.node import Node

ROOT = Path(__file__).resolve().parent.parent


class Infer(Node):
    inputs = ("in",)
    outputs = ("out",)

    class Params(Section):
        model: str = Field("", description="model file; empty: model.path (a checkpoint, .onnx or .engine)")
        backend: Literal["", "onnxruntime", "onnxruntime-cuda", "tensorrt", "torch"] = Field(
            "", description="empty: model.backend")
        threads: int = Field(0, ge=0, le=64, description="0: model.threads")
        classes: list[str] = Field([], description="the class names downstream expects, in order; "
                                   "a model with others is refused. Empty: whatever the model has")

    def setup(self) -> None:
        from models.backends import open_backend
        from models.checkpoint import ModelFileError
        from models.export import StripShape

        m, p = self.settings.model, self.params
        if not (p.model or m.path):
            raise ConfigError([f"node {self.name}: no model: set model.path or the node's `model` param"])
        path = Path(p.model or m.path)
        if not path.is_absolute() and not path.exists():
            path = ROOT / path   # a path inside the project (the shipped model) works from any directory
        self.shape = StripShape.from_settings(self.settings)
        kind = p.backend or m.backend
        try:
            self.backend = open_backend(kind, path, self.shape, p.threads or m.threads)
            if p.classes:
                self.backend.expect(self.shape.rgb, self.shape.hsi, p.classes)
        except ModelFileError as exc:
            raise ConfigError([f"node {self.name}: {exc}"]) from None
        except ImportError as exc:
            raise ConfigError([f"node {self.name}: backend {kind} is not installed here ({exc}); "
                               "the tensorrt backend needs the .[gpu] extra on an NVIDIA machine"]) from None
        self.meta = {"classes": list(self.backend.classes), "model": self.backend.model_hash, "stride": self.shape.stride}
        self.core = self.shape.core
        self.strips, self.busy_s = 0, 0.0
        self.log.info("%s backend, model %s (%s), strips %s -> masks %s", kind, self.backend.model_hash, path,
                      self.shape.rgb[1:3], self.core)

    def _check(self, msg) -> tuple[np.ndarray, np.ndarray]:
        rgb, hsi = msg.arrays.get("rgb"), msg.arrays.get("hsi")
        if rgb is None or hsi is None:
            raise ValueError(f"a strip needs arrays rgb and hsi, this one has {sorted(msg.arrays)}")
        meta = msg.header.meta
        if meta.get("overlap", self.shape.overlap) != self.shape.overlap or meta.get("ratio", self.shape.ratio) != self.shape.ratio:
            raise ValueError(f"strip overlap/ratio {meta.get('overlap')}/{meta.get('ratio')}, the model "
                             f"expects {self.shape.overlap}/{self.shape.ratio}")
        if rgb.dtype != np.uint8 or hsi.dtype not in (np.float16, np.float32):
            raise ValueError(f"strip dtypes rgb {rgb.dtype}, hsi {hsi.dtype}: expected uint8 and float16")
        return rgb, hsi

    def process(self, port, msg):
        rgb, hsi = self._check(msg)
        t0 = time.perf_counter()
        classes, confidence = self.backend.run(rgb, hsi)   # a shape mismatch raises: dropped and counted
        self.busy_s += time.perf_counter() - t0
        h, k = msg.header, self.shape.stride
        valid = -(-int(h.meta.get("valid_lines", self.core[0] * k)) // k)
        out = self.out["out"].new({"classes": (self.core, np.uint8), "confidence": (self.core, np.uint8)}, like=msg,
                                  stream="mask", position=h.position + self.shape.overlap * h.ticks_per_line,
                                  ticks_per_line=h.ticks_per_line * k, meta={**self.meta, "valid_lines": valid})
        if out is None:
            return None
        out.arrays["classes"][...] = classes
        out.arrays["confidence"][...] = confidence
        self.strips += 1
        return [("out", out)]

    def teardown(self) -> None:
        backend = getattr(self, "backend", None)
        if backend is not None:
            backend.close()

    def status(self) -> dict:
        if not getattr(self, "strips", 0):
            return {"strips": 0}
        return {"strips": self.strips, "ms_per_strip": round(self.busy_s / self.strips * 1000, 1)}
