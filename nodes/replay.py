"""Replay: a recording published again through the same messages.

Each output publishes the recorded stream of its name. Pacing is as
recorded (speed 1), faster or slower by a factor, or, with speed 0, as fast
as the graph accepts (lossless edges make that "every message"). Paced, a
message is due when its MCAP log time (the acquisition time the recorder
wrote) comes round again, counted from the first message of the pass and
divided by the speed, and it carries that due time as its acquisition
stamp, not the moment it left: the encoder tracks of the plan, the ejector
and the valve-bar simulator take the stamp for the time the belt was where
the message ends, as a live camera's, so a replay held up by a busy host
delivers late, as a camera can, without moving the belt; a message more than
max_lag_ms late is lost (counted), as a camera loses the frames a busy host
cannot take in time. A position range
keeps the messages with lines in [from_ticks, to_ticks). With `loop` the
recording starts again at its end: sequence numbers keep counting,
positions move on by the recorded span (the belt never runs backwards) and
the first message of each stream after the wrap carries gap=True, so that
nothing downstream splices two passes together.

Arrays and header fields come back exactly as recorded, except the trace
(which starts anew here) and the shared-memory slot; after a message that was
not sent, the next of its stream carries gap=True and the sequence numbers keep
the hole it left, as a source that loses a frame does. A file cut short or
corrupted replays every valid message up to the damage; then the node logs
one error naming the file, the byte offset and the reason, and ends the
stream: the graph finishes, nothing restarts.
"""

from __future__ import annotations

import math
import time

import numpy as np
from pydantic import Field, model_validator

from sortline.nodes.streams import LINES, TRUTH
from sortline.pipeline import metrics, recording
from sortline.pipeline.config import ConfigError, Section
from sortline.pipeline.messages import MessageError
from sortline.pipeline.node import Node, RateLimitedLog

# Header fields a replayed message takes from the recording (trace and slot start anew).
KEPT = ("stream", "seq", "position", "ticks_per_line", "device_ts_ns", "host_ts", "gap", "meta")


