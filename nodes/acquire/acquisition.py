"""The acquisition thread: frames from the camera into a ring of message-sized slots.

The thread owns the device. It fetches each frame with a short timeout,
places it on the belt, copies it once into the ring and hands the buffer
straight back to the producer; the node's main loop publishes full slots.
When the ring is full (the graph downstream is slower than the camera) the
frame is dropped, counted and the next message flagged: a camera cannot
wait. When the device stops delivering or disappears, the thread reports it,
closes it and reconnects with a growing backoff; acquisition resumes with
the gap flagged. No process restart is needed for any of this.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable

import numpy as np
from prometheus_client import Counter, Gauge

from sortline.nodes.acquire.camera import Camera, Fetched
from sortline.nodes.acquire.convert import convert
from sortline.nodes.acquire.position import BeltTracker

FRAMES = Counter("sortline_camera_frames", "Frames fetched from the camera", ["camera"])
LOST = Counter("sortline_camera_lost_frames", "Frames lost, by reason: device (missing frame ids or encoder "
               "steps), ring_full (the graph did not keep up), outage (estimated, while the device was gone)",
               ["camera", "reason"])
GAPS = Counter("sortline_camera_gaps", "Messages flagged as following missing lines", ["camera"])
CONNECTED = Gauge("sortline_camera_connected", "1 while the camera is open and delivering", ["camera"])
RECONNECTS = Counter("sortline_camera_reconnects", "Times the camera was lost and opened again", ["camera"])
UNDERRUNS = Counter("sortline_camera_producer_underruns", "Frames the producer lost for want of a free buffer, "
                    "by its own count", ["camera"])
DELIVERED = Counter("sortline_camera_producer_delivered", "Frames the producer delivered, by its own count", ["camera"])
INCOMPLETE = Counter("sortline_camera_incomplete_buffers", "Incomplete buffers the producer delivered (discarded)",
                     ["camera"])

COUNTERS_EVERY_S = 0.5
WAITING_S = 1.0  # no frame for this long: the status says "waiting"  # how often the producer's own statistics are read


@dataclass
class Batch:
    """One message's worth of lines in a ring slot."""

    slot: int
    frames: int = 0
    lines: int = 0
    position: int = 0
    device_ts_ns: int = 0
    host_ts: bool = False
    gap: bool = False
    ready_ns: int = 0  # when its last frame was fetched


class Ring:
    """Preallocated message slots passed between the acquisition thread and the main loop."""

    def __init__(self, slots: int, shape: tuple[int, int, int], dtype):
        self.data = np.empty((slots, *shape), dtype=dtype)
        self._free = deque(range(slots))
        self._ready: deque[Batch] = deque()
        self._cond = threading.Condition()

    def take_free(self) -> int | None:
        with self._cond:
            return self._free.popleft() if self._free else None

    def put_ready(self, batch: Batch) -> None:
        with self._cond:
            self._ready.append(batch)
            self._cond.notify()

    def get_ready(self, timeout_s: float) -> Batch | None:
        with self._cond:
            if not self._ready:
                self._cond.wait(timeout_s)
            return self._ready.popleft() if self._ready else None

    def give_back(self, slot: int) -> None:
        with self._cond:
            self._free.append(slot)

    def queued(self) -> int:
        return len(self._ready)


