"""The node: what every stage of the pipeline is, and the loop that runs it.

A node kind declares its input and output ports with the payload each
carries (pipeline.ports), a `Params` model, and one compute step:
`process(port, msg)` for a node with inputs, `step()` for a source. It
returns the messages to send as (port, message) pairs. A node is given its
own parameters and the machine (the config's `Machine` half: belt, cameras,
valve bar, model, ...), never the graph. Everything else is done here, the
same way for every node: sockets, decoding and counting malformed input,
checking each message against its port's payload, the trace entry, metrics,
heartbeats, end of stream, recipes changed at run time (pipeline.recipes:
the runner hands each change to the node's `on_recipe`, and the node judges
each object by `recipe_at` its first belt position), and SIGTERM/SIGINT
(stop taking data, finish what is queued for up to DRAIN_S, exit cleanly).

Input arrays are views into the producer's memory and are valid only until
the step returns: a node copies what it keeps.
"""

from __future__ import annotations

import faulthandler
import logging
import os
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping

import msgspec
import zmq

from sortline.pipeline import clock, metrics, registry
from sortline.pipeline.config import EX_CONFIG, ConfigError, Machine, Recipe, Section, Settings, config_toml
from sortline.pipeline.graph import (cpus_of, finished_mark, heartbeat_address, inputs_of, node_params, outputs_of,
                                     prepare_runtime_dir, replica_of)
from sortline.pipeline.messages import Message, MessageError
from sortline.pipeline.notify import Notifier, status_line
from sortline.pipeline.ports import Payload
from sortline.pipeline.recipes import RecipeBook, read_history
from sortline.pipeline.security import Curve
from sortline.pipeline.slots import remove_dead_segments
from sortline.pipeline.transport import Input, Output, SlotReaders

DRAIN_S = 0.8  # after SIGTERM: time to finish queued input, within the 1 s a stop may take
QUIET_S = 0.1  # ... or less, once no more input arrives
POLL_MS = 100
CONNECT_WAIT_S = 2.0  # a source waits this long for its consumers to connect
FINISH_WAIT_S = 60.0  # a finished node waits this long for its consumers to read everything
LOG_EVERY_S = 10.0
RECIPE_CHECK_S = 0.1   # recipe changes are looked for this often (the supervisor's lead is 0.5 s more than it needs)
EX_SOFTWARE = 70  # sysexits.h: a worker thread of the node failed; the supervisor (or systemd) restarts it

Outputs = Iterable[tuple[str, Message]] | None


class NoParams(Section):
    pass


@dataclass(frozen=True)
class Context:
    """What a node may know of the run beyond its machine: for the few that report on the run itself."""

    graph: str = "sortline"
    config_toml: str = ""   # the configuration the graph runs from (what a recording attaches)
    # tcp edges upstream of this node whose hosts' clocks are not known to agree (no PTP): latency
    # measured across them would be meaningless (pipeline.clock).
    unsynchronised_edges: tuple[str, ...] = ()
    # A node with replicas = N runs as N processes: this one is replica `replica` (0 .. N-1). A node that opens a
    # device of its own (a GPU) opens the one of its replica: the machine's device index + replica.
    replica: int = 0
    replicas: int = 1


