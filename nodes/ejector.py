"""The ejector node: valve windows in belt position → commands sent before their deadline.

Windows arrive from the eject-plan node in encoder ticks at the valve bar.
The schedule keeps them in position, per valve, merging windows that
overlap or nearly touch on the same valve. A sender thread turns positions
into times only when a command is about to go (from the encoder track, so a
belt that changed speed since detection is followed), and sends each command
`send_ahead_ms` before its deadline:

    air must arrive  t_air = time the encoder reaches open_pos
    command time     t_cmd = t_air − valve opening time
    deadline         t_cmd − driver latency: a command sent later is refused,
                     logged with its object id and counted as late.

The sender's loop does no allocation beyond the command it sends and no
heavy work: the schedule is a heap of small lists, times are a
multiply-add. It is a thread of its own so that messages arriving on the
node's sockets never delay a command.

Ejections are counted per object (its id, unique within a run), by class:
`sortline_ejections_total{cls}`. Only the recipe's targets can be ejected
(those of the recipe in force at the object's first line, when the recipe
changes at run time), so a window for any other class is refused and
counted, and the metric has at most one series per class a recipe targets.

Latency, from the acquisition of the camera lines a plan was decided on (the
first entry of its trace): to the plan arriving here, the decision latency
(`sortline_ejector_decision_seconds`); to each command leaving for the
driver, the end-to-end latency (`sortline_latency_seconds`, as the sink
measures it). A command leaves `send_ahead_ms` before its deadline by
design, so the second is mostly the belt's travel to the valve bar.
"""

from __future__ import annotations

import heapq
import threading
import time
from collections import deque

import numpy as np
from prometheus_client import Counter, Histogram
from pydantic import Field

from sortline.nodes.belt.bar import BarGeometry
from sortline.nodes.belt.datagram import Command, next_seq, read_key
from sortline.nodes.belt.drivers import DRIVERS
from sortline.nodes.belt.encoder import EncoderTrack
from sortline.nodes.streams import EJECT, LINES, object_position
from sortline.pipeline import metrics
from sortline.pipeline.config import ConfigError, Section
from sortline.pipeline.metrics import LATENCY_BUCKETS
from sortline.pipeline.node import Node, RateLimitedLog

LATE = Counter("sortline_ejector_late", "Commands refused: their deadline had passed", ["node"])
COMMANDS = Counter("sortline_valve_commands", "Commands sent to the valve driver", ["node"])
EJECTIONS = Counter("sortline_ejections", "Objects a command was sent for, by class", ["node", "cls"])
OPEN_SECONDS = Counter("sortline_valve_open_seconds", "Valve-open time commanded (valve-seconds)", ["node"])
MAX_PENDING = 100_000   # valve windows waiting to be sent: a bound on the schedule's memory
DRIVER_ERRORS = Counter("sortline_valve_driver_errors", "Commands the valve driver could not send", ["node"])
LEAD = Histogram("sortline_ejector_lead_seconds", "How far ahead of its deadline a command left", ["node"],
                 buckets=LATENCY_BUCKETS)
DECISION = Histogram("sortline_ejector_decision_seconds", "Decision latency: from the acquisition of the last camera "
                     "lines a plan was decided on (its first trace entry) to the plan reaching the ejector",
                     ["node"], buckets=LATENCY_BUCKETS)


