"""Shared-memory slot pools: how arrays cross a same-host edge without a copy.

The producer of an output owns one pool: a file on tmpfs in the private
runtime directory, mapped by the producer and by each consumer. The producer
writes a message's arrays straight into a free slot and sends only the header
(naming segment, slot and generation) over ZeroMQ; the consumer maps the same
file and gets numpy views. Nothing but the header ever goes through a socket.

Ownership is kept in the pool's control block, never in messages, so no
acknowledgement has to cross a socket (and none can be left unsent when a node
shuts down). Each consumer of the output has a lane:

    generation[slot]      0 while the producer writes the slot, else the
                          generation of the message in it (the seqlock that
                          lets a reader tell its slot was overwritten)
    sent[lane, slot]      generation last sent to that lane
    done[lane, slot]      generation the lane's consumer has finished with
    lane_pid[lane]        pid of the consumer process attached to the lane
    reading[lane]         slot + 1 that the lane's consumer is reading now, 0: none

A slot is free when every lossless lane has done >= sent. A `latest` lane
never holds a slot for long: when no slot is free the producer reuses the
oldest one that no consumer is reading at that moment (a queued message
that the reader will then find overwritten, and count, instead of one it
is halfway through). When a consumer dies, the
producer stops waiting for its lane (everything sent to it up to that moment
counts as done), so a killed consumer never wedges its producer.

Only the producer writes generation and sent; only a consumer writes done,
lane_pid and reading. ZeroMQ's send/recv orders the data writes before the header read.
"""

from __future__ import annotations

import mmap
import os
import time
from typing import Callable

import numpy as np

from pipeline.messages import ArraySpec, MessageError, SlotRef

MAGIC = 0x534C4F54534C3031  # "SLOTSL01"
ALIGN = 64
_HEAD_WORDS = 4  # magic, n_slots, slot_size, n_lanes


