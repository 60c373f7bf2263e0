"""Talking to a valve bar: the datagram, and the drivers that send it.

One datagram commands one air pulse on a range of adjacent valves. Commands
go out ahead of time with absolute times, as timestamped fieldbus outputs
do, so the network's jitter does not move the pulse. Layout (little-endian,
40 bytes):

    offset size field
     0     2    magic          0x4C53 ("SL")
     2     1    version        1
     3     1    flags          0 (reserved)
     4     4    seq            command counter (u32, wraps)
     8     2    valve_lo       first valve (0 = valve 0, at valves.offset_mm)
    10     2    valve_hi       last valve, inclusive
    12     8    open_pos       encoder position (ticks) at which the air must arrive (i64)
    20     8    open_at_ns     when to energise the valve: CLOCK_REALTIME ns, PTP-disciplined (i64)
    28     4    duration_us    how long to keep it energised (u32)
    32     4    object_id      the object this pulse is for, for logs (u32)
    36     4    crc32          zlib.crc32 of bytes 0..35

A controller that tracks the encoder itself may use open_pos; one that only
has a clock uses open_at_ns. Either way it should drop a datagram whose
checksum, magic or version is wrong, and one whose open time has passed.

The drivers that send it are in nodes.belt.drivers.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass


MAGIC = 0x4C53
VERSION = 1
_BODY = struct.Struct("<HBBIHHqqII")
SIZE = _BODY.size + 4


@dataclass(frozen=True)
class Command:
    seq: int
    valve_lo: int
    valve_hi: int
    open_pos: int
    open_at_ns: int
    duration_us: int
    object_id: int


class DatagramError(ValueError):
    """A datagram that is not a valid command (size, magic, version, checksum, contents)."""

    def __init__(self, kind: str, detail: str):
        super().__init__(f"{kind}: {detail}")
        self.kind = kind


def encode(c: Command) -> bytes:
    body = _BODY.pack(MAGIC, VERSION, 0, c.seq & 0xFFFFFFFF, c.valve_lo, c.valve_hi, c.open_pos, c.open_at_ns,
                      c.duration_us, c.object_id & 0xFFFFFFFF)
    return body + struct.pack("<I", zlib.crc32(body))


def decode(data: bytes, valves: int | None = None) -> Command:
    if len(data) != SIZE:
        raise DatagramError("size", f"{len(data)} bytes, a command is {SIZE}")
    body, (crc,) = data[:-4], struct.unpack("<I", data[-4:])
    if zlib.crc32(body) != crc:
        raise DatagramError("checksum", "crc32 does not match")
    magic, version, _, seq, lo, hi, open_pos, open_at, duration, obj = _BODY.unpack(body)
    if magic != MAGIC:
        raise DatagramError("magic", f"0x{magic:04x}")
    if version != VERSION:
        raise DatagramError("version", f"{version}, this end speaks {VERSION}")
    if lo > hi or (valves is not None and hi >= valves):
        raise DatagramError("valves", f"range {lo}..{hi} on a bar of {valves}")
    return Command(seq, lo, hi, open_pos, open_at, duration, obj)
