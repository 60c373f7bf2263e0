"""The message contract: one typed, versioned header plus raw arrays.

On the wire a message is a multipart ZeroMQ message: the header (msgpack,
decoded straight into typed structs by msgspec) and then one frame per array,
unless the arrays sit in a shared-memory slot (`Header.slot`), in which case
only the header travels and each `ArraySpec.offset` says where its array lies
in the slot. Arrays are never pickled and never converted element by element:
they are sent with `copy=False` and read back with `numpy.frombuffer`.

Anything that does not fit this contract raises `MessageError`, whose `kind`
names what was wrong, so a receiving node can count it per kind and carry on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Protocol

import msgspec
import numpy as np

SCHEMA_VERSION = 1

# Arrays in messages are sensor data, masks and tables: plain numeric types only.
DTYPES = frozenset(
    ["bool", "uint8", "int8", "uint16", "int16", "uint32", "int32", "uint64", "int64",
     "float16", "float32", "float64"]
)
_ITEMSIZE = {name: np.dtype(name).itemsize for name in DTYPES}
MAX_ARRAYS = 16
MAX_DIMS = 6
MAX_ARRAY_BYTES = 1 << 30


class MessageError(Exception):
    """A message that does not fit the contract.

    kind is one of: "frames" (wrong frame count), "header" (not a valid
    header), "schema" (unknown schema version), "size" (array bytes do not
    match shape x dtype, or a bad shape/dtype), "slot" (the shared-memory slot
    is missing or out of range), "overwritten" (a `latest` edge reused the
    slot before it was read: a counted drop, not a fault), "payload" (a valid
    message that is not what the receiving port takes: pipeline.ports).
    """

    def __init__(self, kind: str, detail: str):
        super().__init__(f"{kind}: {detail}")
        self.kind = kind
        self.detail = detail


class TraceEntry(msgspec.Struct, array_like=True, frozen=True):
    """One stage a message went through, in the trace clock (ns)."""

    stage: str
    t_in_ns: int
    t_out_ns: int


class ArraySpec(msgspec.Struct, array_like=True, frozen=True):
    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int = -1  # byte offset inside the shared-memory slot; -1: own frame

    @property
    def count(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * _ITEMSIZE[self.dtype]


class SlotRef(msgspec.Struct, array_like=True, frozen=True):
    """Where the arrays of a message sit: a slot of a shared-memory pool."""

    segment: str  # file name inside the private runtime directory
    index: int
    generation: int
    lane: int  # which consumer lane of the pool this copy of the header is for


class Header(msgspec.Struct, kw_only=True, omit_defaults=True):
    stream: str
    seq: int
    position: int = 0  # belt position of the first line, encoder ticks
    ticks_per_line: int = 0
    device_ts_ns: int = 0  # exposure time of the first line as the device stamped it
    host_ts: bool = False  # device_ts_ns is the host clock at arrival (device gave none)
    gap: bool = False  # lines are missing between the previous message and this one
    eos: bool = False  # the stream ends here (finite sources: replay, tests)
    arrays: list[ArraySpec] = []
    trace: list[TraceEntry] = []
    slot: SlotRef | None = None
    meta: dict[str, Any] = {}
    schema: int = SCHEMA_VERSION


class _Version(msgspec.Struct):
    schema: int = -1


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Header)
_version_decoder = msgspec.msgpack.Decoder(_Version)


class Lease(Protocol):
    """A hold on the shared-memory slot a message's arrays sit in (pipeline.slots.SlotLease)."""

    def intact(self) -> bool: ...

    def release(self) -> None: ...


@dataclass(eq=False)
class Message:
    """A decoded message. Arrays are views: valid until the node returns.

    A node that keeps data beyond its `process` call copies it; for a shared
    memory slot, `intact()` tells whether the producer has since overwritten
    it (only a `latest` edge ever does). `header.meta` is the wire form of the
    message's structured payload; `meta` is the same, typed by the receiving
    port (pipeline.ports).
    """

    header: Header
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    lease: Lease | None = None
    outgoing: tuple | None = field(default=None, repr=False)  # (pool, slot, offsets) until sent
    t_in_ns: int = 0  # a source's acquisition time, used as its trace entry's t_in
    meta: Any = None  # header.meta as its port's payload declares it (a msgspec Struct), once checked

    def intact(self) -> bool:
        return self.lease is None or self.lease.intact()

    def release(self) -> None:
        if self.lease is not None:
            self.lease.release()
            self.lease = None


def encode_header(header: Header) -> bytes:
    return _encoder.encode(header)


def decode_header(buf) -> Header:
    try:
        header = _decoder.decode(buf)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        version = _peek_version(buf)
        if version not in (-1, SCHEMA_VERSION):
            raise MessageError("schema", f"schema version {version}, this build reads {SCHEMA_VERSION}") from None
        raise MessageError("header", str(exc)) from None
    if header.schema != SCHEMA_VERSION:
        raise MessageError("schema", f"schema version {header.schema}, this build reads {SCHEMA_VERSION}")
    check_specs(header.arrays)
    return header


def _peek_version(buf) -> int:
    try:
        return _version_decoder.decode(buf).schema
    except (msgspec.DecodeError, msgspec.ValidationError):
        return -1


def check_specs(specs: list[ArraySpec]) -> None:
    if len(specs) > MAX_ARRAYS:
        raise MessageError("size", f"{len(specs)} arrays, at most {MAX_ARRAYS}")
    if len({spec.name for spec in specs}) != len(specs):  # arrays are looked up by name
        raise MessageError("header", f"array names repeat: {[spec.name for spec in specs]}")
    for spec in specs:
        if spec.dtype not in DTYPES:
            raise MessageError("size", f"array {spec.name!r}: dtype {spec.dtype!r} not allowed")
        if len(spec.shape) > MAX_DIMS or any(d < 0 for d in spec.shape):
            raise MessageError("size", f"array {spec.name!r}: bad shape {spec.shape}")
        if spec.nbytes > MAX_ARRAY_BYTES:
            raise MessageError("size", f"array {spec.name!r}: {spec.nbytes} bytes is too large")


def spec_for(name: str, array: np.ndarray, offset: int = -1) -> ArraySpec:
    return ArraySpec(name, array.dtype.name, tuple(array.shape), offset)


def inline_frames(header: Header, arrays: dict[str, np.ndarray]) -> list:
    """Frames of a message whose arrays travel in the message itself."""
    specs = [spec_for(name, a) for name, a in arrays.items()]
    header = msgspec.structs.replace(header, arrays=specs, slot=None)
    return [encode_header(header), *(np.ascontiguousarray(a) for a in arrays.values())]


def inline_arrays(header: Header, frames: list) -> dict[str, np.ndarray]:
    """Zero-copy views of the array frames that follow a header."""
    if len(frames) != len(header.arrays):
        raise MessageError("frames", f"header names {len(header.arrays)} arrays, {len(frames)} array frames came")
    arrays = {}
    for spec, frame in zip(header.arrays, frames):
        buf = frame.buffer if hasattr(frame, "buffer") else memoryview(frame)
        if buf.nbytes != spec.nbytes:
            raise MessageError("size", f"array {spec.name!r}: {buf.nbytes} bytes, shape {spec.shape} {spec.dtype} needs {spec.nbytes}")
        array = np.frombuffer(buf, dtype=spec.dtype).reshape(spec.shape)
        array.flags.writeable = False  # inputs are read-only, whichever way they came
        arrays[spec.name] = array
    return arrays
