"""The live view: the belt as the line sees it, for an operator, in Foxglove (a WebSocket server).

It takes the register node's strips, the class masks and the eject plan's decisions on
live edges (a view never holds the line back: what it cannot take in time is dropped
and counted at its inputs) and keeps the last `window_mm` of belt on a coarse grid (at
most `view_px` wide, every Nth line and column, as the recorder's pictures). A thread
of its own publishes, `hz` times a second, on the Foxglove WebSocket protocol
(foxglove-sdk, the `live` extra):

    /live/rgb           foxglove.RawImage         the RGB strip's lines, the newest at the bottom
    /live/mask          foxglove.RawImage         the class mask in colour, on the same rows
    /live/annotations   foxglove.ImageAnnotations each object's box with its class and decision, and the
                                                  air the valves will blow on it, on those rows
    /live/state         JSON                      the machine's state: recipe, belt, rates, counts, legend

A channel nobody subscribes to costs nothing: its pictures are not made. The server
has no authentication: bind it to the machine's local network only (docs/live-view.md).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from datetime import datetime, timezone

import numpy as np
from foxglove_schemas_protobuf.ImageAnnotations_pb2 import ImageAnnotations
from foxglove_schemas_protobuf.PointsAnnotation_pb2 import PointsAnnotation
from foxglove_schemas_protobuf.RawImage_pb2 import RawImage
from pydantic import Field, field_validator

from sortline.nodes import views
from sortline.nodes.belt.bar import BarGeometry
from sortline.nodes.foxglove_messages import ENCODING, raw_image, schema_of
from sortline.nodes.streams import EJECT, MASK, STRIP
from sortline.pipeline.config import ConfigError, Section, host_port
from sortline.pipeline.node import Node

NO_MASK = 255          # a mask cell not (yet) known: drawn black
MAX_SHAPES = 2000      # objects and valve windows kept for the picture: its annotations stay bounded
IDLE_S = 1.0           # no strip for this long: the state says the belt is idle
DECISION_COLOURS = {"eject": (0.1, 0.9, 0.2, 1.0)}   # any other decision (not a target, too small, ...): yellow
OTHER_COLOUR = (1.0, 0.85, 0.1, 1.0)
AIR_COLOUR = (0.2, 0.5, 1.0, 0.35)
TOPICS = {"rgb": "/live/rgb", "mask": "/live/mask", "annotations": "/live/annotations", "state": "/live/state"}


def _port(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    if port == "0" and host:
        return host, 0
    return host_port(address)


class LiveView(Node):
    inputs = {"strip": STRIP, "mask": MASK, "plan": EJECT}

    class Params(Section):
        bind: str = Field("127.0.0.1:8765", description="HOST:PORT the Foxglove WebSocket server listens on (port "
                          "0: one the system picks, logged); the machine's local network only")
        hz: float = Field(4.0, gt=0, le=30, description="pictures and states a second")
        window_mm: float = Field(0.0, ge=0, le=100_000, description="belt shown; 0: as long as the belt is wide")
        view_px: int = Field(320, ge=16, le=4096, description="the pictures' width at most")

        @field_validator("bind")
        @classmethod
        def _bind(cls, value):
            _port(value)
            return value

    def setup(self) -> None:
        try:
            import foxglove   # the live extra: imported here, so that a graph without it still checks
        except ImportError as exc:
            raise ConfigError([f"nodes.{self.name}: the live view needs foxglove-sdk ({exc}): "
                               "pip install 'sortline[live]'"]) from None

        m, p = self.machine, self.params
        rgb = m.cameras.rgb
        self.tpl = rgb.ticks_per_line
        self.stride = m.model.mask_stride
        self.bar = BarGeometry(m)
        self.expect("strip", width=rgb.pixels, ticks_per_line=self.tpl)
        self.expect("mask", width=rgb.pixels // self.stride, ticks_per_line=self.tpl * self.stride)
        self.expect("plan", valves=m.valve_bar.count)
        self.step = views.grid_step(rgb.pixels, p.view_px)
        window_mm = p.window_mm or m.belt.width_mm
        self.rows = max(1, round(window_mm * m.belt.ticks_per_mm / self.tpl / self.step))
        self.cols = len(range(0, rgb.pixels, self.step))
        self.rgb = np.zeros((self.rows, self.cols, 3), np.uint8)   # a ring of picture rows, by belt position
        self.mask = np.full((self.rows, self.cols), NO_MASK, np.uint8)
        self.mask_cols = np.arange(self.cols) * self.step // self.stride
        self.head: int | None = None   # the picture row after the newest one written
        self.lut = np.zeros((256, 3), np.uint8)
        self.classes: list[str] = []
        self.objects: deque = deque(maxlen=MAX_SHAPES)   # ObjectReport, newest last
        self.windows: deque = deque(maxlen=MAX_SHAPES)   # Window
        self.counts: dict[str, dict[str, int]] = {}       # class -> decision -> objects
        self.windows_total = 0
        self.received = {port: 0 for port in self.inputs}
        self.last_in = {port: 0.0 for port in self.inputs}
        self.decision_ms = 0.0
        self.belt_mm_s = 0.0
        self._belt_at: tuple[float, int] | None = None   # (monotonic s, position) of a strip a while ago
        self.published = 0
        self.lock = threading.Lock()

        host, port = _port(p.bind)
        self.context_fg = foxglove.Context()
        try:
            self.server = foxglove.start_server(name=f"sortline {self.context.graph}", host=host, port=port,
                                                context=self.context_fg)
        except RuntimeError as exc:   # the port is taken, the address is not this machine's
            raise ConfigError([f"nodes.{self.name}.params.bind = {p.bind!r}: {exc}"]) from None

        def channel(topic, message_class):
            name, data = schema_of(message_class)
            return foxglove.Channel(topic, schema=foxglove.Schema(name=name, encoding=ENCODING, data=data),
                                    message_encoding=ENCODING, context=self.context_fg)

        self.channels = {"rgb": channel(TOPICS["rgb"], RawImage), "mask": channel(TOPICS["mask"], RawImage),
                         "annotations": channel(TOPICS["annotations"], ImageAnnotations),
                         "state": foxglove.Channel(TOPICS["state"], message_encoding="json", context=self.context_fg)}
        self.closing = threading.Event()
        self.thread = self.start_thread(self._publish_loop, "live-view")
        where = f"{host}:{self.server.port}"
        self.log.info("live view on ws://%s (Foxglove: Open connection, Foxglove WebSocket): %s pictures of %d x %d "
                      "(%.0f mm of belt), %g a second", where, "/live/rgb, /live/mask,", self.cols, self.rows,
                      window_mm, p.hz)
        if host in ("0.0.0.0", "::", ""):
            self.log.warning("live view on every network this machine is on (%s): it has no authentication, keep "
                             "it on the machine's local network (bind to that interface's address)", where)

    # Input: into the ring, under the lock (the publisher reads it).

    def process(self, port, msg):
        now = time.monotonic()
        with self.lock:
            if port == "strip":
                self._strip(msg, now)
            elif port == "mask":
                self._mask(msg)
            else:
                self._plan(msg)
            # Counted once drawn, under the lock: a state published says what the pictures beside it hold.
            self.received[port] += 1
            self.last_in[port] = now
        return None

    def _strip(self, msg, now: float) -> None:
        meta = msg.meta
        first_line = msg.header.position // self.tpl + meta.overlap
        core = msg.arrays["rgb"][meta.overlap:meta.overlap + meta.valid_lines]
        grid = views.on_grid(core, first_line, self.step)
        first = -(-first_line // self.step)
        self._advance(first, first + len(grid))
        keep = first + np.arange(len(grid)) >= self.head - self.rows   # rows still in the window
        at = (first + np.flatnonzero(keep)) % self.rows
        self.rgb[at] = grid[keep]
        self.mask[at] = NO_MASK   # new belt: its mask is still to come
        position = msg.header.position
        if self._belt_at is None or now - self._belt_at[0] > 5 or position < self._belt_at[1]:
            self._belt_at = (now, position)
        elif now - self._belt_at[0] > 0.5:
            self.belt_mm_s = (position - self._belt_at[1]) / self.machine.belt.ticks_per_mm / (now - self._belt_at[0])
            self._belt_at = (now, position)

    def _advance(self, first: int, end: int) -> None:
        """Make room for picture rows [first, end): rows skipped (lines missing) are cleared, a belt
        that started again elsewhere (a restart, a replay) starts the window again."""
        if self.head is None or end <= self.head - self.rows or first >= self.head + self.rows:
            self.rgb[:] = 0
            self.mask[:] = NO_MASK
            self.head = end
            return
        if first > self.head:
            gone = np.arange(self.head, first) % self.rows
            self.rgb[gone] = 0
            self.mask[gone] = NO_MASK
        self.head = max(self.head, end)

    def _mask(self, msg) -> None:
        meta = msg.meta
        if meta.classes != self.classes:
            self.classes = list(meta.classes)
            self.lut[:len(self.classes)] = views.class_colours(len(self.classes))[:256]
        if self.head is None:
            return
        first_line = msg.header.position // self.tpl    # the mask's first cell row starts at this RGB line
        lines = min(meta.valid_lines, len(msg.arrays["classes"])) * self.stride
        rows = np.arange(-(-first_line // self.step), -(-(first_line + lines) // self.step))
        rows = rows[(rows >= self.head - self.rows) & (rows < self.head)]
        cells = (rows * self.step - first_line) // self.stride
        self.mask[rows % self.rows] = msg.arrays["classes"][cells][:, self.mask_cols]
        if msg.header.trace:
            self.decision_ms = (time.monotonic_ns() - msg.header.trace[0].t_in_ns) / 1e6

    def _plan(self, msg) -> None:
        for o in msg.meta.objects:
            self.objects.append(o)
            by_class = self.counts.setdefault(o.cls, {})
            by_class[o.decision] = by_class.get(o.decision, 0) + 1
        self.windows.extend(msg.meta.windows)
        self.windows_total += len(msg.meta.windows)

    # Output: a thread of its own, at the operator's pace.

    def _publish_loop(self) -> None:
        period = 1.0 / self.params.hz
        next_t = time.monotonic()
        while not self.closing.wait(max(0.0, next_t - time.monotonic())):
            next_t = max(next_t + period, time.monotonic())
            self._publish()

    def _publish(self) -> None:
        wanted = {name for name, ch in self.channels.items() if ch.has_sinks()}
        if not wanted:
            return
        now_ns = time.time_ns()
        with self.lock:
            picture = None
            if self.head is not None and wanted & {"rgb", "mask", "annotations"}:
                top = self.head - self.rows   # picture row shown at the top of the picture
                at = np.arange(top, self.head) % self.rows
                picture = (top, self.rgb[at] if "rgb" in wanted else None,
                           self.lut[self.mask[at]] if "mask" in wanted else None,
                           list(self.objects) if "annotations" in wanted else [],
                           list(self.windows) if "annotations" in wanted else [])
            state = self._state(now_ns) if "state" in wanted else None
        if picture is not None:
            top, rgb, mask, objects, windows = picture
            if rgb is not None:
                self.channels["rgb"].log(raw_image(rgb, now_ns), log_time=now_ns)
            if mask is not None:
                self.channels["mask"].log(raw_image(mask, now_ns), log_time=now_ns)
            if "annotations" in wanted:
                self.channels["annotations"].log(self._annotations(top, objects, windows, now_ns), log_time=now_ns)
        if state is not None:
            self.channels["state"].log(state, log_time=now_ns)
        self.published += 1

    def _annotations(self, top: int, objects, windows, now_ns: int) -> bytes:
        """Boxes in picture pixels: x across the belt, y along it (picture row `top` at y = 0)."""
        out = ImageAnnotations()
        px_mm = self.bar.mm_per_px * self.step          # mm of belt across per picture pixel
        row_ticks = self.tpl * self.step                 # ticks of belt along per picture row

        def box(x0, x1, p0, p1, colour, fill=None):
            y0, y1 = p0 / row_ticks - top, p1 / row_ticks - top
            if y1 < 0 or y0 > self.rows:
                return False
            shape = out.points.add(type=PointsAnnotation.LINE_LOOP, thickness=1.5)
            shape.timestamp.FromNanoseconds(now_ns)
            for x, y in ((x0, y0), (x1, y0), (x1, y1), (x0, y1)):
                shape.points.add(x=x, y=y)
            shape.outline_color.r, shape.outline_color.g, shape.outline_color.b, shape.outline_color.a = colour
            if fill:
                shape.fill_color.r, shape.fill_color.g, shape.fill_color.b, shape.fill_color.a = fill
            return True

        for w in windows:   # where the air meets the belt: back from the valve bar to the scan line
            x0 = (self.bar.offset + (w.valve_lo - 0.5) * self.bar.pitch) / px_mm
            x1 = (self.bar.offset + (w.valve_hi + 0.5) * self.bar.pitch) / px_mm
            box(x0, x1, w.open_pos - self.bar.travel_ticks, w.close_pos - self.bar.travel_ticks, AIR_COLOUR,
                AIR_COLOUR)
        for o in objects:
            colour = DECISION_COLOURS.get(o.decision, OTHER_COLOUR)
            if box(o.x0_mm / px_mm - 0.5, o.x1_mm / px_mm + 0.5, o.p0, o.p1, colour):
                text = out.texts.add(text=f"{o.cls} {o.decision}", font_size=11)
                text.timestamp.FromNanoseconds(now_ns)
                text.position.x, text.position.y = o.x0_mm / px_mm, o.p0 / row_ticks - top - 2
                text.text_color.r, text.text_color.g, text.text_color.b, text.text_color.a = colour
                text.background_color.a = 0.6
        return out.SerializeToString()

    def _state(self, now_ns: int) -> dict:
        now = time.monotonic()
        m = self.machine
        seen = self.last_in["strip"]
        return {
            "time": datetime.fromtimestamp(now_ns / 1e9, timezone.utc).isoformat(timespec="milliseconds"),
            "graph": self.context.graph, "profile": m.profile,
            "belt": "no strips yet" if not seen else ("running" if now - seen < IDLE_S else "idle"),
            "belt_speed_m_s": round(self.belt_mm_s / 1000, 3), "nominal_speed_m_s": m.belt.speed_m_s,
            "recipe": {"targets": list(m.recipe.targets), "priority": m.recipe.priority},
            "decision_latency_ms": round(self.decision_ms, 1),
            "inputs": {port: {"messages": n, "age_s": round(now - self.last_in[port], 2) if n else None}
                       for port, n in self.received.items()},
            "objects": {cls: dict(by_decision) for cls, by_decision in self.counts.items()},
            "ejected": sum(c.get("eject", 0) for c in self.counts.values()),
            "valve_windows": self.windows_total,
            "view": {"rows": self.rows, "cols": self.cols, "step": self.step,
                     "first_position": None if self.head is None else (self.head - self.rows) * self.step * self.tpl,
                     "end_position": None if self.head is None else self.head * self.step * self.tpl},
            "legend": {cls: "#%02x%02x%02x" % tuple(int(v) for v in self.lut[i])
                       for i, cls in enumerate(self.classes)},
        }

    def status(self) -> dict:
        return {"published": self.published, **{f"{port}_in": n for port, n in self.received.items()}}

    def teardown(self) -> None:
        if hasattr(self, "closing"):
            self.closing.set()
            self.thread.join(2)
        if hasattr(self, "server"):
            self.server.stop()
