"""Talking to a valve bar: the datagram one command travels in.

One datagram commands one air pulse on a range of adjacent valves. Commands
go out ahead of time with absolute times, as timestamped fieldbus outputs
do, so the network's jitter does not move the pulse. Whoever can reach the
controller's port could fire the valves, so every datagram is authenticated
with a keyed MAC under the controller's own key (`sortline keys NAME
--valve`) and carries a sequence number that only ever grows, so a copy
replayed later is refused. Layout (little-endian, 56 bytes):

    offset size field
     0     2    magic          0x4C53 ("SL")
     2     1    version        2
     3     1    flags          0 (reserved)
     4     8    seq            grows with every command, across restarts too (u64; see next_seq)
    12     2    valve_lo       first valve (0 = valve 0, at valve_bar.offset_mm)
    14     2    valve_hi       last valve, inclusive
    16     8    open_pos       encoder position (ticks) at which the air must arrive (i64)
    24     8    open_at_ns     when to energise the valve: CLOCK_REALTIME ns, PTP-disciplined (i64)
    32     4    duration_us    how long to keep it energised (u32)
    36     4    object_id      the object this pulse is for, for logs (u32)
    40    16    mac            keyed BLAKE2b, 16 bytes, of bytes 0..39 under the controller's key

What a controller must check, in this order, dropping (and counting) what
fails: the size; the MAC (hmac.compare_digest: in constant time); magic and
version; the sequence number, against a window (SequenceWindow: a number
already seen, or older than the window, is a replay); the valve range
against its bar; the duration against its valves' min and max pulse; and
the open time, which must not have passed. A controller that tracks the
encoder itself may use open_pos; one that only has a clock uses open_at_ns.
The valve-bar simulator (nodes.valve_sim) checks exactly this.

The drivers that send it are in nodes.belt.drivers.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

MAGIC = 0x4C53
VERSION = 2
_BODY = struct.Struct("<HBBQHHqqII")
MAC_SIZE = 16
SIZE = _BODY.size + MAC_SIZE
KEY_SIZE = 32
SEQ_PER_US = 1 << 12   # sequence numbers per microsecond of wall clock (see next_seq)


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
    """A datagram that is not a valid command (size, mac, magic, version, valves, duration, replay, ...)."""

    def __init__(self, kind: str, detail: str):
        super().__init__(f"{kind}: {detail}")
        self.kind = kind


def _mac(key: bytes, body: bytes) -> bytes:
    return hashlib.blake2b(body, key=key, digest_size=MAC_SIZE).digest()


def encode(c: Command, key: bytes) -> bytes:
    body = _BODY.pack(MAGIC, VERSION, 0, c.seq, c.valve_lo, c.valve_hi, c.open_pos, c.open_at_ns,
                      c.duration_us, c.object_id & 0xFFFFFFFF)
    return body + _mac(key, body)


def decode(data: bytes, key: bytes, valves: int, max_duration_us: int) -> Command:
    """The command in a datagram, or DatagramError saying why it must be dropped. (The sequence number
    and the open time are for the receiver to check: they need its state and its clock.)"""
    if len(data) != SIZE:
        raise DatagramError("size", f"{len(data)} bytes, a command is {SIZE}")
    body, mac = data[:-MAC_SIZE], data[-MAC_SIZE:]
    if not hmac.compare_digest(_mac(key, body), mac):
        raise DatagramError("mac", "not made with this controller's key")
    magic, version, _, seq, lo, hi, open_pos, open_at, duration, obj = _BODY.unpack(body)
    if magic != MAGIC:
        raise DatagramError("magic", f"0x{magic:04x}")
    if version != VERSION:
        raise DatagramError("version", f"{version}, this end speaks {VERSION}")
    if lo > hi or hi >= valves:
        raise DatagramError("valves", f"range {lo}..{hi} on a bar of {valves}")
    if not 0 < duration <= max_duration_us:
        raise DatagramError("duration", f"{duration} µs; the valves take 1..{max_duration_us}")
    return Command(seq, lo, hi, open_pos, open_at, duration, obj)


def next_seq(last: int) -> int:
    """The sequence number after `last`: the wall clock in µs x SEQ_PER_US, or last + 1 if that is not
    more. A restarted sender so starts above everything it sent before (the clock has moved on)."""
    return max(last + 1, time.time_ns() // 1000 * SEQ_PER_US)


class SequenceWindow:
    """A receiver's memory of the sequence numbers it accepted: a number seen before is a duplicate, one
    older than the window (reordering the network may do) is a replay."""

    def __init__(self, window_us: int = 50_000, remember: int = 1024):
        self.window = window_us * SEQ_PER_US
        self.highest = -1
        self.recent: deque[int] = deque(maxlen=remember)
        self.seen: set[int] = set()

    def check(self, seq: int) -> str | None:
        """None and remember it, or why it is refused ("duplicate", "replay")."""
        if seq in self.seen:
            return "duplicate"
        if self.highest >= 0 and seq <= self.highest - self.window:
            return "replay"
        if len(self.recent) == self.recent.maxlen:
            self.seen.discard(self.recent[0])
        self.recent.append(seq)
        self.seen.add(seq)
        self.highest = max(self.highest, seq)
        return None


def make_key(path: Path) -> Path:
    """A new controller key: 32 random bytes, hex, readable by the service's group only."""
    if path.exists():
        raise FileExistsError(f"{path} exists; a controller keeps its key (remove it to make a new one)")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
    with os.fdopen(fd, "w") as fh:
        fh.write(os.urandom(KEY_SIZE).hex() + "\n")
    return path


def read_key(path: str) -> bytes:
    """A controller key file, or ValueError saying what is wrong with it."""
    try:
        text = Path(path).read_text().strip()
    except OSError as exc:
        raise ValueError(f"{path!r}: {exc.strerror}") from None
    try:
        key = bytes.fromhex(text)
    except ValueError:
        key = b""
    if len(key) != KEY_SIZE:
        raise ValueError(f"{path!r}: not a valve key ({KEY_SIZE} bytes in hex; make one with `sortline keys NAME "
                         "--valve`)")
    return key