class Replay(Node):
    outputs = {"rgb": LINES, "hsi": LINES, "truth": TRUTH}

    class Params(Section):
        path: str = Field(min_length=1, description="the recording (MCAP) to replay")
        speed: float = Field(1.0, ge=0, description="1: as recorded; a factor; 0: as fast as the graph accepts")
        from_ticks: int | None = Field(None, description="first belt position to replay (encoder ticks)")
        to_ticks: int | None = Field(None, description="belt position to stop before")
        loop: bool = False
        streams: list[str] = Field([], description="recorded streams to publish; empty: every connected one")
        max_lag_ms: float = Field(100.0, gt=0, description="paced: a message this late is lost (counted, the next "
                                  "of its stream flagged gap), as a camera loses the frames a busy host cannot "
                                  "take in time")

        @model_validator(mode="after")
        def _range(self):
            unknown = set(self.streams) - set(Replay.outputs)
            if unknown:
                raise ValueError(f"streams {sorted(unknown)}: a replay publishes {', '.join(Replay.outputs)}")
            if self.from_ticks is not None and self.to_ticks is not None and self.to_ticks <= self.from_ticks:
                raise ValueError(f"to_ticks ({self.to_ticks}) must be above from_ticks ({self.from_ticks})")
            return self

    def setup(self) -> None:
        p = self.params
        why = recording.check_mcap(p.path)
        if why:
            raise ConfigError([f"nodes.{self.name}.params.path = {p.path!r}: {why}"])
        self.ports = {port for port, out in self.out.items() if out.edges and (not p.streams or port in p.streams)}
        self.skipped: set[str] = set()
        self.published = 0
        self.behind_ms = np.zeros(4096)  # paced: how late each of the latest messages was
        self.n_behind = 0
        self.overruns = 0  # paced: messages lost for being too late
        self.passes = 0
        self.damaged = False
        self.malformed = metrics.MALFORMED.labels(self.name, "recording")
        self.lost = {port: metrics.DROPS.labels(f"{self.name}.{port}", "behind") for port in self.outputs}
        self._warn = RateLimitedLog(self.log)
        self.seq_next: dict[str, int] = {}  # per stream: the sequence number after the last one sent
        self.gap_next: set[str] = set()  # streams whose next message follows missing ones (a wrap, a lost one)
        self.seq_shift: dict[str, int] = {}  # per stream: added to recorded sequence numbers in this pass
        self.shift = 0  # ticks added to positions in this pass
        self.span = (math.inf, -math.inf)  # belt positions the first pass covered
        self.grid = 1  # a shift keeps every stream's lines on their grid: a multiple of each ticks_per_line
        self._start_pass()
        pace = "full speed" if p.speed == 0 else f"{p.speed:g}x the recorded pace"
        self.log.info("replaying %s at %s to %s", p.path, pace, ", ".join(sorted(self.ports)))

    def _start_pass(self) -> None:
        self.frames = recording.frames(self.params.path)
        self.pass_t0 = 0  # monotonic time of the first message of this pass
        self.pass_log0 = 0  # its MCAP log time
        self.pass_due = 0  # the latest time a message of this pass was due
        self.pass_count = 0
        self.gap_next |= set(self.seq_next)  # after a wrap
        self.seq_shift = {}

    def step(self):
        p = self.params
        try:
            frame = next(self.frames)
        except StopIteration:
            return self._end_of_file()
        except recording.Damage as exc:
            self.damaged = True
            self.log.error("%s; stopping the replay there", exc)
            self.finish()
            return None
        if frame.stream not in self.ports:
            if frame.stream not in self.skipped:
                self.skipped.add(frame.stream)
                self.log.info("recorded stream %r: not replayed (no connected output of that name, or not in "
                              "streams)", frame.stream)
            return None
        try:
            header, arrays = recording.decode_frame(frame.data)
        except MessageError as exc:
            self.malformed.inc()
            self._warn("recording", f"{p.path}: skipped a frame of stream {frame.stream!r} that does not decode: {exc}")
            return None
        end = header.position + recording.lines_of(header) * header.ticks_per_line
        before = p.from_ticks is not None and end <= p.from_ticks
        if before or (p.to_ticks is not None and header.position >= p.to_ticks):
            return None
        if self.passes and frame.stream not in self.seq_shift:
            # After a wrap the numbers carry on from the last one sent, then follow the recording's.
            self.seq_shift[frame.stream] = self.seq_next.get(frame.stream, header.seq) - header.seq
        acquired = None   # when the message is due; the first of a pass is due when it is ready
        if p.speed > 0 and self.pass_count:
            acquired = self.pass_t0 + int((frame.log_time - self.pass_log0) / p.speed)
            if not self.sleep_until(acquired):
                return None
            # Late against the file's order: one the recorder took in after a later-stamped one is not late.
            self.pass_due = max(self.pass_due, acquired)
            behind = (time.monotonic_ns() - self.pass_due) / 1e6
            self.behind_ms[self.n_behind % len(self.behind_ms)] = behind
            self.n_behind += 1
            if behind > p.max_lag_ms:
                self.overruns += 1
                self.lost[frame.stream].inc()
                self._missing(frame.stream)
                self._warn("behind", f"{behind:.0f} ms behind the recorded pace: lost a {frame.stream} frame, as "
                           "a camera loses those a busy host cannot take in time (this host does not keep up; "
                           "--speed 0 replays by belt position)")
                return None
        try:
            msg = self._message(frame.stream, header, arrays, acquired)
        except (MessageError, ValueError, TypeError) as exc:  # fits the file's layout, not the message contract
            self.malformed.inc()
            self._warn("recording", f"{p.path}: skipped a frame of stream {frame.stream!r}: {exc}")
            for out in self.out.values():
                out.abandon_unsent()
            return None
        if msg is None:   # no room downstream (counted there): this one is lost
            self._missing(frame.stream)
            return None
        if p.speed > 0 and not self.pass_count:
            self.pass_t0 = self.pass_due = msg.t_in_ns
            self.pass_log0 = frame.log_time
        self.pass_count += 1
        self.published += 1
        return [(frame.stream, msg)]

    def _missing(self, stream: str) -> None:
        """A message of this stream was not sent: the next one says so (gap); its number leaves the hole."""
        self.gap_next.add(stream)

    def _message(self, stream: str, header, arrays, acquired: int | None):
        fields = {f: getattr(header, f) for f in KEPT}
        if self.passes == 0:
            self.span = (min(self.span[0], header.position),
                         max(self.span[1], header.position + recording.lines_of(header) * header.ticks_per_line))
            self.grid = math.lcm(self.grid, max(header.ticks_per_line, 1))
        else:
            fields["position"] += self.shift
        if self.passes:
            fields["seq"] += self.seq_shift[stream]
        if stream in self.gap_next:
            fields["gap"] = True
        msg = self.out[stream].new({name: (a.shape, a.dtype) for name, a in arrays.items()},
                                   schema=header.schema, **fields)
        if msg is None:
            return None
        self.gap_next.discard(stream)
        for name, a in arrays.items():
            np.copyto(msg.arrays[name], a)
        msg.t_in_ns = acquired or time.monotonic_ns()  # unpaced: the replay is this message's acquisition
        self.seq_next[stream] = fields["seq"] + 1
        return msg

    def _end_of_file(self):
        if not self.params.loop:
            self.finish()
            return None
        if not self.pass_count:
            self.log.warning("%s: nothing to replay in the position range; stopping", self.params.path)
            self.finish()
            return None
        self.passes += 1
        self.shift += -(-(self.span[1] - self.span[0]) // self.grid) * self.grid
        self._start_pass()
        return None

    def status(self) -> dict:
        out = {"published": self.published, "passes": self.passes + 1, "damaged": int(self.damaged)}
        if self.params.speed > 0:
            out["overruns"] = self.overruns
        if self.n_behind:
            # What a busy host costs the replay: the graph got these messages that late, as from a camera.
            behind = self.behind_ms[:min(self.n_behind, len(self.behind_ms))]
            out["behind_p99_ms"] = round(float(np.percentile(behind, 99)), 1)
            out["behind_max_ms"] = round(float(behind.max()), 1)
        return out