def _control_bytes(n_slots: int, n_lanes: int) -> int:
    words = _HEAD_WORDS + n_slots + 2 * n_lanes * n_slots + 2 * n_lanes
    return -(-words * 8 // 4096) * 4096


def _layout(buf, n_slots: int, n_lanes: int):
    words = np.frombuffer(buf, dtype=np.uint64, count=_control_bytes(n_slots, n_lanes) // 8)
    at = _HEAD_WORDS
    generation = words[at:at + n_slots]
    at += n_slots
    sent = words[at:at + n_lanes * n_slots].reshape(n_lanes, n_slots)
    at += n_lanes * n_slots
    done = words[at:at + n_lanes * n_slots].reshape(n_lanes, n_slots)
    at += n_lanes * n_slots
    lane_pid = words[at:at + n_lanes]
    at += n_lanes
    reading = words[at:at + n_lanes]
    return words, generation, sent, done, lane_pid, reading


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def align(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


class SlotPool:
    """The producer's side of a pool."""

    def __init__(self, path: str, n_slots: int, slot_size: int, lossless_lanes: list[bool]):
        self.path = path
        self.segment = os.path.basename(path)
        self.n_slots = n_slots
        self.slot_size = align(slot_size)
        self.n_lanes = len(lossless_lanes)
        self.lossless = np.array(lossless_lanes, dtype=bool)
        self._base = _control_bytes(n_slots, self.n_lanes)
        size = self._base + n_slots * self.slot_size
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, size)
            self._mm = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        self._buf = np.frombuffer(self._mm, dtype=np.uint8)
        # Touch every page now so that the first messages do not pay page faults.
        self._buf[:] = 0
        words, self._gen, self._sent, self._done, self._pid, self._reading = _layout(self._mm, n_slots, self.n_lanes)
        words[:_HEAD_WORDS] = (MAGIC, n_slots, self.slot_size, self.n_lanes)
        self._generation = 0
        self._writing = np.zeros(n_slots, dtype=bool)  # acquired here, not yet published
        self._floor = np.zeros(self.n_lanes, dtype=np.uint64)  # lane done up to here (dead consumer)
        self._known_pid = [0] * self.n_lanes
        self.reclaimed_lanes = 0

    def acquire(self, nbytes: int, stop: Callable[[], bool]) -> int | None:
        """A slot to write `nbytes` into, or None when stopping.

        Blocks while a lossless lane's consumer still holds every slot;
        returns at once otherwise (reusing the oldest slot if it must).
        """
        if nbytes > self.slot_size:
            raise ValueError(f"{nbytes} bytes do not fit a {self.slot_size}-byte slot")
        self._note_new_consumers()
        pause = 20e-6
        while True:
            slot = self._pick()
            if slot is not None:
                self._writing[slot] = True
                self._gen[slot] = 0
                return slot
            self._reap_dead_consumers()
            if stop():
                return None
            time.sleep(pause)
            pause = min(pause * 2, 1e-3)

    def _pick(self) -> int | None:
        held = (self._done < self._sent) & (self._sent > self._floor[:, None])
        free = ~held.any(axis=0) & ~self._writing
        if not free.any():
            # Latest lanes may lose a queued message; lossless lanes never do,
            # and no slot is taken from under a consumer that is reading it.
            free = ~held[self.lossless].any(axis=0) & ~self._writing
            reading = self._reading[self._reading > 0].astype(np.int64) - 1
            free[reading[reading < self.n_slots]] = False
            if not free.any():
                return None
        candidates = np.flatnonzero(free)
        return int(candidates[np.argmin(self._gen[candidates])])

    def _release_lane(self, lane: int) -> None:
        """Everything sent to this lane so far counts as done: its reader is gone."""
        self._floor[lane] = self._generation
        self.reclaimed_lanes += 1

    def _note_new_consumers(self) -> None:
        # A lane whose pid changed has a new reader (the old one restarted or left).
        for lane in range(self.n_lanes):
            pid = int(self._pid[lane])
            if pid != self._known_pid[lane]:
                if self._known_pid[lane]:
                    self._release_lane(lane)
                self._known_pid[lane] = pid

    def _reap_dead_consumers(self) -> None:
        self._note_new_consumers()
        for lane, pid in enumerate(self._known_pid):
            if pid and not _alive(pid):
                self._release_lane(lane)
                self._known_pid[lane] = 0

    def in_flight(self) -> int:
        """Slots sent to a live lossless consumer that it has not finished with."""
        self._reap_dead_consumers()
        held = (self._done < self._sent) & (self._sent > self._floor[:, None])
        return int(held[self.lossless].any(axis=0).sum())

    def view(self, slot: int, offset: int, dtype, shape) -> np.ndarray:
        dtype = np.dtype(dtype)
        count = int(np.prod(shape, dtype=np.int64))
        start = self._base + slot * self.slot_size + offset
        return np.frombuffer(self._mm, dtype=dtype, count=count, offset=start).reshape(shape)

    def publish(self, slot: int) -> int:
        """Mark the slot's data complete; returns its generation."""
        self._generation += 1
        self._gen[slot] = self._generation
        self._writing[slot] = False
        return self._generation

    def abandon(self, slot: int) -> None:
        """Give back a slot that was acquired but not published."""
        self._writing[slot] = False

    def mark_sent(self, lane: int, slot: int, generation: int) -> None:
        self._sent[lane, slot] = generation

    def close(self) -> None:
        self._buf = self._gen = self._sent = self._done = self._pid = self._reading = None
        try:
            self._mm.close()
        except BufferError:
            pass  # a view is still alive somewhere; the mapping goes with the process


class SlotReader:
    """A consumer's side of one pool segment."""

    def __init__(self, path: str):
        try:
            fd = os.open(path, os.O_RDWR)
        except OSError as exc:
            raise MessageError("slot", f"cannot open slot segment {os.path.basename(path)}: {exc.strerror}") from None
        try:
            size = os.fstat(fd).st_size
            if size < 4096:
                raise MessageError("slot", f"slot segment {os.path.basename(path)} is too short")
            self._mm = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        head = np.frombuffer(self._mm, dtype=np.uint64, count=_HEAD_WORDS)
        if int(head[0]) != MAGIC:
            raise MessageError("slot", f"{os.path.basename(path)} is not a slot segment")
        self.n_slots, self.slot_size, self.n_lanes = (int(x) for x in head[1:])
        self._base = _control_bytes(self.n_slots, self.n_lanes)
        if self._base + self.n_slots * self.slot_size > size:
            raise MessageError("slot", f"slot segment {os.path.basename(path)} is truncated")
        _, self._gen, _, self._done, self._pid, self._reading = _layout(self._mm, self.n_slots, self.n_lanes)
        self._attached: set[int] = set()

    def lease(self, ref: SlotRef, specs: list[ArraySpec]) -> tuple[SlotLease, dict[str, np.ndarray]]:
        if not (0 <= ref.index < self.n_slots and 0 <= ref.lane < self.n_lanes):
            raise MessageError("slot", f"slot {ref.index} lane {ref.lane} outside the pool")
        if ref.lane not in self._attached:
            self._pid[ref.lane] = os.getpid()
            self._attached.add(ref.lane)
        self._reading[ref.lane] = ref.index + 1  # before the generation check: see SlotPool._pick
        lease = SlotLease(self, ref)
        if not lease.intact():
            lease.release()
            raise MessageError("overwritten", f"slot {ref.index} was overwritten before it was read")
        arrays = {}
        for spec in specs:
            if spec.offset < 0 or spec.offset + spec.nbytes > self.slot_size:
                lease.release()
                raise MessageError("size", f"array {spec.name!r} does not fit its slot")
            start = self._base + ref.index * self.slot_size + spec.offset
            count = spec.nbytes // np.dtype(spec.dtype).itemsize
            view = np.frombuffer(self._mm, dtype=spec.dtype, count=count, offset=start).reshape(spec.shape)
            view.flags.writeable = False
            arrays[spec.name] = view
        return lease, arrays

    def detach(self) -> None:
        """Tell the producer this process no longer reads any lane."""
        for lane in self._attached:
            if int(self._pid[lane]) == os.getpid():
                self._pid[lane] = 0
        self._attached.clear()

    def close(self) -> None:
        self.detach()
        self._gen = self._done = self._pid = self._reading = None
        try:
            self._mm.close()
        except BufferError:
            pass


class SlotLease:
    __slots__ = ("_reader", "ref")

    def __init__(self, reader: SlotReader, ref: SlotRef):
        self._reader = reader
        self.ref = ref

    def intact(self) -> bool:
        return int(self._reader._gen[self.ref.index]) == self.ref.generation

    def release(self) -> None:
        ref, reader = self.ref, self._reader
        # A slot already reused belongs to a newer message: leave its bookkeeping alone.
        if int(reader._gen[ref.index]) == ref.generation:
            reader._done[ref.lane, ref.index] = ref.generation
        reader._reading[ref.lane] = 0
