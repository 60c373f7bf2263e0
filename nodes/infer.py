"""The infer node: strips in, per-pixel class masks with confidence out.

Input (STRIP, from the register node): rgb (strip + 2 x overlap lines, W, 3)
uint8 and hsi (those lines / r, W / r, bands) float16 reflectance;
`position` is the encoder position of the strip's first line (the top of the
overlap).

Output (MASK): classes and confidence (max softmax x 255), both (strip
lines, W) uint8, for the core lines only; or, with model.mask_stride k > 1,
(strip lines / k, W / k), one value per k x k RGB pixels, and
`ticks_per_line` k times the strip's. `position` moves to the first core
line; the trace and the other header fields are carried over; the meta names
the model's classes (the one class list: the model carries it), its hash,
the stride and the mask lines with real data (a strip the register node
ended early at a gap has fewer).

The model (model.path) is opened once in setup with the configured backend
(sortline.models.backends: ONNX Runtime and TensorRT need no torch) on GPU
model.device, and given the strip's arrays as they arrive: the model converts
them on its device. Where the config asks for tensorrt or onnxruntime-cuda and
this machine cannot run it (no engine, no TensorRT, no GPU), the node runs the
model's ONNX file on ONNX Runtime on the CPU, with one warning at start-up that
says what is missing; `sortline_infer_backend_info{backend=...}` says which
runs. A model file that is missing, made for other strips, or without a class
the recipe targets is a ConfigError: a restart would not fix it.

A strip that arrives too late is not inferred: where its age (from the
acquisition its trace starts with: the camera lines that completed it) exceeds
`max_age_ms` when the node takes it (default: a quarter of the latency budget
at the nominal belt speed: the strip's oldest lines are a strip's length older
than its newest, about another quarter of the budget on the demo profile, and
inference and the plan need the half that is left), it is dropped and counted
(`sortline_edge_drops_total{reason="late"}`) and the next mask carries the
gap. This is what keeps latency bounded on a host that cannot keep up:
inferring a strip that late would make every strip after it late too, and the
eject plan could blow none of its objects' fronts.
The plan closes objects at the gap; the masks that go on are fresh. With
`timing = false` (a belt that waits for the pipeline: replay, `score
--unpaced`) every strip is inferred, however late.
"""

from __future__ import annotations

import time

import numpy as np
from pydantic import Field

from sortline.models.backends import open_for_machine
from sortline.models.contract import ModelFileError, StripShape, model_file
from sortline.nodes.streams import MASK, STRIP, MaskMeta
from sortline.pipeline import metrics
from sortline.pipeline.config import ConfigError, Section
from sortline.pipeline.node import Node