class Schedule:
    """Pending windows per valve, in belt position; what is due at a given time."""

    def __init__(self, open_ms: float, close_ms: float, latency_ms: float, ahead_ms: float,
                 min_pulse_ms: float, max_pulse_ms: float, merge_ticks: int):
        self.open_ns, self.close_ns = open_ms * 1e6, close_ms * 1e6
        self.latency_ns, self.ahead_ns = latency_ms * 1e6, ahead_ms * 1e6
        self.min_pulse_ns, self.max_pulse_ns = min_pulse_ms * 1e6, max_pulse_ms * 1e6
        self.merge_ticks = merge_ticks
        self.heap: list[list] = []              # [open_pos, n, valve, close_pos, object id, cls, t_exposure]
        self.last: dict[int, list] = {}         # valve -> its latest pending window
        self.n = 0
        self.clamped = 0

    def add(self, valve: int, open_pos: int, close_pos: int, obj: int, cls: str, t_exposure: int = 0) -> None:
        w = self.last.get(valve)
        if w is not None and w[0] <= open_pos <= w[3] + self.merge_ticks:
            w[3] = max(w[3], close_pos)         # overlaps or nearly touches the pending one: one pulse
            return
        self.n += 1
        w = [open_pos, self.n, valve, close_pos, obj, cls, t_exposure]
        heapq.heappush(self.heap, w)
        self.last[valve] = w

    def next_send_ns(self, track: EncoderTrack) -> float | None:
        if not self.heap:
            return None
        return track.time_at(self.heap[0][0]) - self.open_ns - self.latency_ns - self.ahead_ns

    def due(self, now_ns: float, track: EncoderTrack) -> tuple[list, list]:
        """Windows to send now as (window, t_cmd, duration_ns), and (window, deadline) of those whose deadline
        has passed."""
        send, late = [], []
        while self.heap:
            w = self.heap[0]
            t_cmd = track.time_at(w[0]) - self.open_ns
            deadline = t_cmd - self.latency_ns
            if now_ns < deadline - self.ahead_ns:
                break
            heapq.heappop(self.heap)
            if self.last.get(w[2]) is w:
                del self.last[w[2]]
            if now_ns > deadline:
                late.append((w, deadline))
                continue
            send.append((w, t_cmd, self.pulse(track.time_at(w[3]) - self.close_ns - t_cmd)))
        return send, late

    def pulse(self, duration_ns: float) -> float:
        """A pulse the valves can give: within min_pulse_ms..max_pulse_ms (counted when it was not)."""
        if not self.min_pulse_ns <= duration_ns <= self.max_pulse_ns:
            self.clamped += 1
            duration_ns = min(max(duration_ns, self.min_pulse_ns), self.max_pulse_ns)
        return duration_ns