class Node:
    inputs: Mapping[str, Payload] = {}
    outputs: Mapping[str, Payload] = {}
    Params: type[Section] = NoParams
    # A node with deadlines of milliseconds (the one that fires valves): run at a real-time priority, as its
    # systemd unit's drop-in does (systemd/ejector/realtime.conf), also when a supervisor starts it.
    realtime: bool = False

    def __init__(self, name: str, params: Section, machine: Machine, context: Context = Context()):
        self.name = name
        self.params = params
        self.machine = machine
        self.context = context
        self.replica = context.replica   # which of the node's replicas this process is (0 without replicas)
        self.out: dict[str, Output] = {}
        self.bound: dict[str, dict[str, int]] = {}   # per input port: dimensions its payload must have
        self.log = logging.getLogger(f"sortline.{name}")
        self.finished = False
        self.failure = ""   # why a worker thread died: the node is unhealthy and stops
        self.recipes = RecipeBook(machine.recipe)   # the run's recipes by belt position (the runner adds changes)
        self._runner: Runner | None = None

    # What a node implements.

    def setup(self) -> None:
        """Open devices, load models. Raise ConfigError for what a restart will not fix."""

    def process(self, port: str, msg: Message) -> Outputs:
        """One message, already checked against the port's payload (msg.meta is typed).
        Raise ConfigError when what arrives shows the configuration cannot work (the node stops, 78)."""
        raise NotImplementedError

    def step(self) -> Outputs:
        """A source's compute step: called in a loop; paces itself (see sleep_until)."""
        raise NotImplementedError

    def holds(self, port: str) -> bool:
        """True: read no more from this input for now, it is far ahead of another the node waits for.
        Only lossless edges are held back (their senders wait); what arrives on others is taken."""
        return False

    def end_of_stream(self) -> Outputs:
        """Every input has ended: the last outputs (a flush), then the node finishes."""
        return None

    def teardown(self) -> None:
        """Close what setup opened. Runs on every exit path."""

    def status(self) -> dict:
        """A few figures for the heartbeat (and the supervisor's status line)."""
        return {}

    def recipe_classes(self) -> list[str] | None:
        """The class names this node judges by (its model's, its masks', its belt's); None: it judges none, or
        does not know them yet. The supervisor refuses a recipe that names a class one of them lacks."""
        return None

    def on_recipe(self, recipe: Recipe, at_tick: int) -> None:
        """A recipe change, in force from belt position `at_tick` (encoder ticks) on, which is ahead of any data
        the node has: get ready for it (counters, say). Objects are judged by recipe_at(their first position)."""

    def recipe_at(self, tick: int) -> Recipe:
        """The recipe in force at belt position `tick`: the configured one until a change takes effect."""
        return self.recipes.at(tick).recipe

    # What a node may call.

    def start_thread(self, target, name: str) -> threading.Thread:
        """A worker thread that never dies quietly: an exception in it is logged and counted
        (sortline_thread_errors_total) and makes the node unhealthy: its main loop stops and the
        process exits 70, so the supervisor or systemd restarts it."""
        def guarded() -> None:
            try:
                target()
            except BaseException as exc:
                metrics.THREAD_ERRORS.labels(self.name, name).inc()
                self.log.error("thread %s failed: %r; stopping the node (it is restarted)", name, exc, exc_info=True)
                self.failure = f"thread {name}: {exc!r}"

        thread = threading.Thread(target=guarded, name=name, daemon=True)
        thread.start()
        return thread

    def expect(self, port: str, **dims: int) -> None:
        """Sizes the messages on an input port must have (named dimensions of its payload)."""
        unknown = set(dims) - self.inputs[port].dims()
        if unknown:
            raise ValueError(f"{self.inputs[port].name} has no dimension {', '.join(sorted(unknown))}")
        self.bound[port] = dict(dims)

    @property
    def stopping(self) -> bool:
        return self._runner is not None and self._runner.stop_requested

    def finish(self) -> None:
        """A source has no more data: end-of-stream goes downstream, the node exits 0."""
        self.finished = True

    def keep_alive(self) -> None:
        """Heartbeat from inside a long wait in step/process (a node held back is not stuck)."""
        if self._runner is not None:
            self._runner._heartbeat()

    def sleep_until(self, t_ns: int) -> bool:
        """Wait for a monotonic time; False if the node was asked to stop first."""
        while True:
            if self.stopping:
                return False
            left = t_ns - time.monotonic_ns()
            if left <= 0:
                return True
            time.sleep(min(left / 1e9, 0.05))


def build(settings: Settings, name: str) -> Node:
    """The configured node `name` (or replica, infer#1), constructed (not set up), with what the run tells it."""
    node, replica = replica_of(name)
    cls = registry.node_class(settings.nodes[node].kind)
    unsynced = () if settings.clock.ptp_synchronised else tuple(clock.tcp_edges_upstream(settings, name))
    context = Context(settings.graph.name, config_toml(settings), unsynced, replica, settings.nodes[node].replicas)
    return cls(name, node_params(settings, name), settings.machine(), context)


class RateLimitedLog:
    """First occurrence of each kind at once, then a count every LOG_EVERY_S."""

    def __init__(self, log: logging.Logger):
        self._log = log
        self._last: dict[str, float] = {}
        self._pending: dict[str, int] = {}

    def __call__(self, kind: str, text: str) -> None:
        now = time.monotonic()
        last = self._last.get(kind)
        if last is None or now - last >= LOG_EVERY_S:
            more = self._pending.pop(kind, 0)
            suffix = f" ({more} more since the last report)" if more else ""
            self._log.warning("%s%s", text, suffix)
            self._last[kind] = now
        else:
            self._pending[kind] = self._pending.get(kind, 0) + 1


