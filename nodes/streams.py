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

from typing import Annotated

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


Valve = Annotated[int, msgspec.Meta(ge=0, le=1023)]
Position = Annotated[int, msgspec.Meta(ge=-(1 << 62), le=1 << 62)]


class Window(msgspec.Struct, array_like=True, frozen=True):
    """Air for one object on a run of adjacent valves, in encoder positions at the valve bar."""

    valve_lo: Valve
    valve_hi: Valve             # inclusive
    open_pos: Position          # the air must arrive when the encoder reads this...
    close_pos: Position         # ... and may stop here
    object_id: Annotated[int, msgspec.Meta(ge=0, le=(1 << 63) - 1)]   # the object as judged (eject_plan.ObjectFinder)
    cls: Annotated[str, msgspec.Meta(max_length=64)]   # the object's class, a name from the model's classes
    confidence: Annotated[float, msgspec.Meta(ge=0, le=1)]   # the model's mean over the object's pixels


def object_position(object_id: int, width: int, ticks_per_line: int) -> int:
    """The belt position (ticks) of an object's first mask line, from its id (the eject plan's: first mask
    line x mask width + column): the position whose recipe judges the object (pipeline.recipes)."""
    return object_id // width * ticks_per_line


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
    windows: Annotated[list[Window], msgspec.Meta(max_length=100_000)] = []
    objects: Annotated[list[ObjectReport], msgspec.Meta(max_length=100_000)] = []


def windows_fit(meta: EjectMeta, bound) -> str | None:
    """A window must lie on the valve bar (`valves`: its number of valves) and be no longer than the
    belt carries between the scan line and the bar (`window_ticks`, with the margins and one strip)."""
    valves, longest = bound.get("valves"), bound.get("window_ticks")
    for w in meta.windows:
        if w.valve_lo > w.valve_hi or valves is not None and w.valve_hi >= valves:
            return f"a window for valves {w.valve_lo}..{w.valve_hi}, on a bar of {valves}"
        if w.close_pos <= w.open_pos or longest is not None and w.close_pos - w.open_pos > longest:
            return (f"a window from {w.open_pos} to {w.close_pos}: {w.close_pos - w.open_pos} ticks, "
                    f"at most {longest}")
    return None


LINES = Payload("camera lines", arrays={"lines": Array(("uint8", "uint16"), ("lines", "pixels", "channels"))},
                meta=CameraMeta)
TRUTH = Payload("truth", arrays={"labels": Array(("uint8",), ("lines", "pixels")),
                                 "instances": Array(("uint32",), ("lines", "pixels"))}, meta=TruthMeta)
STRIP = Payload("strip", arrays={"rgb": Array(("uint8",), ("lines", "width", 3)),
                                 "hsi": Array(("float16",), ("hsi_lines", "hsi_width", "bands"))}, meta=StripMeta)
MASK = Payload("mask", arrays={"classes": Array(("uint8",), ("lines", "width")),
                               "confidence": Array(("uint8",), ("lines", "width"))}, meta=MaskMeta)
EJECT = Payload("eject windows", meta=EjectMeta, validate=windows_fit, bounds=("valves", "window_ticks"))
