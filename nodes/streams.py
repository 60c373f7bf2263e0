"""The streams between sortline's nodes: each one's payload, declared once.

A node kind names these in its ports (`inputs = {"in": STRIP}`); the runtime
checks every arriving message against its port's payload (pipeline.ports)
and hands the node the typed `msg.meta`. Camera sources (acquire, simulate,
replay) all publish LINES, so everything downstream is the same whichever
source feeds it.

| stream | from -> to | arrays | meta |
|---|---|---|---|
| LINES | acquire, simulate, replay -> register, encoder ports, record | lines (lines, pixels, channels) uint8/uint16 | CameraMeta |
| TRUTH | simulate, replay -> oracle, valve_sim, record | labels (lines, pixels) uint8, instances (lines, pixels) uint32 | TruthMeta |
| STRIP | register -> infer | rgb (lines, width, 3) uint8, hsi (lines/r, width/r, bands) float16 | StripMeta |
| MASK | infer, oracle -> eject_plan | classes, confidence (lines, width) uint8 | MaskMeta |
| EJECT | eject_plan -> ejector | none | EjectMeta: the valve windows |

Class names travel with the data: a mask names the model's classes
(classes[0] is the background, the empty belt), the truth names the
synthetic belt's, and a valve window names its object's class. Nothing
downstream keeps a class list of its own.
"""

from __future__ import annotations

import msgspec

from sortline.pipeline.ports import Array, Payload


class CameraMeta(msgspec.Struct, omit_defaults=True):
    """What a camera message says of its camera: references are valid for one camera and exposure."""

    camera: str = ""            # rgb or hsi: the machine's camera it stands for
    serial: str = ""
    pixel_format: str = ""
    bit_depth: int = 0
    exposure_us: float | None = None


class TruthObject(msgspec.Struct):
    """An object of the synthetic belt, in the truth message where it starts."""

    id: int
    cls: int                    # index into TruthMeta.classes
    x0_mm: float
    x1_mm: float
    p0: int                     # belt positions (ticks) of its first and past its last line
    p1: int
    look: str                   # clear, white, coloured, black, ...


class TruthMeta(msgspec.Struct):
    classes: list[str]          # label i is classes[i]
    objects: list[TruthObject] = []
    palette: list[list[int]] = []


class StripMeta(msgspec.Struct):
    overlap: int                # RGB lines of context above and below the core
    ratio: int                  # RGB pixels per HSI pixel, along and across
    valid_lines: int            # core lines with real data (fewer when a gap ended the strip)


class MaskMeta(msgspec.Struct):
    classes: list[str]          # class i of the mask is classes[i]; classes[0] is the background
    model: str                  # the model's hash ("oracle": the belt's truth)
    stride: int                 # RGB pixels per mask cell, along and across
    valid_lines: int            # mask lines with real data


class Window(msgspec.Struct, array_like=True, frozen=True):
    """Air for one object on a run of adjacent valves, in encoder positions at the valve bar."""

    valve_lo: int
    valve_hi: int               # inclusive
    open_pos: int               # the air must arrive when the encoder reads this...
    close_pos: int              # ... and may stop here
    object_id: int              # unique within a run (the position and column of the object's first pixel)
    cls: str                    # the object's class, a name from the model's classes
    confidence: float           # the model's mean confidence over the object's pixels, 0..1


class ObjectReport(msgspec.Struct):
    """An object the plan has finished with, and what it decided."""

    id: int
    cls: str
    decision: str               # eject, or why not: not_target, small, unsure, touching
    area_px: int
    x0_mm: float
    x1_mm: float
    p0: int
    p1: int


class EjectMeta(msgspec.Struct):
    windows: list[Window] = []
    objects: list[ObjectReport] = []


LINES = Payload("camera lines", arrays={"lines": Array(("uint8", "uint16"), ("lines", "pixels", "channels"))},
                meta=CameraMeta)
TRUTH = Payload("truth", arrays={"labels": Array(("uint8",), ("lines", "pixels")),
                                 "instances": Array(("uint32",), ("lines", "pixels"))}, meta=TruthMeta)
STRIP = Payload("strip", arrays={"rgb": Array(("uint8",), ("lines", "width", 3)),
                                 "hsi": Array(("float16",), ("hsi_lines", "hsi_width", "bands"))}, meta=StripMeta)
MASK = Payload("mask", arrays={"classes": Array(("uint8",), ("lines", "width")),
                               "confidence": Array(("uint8",), ("lines", "width"))}, meta=MaskMeta)
EJECT = Payload("eject windows", meta=EjectMeta)