class _Unhealthy(Exception):
    """A worker thread of the node died (Node.start_thread): the process stops, to be restarted."""


class Runner:
    """Runs one node in this process until it finishes or is told to stop."""

    def __init__(self, settings: Settings, name: str, heartbeat: str | None = None, metrics_port: int = 0):
        self.settings = settings
        self.name = name
        self.stop_requested = False
        self._deadline: float | None = None
        self._heartbeat_addr = heartbeat
        self._metrics_port = metrics_port
        self.node: Node = build(settings, name)
        self.node._runner = self
        self.log = self.node.log
        self._warn = RateLimitedLog(self.log)
        self._hb = None
        self._notify = Notifier()
        # A beat (heartbeat and watchdog ping) at least this often: what the supervisor and systemd expect.
        self._beat_every = min(settings.supervisor.heartbeat_s, self._notify.watchdog_every_s or float("inf"))
        self._last_beat: tuple[float, dict] = (time.monotonic(), {})
        self._ready = False  # setup() has succeeded
        self._inputs: dict[str, Input] = {}
        self._recipes: zmq.Socket | None = None   # the supervisor's recipe changes (pipeline.recipes)
        self._position = 0   # the newest belt position (ticks) this node has handled: where the belt is
        self._recipes_next = 0.0

    def _on_signal(self, signum, frame) -> None:
        if self.stop_requested:
            self._deadline = time.monotonic()  # second signal: stop now
        else:
            self.stop_requested = True
            self._deadline = time.monotonic() + DRAIN_S

    def _past_deadline(self) -> bool:
        return self._deadline is not None and time.monotonic() >= self._deadline

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        faulthandler.register(signal.SIGUSR1)  # `kill -USR1 PID` prints where a node is stuck
        run_dir = self._run_dir = prepare_runtime_dir(self.settings.runtime_dir())
        finished_mark(run_dir, self.name).unlink(missing_ok=True)   # an earlier process's: this one has not
        for name in remove_dead_segments(run_dir, self.name):
            self.log.info("removed %s, left by an earlier process of this node", name)
        ctx = zmq.Context()
        readers = SlotReaders(run_dir)
        node = self.node
        hb = curve = None
        try:
            curve = Curve(ctx, self.settings, self.name)
            for port, edges in inputs_of(self.settings, self.name).items():
                self._inputs[port] = Input(ctx, self.name, port, edges, readers, curve, node.inputs[port], self._warn)
            outs = outputs_of(self.settings, self.name)
            for port in node.outputs:
                node.out[port] = Output(ctx, self.name, port, outs.get(port, []), run_dir, self._past_deadline,
                                        idle=self._heartbeat, curve=curve)
            # To the supervisor's address, or where one would listen: under systemd the control process
            # (`sortline control`) reads the beats there; with nobody there they are dropped unsent.
            hb = ctx.socket(zmq.PUSH)
            hb.setsockopt(zmq.SNDHWM, 16)
            hb.setsockopt(zmq.LINGER, 200)  # lets the last heartbeat (final counts) out
            hb.connect(self._heartbeat_addr or heartbeat_address(run_dir))
            if self._metrics_port:
                metrics.serve(self.settings.metrics.bind, self._metrics_port)
            self._hb, self._hb_next = hb, 0.0
            self._stage = metrics.STAGE_SECONDS.labels(self.name)
            # Subscribed before the history is read: a change published in between comes by the socket.
            self._recipes = ctx.socket(zmq.SUB)
            self._recipes.setsockopt(zmq.LINGER, 0)
            self._recipes.setsockopt(zmq.SUBSCRIBE, b"")
            self._recipes.connect(f"ipc://{run_dir}/recipes.sock")
            node.setup()
            self._take_recipes(read_history(run_dir))
            self._ready = True
            metrics.UP.labels(self.name).set(1)
            self._notify.ready(f"running (pid {os.getpid()})")  # systemd starts the units ordered after it
            self._heartbeat(force=True)  # the supervisor reads the first one as "ready"
            self.log.info("running (pid %d)", os.getpid())
            if self._inputs:
                self._run_consumer()
            else:
                self._run_source()
            if node.finished:
                finished_mark(run_dir, self.name).write_text(f"{os.getpid()}\n")   # before any end of stream
            for port, out in node.out.items():
                if not node.finished:
                    out.settle()
                    continue
                for edge in out.finish(self.name, 0, FINISH_WAIT_S):
                    self.log.error("%s: the consumer did not read to the end of stream within %.0f s; "
                                   "what it had not read is lost", edge, FINISH_WAIT_S)
            return 0
        except ConfigError as exc:
            for line in exc.lines:
                self.log.error("%s", line)
            return EX_CONFIG
        except _Unhealthy:
            return EX_SOFTWARE
        finally:
            self._notify.stopping()
            metrics.UP.labels(self.name).set(0)
            self._heartbeat(force=True)
            try:
                node.teardown()
            finally:
                for inp in self._inputs.values():
                    inp.close()
                for out in node.out.values():
                    out.close()
                readers.close()
                if hb is not None:
                    hb.close()
                if self._recipes is not None:
                    self._recipes.close()
                if curve is not None:
                    curve.close()  # its thread holds a socket: before ctx.term()
                ctx.term()
                self.log.info("stopped")

    def _run_source(self) -> None:
        node = self.node
        for port, out in node.out.items():
            if not out.wait_for_consumers(CONNECT_WAIT_S):
                self.log.warning("output %r: no consumer connected after %.0f s; sending anyway", port, CONNECT_WAIT_S)
        while not self.stop_requested and not node.finished:
            self._check_recipes()
            t_step = time.monotonic_ns()
            self._send(node.step(), t_step)
            self._heartbeat()
            self._check_health()

    def _run_consumer(self) -> None:
        self._poller = zmq.Poller()
        self._port_of: dict[zmq.Socket, str] = {}
        for port, inp in self._inputs.items():
            for sock in inp.sockets:
                self._poller.register(sock, zmq.POLLIN)
                self._port_of[sock] = port
        quiet_since = None
        while not self.node.finished:
            self._hold_back()
            events = self._poller.poll(self._poll_ms())
            for sock, _ in events:
                self._handle(sock)
            self._check_recipes()
            self._expire_merges()
            self._heartbeat()
            self._check_health()
            if not any(inp.sockets for inp in self._inputs.values()):
                self._flush_merges()
                self._send(self.node.end_of_stream(), time.monotonic_ns())
                self.node.finish()
            if self.stop_requested:
                now = time.monotonic()
                if events or quiet_since is None:
                    quiet_since = now
                if self._past_deadline() or now - quiet_since >= QUIET_S:
                    self._flush_merges()   # what the replicas sent is queued input too
                    return

    # The merges of replicated edges (pipeline.reorder): what they hold goes on in order, by a deadline.

    def _poll_ms(self) -> float:
        wait = POLL_MS if not self.stop_requested else QUIET_S * 1000 / 2
        due = [d for inp in self._inputs.values() for m in inp.merges.values() if (d := m.due_ns()) is not None]
        if due:
            wait = min(wait, max(0.0, (min(due) - time.monotonic_ns()) / 1e6))
        return wait

    def _hold_back(self) -> None:
        """Lossless edges: stop reading those the node holds (Node.holds) and the replicas whose messages
        would only fill a full merge window (their senders wait meanwhile), read them again once there is
        room. A bounded or latest edge is always read: its sender cannot wait."""
        for port, inp in self._inputs.items():
            held = self.node.holds(port)
            for sock, edge in inp.sockets.items():
                if edge.policy != "lossless":
                    continue
                merge = inp.merges.get(edge.group)   # on a lossless edge, a lossless merge
                blocked = held or (merge is not None and merge.blocked(edge.replica))
                self._poller.register(sock, 0 if blocked else zmq.POLLIN)

    def _expire_merges(self) -> None:
        now = time.monotonic_ns()
        for port, inp in self._inputs.items():
            for merge in inp.merges.values():
                for msg, t_in in merge.expire(now):
                    self._process(port, merge.name, msg, t_in)

    def _flush_merges(self) -> None:
        for port, inp in self._inputs.items():
            for merge in inp.merges.values():
                for msg, t_in in merge.flush():
                    self._process(port, merge.name, msg, t_in)

    def _eos_confirmed(self, edge) -> bool:
        """An end of stream ends an input for good, so only its producer may end it: on this host it leaves
        a mark in the private runtime directory before it sends one (finished_mark); across hosts, an
        authenticated (CURVE) tcp edge's producer is who it says. Any other is refused, counted, logged."""
        ok = finished_mark(self._run_dir, edge.src).exists() or clock.is_tcp(edge) and self.settings.security.curve
        if not ok:
            why = (f"{edge.src} has not finished" if not clock.is_tcp(edge) else
                   f"{edge.src} has not finished here, and an unauthenticated tcp edge (no security.curve) cannot say")
            metrics.MALFORMED.labels(self.name, "eos").inc()
            self._warn("eos", f"refused an end of stream on {edge.name}: {why}")
        return ok

    def _check_recipes(self) -> None:
        """Not on every message (a poll costs some 10 us): every RECIPE_CHECK_S, well within the lead a change
        is given (pipeline.supervisor)."""
        now = time.monotonic()
        if now < self._recipes_next:
            return
        self._recipes_next = now + RECIPE_CHECK_S
        self._read_recipes()

    def _read_recipes(self) -> None:
        while True:
            try:
                raw = self._recipes.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                entries = RecipeBook.load(raw)
            except (ValueError, KeyError, TypeError) as exc:
                self._warn("recipe", f"ignored a recipe message that is not a recipe history: {exc!r}")
                continue
            self._take_recipes(entries)

    def _take_recipes(self, entries) -> None:
        """The supervisor's history (each change comes again every second): the changes not seen yet."""
        for entry in entries:
            try:
                if not self.node.recipes.add(entry):
                    continue
            except ValueError as exc:
                self._warn("recipe", f"ignored a recipe change: {exc}")
                continue
            r = entry.recipe
            self.log.info("recipe change %d: targets %s, priority %s, from belt position %d on", entry.n,
                          ", ".join(r.targets), r.priority, entry.at_tick)
            self.node.on_recipe(r, entry.at_tick)

    def _check_health(self) -> None:
        if self.node.failure:
            raise _Unhealthy(self.node.failure)

    def _handle(self, sock: zmq.Socket) -> None:
        port = self._port_of[sock]
        inp = self._inputs[port]
        edge = inp.sockets[sock]
        for frames in inp.read(sock):
            t_in = time.monotonic_ns()
            try:
                msg = inp.decode(frames, edge)
            except MessageError as exc:
                if exc.kind == "overwritten":
                    metrics.DROPS.labels(edge.name, "overwritten").inc()
                else:
                    metrics.MALFORMED.labels(self.name, exc.kind).inc()
                    self._warn(exc.kind, f"dropped a malformed message on {edge.name}: {exc}")
                continue
            if msg.header.eos:
                msg.release()
                if not self._eos_confirmed(edge):
                    continue
                self.log.info("end of stream on %s", edge.name)
                self._poller.unregister(sock)
                inp.end(sock)
                merge = inp.merges.get(edge.group)
                if merge is not None:
                    for held, t in merge.ended(edge.replica):
                        self._process(port, merge.name, held, t)
                return
            try:
                inp.payload.check(msg, self.node.bound.get(port, {}))
            except MessageError as exc:
                metrics.MALFORMED.labels(self.name, exc.kind).inc()
                self._warn(exc.kind, f"dropped a message on {edge.name}: {exc}")
                msg.release()
                continue
            inp.received.inc()
            if "lines" in msg.arrays:  # camera lines (sources' messages): lines per second on the dashboard
                inp.lines.inc(len(msg.arrays["lines"]))
            merge = inp.merges.get(edge.group)
            for ready, t in [(msg, t_in)] if merge is None else merge.push(msg, t_in, edge.replica):
                self._process(port, edge.name, ready, t)
            msg.release()   # a message the merge keeps, it has copied

    def _process(self, port: str, edge: str, msg: Message, t_in: int) -> None:
        """The node's step on one checked message (edge: where it came from, for the counts), and its outputs sent."""
        try:
            outs = list(self.node.process(port, msg) or ())
        except ConfigError:
            msg.release()
            raise  # what arrived shows the configuration cannot work: stop (78), do not crash-loop
        except Exception as exc:  # a bad message must not take the node down
            metrics.MALFORMED.labels(self.name, "process").inc()
            self._warn("process", f"dropped a message on {edge}: processing failed: {exc!r}")
            self.log.debug("processing failed", exc_info=True)
            for out in self.node.out.values():
                out.abandon_unsent()  # slots it took before failing
            msg.release()
            return
        self._position = max(self._position, msg.header.position)
        if not msg.intact():
            metrics.DROPS.labels(edge, "overwritten").inc()
            self._warn("overwritten", f"dropped a message on {edge}: its slot was overwritten while in use")
            for oport, omsg in outs:
                self.node.out[oport].abandon(omsg)
        else:
            self._send(outs, t_in)
        msg.release()
        self._stage.observe((time.monotonic_ns() - t_in) / 1e9)

    def _send(self, outs: Outputs, t_in: int) -> None:
        for port, msg in outs or ():
            if msg is not None:
                self._position = max(self._position, msg.header.position)
                self.node.out[port].send(msg, msg.t_in_ns or t_in, self.name)

    def _heartbeat(self, force: bool = False) -> None:
        """Called from the main loop, and from its waits on a slow consumer (a node
        held back by back-pressure is not stuck), never from a side thread: the
        supervisor's heartbeat and systemd's watchdog stop when the loop does."""
        if not self._ready:   # the heartbeat socket is there from before setup
            return
        now = time.monotonic()
        if not force and now < self._hb_next:
            return
        self._hb_next = now + self._beat_every
        snapshot, status = metrics.snapshot(), self.node.status()
        then, before = self._last_beat
        self._last_beat = (now, snapshot)
        if self._notify.enabled:
            self._notify.alive(status_line(snapshot, before, now - then, status))
        beat = {"node": self.name, "pid": os.getpid(), "t": time.time(), "metrics": snapshot, "status": status,
                "position": self._position, "recipe": self.node.recipes.current.n,
                "classes": self.node.recipe_classes()}
        try:
            self._hb.send(_encode_beat(beat), flags=zmq.NOBLOCK)
        except zmq.Again:
            pass  # no supervisor listening: heartbeats are advisory


