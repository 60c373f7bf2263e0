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
from typing import Annotated, Any, Protocol

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
MAX_META_DEPTH = 16     # tables in tables in a header's meta
MAX_TRACE = 64          # stages a message went through
CLOCK_MAX_NS = 1 << 62  # trace times: monotonic or wall-clock ns, well inside int64 after any shift

# Bounds msgspec checks while decoding: whatever bytes arrive, a decoded header is one a node can use.
_Ns = Annotated[int, msgspec.Meta(ge=0, le=CLOCK_MAX_NS)]
_Dim = Annotated[int, msgspec.Meta(ge=0, le=1 << 31)]
_Int64 = Annotated[int, msgspec.Meta(ge=-(1 << 63), le=(1 << 63) - 1)]
_Count = Annotated[int, msgspec.Meta(ge=0, le=(1 << 63) - 1)]


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

    stage: Annotated[str, msgspec.Meta(max_length=64)]
    t_in_ns: _Ns
    t_out_ns: _Ns


class ArraySpec(msgspec.Struct, array_like=True, frozen=True):
    name: Annotated[str, msgspec.Meta(max_length=64)]
    dtype: Annotated[str, msgspec.Meta(max_length=16)]
    shape: Annotated[tuple[_Dim, ...], msgspec.Meta(min_length=1, max_length=MAX_DIMS)]
    offset: Annotated[int, msgspec.Meta(ge=-1, le=1 << 40)] = -1  # byte offset inside the slot; -1: own frame

    @property
    def count(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * _ITEMSIZE[self.dtype]


class SlotRef(msgspec.Struct, array_like=True, frozen=True):
    """Where the arrays of a message sit: a slot of a shared-memory pool."""

    # a file name inside the private runtime directory (never a path): node.port.pid.n.slots (node#i: a replica)
    segment: Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_#-]+\.[A-Za-z0-9_]+\.[0-9]+\.[0-9]+\.slots$",
                                         max_length=200)]
    index: Annotated[int, msgspec.Meta(ge=0, le=1 << 16)]
    generation: _Count
    lane: Annotated[int, msgspec.Meta(ge=0, le=1 << 10)]  # the consumer lane this copy of the header is for


class Header(msgspec.Struct, kw_only=True, omit_defaults=True):
    stream: Annotated[str, msgspec.Meta(max_length=64)]
    seq: _Count
    position: _Int64 = 0  # belt position of the first line, encoder ticks
    ticks_per_line: _Dim = 0
    device_ts_ns: _Int64 = 0  # exposure time of the first line as the device stamped it
    host_ts: bool = False  # device_ts_ns is the host clock at arrival (device gave none)
    gap: bool = False  # lines are missing between the previous message and this one
    eos: bool = False  # the stream ends here (finite sources: replay, tests)
    arrays: Annotated[list[ArraySpec], msgspec.Meta(max_length=MAX_ARRAYS)] = []
    trace: Annotated[list[TraceEntry], msgspec.Meta(max_length=MAX_TRACE)] = []
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
    """The header in `buf`, or MessageError: never any other exception, whatever the bytes."""
    try:
        header = _decoder.decode(buf)
    except (msgspec.DecodeError, msgspec.ValidationError, RecursionError) as exc:
        version = _peek_version(buf)
        if version not in (-1, SCHEMA_VERSION):
            raise MessageError("schema", f"schema version {version}, this build reads {SCHEMA_VERSION}") from None
        detail = str(exc) or type(exc).__name__
        # What failed says which kind it was: an array's description, the slot reference, or the rest.
        kind = "size" if "at `$.arrays" in detail else "slot" if "at `$.slot" in detail else "header"
        raise MessageError(kind, detail) from None
    if header.schema != SCHEMA_VERSION:
        raise MessageError("schema", f"schema version {header.schema}, this build reads {SCHEMA_VERSION}")
    if _depth(header.meta) > MAX_META_DEPTH:
        raise MessageError("header", f"meta nested deeper than {MAX_META_DEPTH} levels")
    check_specs(header.arrays)
    return header


def _depth(value) -> int:
    """How deeply tables and lists nest in a decoded value (iteratively: a deep one must not recurse)."""
    deepest, todo = 0, [(value, 1)]
    while todo:
        v, d = todo.pop()
        if isinstance(v, dict):
            v = v.values()
        elif not isinstance(v, list):
            continue
        deepest = max(deepest, d)
        if deepest > MAX_META_DEPTH:
            break
        todo.extend((x, d + 1) for x in v)
    return deepest


def _peek_version(buf) -> int:
    try:
        return _version_decoder.decode(buf).schema
    except (msgspec.DecodeError, msgspec.ValidationError, RecursionError):
        return -1


def check_specs(specs: list[ArraySpec]) -> None:
    if len(specs) > MAX_ARRAYS:
        raise MessageError("size", f"{len(specs)} arrays, at most {MAX_ARRAYS}")
    if len({spec.name for spec in specs}) != len(specs):  # arrays are looked up by name
        raise MessageError("header", f"array names repeat: {[spec.name for spec in specs]}")
    for spec in specs:
        if spec.dtype not in DTYPES:
            raise MessageError("size", f"array {spec.name!r}: dtype {spec.dtype!r} not allowed")
        if not 1 <= len(spec.shape) <= MAX_DIMS or any(d < 0 for d in spec.shape):
            raise MessageError("size", f"array {spec.name!r}: bad shape {spec.shape}")
        # Empty arrays too: numpy refuses a shape whose other dimensions multiply past its index range.
        if math.prod(max(d, 1) for d in spec.shape) * _ITEMSIZE[spec.dtype] > MAX_ARRAY_BYTES:
            raise MessageError("size", f"array {spec.name!r}: shape {spec.shape} is too large")


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
