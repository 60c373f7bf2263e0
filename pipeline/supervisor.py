"""The supervisor: every node of the graph as its own process, kept alive.

A node with replicas = N is N processes, infer#0 .. infer#N-1, each started,
watched, restarted and reported on its own (pipeline.graph.topo_order names them).

It starts the nodes (every node with inputs at once, then the sources once
those are set up, so nothing is sent into the void),
restarts one that dies with a growing backoff (and counts it), kills and
restarts one whose heartbeats stop, never restarts one that exits with a
configuration error (that would only be a crash loop), and stops them in
data-flow order so that each node can finish what its producer sent.
Heartbeats carry each node's metrics; the supervisor prints them as a status
table.

It also owns the run's recipe (pipeline.recipes): `sortline recipe` asks it
for a change on `control.sock` in the runtime directory, the OPC UA server
(pipeline.opcua, run in a thread of this process when `opcua.enabled`) calls
`change_recipe` directly; either way the change is checked against the
classes the nodes know, given a belt position ahead of the scan line, written
to the audit log, and published to every node on `recipes.sock`. The server
serves what `MachineView` makes of the heartbeats: nothing of it runs in a
node, so none of it can slow the data.

Under systemd each node is its own unit and systemd starts, watches and
restarts them; `sortline control` is then this class with `start_nodes=False`:
the same heartbeats (a node sends them to the same socket however it was
started), recipe book, control socket and OPC UA server, and no child
processes. It notices a node restarted by its new pid, one that is down by its
missing beats, one that finished by the mark it leaves. Restarted itself in the
middle of a run, it takes up the run's recipe history where it was (the nodes
hold it) instead of starting again from the configured recipe.
"""

from __future__ import annotations

import fcntl
import json
import logging
import math
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import msgspec
import zmq

from sortline.pipeline import metrics
from sortline.pipeline.config import EX_CONFIG, ConfigError, Settings
from sortline.pipeline.graph import (finished_mark, heartbeat_address, prepare_runtime_dir, replica_of, source_nodes,
                                     topo_order)
from sortline.pipeline.machine_state import MachineView
from sortline.pipeline.notify import Notifier
from sortline.pipeline.recipes import (Entry, RecipeBook, RecipeError, audit, make_recipe, read_history,
                                       write_history)

log = logging.getLogger("sortline.supervisor")

STOP_WAIT_S = 2.0  # a node gets this long after SIGTERM before SIGKILL
COUNTED = ("_total", "_count", "_sum")  # samples that add up across a node's processes
STABLE_S = 10.0  # a node that ran this long has its backoff reset
RECIPE_MARGIN_S = 0.5   # a recipe change takes effect this far ahead of where the belt may be by then
REPUBLISH_S = 1.0       # the recipe history goes out again this often (a message missed is made good)
SPARE_RETRY_S = 10.0    # a spare that exited on its own is started again no sooner than this


@dataclass
class Child:
    name: str
    index: int
    proc: subprocess.Popen | None = None
    state: str = "starting"  # running | waiting (to restart) | finished | failed | stopped
    started: float = 0.0
    restarts: int = 0
    backoff: float = 0.0
    restart_at: float = 0.0
    last_beat: float = 0.0
    beat: dict = field(default_factory=dict)
    prev_beat: dict = field(default_factory=dict)
    retired: dict = field(default_factory=dict)   # counters of the node's earlier processes, as last reported
    last_error: str = ""   # how its last process ended, when it did not finish

    def totals(self) -> dict[str, float]:
        """The node's counters over all its processes (a restarted node's counters start again at 0)."""
        now = self.beat.get("metrics", {})
        return {**now, **{k: v + now.get(k, 0.0) for k, v in self.retired.items()}}

    def retire(self) -> None:
        for key, value in self.beat.get("metrics", {}).items():
            if key.split("{")[0].endswith(COUNTED):
                self.retired[key] = self.retired.get(key, 0.0) + value
        self.beat, self.prev_beat = {}, {}


