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
is halfway through). A `bounded` lane keeps its queued slots, like a
lossless one, but the producer never waits for them: with no slot free,
acquire() returns None at once and the new message is dropped (unless a
lossless lane shares the output: then nothing may be lost, and it waits).
When a consumer dies, the producer stops waiting for its lane (everything
sent to it up to that moment counts as done), so a killed consumer never
wedges its producer.

Only the producer writes generation and sent (and clears the reading mark of
a consumer it found dead); only a consumer writes done, lane_pid and
reading. ZeroMQ's send/recv orders the data writes before the header read.
The control words are read and written one at a time through a memoryview:
for a handful of slots that is several times cheaper than numpy calls, and
it runs for every message.
"""

from __future__ import annotations

import mmap
import os
from pathlib import Path
import time
from typing import Callable

import numpy as np

from sortline.pipeline.messages import ArraySpec, MessageError, SlotRef

MAGIC = 0x534C4F54534C3031  # "SLOTSL01"
ALIGN = 64
# Longest sleep of a producer waiting for a free slot. Such a producer waits for a lossless consumer slower
# than itself, which has the other slots' messages still queued, so waking later costs no throughput, while
# looking often takes CPU from that consumer: at 0.1 ms, a feed waiting ~15 ms a strip for two infer replicas
# on two cores spent 5 ms of CPU per strip looking (benchmarks/replicas.py, feed_cpu_ms_per_strip).
MAX_PAUSE_S = 2e-3
_HEAD_WORDS = 4  # magic, n_slots, slot_size, n_lanes


def align(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_dead_segments(run_dir: Path | str, node: str) -> list[str]:
    """Segments (node.port.pid.n.slots) an earlier process of this node left when it
    died: under systemd no supervisor removes them, and tmpfs is memory."""
    removed = []
    for path in Path(run_dir).glob(f"{node}.*.slots"):
        parts = path.name.split(".")
        if len(parts) == 5 and parts[2].isdigit() and not _alive(int(parts[2])):
            path.unlink(missing_ok=True)
            removed.append(path.name)
    return removed


class _Control:
    """Index arithmetic over the control words of a pool."""

    def __init__(self, mm: mmap.mmap, n_slots: int, n_lanes: int):
        self.n_slots, self.n_lanes = n_slots, n_lanes
        self.size = self.bytes_for(n_slots, n_lanes)
        self.w = memoryview(mm)[: self.size].cast("Q")
        self.gen0 = _HEAD_WORDS
        self.sent0 = self.gen0 + n_slots
        self.done0 = self.sent0 + n_lanes * n_slots
        self.pid0 = self.done0 + n_lanes * n_slots
        self.reading0 = self.pid0 + n_lanes

    @staticmethod
    def bytes_for(n_slots: int, n_lanes: int) -> int:
        words = _HEAD_WORDS + n_slots + 2 * n_lanes * n_slots + 2 * n_lanes
        return -(-words * 8 // 4096) * 4096

    def release(self) -> None:
        self.w.release()


class SlotPool:
    """The producer's side of a pool."""

    def __init__(self, path: str, n_slots: int, slot_size: int, lossless_lanes: list[bool],
                 bounded_lanes: list[bool] | None = None):
        self.path = path
        self.segment = os.path.basename(path)
        self.n_slots = n_slots
        self.slot_size = align(slot_size)
        self.n_lanes = len(lossless_lanes)
        self.lossless = list(lossless_lanes)
        # Lanes whose queued messages are never overwritten.
        self.kept = [a or b for a, b in zip(self.lossless, bounded_lanes or [False] * self.n_lanes)]
        self._base = _Control.bytes_for(n_slots, self.n_lanes)
        size = self._base + n_slots * self.slot_size
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, size)
            self._mm = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        # Touch every page now so that the first messages do not pay page faults.
        np.frombuffer(self._mm, dtype=np.uint8)[:] = 0
        self._c = _Control(self._mm, n_slots, self.n_lanes)
        for i, word in enumerate((MAGIC, n_slots, self.slot_size, self.n_lanes)):
            self._c.w[i] = word
        self._generation = 0
        self._writing = [False] * n_slots  # acquired here, not yet published
        self._floor = [0] * self.n_lanes  # lane counts as done up to this generation (reader gone)
        self._known_pid = [0] * self.n_lanes
        self._reaped: set[int] = set()   # pids of readers found dead (their lanes already given back)
        self.reclaimed_lanes = 0

    def acquire(self, nbytes: int, stop: Callable[[], bool]) -> int | None:
        """A slot to write `nbytes` into, or None when stopping or when bounded lanes hold every slot.

        Blocks while a lossless lane's consumer still holds a slot and none
        is free; returns at once otherwise (reusing the oldest slot of a
        latest lane if it must).
        """
        if nbytes > self.slot_size:
            raise ValueError(f"{nbytes} bytes do not fit a {self.slot_size}-byte slot")
        self._note_new_consumers()
        pause = 20e-6
        while True:
            slot = self._pick()
            if slot is None:
                self._reap_dead_consumers()   # a consumer that died holding slots gives them back
                slot = self._pick()
            if slot is None and not self._lossless_holds_any():
                # No lossless reader holds a slot now, but one may have let go of its
                # last ones since the pick above (this process was descheduled in
                # between): pick again before saying bounded lanes hold them all.
                slot = self._pick()
                if slot is None and not any(self.lossless):
                    return None
                # With a lossless reader on this output too, nothing may be dropped: wait (the
                # lossless reader sets the pace of an output it shares with bounded ones).
            if slot is not None:
                c = self._c
                before = c.w[c.gen0 + slot]
                self._writing[slot] = True
                c.w[c.gen0 + slot] = 0
                # A reader may have started on this slot after _pick looked (it marks `reading`, then
                # checks the generation). Looking again after the claim closes that window: either it
                # sees the claim (and counts an overwrite, the data untouched) or the claim sees it.
                if self._being_read(slot):
                    self._reap_dead_consumers()   # a reader killed while reading leaves its mark: cleared
                if self._being_read(slot):
                    c.w[c.gen0 + slot] = before
                    self._writing[slot] = False
                    if stop():   # a waiting producer still heartbeats, and still hears a stop
                        return None
                    time.sleep(pause)
                    continue
                return slot
            if stop():
                return None
            time.sleep(pause)
            pause = min(pause * 2, MAX_PAUSE_S)

    def _being_read(self, slot: int) -> bool:
        c = self._c
        return any(c.w[c.reading0 + lane] == slot + 1 for lane in range(self.n_lanes))

    def _held(self, lane: int, slot: int) -> bool:
        c = self._c
        sent = c.w[c.sent0 + lane * c.n_slots + slot]
        return c.w[c.done0 + lane * c.n_slots + slot] < sent and sent > self._floor[lane]

    def _pick(self) -> int | None:
        c, w = self._c, self._c.w
        lanes = range(self.n_lanes)
        free, overwritable = [], []
        for slot in range(self.n_slots):
            if self._writing[slot]:
                continue
            held = [self._held(lane, slot) for lane in lanes]
            if not any(held):
                free.append(slot)
            elif not any(h and self.kept[lane] for lane, h in enumerate(held)):
                overwritable.append(slot)
        if free:
            # The slot freed last is the one still in the caches.
            return max(free, key=lambda s: w[c.gen0 + s])
        # Latest lanes may lose a queued message (the oldest); lossless lanes
        # never do, and no slot is taken from under a consumer reading it.
        reading = {w[c.reading0 + lane] - 1 for lane in lanes}
        overwritable = [s for s in overwritable if s not in reading]
        if not overwritable:
            return None
        return min(overwritable, key=lambda s: w[c.gen0 + s])

    def _lossless_holds_any(self) -> bool:
        return any(self._held(lane, slot) for lane in range(self.n_lanes) if self.lossless[lane]
                   for slot in range(self.n_slots))

    def _release_lane(self, lane: int) -> None:
        """Everything sent to this lane so far counts as done: its reader is gone."""
        self._floor[lane] = self._generation
        self.reclaimed_lanes += 1

    def _note_new_consumers(self) -> None:
        # A lane whose pid changed has a new reader (the old one restarted or left).
        c = self._c
        for lane in range(self.n_lanes):
            pid = c.w[c.pid0 + lane]
            if pid != self._known_pid[lane] and pid not in self._reaped:
                if self._known_pid[lane]:
                    self._release_lane(lane)
                self._known_pid[lane] = pid

    def _reap_dead_consumers(self) -> None:
        self._note_new_consumers()
        c = self._c
        for lane, pid in enumerate(self._known_pid):
            if pid and not _alive(pid):
                self._release_lane(lane)
                self._known_pid[lane] = 0
                self._reaped.add(pid)            # its pid stays in the block until a new reader comes
                c.w[c.reading0 + lane] = 0       # and what it was reading is nobody's now

    def in_flight(self) -> int:
        """Slots sent to a live lossless consumer that it has not finished with."""
        self._reap_dead_consumers()
        return sum(any(self._held(lane, slot) for lane in range(self.n_lanes) if self.lossless[lane])
                   for slot in range(self.n_slots))

    def view(self, slot: int, spec: ArraySpec) -> np.ndarray:
        start = self._base + slot * self.slot_size + spec.offset
        return np.frombuffer(self._mm, dtype=spec.dtype, count=spec.count, offset=start).reshape(spec.shape)

    def publish(self, slot: int) -> int:
        """Mark the slot's data complete; returns its generation."""
        self._generation += 1
        self._c.w[self._c.gen0 + slot] = self._generation
        self._writing[slot] = False
        return self._generation

    def abandon(self, slot: int) -> None:
        """Give back a slot that was acquired but not published."""
        self._writing[slot] = False

    def mark_sent(self, lane: int, slot: int, generation: int) -> None:
        self._c.w[self._c.sent0 + lane * self.n_slots + slot] = generation

    def close(self) -> None:
        self._c.release()
        try:
            self._mm.close()
        except BufferError:
            pass  # a view is still alive somewhere; the mapping goes with the process


