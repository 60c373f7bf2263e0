"""The recorder: every stream it is given, to one MCAP file (pipeline.recording).

Any number of edges feed its one input, one per stream; each stream gets a
channel of its own. The node copies each message out of its slot into one
frame buffer and hands it to a writer thread (compression and disk writes
happen there, off the pipeline's path). The queue between them is bounded
in bytes: when it is full the node waits, which holds a lossless edge back,
and says so (a log line, `sortline_record_stalls_total` and the seconds
waited). Nothing is dropped here; on a `latest` edge the transport counts
what it dropped before the recorder saw it.

Beside the frames, each camera stream gets an image channel for people
(`/rgb/image`, `/hsi/image`: Foxglove's foxglove.RawImage, protobuf): pictures
on a grid at most `image_px` wide that tile the belt, `image_hz` of them per
second of belt at the nominal speed, RGB as it is (rgb8), other cameras in false
colour. They cost a strided copy of a sixteenth or less of each frame, and an
encoding `image_hz` times a second; replay and every frame reader skip them.

The file is self-describing: the machine configuration the graph ran with
(and calibration files, when listed) are attachments, a metadata record
holds version, profile and start time, and at the end a second one holds
the per-stream figures that `sortline inspect` prints. Chunks are closed at
least every `flush_s`, so a file cut by a power loss holds all but the last
moments, and replays up to the damage.
"""

from __future__ import annotations

import json
import os
import stat
import threading
import time
from collections import deque
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Literal

import numpy as np
from prometheus_client import Counter, Gauge
from pydantic import Field

from sortline.nodes import views
from sortline.nodes.foxglove_messages import ENCODING, RawImage, raw_image, schema_of
from sortline.pipeline import recording
from sortline.pipeline.config import ConfigError, Section
from sortline.pipeline.mcap_writer import McapWriter
from sortline.pipeline.node import Node, RateLimitedLog
from sortline.pipeline.ports import ANY

PLAUSIBLE_AGE_NS = 60 * 10**9  # an acquisition time older than this is from another host's clock
SPARE_ROUND = 64 * 1024  # frame buffers come in multiples of this, so that one fits the next frame
SPARE_MAX = 64  # frame buffers kept for reuse
MAX_STREAMS = 64  # streams (channels) in one recording

RECORDED_BYTES = Counter("sortline_record_bytes", "Bytes of frames recorded", ["node", "stream"])
RECORDED = Counter("sortline_record_messages", "Messages recorded", ["node", "stream"])
QUEUED = Gauge("sortline_record_queue_bytes", "Bytes waiting for the writer thread", ["node"])
STALLS = Counter("sortline_record_stalls", "Times the writer fell behind and the input was held back", ["node"])
STALL_SECONDS = Counter("sortline_record_stall_seconds", "Time the input was held back by the writer", ["node"])
LOST = Counter("sortline_record_lost", "Messages not recorded: the file could not be written", ["node"])
IMAGES = Counter("sortline_record_images", "Pictures recorded on the image channels (Foxglove)", ["node", "stream"])
FAILED = Gauge("sortline_record_failed", "1 once the recording file could not be written", ["node"])


def sortline_version() -> str:
    try:
        return version("sortline")
    except PackageNotFoundError:
        return "unknown"


def free_path(path: Path) -> Path:
    """`path`, or, when it exists, the first free `stem.N.suffix` beside it."""
    n = 1
    candidate = path
    while candidate.exists():
        candidate = path.with_name(f"{path.stem}.{n}{path.suffix}")
        n += 1
    return candidate


def image_topic(stream: str) -> str:
    """The Foxglove image channel of a camera stream in a recording."""
    return f"/{stream}/image"


