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
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import msgspec
import zmq

from sortline.pipeline import metrics
from sortline.pipeline.config import EX_CONFIG, Settings
from sortline.pipeline.graph import prepare_runtime_dir, replica_of, source_nodes, topo_order

log = logging.getLogger("sortline.supervisor")

STOP_WAIT_S = 2.0  # a node gets this long after SIGTERM before SIGKILL
COUNTED = ("_total", "_count", "_sum")  # samples that add up across a node's processes
STABLE_S = 10.0  # a node that ran this long has its backoff reset


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
                 out=None, report: str | None = None):
        self.settings = settings
        self.config_path = str(Path(config_path).resolve())
        self.seconds = seconds
        self.report = report
        self.out = out or sys.stdout
        self.order = topo_order(settings)
        self.children = {name: Child(name, i) for i, name in enumerate(self.order)}
        self._stop = False
        self.exit_code = 0

    def _on_signal(self, signum, frame) -> None:
        self._stop = True

    def run(self) -> int:
        problems = metrics.port_problems(self.settings)   # as `sortline check` does: before anything starts
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
        self.heartbeat_addr = f"ipc://{self.run_dir}/supervisor.sock"
        beats.bind(self.heartbeat_addr)
        deadline = None if self.seconds is None else time.monotonic() + self.seconds
        next_status = time.monotonic() + self.settings.supervisor.status_every_s
        try:
            # Every node that only sends what it receives at once, then, once they are all set up, the
            # sources: so that a live source never sends into the void.
            sources = set(source_nodes(self.settings))
            for group in ([n for n in self.order if n not in sources], [n for n in self.order if n in sources]):
                for name in group:
                    self._start(self.children[name])
                self._await_ready([self.children[name] for name in group], beats)
                self._watch()
                if self._stop:  # a configuration fault: do not start the rest
                    break
            while not self._stop:
                if beats.poll(100):
                    self._read_beats(beats)
                self._watch()
                now = time.monotonic()
                if deadline is not None and now >= deadline:
                    break
                if all(c.state in ("finished", "failed") for c in self.children.values()):
                    break
                if now >= next_status:
                    self.print_status()
                    next_status = now + self.settings.supervisor.status_every_s
        finally:
            self._stop_all(beats)
            self.print_status(final=True)
            if self.report:
                self.write_report(self.report)
            beats.close()
            ctx.term()
            self._clean_run_dir()
        return self.exit_code

    def _start(self, child: Child) -> None:
        cmd = [sys.executable, "-m", "sortline", "node", child.name, "--config", self.config_path,
               "--heartbeat", self.heartbeat_addr]
        if self.settings.metrics.port_base:
            cmd += ["--metrics-port", str(metrics.port_of(self.settings, child.name))]
        child.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL)
        child.state, child.started, child.last_beat = "running", time.monotonic(), 0.0

    def _await_ready(self, children: list[Child], beats: zmq.Socket) -> None:
        """Wait for the nodes' first heartbeats (each sent once its setup is done); a node that
        exits meanwhile is _watch()'s business."""
        deadline = time.monotonic() + self.settings.supervisor.heartbeat_timeout_s
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
            if child.proc is not None and beat.get("pid") == child.proc.pid:
                child.prev_beat, child.beat = child.beat, {**beat, "mono": time.monotonic()}
                child.last_beat = time.monotonic()

    def _watch(self) -> None:
        cfg = self.settings.supervisor
        now = time.monotonic()
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
                log.error("%s died (%s); restart %d in %.1f s", child.name, how, child.restarts, child.backoff)
                self._remove_segments(child.name, child.proc.pid)
                child.retire()

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
        for pattern in ("*.slots", "*.sock", "*.finished"):
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

