"""The valve-bar simulator: receives the ejector's datagrams and scores the air against the truth.

It listens where a valve controller would (ejector.address, UDP), checks
every datagram (size, magic, version, checksum, valve range: a bad one is
counted by kind and dropped, as a controller must), and turns each pulse
into the stretch of belt it blows on: air from valve opening (command time +
valves.open_ms) to closing (command time + duration + valves.close_ms), in
encoder positions from its own encoder track (a camera stream), on the
valve's cross-belt lane.

The truth stream (labels and object ids on the RGB grid) is held until the
belt has carried it well past the valve bar; then each object pixel is
checked against the air on its valve at its position. An object is hit when
at least `hit_fraction` of its pixels were in the air. The report: recovery
(targets hit / targets), purity (hit objects that are targets, by count and
by area), missed targets (no air at all), air use (valve-open seconds), and
what arrived late or malformed; and, from the truth's object list, recovery
per look (clear, white, coloured, black: carbon-black items are nearly
invisible in the NIR) and the other objects the air carried off, by class.

An object is a target when the recipe in force at its first belt position
targets its class (the recipe can change at run time, pipeline.recipes), and
the report scores each recipe's stretch of belt on its own (`recipes`).
"""

from __future__ import annotations

import json
import os
import socket
import struct
import threading
import time
from collections import deque

import numpy as np
from prometheus_client import Counter
from pydantic import Field

from sortline.nodes.belt.bar import BarGeometry
from sortline.nodes.belt.datagram import SIZE, DatagramError, SequenceWindow, decode, read_key
from sortline.nodes.belt.encoder import EncoderTrack
from sortline.nodes.streams import LINES, TRUTH
from sortline.pipeline.config import ConfigError, Section, host_port
from sortline.pipeline.node import Node

BAD = Counter("sortline_valve_sim_bad_datagrams", "Datagrams the valve-bar simulator refused", ["node", "kind"])
KERNEL_DROPS = Counter("sortline_valve_sim_kernel_drops", "Datagrams the kernel dropped at the valve port (its "
                       "receive buffer was full)", ["node"])
SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)   # Linux: kernel receive time, CLOCK_REALTIME
SO_RXQ_OVFL = getattr(socket, "SO_RXQ_OVFL", 40)         # Linux: with each datagram, the drops so far
ANCILLARY = socket.CMSG_SPACE(16) + socket.CMSG_SPACE(4)   # room for both
QUIET_MAX_S = 600.0  # unpaced: the longest wait for the last commands after the end of the truth
SETTLE_MM = 150.0   # truth is scored once the belt has carried it this far past the valve bar