class Ejector(Node):
    inputs = {"in": EJECT, "encoder": LINES}
    realtime = True

    class Params(Section):
        send_ahead_ms: float = Field(20.0, ge=0, le=1000, description="commands leave this long before their "
                                     "deadline (the driver and controller must hold them that long)")
        merge_gap_mm: float = Field(5.0, ge=0, description="windows on one valve closer than this become one pulse")
        samples: str = Field("", description="write every command's exposure, send and deadline times (for "
                             "`sortline hil`) and every command sent (valve, open and close position, object id) "
                             "here (.npz) when the node stops")
        timing: bool = Field(True, description="false: send every window at once, by position only (scoring "
                             "decisions on a belt that waits for the pipeline; never on a machine)")

    def setup(self) -> None:
        m, p = self.machine, self.params
        e, v = m.ejector, m.valve_bar
        if not e.key:
            raise ConfigError(["ejector.key: not set; valve commands are authenticated with the controller's key "
                               "(make one with `sortline keys NAME --valve`)"])
        try:
            key = read_key(e.key)
        except ValueError as exc:
            raise ConfigError([f"ejector.key = {exc}"]) from None
        try:
            self.driver = DRIVERS[e.driver](e.address, key)
        except (ValueError, OSError) as exc:
            raise ConfigError([f"ejector.address = {e.address!r}: {exc}"]) from None
        self.track = EncoderTrack(m.belt.ticks_per_mm, m.belt.speed_m_s)
        # Windows off the bar, or longer than the belt can carry to it, never reach the schedule.
        self.expect("in", valves=v.count, window_ticks=BarGeometry(m).max_window_ticks)
        self.schedule = Schedule(v.open_ms, v.close_ms, e.driver_latency_ms, p.send_ahead_ms, v.min_pulse_ms,
                                 v.max_pulse_ms, int(p.merge_gap_mm * m.belt.ticks_per_mm))
        self.lock = threading.Lock()
        self.wake = threading.Event()
        self.sent = self.late = self.seq = 0
        self.recent = deque(maxlen=4096)        # object ids a command went out for (ejections are counted once)
        self.recent_set: set[int] = set()
        self.ejections = {cls: EJECTIONS.labels(self.name, cls) for cls in m.recipe.targets}
        # The plan's object ids give each object's first mask line: the recipe it is judged by.
        self.mask_width = m.cameras.rgb.pixels // m.model.mask_stride
        self.mask_tpl = m.cameras.rgb.ticks_per_line * m.model.mask_stride
        self.not_target = metrics.MALFORMED.labels(self.name, "window_class")
        self.overflow = metrics.DROPS.labels(f"{self.name}.in", "pending_full")
        self.lead_ms = np.zeros(4096)
        self.decision_ms = np.zeros(4096)
        self.n_lead = self.n_decision = 0
        # For `sortline hil`: per command (exposure, sent, deadline, missed, object id), per decision its trace.
        self.samples = np.zeros((1 << 20, 5)) if p.samples else None
        self.n_samples = 0
        # What was sent, by belt position: two runs of one recording are compared by it (`sortline replay`).
        self.sent_log = np.zeros((1 << 20, 4), np.int64) if p.samples else None
        self.traces: list | None = [] if p.samples else None
        self.stages: list[str] = []
        # Monotonic → realtime for the datagram's absolute time (the controller's clock is PTP, not ours).
        self._late, self._commands = LATE.labels(self.name), COMMANDS.labels(self.name)
        self._open_s, self._lead = OPEN_SECONDS.labels(self.name), LEAD.labels(self.name)
        self._driver_errors = DRIVER_ERRORS.labels(self.name)
        # End-to-end latency where commands leave: exposure -> the command sent (the sink's figure, at the valves).
        self._e2e, self._decision = metrics.E2E_SECONDS.labels(self.name), DECISION.labels(self.name)
        # Across hosts the trace is only as good as the hosts' clock agreement (pipeline/clock.py).
        self.e2e_reported = not self.context.unsynchronised_edges
        if not self.e2e_reported:
            self.log.warning("end-to-end and decision latency not reported: their path crosses tcp edges (%s) "
                             "and clock.ptp_synchronised is false", ", ".join(self.context.unsynchronised_edges))
        self._warn = RateLimitedLog(self.log)
        self.running = True
        self.sender = self.start_thread(self._send_loop, "sender")
        self.log.info("%s driver to %s; commands %g ms ahead of their deadline", e.driver, e.address, p.send_ahead_ms)

    def process(self, port, msg):
        h = msg.header
        if port == "encoder":
            with self.lock:
                self.track.follow(msg)
            return None
        windows = [w for w in msg.meta.windows if self._target(w)]
        t_exposure = h.trace[0].t_in_ns if h.trace else 0
        if h.trace:
            now = time.monotonic_ns()
            self.decision_ms[self.n_decision % 4096] = (now - t_exposure) / 1e6
            self.n_decision += 1
            if self.e2e_reported:
                self._decision.observe((now - t_exposure) / 1e9)
            if self.traces is not None and windows:
                self.traces.append([now] + [t for e in h.trace for t in (e.t_in_ns, e.t_out_ns)])
                self.stages = self.stages or [e.stage for e in h.trace]
        if not self.params.timing:
            for w in windows:
                duration = self.schedule.pulse((w.close_pos - w.open_pos) / self.track.nominal)   # nominal speed
                for valve in range(w.valve_lo, w.valve_hi + 1):
                    self._send([w.open_pos, 0, valve, w.close_pos, w.object_id, w.cls, 0], 0, duration, 0)
            return None
        with self.lock:
            if len(self.schedule.heap) + sum(w.valve_hi - w.valve_lo + 1 for w in windows) > MAX_PENDING:
                # More air pending than a belt's length of objects could ever need: windows from nowhere.
                self.overflow.inc(len(windows))
                self._warn("pending", f"{len(self.schedule.heap)} windows pending already: refused {len(windows)} more")
                return None
            for w in windows:
                for valve in range(w.valve_lo, w.valve_hi + 1):
                    self.schedule.add(valve, w.open_pos, w.close_pos, w.object_id, w.cls, t_exposure)
        self.wake.set()
        return None

    def on_recipe(self, recipe, at_tick):
        for cls in recipe.targets:   # a series for each class a recipe of the run targets
            if cls not in self.ejections:
                self.ejections[cls] = EJECTIONS.labels(self.name, cls)

    def _target(self, w) -> bool:
        targets = self.recipe_at(object_position(w.object_id, self.mask_width, self.mask_tpl)).targets
        if w.cls in targets:
            return True
        self.not_target.inc()
        self._warn("window_class", f"refused a window for object {w.object_id} of class {w.cls!r}: not a target "
                   f"(recipe.targets: {', '.join(targets)})")
        return False

    def _send_loop(self) -> None:
        while self.running:
            now = time.monotonic_ns()
            with self.lock:
                if not self.track.known:
                    send, late, nxt = [], [], None
                else:
                    send, late = self.schedule.due(now, self.track)
                    nxt = self.schedule.next_send_ns(self.track)
            for w, t_cmd, duration in send:
                self._send(w, t_cmd, duration, now)
            for w, deadline in late:
                self.late += 1
                self._late.inc()
                self._sample(w[6], now, deadline, missed=True, obj=w[4])
                self._warn("late", f"late: valve {w[2]} for object {w[4]} ({w[5]}) missed its deadline; not sent")
            wait = 0.005 if nxt is None else min(max((nxt - time.monotonic_ns()) / 1e9, 0.0002), 0.005)
            self.wake.wait(wait)
            self.wake.clear()

    def _send(self, w, t_cmd: float, duration: float, now: int) -> None:
        self.seq = next_seq(self.seq)
        # The datagram carries wall-clock time (PTP-disciplined on a machine). Its offset from the monotonic
        # clock is read for each command: a clock step or slew since start-up must not move the air.
        realtime_offset = time.time_ns() - time.monotonic_ns()
        try:
            self.driver.send(Command(self.seq, w[2], w[2], w[0], int(t_cmd + realtime_offset) if t_cmd else 0,
                                     int(duration / 1000), w[4]))
        except OSError as exc:
            self._driver_errors.inc()
            self._warn("driver", f"valve driver: {exc} (command for object {w[4]} lost)")
            return
        sent_ns = time.monotonic_ns()
        if self.sent_log is not None:
            if self.sent < len(self.sent_log):
                self.sent_log[self.sent] = (w[2], w[0], w[3], w[4])
            else:
                self._warn("sent_log", f"{self.params.samples}: keeps the first {len(self.sent_log)} commands sent")
        self.sent += 1
        self._commands.inc()
        self._open_s.inc(duration / 1e9)
        if w[6] and self.e2e_reported:   # no exposure time: sent by position alone (timing off)
            self._e2e.observe((sent_ns - w[6]) / 1e9)
        self._sample(w[6], sent_ns, t_cmd - self.schedule.latency_ns, missed=False, obj=w[4])
        if self.params.timing:
            lead = (t_cmd - self.schedule.latency_ns - now) / 1e6
            self.lead_ms[self.n_lead % 4096] = lead
            self.n_lead += 1
            self._lead.observe(max(lead, 0) / 1e3)
        if w[4] not in self.recent_set:
            if len(self.recent) == self.recent.maxlen:
                self.recent_set.discard(self.recent[0])
            self.recent.append(w[4])
            self.recent_set.add(w[4])
            self.ejections[w[5]].inc()

    def _sample(self, t_exposure: int, t_sent: int, deadline: float, missed: bool, obj: int = 0) -> None:
        """One command for the latency report (preallocated: no allocation in the sender's loop)."""
        if self.samples is None or not t_exposure:
            return
        i = self.n_samples % len(self.samples)
        self.samples[i] = (t_exposure, t_sent, deadline, missed, obj)
        self.n_samples += 1

    def end_of_stream(self):
        # Windows still ahead of the bar go out when due: wait for the last one (the belt keeps moving).
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline and not self.stopping:
            with self.lock:
                if not self.schedule.heap:
                    break
            time.sleep(0.01)
        return None

    def teardown(self) -> None:
        if hasattr(self, "sender"):
            self.running = False
            self.wake.set()
            self.sender.join(timeout=1)
            self.driver.close()
            if self.samples is not None:
                n = min(self.n_samples, len(self.samples))
                width = max((len(t) for t in self.traces), default=1)
                traces = np.array([t for t in self.traces if len(t) == width], dtype=np.int64).reshape(-1, width)
                np.savez(self.params.samples, commands=self.samples[:n], traces=traces,
                         stages=np.array(self.stages), late=self.late, sent=self.sent,
                         windows=self.sent_log[:min(self.sent, len(self.sent_log))])

    def status(self) -> dict:
        out = {"sent": self.sent, "late": self.late, "pending": len(self.schedule.heap)}
        if self.params.timing:   # by position alone the belt's speed is never used (a replay sets it as fast as it can)
            out["speed_m_s"] = round(self.track.speed_m_s(), 3)
        for name, arr, n in (("lead", self.lead_ms, self.n_lead), ("decision", self.decision_ms, self.n_decision)):
            if n:
                vals = arr[:min(n, len(arr))]
                out[f"{name}_p50_ms"] = round(float(np.percentile(vals, 50)), 2)
                out[f"{name}_{'min' if name == 'lead' else 'p99'}_ms"] = round(
                    float(vals.min() if name == "lead" else np.percentile(vals, 99)), 2)
        return out
