"""What a port carries: each stream's payload, declared once, checked where it arrives.

A node kind declares its ports with the payload each one carries
(`inputs = {"in": STRIP}`), as Holoscan's operators declare what a port
accepts. A payload names its arrays, with the dtypes and shapes they may
have, and the typed structure of its header's `meta` (a msgspec Struct):

    STRIP = Payload("strip", arrays={
        "rgb": Array(("uint8",), ("lines", "width", 3)),
        "hsi": Array(("float16",), ("hsi_lines", "hsi_width", "bands")),
    }, meta=StripMeta)

A dimension is a number (always that size), a name (the same size wherever
the name appears in one message, and the bound value if the receiving node
bound it: `self.expect("in", width=640)`), or None (any size). The name
`ticks_per_line` binds the header's field of that name too. Bounds of the
meta that depend on the machine (valve numbers within the bar) are a
`validate` function of the payload, over the values the node bound.

The runner checks every arriving message against its port's payload before
the node sees it: a message that does not fit is a MessageError of kind
"payload", counted and logged like any malformed message, and the node's
`process` gets `msg.meta` as the typed Struct. Nodes do not check by hand.
The graph check (`sortline check`, start-up) refuses an edge whose two ends
declare different payloads.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import msgspec

from sortline.pipeline.messages import Message, MessageError

Dim = int | str | None


@dataclass(frozen=True)
class Array:
    dtypes: tuple[str, ...]
    shape: tuple[Dim, ...]


@dataclass(frozen=True)
class Payload:
    """A stream's payload. `ANY` takes whatever comes (recorders, relays, measuring sinks)."""

    name: str
    arrays: Mapping[str, Array] = field(default_factory=dict)
    meta: type[msgspec.Struct] | None = None
    any: bool = False
    # Bounds of the meta that depend on the machine (a valve bar's size): a function of the typed meta
    # and what the node bound, saying what is wrong or None; the names it reads are `bounds`.
    validate: Callable[[Any, Mapping[str, int]], str | None] | None = None
    bounds: tuple[str, ...] = ()

    def dims(self) -> set[str]:
        """The names a receiving node may bind: the arrays' named dimensions, ticks_per_line, bounds."""
        return {d for a in self.arrays.values() for d in a.shape if isinstance(d, str)} | {"ticks_per_line",
                                                                                            *self.bounds}

    def accepts(self, other: Payload) -> bool:
        """Whether an edge from a port carrying `other` may end at a port taking this."""
        return self.any or other.any or other is self

    def check(self, msg: Message, bound: Mapping[str, int]) -> None:
        """Raise MessageError("payload", ...) unless msg fits; set msg.meta to the typed meta."""
        if self.any:
            return
        if set(msg.arrays) != set(self.arrays):
            raise MessageError("payload", f"a {self.name} message has arrays {sorted(self.arrays)}, "
                               f"this one {sorted(msg.arrays)}")
        seen: dict[str, int] = {}
        if "ticks_per_line" in bound:
            seen["ticks_per_line"] = msg.header.ticks_per_line
        for name, decl in self.arrays.items():
            a = msg.arrays[name]
            if a.dtype.name not in decl.dtypes:
                raise MessageError("payload", f"{self.name} array {name!r} is {a.dtype.name}, "
                                   f"expected {' or '.join(decl.dtypes)}")
            if a.ndim != len(decl.shape):
                raise MessageError("payload", f"{self.name} array {name!r} has shape {a.shape}, expected "
                                   f"{len(decl.shape)} dimensions {_show(decl.shape)}")
            for size, dim in zip(a.shape, decl.shape):
                if isinstance(dim, int) and size != dim or isinstance(dim, str) and seen.setdefault(dim, size) != size:
                    raise MessageError("payload", f"{self.name} array {name!r} has shape {a.shape}, expected "
                                       f"{_show(decl.shape)} with {_show_dims(seen, bound)}")
        for dim, value in bound.items():
            if dim in seen and seen[dim] != value:
                raise MessageError("payload", f"{self.name} message has {dim} = {seen[dim]}, this node "
                                   f"takes {dim} = {value}")
        if self.meta is not None:
            try:
                msg.meta = msgspec.convert(msg.header.meta, self.meta)
            except msgspec.ValidationError as exc:
                raise MessageError("payload", f"{self.name} meta: {exc}") from None
            why = self.validate(msg.meta, bound) if self.validate else None
            if why:
                raise MessageError("payload", f"{self.name}: {why}")


def _show(shape: tuple[Dim, ...]) -> str:
    return "(" + ", ".join("*" if d is None else str(d) for d in shape) + ")"


def _show_dims(seen: Mapping[str, int], bound: Mapping[str, int]) -> str:
    return ", ".join(f"{k} = {v}" for k, v in {**seen, **bound}.items()) or "any sizes"


ANY = Payload("any", any=True)