class Pictures:
    """The image channel of one camera stream: its lines on a coarse grid, in tiles of belt."""

    def __init__(self, stream: str, lines, ticks_per_line: int, machine, params):
        self.topic = image_topic(stream)
        self.step = views.grid_step(lines.shape[1], params.image_px)
        tile_mm = machine.belt.speed_m_s * 1000.0 / params.image_hz
        self.tiles = views.Tiles(max(1, round(tile_mm * machine.belt.ticks_per_mm / ticks_per_line / self.step)))
        self.rgb = lines.dtype == np.uint8 and lines.shape[2] == 3
        if not self.rgb:   # three bands in false colour; the wavelengths are known for a machine camera
            cam = getattr(machine.cameras, stream, None)
            bands = views.hsi_bands(lines.shape[2], cam.wavelength_nm if cam else None)
            self.bands = [min(b, lines.shape[2] - 1) for b in bands]
        self.ticks_per_line = ticks_per_line
        self.seq = 0
        self.log_time = 0

    def add(self, header, lines, log_time: int) -> list[tuple[int, int, bytes]]:
        """The pictures this message completes, as (seq, log time, encoded); a gap ends the one begun."""
        if header.ticks_per_line != self.ticks_per_line or header.position % self.ticks_per_line:
            return []   # not on the stream's grid of lines: no place in a picture
        out = self.flush() if header.gap else []
        self.log_time = log_time
        first_line = header.position // self.ticks_per_line
        grid = views.on_grid(lines, first_line, self.step)
        if not self.rgb:
            grid = grid[..., self.bands]   # three bands of the lines on the grid: the one copy
        return out + [self.encode(tile) for tile in self.tiles.add(grid, -(-first_line // self.step))]

    def flush(self) -> list[tuple[int, int, bytes]]:
        tile = self.tiles.flush()
        return [] if tile is None else [self.encode(tile)]

    def encode(self, tile) -> tuple[int, int, bytes]:
        """Stamped with the log time of the last message in it: when the picture was complete."""
        self.seq += 1
        return self.seq, self.log_time, raw_image(tile if self.rgb else views.stretch(tile), self.log_time)


class Recorder(Node):
    inputs = {"in": ANY}

    class Params(Section):
        path: str = Field(min_length=1, description="the MCAP file to write")
        overwrite: bool = Field(False, description="false: an existing file is kept and FILE.N.mcap is written")
        # zstd is not offered: it writes camera frames at 55-60 MB/s, under the demo's 63.5 MB/s at 3 m/s.
        compression: Literal["lz4", "none"] = "lz4"
        chunk_mb: float = Field(1.0, gt=0, le=256, description="MCAP chunk size (before compression)")
        flush_s: float = Field(1.0, gt=0, description="close a chunk at least this often (what a power cut loses)")
        queue_mb: float = Field(64.0, gt=0, description="frames waiting for the disk before the input is held back")
        calibration: list[str] = Field([], description="more calibration files to attach (the config's are always)")
        image_hz: float = Field(2.0, ge=0, le=50, description="pictures per second of belt (at the nominal speed) "
                                "on each camera stream's image channel, for Foxglove; 0: no image channels")
        image_px: int = Field(320, ge=8, le=8192, description="the pictures' width at most: every Nth line and "
                              "column of the camera")

    def setup(self) -> None:
        p = self.params
        path = Path(p.path).absolute()
        key = f"nodes.{self.name}.params"
        if not path.parent.is_dir() or not os.access(path.parent, os.W_OK):
            raise ConfigError([f"{key}.path = {p.path!r}: directory {path.parent} does not exist or is not writable"])
        for cal in p.calibration:
            if not Path(cal).is_file():
                raise ConfigError([f"{key}.calibration: {cal!r} is not a file"])
        # The machine's own calibration goes with every recording: a file must explain itself.
        self.calibrations = [*p.calibration, *(c for c in self.machine.calibration.model_dump().values()
                                               if c and Path(c).is_file() and c not in p.calibration)]
        if path.exists() and not p.overwrite:
            kept, path = path, free_path(path)
            self.log.warning("%s exists (an earlier run, or this node before a restart): recording to %s",
                             kept, path)
        self.path = path
        self.channels: dict[str, int] = {}  # the writer thread's
        self.stats: dict[str, recording.StreamStats] = {}
        self.pictures: dict[str, Pictures | None] = {}   # per stream: its image channel (None: it has none)
        self.images = 0
        self.limit = int(p.queue_mb * 2**20)
        self.queue: deque = deque()
        self.spare: list[bytearray] = []  # frame buffers the writer is done with
        self.queued = 0
        self.cond = threading.Condition()
        self.closing = False
        self.write_error: BaseException | None = None
        self.stalls = 0
        self.stall_s = 0.0
        self._queued = QUEUED.labels(self.name)
        self._warn = RateLimitedLog(self.log)
        self.lost = 0
        self._lost = LOST.labels(self.name)
        self._failed = FAILED.labels(self.name)
        try:
            self._start_file(path)
        except OSError as exc:   # a full or failing disk already at the file's start
            self._fail(exc)
            self._remove_unwritten()
            return
        self.thread = self.start_thread(self._write_loop, "mcap-writer")
        self.log.info("recording to %s (%s chunks of %g MiB)", path, p.compression, p.chunk_mb)

    def _fail(self, exc: BaseException) -> None:
        """The file cannot be written (a full or failing disk): say so once, loudly, and from now on
        let every message go, counted. The recorder stays up, so nothing upstream ever waits on it:
        the line keeps sorting, and no restart loop leaves a file behind each time."""
        self.write_error = exc
        self._failed.set(1)
        self.log.error("cannot write %s (%s): recording stopped; the line goes on, and every message from now on "
                       "is counted in sortline_record_lost_total", self.path, exc)

    def _start_file(self, path: Path) -> None:
        """Open the file and write what comes before the frames: schema, metadata, attachments."""
        p = self.params
        self.fh = open(path, "wb")
        self.writer = McapWriter(self.fh, recording.PROFILE, f"sortline {sortline_version()}",
                                 chunk_size=int(p.chunk_mb * 2**20), compression=p.compression)
        self.schema = self.writer.register_schema(recording.SCHEMA_NAME, recording.SCHEMA_ENCODING,
                                                  recording.SCHEMA_TEXT.encode())
        name, data = schema_of(RawImage)
        self.image_schema = self.writer.register_schema(name, ENCODING, data) if p.image_hz else 0
        now = time.time_ns()
        self.writer.add_metadata(recording.META_RUN, {
            "sortline_version": sortline_version(), "profile": self.machine.profile,
            "graph": self.context.graph, "node": self.name,
            "start_time": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
            "belt_ticks_per_mm": repr(self.machine.belt.ticks_per_mm), "compression": p.compression,
        })
        self.writer.add_attachment(now, now, recording.CONFIG_ATTACHMENT, "application/toml",
                                   self.context.config_toml.encode())
        for cal in self.calibrations:
            self.writer.add_attachment(now, now, f"calibration/{Path(cal).name}", "application/octet-stream",
                                       Path(cal).read_bytes())

    def process(self, port, msg):
        if self.write_error is not None:
            self.lost += 1
            self._lost.inc()
            return None
        h = msg.header
        if h.stream not in self.stats and len(self.stats) >= MAX_STREAMS:
            # A stream is a channel of the file and a label of the metrics: their number stays bounded.
            raise ValueError(f"stream {h.stream!r}: this recording has {MAX_STREAMS} streams already")
        frame = recording.encode_frame(h, msg.arrays, self._buffer)  # the one copy out of the slot
        arrival = time.time_ns()
        log_time = arrival
        if h.host_ts and h.device_ts_ns:
            # Stamped on this host's monotonic clock when its first line was taken (a camera
            # without a clock of its own, or the simulator, whose belt may run faster than real
            # time when unpaced): that spacing is what a replay "as recorded" reproduces.
            log_time = arrival - (time.monotonic_ns() - h.device_ts_ns)
        elif h.trace:  # the source's acquisition time, on this host's clock
            age = time.monotonic_ns() - h.trace[0].t_in_ns
            if 0 <= age < PLAUSIBLE_AGE_NS:
                log_time = arrival - age
        self.stats.setdefault(h.stream, recording.StreamStats()).add(h, len(frame), log_time)
        self._put((h.stream, log_time, arrival, h.seq, frame, False))
        RECORDED.labels(self.name, h.stream).inc()
        RECORDED_BYTES.labels(self.name, h.stream).inc(len(frame))
        pictures = self._pictures_of(h, msg.arrays)
        if pictures is not None:
            self._put_images(pictures, pictures.add(h, msg.arrays["lines"], log_time), arrival)
        return None

    def _pictures_of(self, header, arrays) -> Pictures | None:
        """The image channel of a camera stream (one whose message is (lines, pixels, channels) lines)."""
        if header.stream not in self.pictures:
            lines = arrays.get("lines")
            camera = (self.params.image_hz > 0 and lines is not None and lines.ndim == 3 and len(arrays) == 1
                      and lines.dtype in (np.uint8, np.uint16) and header.ticks_per_line > 0)
            self.pictures[header.stream] = (Pictures(header.stream, lines, header.ticks_per_line, self.machine,
                                                     self.params) if camera else None)
        return self.pictures[header.stream]

    def _put_images(self, pictures: Pictures, images: list[tuple[int, int, bytes]], arrival: int) -> None:
        for seq, log_time, data in images:
            self._put((pictures.topic, log_time, arrival, seq, data, True))
            self.images += 1
            IMAGES.labels(self.name, pictures.topic).inc()

    def _buffer(self, nbytes: int) -> bytearray:
        """A frame buffer, reused: a fresh one costs a page fault per 4 KiB (in the
        benchmark, reuse took a third off the time of the copy out of the slot)."""
        with self.cond:
            for i, buf in enumerate(self.spare):
                if len(buf) >= nbytes:
                    del self.spare[i]
                    return buf
        return bytearray(-(-nbytes // SPARE_ROUND) * SPARE_ROUND)

    def _put(self, item) -> None:
        n = len(item[4])
        with self.cond:
            if self.queued + n > self.limit and self.queue:
                t0 = time.monotonic()
                self.stalls += 1
                STALLS.labels(self.name).inc()
                self._warn("stall", f"the disk is not keeping up with the recording ({self.queued / 2**20:.0f} MiB "
                                    f"waiting): holding the input back")
                while self.queued + n > self.limit and self.queue and self.write_error is None:
                    self.cond.wait(0.2)
                    self.cond.release()
                    try:
                        self.keep_alive()  # held back by the disk is not stuck
                    finally:
                        self.cond.acquire()
                waited = time.monotonic() - t0
                self.stall_s += waited
                STALL_SECONDS.labels(self.name).inc(waited)
            self.queue.append(item)
            self.queued += n
            self._queued.set(self.queued)
            self.cond.notify_all()

    def _write_loop(self) -> None:
        """The writer thread: the only user of the McapWriter until teardown."""
        next_flush = time.monotonic() + self.params.flush_s
        try:
            while True:
                with self.cond:
                    while not self.queue and not self.closing:
                        self.cond.wait(max(0.0, min(0.2, next_flush - time.monotonic())))
                        if time.monotonic() >= next_flush:
                            break
                    item = self.queue.popleft() if self.queue else None
                    if item is None and self.closing:
                        return
                if item is not None:
                    topic, log_time, arrival, seq, frame, image = item
                    channel = self._channel(topic, image)
                    self.writer.add_message(channel, log_time=log_time, data=frame, publish_time=arrival,
                                            sequence=seq & 0xFFFFFFFF)  # copies the frame
                    with self.cond:
                        self.queued -= len(frame)
                        if not image and len(self.spare) < SPARE_MAX:
                            self.spare.append(frame.obj)
                        self._queued.set(self.queued)
                        self.cond.notify_all()
                if time.monotonic() >= next_flush:
                    self.writer.flush()  # closes the chunk: a power cut loses at most flush_s
                    next_flush = time.monotonic() + self.params.flush_s
        except OSError as exc:  # disk full, I/O error: recording stops, the node and the line go on
            with self.cond:
                self.lost += len(self.queue)
                self._lost.inc(len(self.queue))
                self.queue.clear()   # what was waiting for the disk is lost, counted, and its memory freed
                self.queued = 0
                self._queued.set(0)
                self._fail(exc)
                self.cond.notify_all()

    def _channel(self, topic: str, image: bool) -> int:
        channel = self.channels.get(topic)
        if channel is None:
            channel = self.channels[topic] = (
                self.writer.register_channel(topic, ENCODING, self.image_schema) if image else
                self.writer.register_channel(topic, recording.MESSAGE_ENCODING, self.schema, {"stream": topic}))
        return channel

    def end_of_stream(self):
        self.log.info("end of stream: %s", self._summary_line())
        return None

    def _summary_line(self) -> str:
        n = sum(s.messages for s in self.stats.values())
        mb = sum(s.bytes for s in self.stats.values()) / 1e6
        return (f"{n} messages, {mb:.1f} MB in {len(self.stats)} streams, {self.images} pictures, {self.stalls} stalls "
                f"({self.stall_s:.1f} s held back)")

    def teardown(self) -> None:
        if not hasattr(self, "thread"):   # setup refused the configuration, or the file could not be started
            if getattr(self, "write_error", None) is not None:
                self.log.error("%s: nothing recorded (%s); %d messages lost", self.path, self.write_error, self.lost)
            return
        if self.write_error is None:   # the pictures begun, as far as they go
            for pictures in filter(None, self.pictures.values()):
                self._put_images(pictures, pictures.flush(), time.time_ns())
        with self.cond:
            self.closing = True
            self.cond.notify_all()
        while self.thread.is_alive():  # what was accepted is written, however long the disk takes
            self.thread.join(0.2)
            self.keep_alive()
        if self.write_error is not None:
            self.log.error("%s: writing failed (%s); the file holds what was written before (it replays up to "
                           "there), %d messages were not written", self.path, self.write_error, self.lost)
            try:
                self.fh.close()
            except OSError:
                pass
            return
        try:
            self.writer.add_metadata(recording.META_STREAMS, {
                "json": json.dumps({name: s.to_dict() for name, s in self.stats.items()})})
            self.writer.finish()
            self.fh.close()
        except OSError as exc:
            self.log.error("%s: could not finish the file (%s); it replays up to the damage", self.path, exc)
            return
        self.log.info("recorded %s: %s", self.path, self._summary_line())

    def status(self) -> dict:
        out = {"messages": sum(s.messages for s in self.stats.values()),
               "mb": round(sum(s.bytes for s in self.stats.values()) / 1e6, 1),
               "queue_mb": round(self.queued / 2**20, 1), "images": self.images, "stalls": self.stalls,
               "lost": self.lost}
        if self.write_error is not None:
            out["failed"] = str(self.write_error)
        return out

    def _remove_unwritten(self) -> None:
        """A file the disk took nothing of (not even its header) is no recording: it goes."""
        fh = getattr(self, "fh", None)
        if fh is not None:
            try:
                fh.close()
            except OSError:
                pass
        try:
            st = self.path.stat()
            if stat.S_ISREG(st.st_mode) and st.st_size < 64:   # a file, never a device (/dev/full)
                self.path.unlink()
        except OSError:
            pass
