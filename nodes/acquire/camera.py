"""One open camera: configure it, start it, fetch its frames, read its counters.

A `Camera` lives from one connection to the next: when the device goes away
the acquisition thread closes it and opens a new one. Frames are fetched on
the caller's own thread (never harvesters' background thread, which drops
buffers without a count), copied once, and the buffer goes straight back to
the producer.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
from genicam.gentl import GenericException as GenTLError
from harvesters.core import Callback, ImageAcquirer

from sortline.nodes.acquire import convert, features
from sortline.nodes.acquire.device import DeviceError, DeviceInfo, devices, producers, select

# How often the fetch loop looks for a frame. The genicam binding holds the GIL
# while it waits inside the producer, so a blocking wait there would stall the
# node's main loop for as long; instead each look returns at once, and the
# thread sleeps (GIL released) between looks. 0.5 ms adds at most that much
# latency; each look costs ~0.1 ms of CPU, so after IDLE_AFTER_S without a
# frame (a triggered camera on a stopped belt) it looks every IDLE_POLL_S.
POLL_S = 0.0005
IDLE_AFTER_S = 0.05
IDLE_POLL_S = 0.005
LOOK_S = 1e-5  # try_fetch's own timeout: long enough for one immediate look, no longer

# Chunks sortline reads, by their SFNC ChunkSelector names.
CHUNKS = ("FrameID", "Timestamp", "EncoderValue")


@dataclass
class Fetched:
    frame_id: int | None
    encoder: int | None
    device_ts_ns: int | None
    host_ns: int  # time.monotonic_ns() when the buffer was fetched
    data: np.ndarray  # a view into the producer's buffer, valid until requeued
    buffer: object


class _Counter(Callback):
    def __init__(self):
        self.count = 0

    def emit(self, context=None) -> None:
        self.count += 1


class Camera:
    def __init__(self, cti: list[str], selector: dict[str, str], wanted: list[features.Feature],
                 layout: convert.Layout, reverse_bands: bool, buffers: int, use_chunks: bool,
                 log: logging.Logger):
        h = producers(cti)
        self.info: DeviceInfo = select(devices(h), **selector)
        self.log = log
        try:
            self.ia: ImageAcquirer = h.create(self.info.index)
        except Exception as exc:  # e.g. ResourceInUseException: another process has it open
            raise DeviceError(f"{self.info.label()} could not be opened: {exc}") from None
        try:
            node_map = self.ia.remote_device.node_map
            label = self.info.label()
            self.applied = features.apply(node_map, wanted, label, log)
            self.chunks = self._enable_chunks(node_map) if use_chunks else set()
            width, height = int(node_map.Width.value), int(node_map.Height.value)
            try:
                fmt = convert.pixel_format(str(node_map.PixelFormat.value))
                self.shape = convert.FrameShape(fmt, width, height, layout, reverse_bands)
            except ValueError as exc:
                raise features.FeatureError(f"{label}: {exc}") from None
            self.ts_hz = self._timestamp_hz(node_map)
            self.ia.num_buffers = max(buffers, self.ia.min_num_buffers)
            self.ia.timeout_period_on_update_event_data_call = 0  # ms: look, do not wait (see POLL_S)
            self.incomplete = _Counter()
            self.ia.add_callback(ImageAcquirer.Events.INCOMPLETE_BUFFER, self.incomplete)
        except BaseException:
            self.close()
            raise
        self._stream = None
        self._last_frame_s = 0.0

    def _enable_chunks(self, node_map) -> set[str]:
        offered = features.readable(node_map, "ChunkSelector")
        choices = set(node_map.get_node("ChunkSelector").symbolics) if offered is not None else set()
        enabled = set()
        for chunk in CHUNKS:
            if chunk not in choices:
                continue
            try:
                node_map.ChunkSelector.value = chunk
                node_map.ChunkEnable.value = True
                enabled.add(chunk)
            except Exception as exc:
                self.log.info("chunk %s offered but not enabled: %s", chunk, exc)
        if features.readable(node_map, "ChunkModeActive") is not None:
            try:
                # Off when nothing useful is offered: chunk parsing costs time on every frame.
                node_map.ChunkModeActive.value = bool(enabled)
            except Exception as exc:
                self.log.info("ChunkModeActive not set: %s", exc)
        missing = [c for c in CHUNKS if c not in enabled]
        self.log.info("chunk data: %s%s", ", ".join(sorted(enabled)) or "none",
                      f" (not offered: {', '.join(missing)})" if missing else "")
        return enabled

    @staticmethod
    def _timestamp_hz(node_map) -> float:
        for name in ("GevTimestampTickFrequency", "DeviceTimestampFrequency"):
            hz = features.readable(node_map, name)
            if hz:
                return float(hz)
        return 1e9  # SFNC: Timestamp counts nanoseconds unless the device says otherwise

    def start(self) -> None:
        self.ia.start()
        self._stream = self.ia.data_streams[0].module

    def fetch(self, timeout_s: float) -> Fetched | None:
        """The next complete frame, or None when none came within timeout_s. Its data is a
        view into the producer's buffer: copy it out, then `requeue` it at once. Raises the
        producer's exception when the device has gone away."""
        deadline = time.monotonic() + timeout_s
        while (buf := self.ia.try_fetch(timeout=LOOK_S)) is None:
            now = time.monotonic()
            if now >= deadline:
                return None
            time.sleep(POLL_S if now - self._last_frame_s < IDLE_AFTER_S else IDLE_POLL_S)
        host_ns = time.monotonic_ns()
        self._last_frame_s = host_ns / 1e9
        try:
            module = buf.module
            return Fetched(self._frame_id(module), self._chunk("EncoderValue"), self._device_ts(module), host_ns,
                           buf.payload.components[0].data, buf)
        except BaseException:
            buf.queue()
            raise

    @staticmethod
    def requeue(frame: Fetched) -> None:
        frame.buffer.queue()

    def _frame_id(self, module) -> int | None:
        # The buffer's frame id first: GenTL gives it 64 bits, where some devices' FrameID
        # chunk has 16 and wraps (it would read as a restart every 65536 frames).
        try:
            return int(module.frame_id)
        except GenTLError:
            return self._chunk("FrameID")

    def _chunk(self, name: str) -> int | None:
        if name not in self.chunks:
            return None
        try:
            return int(getattr(self.ia.remote_device.node_map, f"Chunk{name}").value)
        except Exception:
            return None

    def _device_ts(self, module) -> int | None:
        ticks = self._chunk("Timestamp")
        if ticks is not None:
            return int(ticks * 1e9 / self.ts_hz)
        try:
            return int(module.timestamp_ns) or None
        except GenTLError:
            return None  # no device clock (the simulated producer has none): host time stands in

    def stream_counters(self) -> tuple[int, int]:
        """The producer's own (delivered, underrun) counts since this connection started."""
        try:
            return int(self._stream.num_delivered), int(self._stream.num_underrun)
        except (GenTLError, AttributeError):
            return 0, 0

    def close(self) -> None:
        try:
            self.ia.stop()
        except Exception:
            pass  # it may already be gone: destroy() below still frees what is left
        try:
            self.ia.destroy()
        except Exception as exc:
            self.log.debug("closing the device: %r", exc)