class Supervisor:
    def __init__(self, settings: Settings, config_path: str | os.PathLike, seconds: float | None = None,
                 out=None, report: str | None = None, start_nodes: bool = True, nodes: list[str] | None = None):
        """start_nodes=False: watch nodes something else starts (systemd), those of `nodes` (default all)."""
        self.settings = settings
        self.config_path = str(Path(config_path).resolve())
        self.seconds = seconds
        self.report = report
        self.out = out or sys.stdout
        self.start_nodes = start_nodes
        self.order = [n for n in topo_order(settings) if nodes is None or n in nodes]
        self.children = {name: Child(name, i) for i, name in enumerate(self.order)}
        self._stop = False
        self.exit_code = 0
        self.book = RecipeBook(settings.recipe)
        self.phase = "starting"   # starting | up | stopping: for the machine's state
        self.view: dict = {}      # what MachineView made of the last heartbeats (the OPC UA server reads it)
        self._machine = MachineView(settings, set(source_nodes(settings)) & set(self.order))
        self._recipe_lock = threading.Lock()   # changes come from this thread and from the OPC UA server's
        self._belt: tuple[float, int, float] = (time.monotonic(), 0, 0.0)   # when, where, ticks/s measured
        self._plc = None
        self._spare: subprocess.Popen | None = None   # see _keep_spare
        self._spare_at = 0.0

    def _on_signal(self, signum, frame) -> None:
        self._stop = True

    def run(self) -> int:
        # As `sortline check` does, before anything starts (a watcher's nodes hold their ports already).
        problems = metrics.port_problems(self.settings) if self.start_nodes else []
        if problems:
            for line in problems:
                log.error("%s", line)
            return EX_CONFIG
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        self.run_dir = prepare_runtime_dir(self.settings.runtime_dir())
        # One supervisor per graph: a second one would bind the same sockets and steal the first one's
        # messages. The lock goes with the process, however it ends.
        self._lock = open(self.run_dir / "supervisor.lock", "a+")
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.seek(0)
            log.error("graph %s is already running in %s (supervisor pid %s): stop it first, or give this one "
                      "another graph.name", self.settings.graph.name, self.run_dir, self._lock.read().strip() or "?")
            return EX_CONFIG
        self._lock.truncate(0)
        self._lock.write(f"{os.getpid()}\n")
        self._lock.flush()
        ctx = zmq.Context()
        beats = ctx.socket(zmq.PULL)
        beats.setsockopt(zmq.LINGER, 0)
        self.heartbeat_addr = heartbeat_address(self.run_dir)
        beats.bind(self.heartbeat_addr)
        self.since = time.monotonic()
        if not self.start_nodes:
            self._take_up_history(beats)
        write_history(self.run_dir, self.book)
        self._publisher = ctx.socket(zmq.PUB)
        self._publisher.setsockopt(zmq.LINGER, 0)
        self._publisher.bind(f"ipc://{self.run_dir}/recipes.sock")
        control = ctx.socket(zmq.REP)
        control.setsockopt(zmq.LINGER, 0)
        control.bind(f"ipc://{self.run_dir}/control.sock")
        poller = zmq.Poller()
        poller.register(beats, zmq.POLLIN)
        poller.register(control, zmq.POLLIN)
        next_publish = 0.0
        next_status = time.monotonic() + self.settings.supervisor.status_every_s
        notify, next_alive = Notifier(), 0.0
        try:
            self._start_plc()
            if self.start_nodes:
                self._start_all(beats)
                self.phase = "up"
            # A timed run lasts that long once its nodes are up: a slow start takes none of the belt's time.
            deadline = None if self.seconds is None else time.monotonic() + self.seconds
            notify.ready(f"watching {len(self.order)} nodes" if not self.start_nodes else "running")
            while not self._stop:
                events = dict(poller.poll(100))
                if beats in events:
                    self._read_beats(beats)
                if control in events:
                    self._answer(control)
                self._watch()
                now = time.monotonic()
                if self.phase == "starting" and all(c.state != "starting" for c in self.children.values()):
                    self.phase = "up"
                self.view = self._machine.update(self.phase, self.children, self._belt[1])
                if now >= next_alive:   # systemd's watchdog and `systemctl status`
                    notify.alive(f"machine {self.view['state']}, recipe change {self.book.current.n}")
                    next_alive = now + min(self.settings.supervisor.heartbeat_s,
                                           notify.watchdog_every_s or math.inf)
                if now >= next_publish:
                    with self._recipe_lock:
                        self._publisher.send(self.book.dump())
                    next_publish = now + REPUBLISH_S
                if deadline is not None and now >= deadline:
                    break
                if self.start_nodes and all(c.state in ("finished", "failed") for c in self.children.values()):
                    break
                if now >= next_status and self.start_nodes:   # under systemd: `sortline status`, the journal
                    self.print_status()
                    next_status = now + self.settings.supervisor.status_every_s
        finally:
            notify.stopping()
            self.phase = "stopping"
            self.view = self._machine.update(self.phase, self.children, self._belt[1])
            if self.start_nodes:
                self._stop_spare()
                self._stop_all(beats)
            if self._plc is not None:
                self._plc.stop()
            self.print_status(final=True)
            if self.report:
                self.write_report(self.report)
            beats.close()
            control.close()
            self._publisher.close()
            ctx.term()
            if self.start_nodes:   # a watcher's nodes run on: their sockets, segments and recipes stay
                self._clean_run_dir()
        return self.exit_code

    def _start_all(self, beats: zmq.Socket) -> None:
        """Every node that only sends what it receives at once, then, once they are all set up, the
        sources: so that a live source never sends into the void."""
        sources = set(source_nodes(self.settings))
        for group in ([n for n in self.order if n not in sources], [n for n in self.order if n in sources]):
            for name in group:
                self._start(self.children[name])
            self._await_ready([self.children[name] for name in group], beats)
            self._watch()
            if self._stop:  # a configuration fault: do not start the rest
                break

    def _take_up_history(self, beats: zmq.Socket) -> None:
        """A watcher that starts while the nodes run (it was restarted) continues the run's recipe history,
        which they hold, rather than start a second one they would take for old news (a change numbered 1
        again would be ignored). The nodes are running if one beats within two beat periods; a history in
        the runtime directory with no node running is an earlier run's, and the configured recipe starts
        this one."""
        history = read_history(self.run_dir)
        deadline = time.monotonic() + 2 * self.settings.supervisor.heartbeat_s + 0.2
        while time.monotonic() < deadline and not any(c.last_beat for c in self.children.values()):
            if beats.poll(50):
                self._read_beats(beats)
        if not any(c.last_beat for c in self.children.values()) or not history:
            return
        try:
            for entry in history[1:]:
                self.book.add(entry)
        except ValueError as exc:
            log.error("the run's recipe history in %s is not one: %s; starting from the configured recipe",
                      self.run_dir, exc)
            self.book = RecipeBook(self.settings.recipe)
            return
        if self.book.current.n:
            r = self.book.current.recipe
            log.info("the nodes are running: taking up their recipe history (change %d: targets %s, priority "
                     "%s, from belt position %d on)", self.book.current.n, ", ".join(r.targets), r.priority,
                     self.book.current.at_tick)

    def _start(self, child: Child) -> None:
        port = metrics.port_of(self.settings, child.name) if self.settings.metrics.port_base else None
        child.proc = self._take_spare(child.name, port)
        if child.proc is None:
            cmd = [sys.executable, "-m", "sortline", "node", child.name, "--config", self.config_path,
                   "--heartbeat", self.heartbeat_addr]
            if port is not None:
                cmd += ["--metrics-port", str(port)]
            child.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL)
        child.state, child.started, child.last_beat = "running", time.monotonic(), 0.0

    # The spare: one process started ahead (`sortline node --standby`), that becomes the next node to restart.

    def _keep_spare(self, now: float) -> None:
        """A spare once every running node has beaten (its start-up then competes with nobody's)."""
        spare = self._spare
        if spare is not None:
            rc = spare.poll()
            if rc is None:
                return
            log.warning("the spare node process exited (code %s); the next restart starts a process", rc)
            self._spare, self._spare_at = None, now + SPARE_RETRY_S
        if (not self.settings.supervisor.spare or self._stop or now < self._spare_at
                or any(c.state == "running" and not c.last_beat for c in self.children.values())):
            return
        self._spare = subprocess.Popen(
            [sys.executable, "-m", "sortline", "node", "--standby", "--config", self.config_path,
             "--heartbeat", self.heartbeat_addr], stdin=subprocess.PIPE)

    def _take_spare(self, name: str, port: int | None) -> subprocess.Popen | None:
        spare, self._spare = self._spare, None
        if spare is None or spare.poll() is not None:
            return None
        try:
            spare.stdin.write(f"{name} {'' if port is None else port}\n".encode())
            spare.stdin.close()
        except OSError:   # it died just now
            spare.kill()
            spare.wait()
            return None
        return spare

    def _stop_spare(self) -> None:
        spare, self._spare = self._spare, None
        if spare is None:
            return
        try:
            spare.stdin.close()   # end of its input: it exits, having become nothing
            spare.wait(STOP_WAIT_S)
        except (OSError, subprocess.TimeoutExpired):
            spare.kill()
            spare.wait()

    def _await_ready(self, children: list[Child], beats: zmq.Socket) -> None:
        """Wait for the nodes' first heartbeats (each sent once its setup is done); a node that
        exits meanwhile is _watch()'s business."""
        # Setup is not liveness: loading a model on a busy host takes longer than a heartbeat timeout.
        deadline = time.monotonic() + self.settings.supervisor.start_timeout_s
        while not self._stop and time.monotonic() < deadline:
            if all(c.last_beat or c.proc.poll() is not None for c in children):
                return
            if beats.poll(50):
                self._read_beats(beats)

    def _read_beats(self, sock: zmq.Socket) -> None:
        while True:
            try:
                raw = sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                beat = msgspec.msgpack.decode(raw)
                child = self.children[beat["node"]]
            except (msgspec.DecodeError, KeyError, TypeError):
                continue
            if self.start_nodes:
                if child.proc is None or beat.get("pid") != child.proc.pid:
                    continue   # an earlier process's last words, or a node started by hand
            elif not self._from_watched(child, beat):
                continue
            child.prev_beat, child.beat = child.beat, {**beat, "mono": time.monotonic()}
            child.last_beat = time.monotonic()
            self._follow_belt(beat.get("position"))

    def _from_watched(self, child: Child, beat: dict) -> bool:
        """A watcher's view of a beat: False for a stale one; a new pid is the node restarted (by systemd)."""
        sent = beat.get("t")
        if not isinstance(sent, (int, float)) or time.time() - sent > self.settings.supervisor.heartbeat_timeout_s:
            return False   # queued while nobody listened
        pid = child.beat.get("pid")
        if pid is not None and beat.get("pid") != pid:
            child.restarts += 1
            child.last_error = f"restarted (pid {pid}, now {beat.get('pid')})"
            log.warning("%s restarted (pid %s, now %s)", child.name, pid, beat.get("pid"))
            child.retire()
            child.state = "running"
        elif child.state == "starting":
            child.state = "running"
        return True

    def _follow_belt(self, position) -> None:
        """Where the belt is (the newest position any node has handled) and how fast it goes."""
        if not isinstance(position, int):
            return
        t, known, rate = self._belt
        now = time.monotonic()
        if position > known:
            if known and now - t > 0.2:
                rate = (position - known) / (now - t)
            if not known or now - t > 0.2:
                self._belt = (now, position, rate)

    # Recipes at run time (pipeline.recipes).

    def classes(self) -> list[str] | None:
        """The classes every node that judges by class knows (None: none has said yet)."""
        known = [c.beat["classes"] for c in self.children.values()
                 if c.state == "running" and isinstance(c.beat.get("classes"), list)]
        if not known:
            return None
        return [name for name in known[0] if all(name in k for k in known[1:])]

    def change_recipe(self, targets: list[str] | None, priority: str | None, source: str) -> dict | None:
        """Check a change, give it its belt position, write it to the audit log and publish it: the audit
        record (None: the recipe is that already), or RecipeError saying why not. Called from this thread and
        the OPC UA server's."""
        with self._recipe_lock:
            old = self.book.current
            recipe = make_recipe(targets, priority, old.recipe, self.classes())
            if recipe == old.recipe:   # a PLC that writes its recipe again after a restart: nothing to do
                return None
            entry = Entry(old.n + 1, self._effective_tick(), recipe)
            try:
                record = audit(self.settings.graph.name, source, old, entry, self._belt[1])
            except OSError as exc:   # a change nobody could trace is not made
                raise RecipeError(f"the audit log {exc.filename}: {exc.strerror}; the recipe stays as it is") from None
            self.book.add(entry)
            write_history(self.run_dir, self.book)   # before it is published: a node starting now reads it
            self._publisher.send(self.book.dump())
        log.info("recipe change %d from %s: targets %s, priority %s, from belt position %d on (the belt is at %d)",
                 entry.n, source, ", ".join(recipe.targets), recipe.priority, entry.at_tick, self._belt[1])
        return record

    def _effective_tick(self) -> int:
        """A belt position no node has data for yet, nor will have before the change reaches it: where the
        belt is by the newest heartbeat, plus what it may travel in a heartbeat period (how old that news
        may be) and a margin for the change's way to the nodes, at the faster of the nominal and the
        measured speed."""
        s = self.settings
        nominal = s.belt.speed_m_s * 1000.0 * s.belt.ticks_per_mm
        t, position, measured = self._belt
        ahead_s = (time.monotonic() - t) + s.supervisor.heartbeat_s + RECIPE_MARGIN_S
        tick = position + math.ceil(max(nominal, measured) * ahead_s)
        return max(tick, self.book.current.at_tick + 1)

    def _answer(self, control: zmq.Socket) -> None:
        """One request of `sortline recipe` (show, set): a JSON object in, one out."""
        try:
            request = json.loads(control.recv(zmq.NOBLOCK))
        except zmq.Again:
            return
        except ValueError:
            control.send_json({"ok": False, "error": "not a JSON request"})
            return
        current = self.book.current
        if not isinstance(request, dict) or request.get("op") not in ("show", "set"):
            reply = {"ok": False, "error": "expected {\"op\": \"show\"} or {\"op\": \"set\", ...}"}
        elif request["op"] == "show":
            reply = {"ok": True, "recipe": current.recipe.model_dump(), "change": current.n,
                     "at_tick": current.at_tick, "position": self._belt[1], "classes": self.classes()}
        else:
            try:
                source = str(request.get("source") or "cli")[:200]
                reply = {"ok": True, "record": self.change_recipe(request.get("targets"), request.get("priority"),
                                                                  source)}
            except RecipeError as exc:
                reply = {"ok": False, "error": str(exc)}
        control.send_json(reply)

    def _start_plc(self) -> None:
        if not self.settings.opcua.enabled:
            return
        try:
            from sortline.pipeline.opcua import PlcServer   # asyncua, the plc extra: only where it is asked for
        except ImportError as exc:
            raise ConfigError([f"opcua.enabled: the OPC UA server needs asyncua ({exc}): pip install "
                               "'sortline[plc]', or set opcua.enabled = false"]) from None

        self.view = self._machine.update(self.phase, self.children, 0)
        self._plc = PlcServer(self)
        self._plc.start()

    def _watch(self) -> None:
        cfg = self.settings.supervisor
        now = time.monotonic()
        if not self.start_nodes:
            self._watch_beats(now)
            return
        if self.phase == "up":
            self._keep_spare(now)
        for child in self.children.values():
            if child.state == "waiting" and now >= child.restart_at:
                log.info("restarting %s (restart %d)", child.name, child.restarts)
                self._start(child)
                continue
            if child.state != "running":
                continue
            rc = child.proc.poll()
            if rc is None:
                if child.last_beat and now - child.last_beat > cfg.heartbeat_timeout_s:
                    log.error("%s sent no heartbeat for %.1f s: killing it", child.name, now - child.last_beat)
                    child.last_error = f"no heartbeat for {now - child.last_beat:.1f} s: killed"
                    child.proc.kill()
                    child.proc.wait()
                    rc = -signal.SIGKILL
                else:
                    continue
            if rc == 0:
                child.state = "finished"
                log.info("%s finished", child.name)
            elif rc == EX_CONFIG:
                child.state = "failed"
                child.last_error = "configuration error (exit 78)"
                log.error("%s cannot start: configuration error (see above); not restarting it", child.name)
                self.exit_code = EX_CONFIG
                self._stop = True
            else:
                how = f"signal {-rc}" if rc < 0 else f"exit code {rc}"
                child.restarts += 1
                if now - child.started > STABLE_S:
                    child.backoff = 0.0
                child.backoff = min(max(child.backoff * 2, cfg.restart_backoff_s), cfg.restart_backoff_max_s)
                child.state, child.restart_at = "waiting", now + child.backoff
                child.last_error = f"died ({how})"
                log.error("%s died (%s); restart %d in %.1f s", child.name, how, child.restarts, child.backoff)
                self._remove_segments(child.name, child.proc.pid)
                child.retire()

    def _watch_beats(self, now: float) -> None:
        """Nodes systemd runs: finished by the mark a finished node leaves (a process started again removes
        it first); a node that has not beaten within the heartbeat timeout of the watcher's start is counted
        as running and down (a fault)."""
        for child in self.children.values():
            if child.state != "finished" and finished_mark(self.run_dir, child.name).exists():
                child.state = "finished"
            elif child.state == "starting" and now - self.since > self.settings.supervisor.heartbeat_timeout_s:
                child.state = "running"
                child.last_error = "no heartbeat since the watcher started"

    def _remove_segments(self, name: str, pid: int) -> None:
        # A dead producer's slot segments: consumers that mapped them keep their mapping.
        for path in self.run_dir.glob(f"{name}.*.{pid}.*.slots"):
            path.unlink(missing_ok=True)

    def _stop_all(self, beats: zmq.Socket) -> None:
        """SIGTERM in data-flow order: each node drains what its producer left."""
        for name in self.order:
            child = self.children[name]
            if child.state == "waiting":
                child.state = "stopped"
            if child.state != "running" or child.proc.poll() is not None:
                continue
            child.proc.send_signal(signal.SIGTERM)
            try:
                child.proc.wait(STOP_WAIT_S)
            except subprocess.TimeoutExpired:
                log.error("%s did not stop within %.0f s: killing it", name, STOP_WAIT_S)
                child.proc.kill()
                child.proc.wait()
            child.state = "stopped"
            self._read_beats(beats)
        self._read_beats(beats)

    def _clean_run_dir(self) -> None:
        for pattern in ("*.slots", "*.sock", "*.finished", "recipes.json"):
            for path in self.run_dir.glob(pattern):
                path.unlink(missing_ok=True)

    # Status table.

    def print_status(self, final: bool = False) -> None:
        """Per node: messages per second in and out (totals when final), drops,
        malformed messages, restarts, and the node's own figures."""
        rows = []
        for name in self.order:
            c = self.children[name]
            m, prev = (c.totals() if final else c.beat.get("metrics", {})), c.prev_beat.get("metrics", {})
            if final:
                count_in = metrics.total(m, "sortline_messages_total", 'direction="in"')
                count_out = metrics.total(m, "sortline_messages_total", 'direction="out"')
            else:
                dt = c.beat.get("mono", 0) - c.prev_beat.get("mono", 0)
                count_in = metrics.rate(m, prev, dt, 'direction="in"')
                count_out = metrics.rate(m, prev, dt, 'direction="out"')
            drops = metrics.total(m, "sortline_edge_drops_total")
            bad = metrics.total(m, "sortline_malformed_messages_total")
            extra = " ".join(f"{k}={v}" for k, v in c.beat.get("status", {}).items())
            rows.append(f"  {name:<12} {c.state:<9} {count_in:>8.{0 if final else 1}f} "
                        f"{count_out:>8.{0 if final else 1}f} {drops:>7.0f} {bad:>9.0f} {c.restarts:>8d}  {extra}")
        columns = "in, out (messages)" if final else "in/s, out/s"
        print(f"sortline {'final' if final else 'status'}: node, state, {columns}, drops, malformed, restarts, details",
              file=self.out)
        print("\n".join(rows), file=self.out, flush=True)

    def write_report(self, path: str) -> None:
        """Each node's kind, final state, restarts, metrics (of its last process), totals (its counters over
        every process it had) and status, as JSON."""
        report = {name: {"kind": self.settings.nodes[replica_of(name)[0]].kind, "state": c.state, "restarts": c.restarts,
                         "metrics": c.beat.get("metrics", {}), "totals": c.totals(), "status": c.beat.get("status", {})}
                  for name, c in self.children.items()}
        tmp = f"{path}.tmp"
        with open(tmp, "w") as fh:
            json.dump({"exit_code": self.exit_code, "nodes": report}, fh, indent=2)
        os.replace(tmp, path)