class Infer(Node):
    inputs = {"in": STRIP}
    outputs = {"out": MASK}

    class Params(Section):
        timing: bool = Field(True, description="false: infer every strip however late (a belt that waits for "
                             "the pipeline); true: drop a strip too late to be of use, and count it")
        max_age_ms: float = Field(0.0, ge=0, description="a strip older than this when the node takes it is "
                                  "dropped; 0: a quarter of the latency budget at the nominal belt speed")

    def setup(self) -> None:
        m = self.machine.model
        self.shape = s = StripShape.from_machine(self.machine)
        # Replicas of this node share the machine's GPUs out: replica i opens model.device + i.
        self.backend, unavailable = open_model(self.machine, m.device + self.replica)
        classes = list(self.backend.classes)
        self.expect("in", lines=s.lines, width=s.width, hsi_lines=s.lines // s.ratio, hsi_width=s.width // s.ratio,
                    bands=s.bands)
        if unavailable:
            self.log.warning("model.backend = %r cannot run here: %s. Running model %s on ONNX Runtime on the CPU "
                             "instead, far slower than a GPU", m.backend, unavailable, self.backend.model_hash)
        metrics.INFER_BACKEND.labels(self.name, self.backend.name).set(1)
        self.classes = classes
        self.core = s.core
        self.strips, self.busy_s = 0, 0.0
        # Across hosts without synchronised clocks a trace's age means nothing: then nothing is dropped as late.
        timed = self.params.timing and not self.context.unsynchronised_edges
        max_age_ms = self.params.max_age_ms or self.machine.budget_ms() / 4
        self.max_age_ns = max_age_ms * 1e6 if timed else None
        self.late, self.gap = 0, False
        self._late = metrics.DROPS.labels(f"{self.name}.in", "late")
        self.log.info("%s backend, model %s (%s), strips %s -> masks %s", self.backend.name, self.backend.model_hash,
                      m.path, s.rgb[1:3], self.core)

    def process(self, port, msg):
        h, meta, s = msg.header, msg.meta, self.shape
        if (meta.overlap, meta.ratio) != (s.overlap, s.ratio):
            raise ValueError(f"strip overlap/ratio {meta.overlap}/{meta.ratio}, the model expects {s.overlap}/{s.ratio}")
        if self.max_age_ns is not None and h.trace and time.monotonic_ns() - h.trace[0].t_in_ns > self.max_age_ns:
            self.late += 1
            self._late.inc()
            self.gap = True
            return None
        t0 = time.perf_counter()
        classes, confidence = self.backend.run(msg.arrays["rgb"], msg.arrays["hsi"])
        self.busy_s += time.perf_counter() - t0
        k = s.stride
        valid = -(-meta.valid_lines // k)
        out = self.out["out"].new({"classes": (self.core, np.uint8), "confidence": (self.core, np.uint8)}, like=msg,
                                  stream="mask", position=h.position + s.overlap * h.ticks_per_line,
                                  ticks_per_line=h.ticks_per_line * k, gap=h.gap or self.gap,
                                  meta=MaskMeta(self.classes, self.backend.model_hash, k, valid))
        if out is None:
            return None
        out.arrays["classes"][...] = classes
        out.arrays["confidence"][...] = confidence
        self.strips += 1
        self.gap = False
        return [("out", out)]

    def recipe_classes(self):
        return self.classes[1:]   # a recipe change naming another class is refused (the supervisor asks)

    def on_recipe(self, recipe, at_tick):
        missing = [t for t in recipe.targets if t not in self.classes[1:]]
        if missing:   # the supervisor checks a change against the classes this node reports: a bug if seen
            self.log.error("recipe targets %s not among the classes of model %s", ", ".join(missing),
                           self.backend.model_hash)

    def teardown(self) -> None:
        if hasattr(self, "backend"):
            self.backend.close()

    def status(self) -> dict:
        if not self.strips:
            return {"strips": 0, "late": self.late, "backend": self.backend.name}
        return {"strips": self.strips, "late": self.late, "backend": self.backend.name,
                "ms_per_strip": round(self.busy_s / self.strips * 1000, 1)}


def open_model(machine, device: int):
    """(backend, why the configured one cannot run here or "") for the machine's model on GPU `device`:
    what the infer node runs, and what `sortline check` opens to say a model will not do before a run."""
    m = machine.model
    if not m.path:
        raise ConfigError(["model.path: not set; the infer node needs a model (docs/model.md)"])
    try:
        backend, unavailable = open_for_machine(m.backend, model_file(m.path), StripShape.from_machine(machine),
                                                m.threads, device)
    except ModelFileError as exc:
        raise ConfigError([f"model.path: {exc}"]) from None
    except ImportError as exc:
        raise ConfigError([f"model.backend = {m.backend!r} is not installed here ({exc}); onnxruntime needs "
                           "the .[infer] extra, tensorrt the .[gpu] extra on an NVIDIA machine"]) from None
    missing = [t for t in machine.recipe.targets if t not in list(backend.classes)[1:]]
    if missing:
        raise ConfigError([f"recipe.targets: {', '.join(missing)} not among the classes of model "
                           f"{backend.model_hash} ({', '.join(backend.classes[1:])})"])
    return backend, unavailable