class Acquisition:
    def __init__(self, name: str, open_camera: Callable[[], Camera], message_lines: int, ticks_per_line: int,
                 ring_slots: int, fetch_timeout_s: float, stall_timeout_s: float, backoff_s: float,
                 backoff_max_s: float, encoder_bits: int, log: logging.Logger,
                 start_thread: Callable[[Callable[[], None], str], threading.Thread]):
        self.name, self.log = name, log
        self._start_thread = start_thread   # the node's: a thread that fails stops the node
        self._open = open_camera
        self._message_lines, self._ticks_per_line, self._encoder_bits = message_lines, ticks_per_line, encoder_bits
        self._ring_slots = ring_slots
        self._fetch_timeout_s, self._stall_timeout_s = fetch_timeout_s, stall_timeout_s
        self._backoff_s, self._backoff_max_s = backoff_s, backoff_max_s
        self.lock = threading.Lock()  # held while the camera is used: closing never races a fetch
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.camera: Camera | None = None
        self.state = "starting"  # starting | acquiring | waiting | lost | reconnecting
        self.error = ""  # why the camera was lost, or why the last reconnect failed
        # Prometheus counters, and the same totals as plain numbers for the heartbeat.
        self.counts = dict.fromkeys(("frames", "lost_device", "lost_ring_full", "lost_outage", "gaps", "reconnects"), 0)
        self._metrics = {"frames": FRAMES.labels(name), "gaps": GAPS.labels(name),
                         "reconnects": RECONNECTS.labels(name),
                         **{f"lost_{r}": LOST.labels(name, r) for r in ("device", "ring_full", "outage")}}
        self._connected = CONNECTED.labels(name)
        self.connected = False
        self._underruns, self._delivered = UNDERRUNS.labels(name), DELIVERED.labels(name)
        self._incomplete = INCOMPLETE.labels(name)
        self._warned: dict[str, float] = {}

    def _count(self, key: str, n: int = 1) -> None:
        self.counts[key] += n
        self._metrics[key].inc(n)

    @property
    def fps(self) -> float:
        return 1.0 / self._period_s if self.connected and self._period_s else 0.0

    # Called from the node's main thread.

    def connect(self) -> Camera:
        """The first connection, in setup: errors go to the caller (a wrong selector or a
        required feature the device rejects will not be fixed by retrying)."""
        camera = self._open()
        shape = camera.shape
        if self._message_lines % shape.lines:
            camera.close()
            raise ValueError(f"a frame has {shape.lines} lines; messages of {self._message_lines} lines "
                             f"(the camera's lines_per_frame) must be a whole number of frames")
        self.frame_shape = shape
        self.batch_frames = self._message_lines // shape.lines
        self.ring = Ring(self._ring_slots, (self._message_lines, shape.pixels, shape.channels), shape.dtype)
        self.tracker = BeltTracker(shape.lines, self._ticks_per_line, self._encoder_bits)
        self._batch: Batch | None = None
        self._pending_gap = False
        self._period_s = 0.0  # frame period, measured; estimates what an outage cost
        self._last_frame_ns = 0
        self._counters_at = 0.0
        self._has_ids = True
        self.camera = camera
        return camera

    def start(self) -> None:
        """Start acquiring: at the node's first step, not in setup, so that frames do not
        pile up (and get dropped) while the graph is still connecting."""
        self._start(self.camera)
        self._thread = self._start_thread(self._run, "acquisition")

    def take(self, timeout_s: float) -> Batch | None:
        return self.ring.get_ready(timeout_s)

    def release(self, batch: Batch) -> None:
        self.ring.give_back(batch.slot)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread.is_alive():
            self._thread.join(timeout=2.0)
        with self.lock:
            self._close()

    # The acquisition thread.

    def _start(self, camera: Camera) -> None:
        camera.start()
        self.camera = camera
        self._counter_base = (0, 0, 0)  # the producer's counters restart with each connection
        self._last_frame_ns = time.monotonic_ns()
        self.connected = True
        self._connected.set(1)
        self.state, self.error = "acquiring", ""

    def _close(self) -> None:
        if self.camera is not None:
            self.camera.close()
            self.camera = None
        self.connected = False
        self._connected.set(0)

    def _run(self) -> None:
        while not self._stop.is_set():
            if self.camera is None:
                self._reconnect()
                continue
            try:
                self._step()
            except Exception as exc:  # the producer's own exceptions: the device has gone away
                self._lost(f"fetch failed: {type(exc).__name__}: {exc}")

    def _step(self) -> None:
        with self.lock:
            camera = self.camera
            if camera is None:
                return
            frame = camera.fetch(self._fetch_timeout_s)
            if frame is None:
                silent = (time.monotonic_ns() - self._last_frame_ns) / 1e9
                if self._stall_timeout_s and silent > self._stall_timeout_s:
                    raise TimeoutError(f"no frame for {silent:.1f} s")
                if silent > WAITING_S and self.state == "acquiring":
                    self.state = "waiting"  # no frames, e.g. a triggered camera on a stopped belt
                return
            if self.state == "waiting":
                self.state = "acquiring"
            try:
                self._take_frame(camera, frame)
            finally:
                camera.requeue(frame)
        if frame.host_ns / 1e9 - self._counters_at > COUNTERS_EVERY_S:
            self._read_counters(camera)

    def _take_frame(self, camera: Camera, frame: Fetched) -> None:
        self._count("frames")
        dt = (frame.host_ns - self._last_frame_ns) / 1e9
        if 0 < dt < 1.0:
            self._period_s = dt if not self._period_s else 0.95 * self._period_s + 0.05 * dt
        self._last_frame_ns = frame.host_ns
        self._has_ids = frame.frame_id is not None or frame.encoder is not None
        place = self.tracker.place(frame.frame_id, frame.encoder)
        if place.lost:
            self._count("lost_device", place.lost)
            self._warn("device", f"{place.lost} frames missing before frame id {frame.frame_id} "
                       f"(position {place.position}): the device did not deliver them")
        gap = place.gap or self._pending_gap
        batch = self._batch
        if batch is not None and gap:
            self._publish(batch)  # what came before the gap goes out as a shorter message
            batch = None
        if batch is None:
            slot = self.ring.take_free()
            if slot is None:
                self._count("lost_ring_full")
                self._pending_gap = True
                self._warn("ring_full", "ring full: the graph downstream does not keep up; frame dropped")
                return
            batch = self._batch = Batch(slot, position=place.position, device_ts_ns=frame.device_ts_ns or frame.host_ns,
                                        host_ts=frame.device_ts_ns is None, gap=gap)
            self._pending_gap = False
            if gap:
                self._count("gaps")
        shape = camera.shape
        dest = self.ring.data[batch.slot, batch.lines:batch.lines + shape.lines]
        convert(frame.data, shape, dest)
        batch.frames += 1
        batch.lines += shape.lines
        batch.ready_ns = frame.host_ns
        if batch.frames == self.batch_frames:
            self._publish(batch)

    def _publish(self, batch: Batch) -> None:
        self._batch = None
        self.ring.put_ready(batch)

    def _read_counters(self, camera: Camera) -> None:
        """The producer's own account: underruns and deliveries, incomplete buffers. Without
        frame ids or encoder values they are the only sign of loss, so they flag a gap."""
        self._counters_at = time.monotonic()
        delivered, underrun = camera.stream_counters()
        incomplete = camera.incomplete.count
        base = self._counter_base
        d_delivered, d_underrun, d_incomplete = delivered - base[0], underrun - base[1], incomplete - base[2]
        self._counter_base = (delivered, underrun, incomplete)
        self._delivered.inc(max(0, d_delivered))
        self._underruns.inc(max(0, d_underrun))
        self._incomplete.inc(max(0, d_incomplete))
        if not self._has_ids and (d_underrun > 0 or d_incomplete > 0):
            self._count("lost_device", d_underrun + d_incomplete)
            self._pending_gap = True
            self._warn("producer", f"the producer reports {d_underrun} underruns and {d_incomplete} incomplete buffers")

    def _lost(self, why: str) -> None:
        self.log.error("camera %s lost: %s; reconnecting", self.camera.info.label() if self.camera else "", why)
        self.state, self.error = "lost", why
        self._lost_at = self._last_frame_ns / 1e9  # the outage began with the last frame that came
        with self.lock:
            if self._batch is not None:
                self._publish(self._batch)  # the lines it already holds are good
            self._close()

    def _reconnect(self) -> None:
        delay, attempt = self._backoff_s, 0
        while not self._stop.wait(delay if attempt else 0):
            attempt += 1
            camera = None
            try:
                camera = self._open()
                if camera.shape != self.frame_shape:
                    raise ValueError(f"the device now delivers {camera.shape}, not {self.frame_shape}")
                with self.lock:
                    self._start(camera)
            except Exception as exc:
                if camera is not None and camera is not self.camera:
                    camera.close()
                self.state, self.error = "reconnecting", f"attempt {attempt}: {exc}"
                if attempt & (attempt - 1) == 0:  # attempts 1, 2, 4, 8...: enough to see, not a flood
                    self.log.warning("camera %s: reconnect attempt %d failed: %s", self.name, attempt, exc)
                delay = min(delay * 2, self._backoff_max_s)
                continue
            outage = time.monotonic() - self._lost_at
            missed = max(0, round(outage / self._period_s) - 1) if self._period_s else 0
            self.tracker.restart(missed)
            self._count("lost_outage", missed)
            self._count("reconnects")
            self.log.warning("camera %s reconnected after %.1f s (attempt %d); about %d frames missed, "
                             "the next message is flagged as a gap", camera.info.label(), outage, attempt, missed)
            return

    def _warn(self, kind: str, text: str) -> None:
        """At most one line a second per kind: the counters have the totals."""
        now = time.monotonic()
        if now - self._warned.get(kind, 0.0) >= 1.0:
            self._warned[kind] = now
            self.log.warning("%s", text)