class SlotReader:
    """A consumer's side of one pool segment."""

    def __init__(self, path: str):
        name = os.path.basename(path)
        try:
            fd = os.open(path, os.O_RDWR)
        except OSError as exc:
            raise MessageError("slot", f"cannot open slot segment {name}: {exc.strerror}") from None
        try:
            size = os.fstat(fd).st_size
            if size < 4096:
                raise MessageError("slot", f"slot segment {name} is too short")
            self._mm = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        magic, self.n_slots, self.slot_size, self.n_lanes = memoryview(self._mm)[: _HEAD_WORDS * 8].cast("Q")
        if magic != MAGIC:
            self._mm.close()
            raise MessageError("slot", f"{name} is not a slot segment")
        self._base = _Control.bytes_for(self.n_slots, self.n_lanes)
        if self._base + self.n_slots * self.slot_size > size:
            self._mm.close()
            raise MessageError("slot", f"slot segment {name} is truncated")
        self._c = _Control(self._mm, self.n_slots, self.n_lanes)
        self._attached: set[int] = set()

    def lease(self, ref: SlotRef, specs: list[ArraySpec]) -> tuple[SlotLease, dict[str, np.ndarray]]:
        if not (0 <= ref.index < self.n_slots and 0 <= ref.lane < self.n_lanes):
            raise MessageError("slot", f"slot {ref.index} lane {ref.lane} outside the pool")
        if ref.generation <= 0:
            raise MessageError("slot", f"generation {ref.generation} was never published")
        c = self._c
        if ref.lane not in self._attached:
            c.w[c.pid0 + ref.lane] = os.getpid()
            self._attached.add(ref.lane)
        c.w[c.reading0 + ref.lane] = ref.index + 1  # before the generation check: see SlotPool._pick
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
            view = np.frombuffer(self._mm, dtype=spec.dtype, count=spec.count, offset=start).reshape(spec.shape)
            view.flags.writeable = False
            arrays[spec.name] = view
        return lease, arrays

    def detach(self) -> None:
        """Tell the producer this process no longer reads any lane."""
        c = self._c
        for lane in self._attached:
            if c.w[c.pid0 + lane] == os.getpid():
                c.w[c.pid0 + lane] = 0
        self._attached.clear()

    def close(self) -> None:
        self.detach()
        self._c.release()
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
        c = self._reader._c
        return c.w[c.gen0 + self.ref.index] == self.ref.generation

    def release(self) -> None:
        ref, c = self.ref, self._reader._c
        # A slot already reused belongs to a newer message: leave its bookkeeping alone.
        if c.w[c.gen0 + ref.index] == ref.generation:
            c.w[c.done0 + ref.lane * c.n_slots + ref.index] = ref.generation
        c.w[c.reading0 + ref.lane] = 0