class ValveSim(Node):
    inputs = {"truth": TRUTH, "encoder": LINES}

    class Params(Section):
        hit_fraction: float = Field(0.5, gt=0, le=1, description="share of an object's area the air must cover")
        report: str = Field("", description="write the score here (JSON) when the node stops")
        by_position: bool = Field(False, description="place the air by the commands' encoder positions, not "
                                  "their times (scoring decisions alone, with an ejector whose timing is off)")

    def setup(self) -> None:
        m = self.machine
        self.bar = BarGeometry(m)
        self.expect("truth", pixels=m.cameras.rgb.pixels)
        self.track = EncoderTrack(m.belt.ticks_per_mm, m.belt.speed_m_s)
        self.open_ns, self.close_ns = m.valve_bar.open_ms * 1e6, m.valve_bar.close_ms * 1e6
        self.targets = m.recipe.targets
        self.classes: list[str] | None = None   # the belt's classes, from the first truth message
        self.commanded: set[int] = set()        # object ids (u32) the datagrams named
        self.lock = threading.Lock()
        self.air: list[list[tuple[float, float]]] = [[] for _ in range(self.bar.count)]  # RGB-frame positions
        self.commands = self.late_arrivals = 0
        self.last_command = time.monotonic()
        self.longest_pause = 0.0
        self.bad: dict[str, int] = {}
        self.air_s = 0.0
        self.pending: deque[tuple[int, np.ndarray, np.ndarray]] = deque()   # truth chunks not yet scored
        self.objects: dict[int, list] = {}                             # id -> [cls, pixels, hit pixels]
        self.looks: dict[int, str] = {}                                # id -> look (from the truth's object list)
        self.first: dict[int, int] = {}                                # id -> its first belt position (ticks)
        try:
            self.key = read_key(m.ejector.key) if m.ejector.key else None
        except ValueError as exc:
            raise ConfigError([f"ejector.key = {exc}"]) from None
        if self.key is None:
            raise ConfigError(["ejector.key: not set; the valve-bar simulator checks every datagram's MAC as a "
                               "controller must (make a key with `sortline keys NAME --valve`)"])
        self.max_duration_us = int(m.valve_bar.max_pulse_ms * 1000)
        self.sequence = SequenceWindow()
        self.kernel_drops = 0
        self._kernel_drops = KERNEL_DROPS.labels(self.name)
        host, port = host_port(m.ejector.address)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            self.sock.bind((host, port))
        except OSError as exc:
            raise ConfigError([f"ejector.address = {m.ejector.address!r}: the valve-bar simulator cannot listen "
                               f"there ({exc.strerror})"]) from None
        self.sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        self.sock.setsockopt(socket.SOL_SOCKET, SO_RXQ_OVFL, 1)
        self.sock.settimeout(0.1)
        self.running = True
        self.receiver = self.start_thread(self._receive, "receiver")
        self.log.info("valve bar of %d valves listening on %s; scoring %s", self.bar.count, m.ejector.address,
                      ", ".join(self.targets))

    def _receive(self) -> None:
        while self.running:
            try:
                data, anc, _, _ = self.sock.recvmsg(SIZE + 64, ANCILLARY)
            except (TimeoutError, socket.timeout):
                continue
            except OSError:
                return
            # When the datagram reached this host, stamped by the kernel: a busy machine that is slow to
            # run this thread must not make a command that came on time look late.
            arrived = time.monotonic_ns()
            realtime_offset = time.time_ns() - arrived   # now, not at start-up: the wall clock may have moved
            for level, kind, value in anc:
                if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS and len(value) >= 16:
                    sec, nsec = struct.unpack("qq", value[:16])
                    arrived = sec * 1_000_000_000 + nsec - realtime_offset
                elif level == socket.SOL_SOCKET and kind == SO_RXQ_OVFL and len(value) >= 4:
                    total = struct.unpack("I", value[:4])[0]   # the socket's drops so far
                    if total > self.kernel_drops:
                        self._kernel_drops.inc(total - self.kernel_drops)
                        self.kernel_drops = total
            try:
                c = decode(data, self.key, self.bar.count, self.max_duration_us)
                why = self.sequence.check(c.seq)
                if why:
                    raise DatagramError(why, f"sequence {c.seq}")
            except DatagramError as exc:
                self.bad[exc.kind] = self.bad.get(exc.kind, 0) + 1
                BAD.labels(self.name, exc.kind).inc()
                continue
            t_cmd = c.open_at_ns - realtime_offset
            with self.lock:
                self.commands += 1
                self.commanded.add(c.object_id)
                now = time.monotonic()
                if self.commands > 1:
                    self.longest_pause = max(self.longest_pause, now - self.last_command)
                self.last_command = now
                if self.params.by_position:
                    a = c.open_pos - self.bar.travel_ticks
                    b = a + c.duration_us * 1000 * self.track.nominal
                    self.air_s += c.duration_us / 1e6 * (c.valve_hi - c.valve_lo + 1)
                    for v in range(c.valve_lo, c.valve_hi + 1):
                        self.air[v].append((a, b))
                    continue
                if arrived > t_cmd:
                    self.late_arrivals += 1   # a controller would drop it: no air
                    continue
                if not self.track.known:
                    continue
                a = self.track.position_at(t_cmd + self.open_ns) - self.bar.travel_ticks
                b = self.track.position_at(t_cmd + c.duration_us * 1000 + self.close_ns) - self.bar.travel_ticks
                self.air_s += c.duration_us / 1e6 * (c.valve_hi - c.valve_lo + 1)
                for v in range(c.valve_lo, c.valve_hi + 1):
                    self.air[v].append((a, b))

    def process(self, port, msg):
        h = msg.header
        if port == "encoder":
            with self.lock:
                pair = self.track.follow(msg)
            if pair is not None and not self.params.by_position:
                self._score_settled(pair[0])
            return None
        if self.classes is None:
            missing = [t for t in self.targets if t not in msg.meta.classes[1:]]
            if missing:
                raise ConfigError([f"recipe.targets: {', '.join(missing)} not among the belt's classes "
                                   f"({', '.join(msg.meta.classes[1:])}): nothing to score them against"])
            self.classes = list(msg.meta.classes)
        elif msg.meta.classes != self.classes:
            raise ValueError(f"truth classes {msg.meta.classes}, the truth so far had {self.classes}")
        self.pending.append((h.position, msg.arrays["labels"].copy(), msg.arrays["instances"].copy()))
        for o in msg.meta.objects:
            self.looks[o.id] = o.look
            self.first[o.id] = o.p0
        return None

    def recipe_classes(self):
        return None if self.classes is None else self.classes[1:]

    def _judged(self) -> list[tuple[int, list, bool, int]]:
        """Each object scored so far: id, [class, pixels, hit pixels], whether the recipe in force at its
        first belt position targets its class, and that recipe's change number."""
        targets: dict[int, set[int]] = {}
        out = []
        for oid, r in self.objects.items():
            entry = self.recipes.at(self.first.get(oid, 0))
            if entry.n not in targets:
                targets[entry.n] = {self.classes.index(t) for t in entry.recipe.targets if t in self.classes}
            out.append((oid, r, r[0] in targets[entry.n], entry.n))
        return out

    def _by_recipe(self, judged) -> list[dict]:
        """Recovery and purity of each recipe's stretch of belt (the objects that start in it)."""
        frac, out = self.params.hit_fraction, []
        for e in self.recipes.entries:
            mine = [(oid, r, t) for oid, r, t, n in judged if n == e.n]
            hit = [(r, t) for _, r, t in mine if r[2] >= frac * r[1]]
            targets = sum(t for _, _, t in mine)
            hit_targets = sum(t for _, t in hit)
            starts = [self.first[oid] for oid, _, _ in mine if oid in self.first]
            out.append({"change": e.n, "at_tick": None if e.n == 0 else e.at_tick, "targets_classes": e.recipe.targets,
                        "priority": e.recipe.priority, "objects": len(mine), "targets": targets, "hit": len(hit),
                        "hit_targets": hit_targets, "recovery": hit_targets / targets if targets else None,
                        "purity": hit_targets / len(hit) if hit else None,
                        "first_tick": min(starts, default=None), "last_tick": max(starts, default=None)})
        return out

    def end_of_stream(self):
        if self.params.by_position:
            # Commands come when the pipeline gets to them, not on the belt's clock: wait until they stop,
            # then score everything (on a moving belt, what never passed the bar is left out instead).
            # A slow stage (a big model on a CPU) spaces them out, so "stopped" means quiet for longer than
            # the longest pause so far.
            deadline = time.monotonic() + QUIET_MAX_S
            while not self.stopping and time.monotonic() - self.last_command < max(1.0, 2 * self.longest_pause):
                if time.monotonic() > deadline:
                    self.log.warning("commands still coming %.0f s after the end of the truth: scoring now",
                                     QUIET_MAX_S)
                    break
                self.keep_alive()
                time.sleep(0.05)
            while self.pending:
                self._score(*self.pending.popleft())
                self.keep_alive()
        return None

    def _score_settled(self, encoder_pos: int) -> None:
        settle = self.bar.travel_ticks + SETTLE_MM * self.bar.tpm
        while self.pending and self.pending[0][0] + len(self.pending[0][1]) * self.bar.tpl + settle < encoder_pos:
            position = self.pending[0][0]
            self._score(*self.pending.popleft())
            # Chunks are scored in belt order: air that ended before this one cannot touch the next.
            with self.lock:
                self.air = [[span for span in spans if span[1] >= position] for spans in self.air]

    def _score(self, position: int, labels: np.ndarray, ids: np.ndarray) -> None:
        rows, cols = np.nonzero(ids)
        if len(rows) == 0:
            return
        pos = position + (rows + 0.5) * self.bar.tpl        # each pixel's position at the RGB scan line
        valve = self.bar.valve_of_col[cols]
        hit = np.zeros(len(rows), bool)
        with self.lock:
            air = {v: sorted(self.air[v]) for v in np.unique(valve) if v >= 0 and self.air[v]}
        for v, spans in air.items():
            sel = valve == v
            starts = np.array([a for a, _ in spans])
            ends = np.maximum.accumulate(np.array([b for _, b in spans]))   # spans may overlap
            i = np.searchsorted(starts, pos[sel], side="right") - 1
            hit[sel] = (i >= 0) & (pos[sel] < ends[np.maximum(i, 0)])
        obj, inv = np.unique(ids[rows, cols], return_inverse=True)
        px = np.bincount(inv)
        hits = np.bincount(inv, weights=hit)
        cls = labels[rows, cols]
        first = np.zeros(len(obj), int)
        first[inv[::-1]] = np.arange(len(inv))[::-1]
        for o, n, k, c in zip(obj.tolist(), px.tolist(), hits.tolist(), cls[first].tolist()):
            rec = self.objects.setdefault(o, [c, 0, 0.0])
            rec[1] += n
            rec[2] += k

    def score(self) -> dict:
        frac = self.params.hit_fraction
        judged = self._judged()
        targets = [r for _, r, is_target, _ in judged if is_target]
        # Recovery per look: carbon-black items have almost no NIR signature (on real sorters as here),
        # so the share of black targets bounds what an NIR-based model can recover.
        by_look: dict[str, list[int]] = {}
        for oid, r, is_target, _ in judged:
            if is_target:
                tally = by_look.setdefault(self.looks.get(oid, "unknown"), [0, 0])
                tally[0] += 1
                tally[1] += r[2] >= frac * r[1]
        visible = [t for look, t in by_look.items() if look != "black"]
        n_visible = sum(t[0] for t in visible)
        hit = [(oid, r, is_target) for oid, r, is_target, _ in judged if r[2] >= frac * r[1]]
        hit_targets = [r for _, r, is_target in hit if is_target]
        # What dilutes the ejected fraction: the other objects the air carried off, by class.
        others: dict[str, int] = {}
        others_by_look: dict[str, int] = {}
        for oid, r, is_target in hit:
            if not is_target:
                others[self.classes[r[0]]] = others.get(self.classes[r[0]], 0) + 1
                look = self.looks.get(oid, "unknown")
                others_by_look[look] = others_by_look.get(look, 0) + 1
        area_hit = sum(r[2] for r in self.objects.values())
        area_hit_targets = sum(r[2] for r in targets)
        return {
            "objects": len(self.objects), "targets": len(targets), "hit": len(hit), "hit_targets": len(hit_targets),
            "recovery": len(hit_targets) / len(targets) if targets else None,
            "purity": len(hit_targets) / len(hit) if hit else None,
            "purity_area": area_hit_targets / area_hit if area_hit else None,
            "missed": sum(1 for r in targets if r[2] == 0),
            "recovery_not_black": sum(t[1] for t in visible) / n_visible if n_visible else None,
            "black_targets": by_look.get("black", [0, 0])[0],
            "recovery_by_look": {look: round(t[1] / t[0], 4) for look, t in sorted(by_look.items())},
            "hit_others_by_class": dict(sorted(others.items())),
            "hit_others_by_look": dict(sorted(others_by_look.items())),
            "commands": self.commands, "late_arrivals": self.late_arrivals, "bad_datagrams": sum(self.bad.values()),
            "bad_by_kind": dict(self.bad), "air_valve_s": round(self.air_s, 4), "targets_classes": self.targets,
            "commanded_objects": len(self.commanded), "kernel_drops": self.kernel_drops,
            "recipes": self._by_recipe(judged),
        }

    def status(self) -> dict:
        s = self.score()
        return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in s.items()
                if k in ("objects", "targets", "recovery", "purity", "commands", "late_arrivals", "bad_datagrams")}

    def teardown(self) -> None:
        if not hasattr(self, "receiver"):
            return
        self.running = False
        self.receiver.join(timeout=1)
        self.sock.close()
        if self.params.report:
            tmp = f"{self.params.report}.tmp"
            # With each object scored, so that any stretch of belt can be scored from the report (a recipe's first
            # seconds, say): id, first belt position, class, hit, whether its recipe targeted it, and its look.
            frac = self.params.hit_fraction
            objects = [[oid, self.first.get(oid), self.classes[r[0]], bool(r[2] >= frac * r[1]), is_target,
                        self.looks.get(oid, "unknown")] for oid, r, is_target, _ in self._judged()]
            with open(tmp, "w") as fh:
                json.dump({**self.score(), "objects_scored": objects}, fh, indent=2)
            os.replace(tmp, self.params.report)