def _plain(obj):
    if hasattr(obj, "item"):  # numpy scalars in a node's status()
        return obj.item()
    return str(obj)


_encode_beat = msgspec.msgpack.Encoder(enc_hook=_plain).encode


def _pin(name: str, cpus: list[int]) -> None:
    """Run on the configured cores; a machine without them runs the node anywhere, and says so."""
    if not cpus or not hasattr(os, "sched_setaffinity"):
        return
    usable = sorted(set(cpus) & os.sched_getaffinity(0))
    if not usable:
        logging.getLogger(f"sortline.{name}").warning("cpus %s: none of them is available here (%s); running "
                                                      "on any", cpus, sorted(os.sched_getaffinity(0)))
        return
    os.sched_setaffinity(0, usable)


REALTIME_PRIORITY = 50   # the unit's CPUSchedulingPriority: above every other node


def _realtime(name: str) -> None:
    """SCHED_FIFO for every thread of this process and those it starts (the ejector's sender and ZeroMQ's I/O
    thread above all), as the unit's drop-in gives it; a host that does not allow it (no CAP_SYS_NICE, a
    container) runs the node at normal priority, and says so. Not SCHED_RESET_ON_FORK: Linux applies it to
    new threads as well as to forked processes."""
    log = logging.getLogger(f"sortline.{name}")
    if not hasattr(os, "sched_setscheduler") or not os.path.isdir("/proc/self/task"):
        return
    if os.sched_getscheduler(0) & ~os.SCHED_RESET_ON_FORK in (os.SCHED_FIFO, os.SCHED_RR):
        return
    try:
        # Threads started before this (a spare process's, the numerical libraries' pools) too.
        for task in os.listdir("/proc/self/task"):
            os.sched_setscheduler(int(task), os.SCHED_FIFO, os.sched_param(REALTIME_PRIORITY))
    except OSError as exc:
        log.warning("real-time priority (SCHED_FIFO %d) not allowed here (%s): running at normal priority, so "
                    "valve commands may be late on a busy host", REALTIME_PRIORITY, exc.strerror)
        return
    log.info("running at real-time priority (SCHED_FIFO %d)", REALTIME_PRIORITY)


def _stop_with_parent() -> None:
    """Ask Linux to SIGTERM this process when its supervisor dies, however it dies."""
    try:
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass  # not Linux: an orphaned node still stops on its own SIGTERM


def main(settings: Settings, name: str, heartbeat: str | None, metrics_port: int | None = None) -> int:
    if heartbeat:  # started by a supervisor
        _stop_with_parent()
    _pin(name, cpus_of(settings, name))
    if metrics_port is None:
        metrics_port = metrics.port_of(settings, name)
    try:
        runner = Runner(settings, name, heartbeat, metrics_port)
    except ConfigError as exc:
        for line in exc.lines:
            logging.getLogger(f"sortline.{name}").error("%s", line)
        return EX_CONFIG
    if heartbeat and runner.node.realtime:   # under systemd the unit decides (install-service --realtime)
        _realtime(name)
    code = runner.run()
    # Done: a late SIGTERM (a second one from whoever stops us) must not kill the exit. Python puts
    # its own handlers back to the default while it shuts down, but leaves an ignored signal ignored.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    return code
