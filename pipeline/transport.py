"""Ports: the sending and receiving ends of edges.

An `Output` binds one socket per edge leaving a node's port; an `Input`
connects one socket per edge arriving at a port. Each edge has a policy:

- lossless: the sender waits (on the socket's high-water mark, and on the
  slot pool) until the consumer takes the message. Replay and recording.
- bounded: the sender never waits: a camera cannot be paused. The consumer
  reads every queued message in order; once `hwm` messages are queued, a new
  one is dropped at the sender. Camera streams into the register node.
- latest: the sender never waits, as with bounded, and a consumer that falls
  behind drains its queue and keeps only the newest message (displays,
  stages that only care about now).
  On both, a shared-memory slot may be reused under a slow reader, who then
  finds it overwritten. Every such loss is counted per edge.

Same-host edges carry only the header through ZeroMQ and the arrays through
a shared-memory slot pool (pipeline.slots); other edges carry the arrays as
extra frames. Node code sees the same `Message` either way.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Callable

import msgspec
import numpy as np
import zmq
from zmq.utils.monitor import recv_monitor_message

from sortline.pipeline import clock, metrics
from sortline.pipeline.graph import Edge
from sortline.pipeline.messages import (
    MAX_TRACE,
    ArraySpec,
    Header,
    Message,
    MessageError,
    SlotRef,
    TraceEntry,
    check_specs,
    decode_header,
    encode_header,
    inline_arrays,
    inline_frames,
)
from sortline.pipeline.ports import ANY, Payload
from sortline.pipeline.reorder import Reorder
from sortline.pipeline.slots import SlotPool, SlotReader, align

log = logging.getLogger("sortline.transport")

DRAIN_LIMIT = 1000  # messages a latest edge discards in one go before yielding


def _socket(ctx: zmq.Context, edge: Edge, sending: bool, curve=None) -> zmq.Socket:
    if edge.pattern == "pubsub":
        sock = ctx.socket(zmq.XPUB if sending else zmq.SUB)
        if sending:
            # A plain PUB drops silently at its high-water mark; with NODROP it
            # says so (EAGAIN), and the drop is counted. VERBOSER hands us every
            # subscribe and unsubscribe: that is how subscribers are counted.
            sock.setsockopt(zmq.XPUB_NODROP, 1)
            sock.setsockopt(zmq.XPUB_VERBOSER, 1)
        else:
            sock.setsockopt(zmq.SUBSCRIBE, b"")
    else:
        sock = ctx.socket(zmq.PUSH if sending else zmq.PULL)
    sock.setsockopt(zmq.SNDHWM if sending else zmq.RCVHWM, edge.hwm)
    # What is still queued at close: a finished producer has already waited for its
    # consumers (Output.finish), a stopped one for its slots (Output.settle).
    sock.setsockopt(zmq.LINGER, 100 if edge.policy == "lossless" else 0)
    if not sending:
        # Consumers start before their producers bind: retry the connection
        # often, so a live edge is joined within a frame or two.
        sock.setsockopt(zmq.RECONNECT_IVL, 10)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
    if curve is not None:
        curve.secure(sock, edge, sending)  # tcp edges: CURVE keys (pipeline/security.py)
    return sock


# What an output message takes over from the input it derives from (`like`), unless the node says otherwise.
INHERITED = ("stream", "seq", "position", "ticks_per_line", "device_ts_ns", "host_ts", "gap", "trace", "meta")


def derived_header(like: Message | None, fields: dict) -> Header:
    base = {} if like is None else {f: getattr(like.header, f) for f in INHERITED}
    return Header(**{**base, **fields})


class Output:
    """One output port: allocates messages and sends them on every edge."""

    def __init__(self, ctx: zmq.Context, node: str, port: str, edges: list[Edge], run_dir: Path,
                 stop: Callable[[], bool], idle: Callable[[], None] = lambda: None, curve=None):
        self.node, self.port, self.edges = node, port, edges
        self._run_dir = run_dir
        self._stop = stop
        self._idle = idle  # called while waiting on a consumer (the node's heartbeat)
        self._sockets, self._monitors = [], []
        for edge in edges:
            sock = _socket(ctx, edge, sending=True, curve=curve)
            # Consumers are counted, to know when one is there to send to and
            # when it has hung up: a PUSH socket's connections from its own
            # events, an XPUB's subscribers from their (un)subscriptions.
            if edge.pattern == "pushpull":
                self._monitors.append(sock.get_monitor_socket(zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED))
            else:
                self._monitors.append(None)
            sock.bind(edge.bind)
            self._sockets.append(sock)
        self._peers = [0] * len(edges)
        # What one message is sent on: each plain edge, and one edge of each group of edges to a replicated
        # node (fanout), taken round robin. self._turn: the group's next edge.
        self._targets: list[list[int]] = []
        groups: dict[int, list[int]] = {}
        for i, e in enumerate(edges):
            if e.fanout > 1:
                if e.group not in groups:
                    self._targets.append(groups.setdefault(e.group, []))
                groups[e.group].append(i)
            else:
                self._targets.append([i])
        self._turn = [0] * len(self._targets)
        self._shm_edges = [e for e in edges if e.shm]
        self._pool: SlotPool | None = None
        self._pools_made = 0
        self._unsent: list[Message] = []  # holding a slot, not yet sent
        self._sent = metrics.MESSAGES.labels(node, port, "out")
        self._dropped = {e.name: metrics.DROPS.labels(e.name, "queue_full") for e in edges}
        self._reclaims = metrics.SLOT_RECLAIMS.labels(node, port)

    def new(self, arrays: dict[str, tuple[tuple[int, ...], object]], *, like: Message | None = None,
            **fields) -> Message | None:
        """A message with writable arrays of the given (shape, dtype), ready to fill.

        Header fields come from `like` (the input this output derives from) and
        are overridden by `fields`. Returns None when the node is stopping
        while a lossless consumer still holds every slot, and when bounded
        consumers hold every slot (the message is dropped and counted).
        """
        header = derived_header(like, fields)
        if not self._shm_edges or not arrays:   # a header alone needs no slot
            return Message(header, {name: np.empty(shape, dtype) for name, (shape, dtype) in arrays.items()})
        specs, total = [], 0
        for name, (shape, dtype) in arrays.items():
            spec = ArraySpec(name, np.dtype(dtype).name, tuple(shape), total)
            check_specs([spec])
            specs.append(spec)
            total += align(spec.nbytes)
        pool = self._pool_for(total)
        reclaimed = pool.reclaimed_lanes
        slot = pool.acquire(total, self._waiting)
        if pool.reclaimed_lanes != reclaimed:
            self._reclaims.inc(pool.reclaimed_lanes - reclaimed)
            log.warning("%s.%s: a consumer went away holding slots; took them back", self.node, self.port)
        if slot is None:
            # Bounded consumers hold every slot, or a latest consumer is reading the only one it could
            # take: the new message is dropped, and counted on every edge that does not wait.
            if not self._stop():
                for e in self._shm_edges:
                    if e.policy in ("bounded", "latest"):
                        self._dropped[e.name].inc()
            return None
        msg = Message(header, {spec.name: pool.view(slot, spec) for spec in specs})
        msg.outgoing = (pool, slot, specs)
        self._unsent.append(msg)
        return msg

    def _waiting(self) -> bool:
        """Between two tries of a blocked send: True when it is time to give up."""
        self._idle()
        return self._stop()

    def _pool_for(self, nbytes: int) -> SlotPool:
        if self._pool is not None and nbytes <= self._pool.slot_size:
            return self._pool
        # First message, or one larger than the slots: make a new segment. The
        # old one stays until the node exits, as headers in flight may name it.
        self._pools_made += 1
        path = self._run_dir / f"{self.node}.{self.port}.{os.getpid()}.{self._pools_made}.slots"
        slots = max(e.slots for e in self._shm_edges)
        lanes = max(e.lane for e in self.edges) + 1
        lossless, bounded = [False] * lanes, [False] * lanes
        for e in self._shm_edges:
            lossless[e.lane] = e.policy == "lossless"
            bounded[e.lane] = e.policy == "bounded"
        self._pool = SlotPool(str(path), slots, max(nbytes, 4096), lossless, bounded)
        return self._pool

    def send(self, msg: Message, t_in_ns: int, stage: str) -> None:
        """Stamp the trace and send on every edge, or on one of each group to a replicated node (blocking only
        lossless ones)."""
        header = msg.header
        # The first entry (acquisition) and the latest stages: a receiver refuses a longer trace.
        kept = header.trace if len(header.trace) < MAX_TRACE else [*header.trace[:1], *header.trace[2 - MAX_TRACE:]]
        trace = [*kept, TraceEntry(stage, t_in_ns, time.monotonic_ns())]
        slot_info = msg.outgoing
        if slot_info is not None:
            pool, slot, specs = slot_info
            generation = pool.publish(slot)
            header = msgspec.structs.replace(header, trace=trace, arrays=specs)
        else:
            header = msgspec.structs.replace(header, trace=trace)
        inline = [None, None]  # frames for edges on this host, and for tcp edges (trace in wall-clock time)

        def frames(edge: Edge) -> tuple[list, bool]:
            """The frames for an edge, and whether ZeroMQ must copy them."""
            if edge.shm and slot_info is not None:
                header.slot = SlotRef(pool.segment, slot, generation, edge.lane)
                return [encode_header(header)], True
            tcp = clock.is_tcp(edge)
            if inline[tcp] is None:
                inline[tcp] = inline_frames(clock.to_wall(header) if tcp else header, msg.arrays)
            return inline[tcp], slot_info is not None   # slot memory is reused: never hand it over uncopied

        for k, target in enumerate(self._targets):
            i = self._send(k, target, frames)
            if i is not None and self.edges[i].shm and slot_info is not None:
                pool.mark_sent(self.edges[i].lane, slot, generation)
        if slot_info is not None:
            msg.outgoing = None
            self._unsent.remove(msg)
        self._sent.inc()

    def abandon(self, msg: Message) -> None:
        """Give back the slot of a message that will not be sent."""
        slot_info = msg.outgoing
        if slot_info is not None:
            slot_info[0].abandon(slot_info[1])
            msg.outgoing = None
            self._unsent.remove(msg)

    def abandon_unsent(self) -> None:
        for msg in list(self._unsent):
            self.abandon(msg)

    def _send(self, k: int, target: list[int], frames) -> int | None:
        """Send on the target's edge, or on one of a replicated node's edges: the first, round robin from its
        turn, that takes the message now (a replica that is full, or down, is passed over). On a lossless
        edge wait until one takes it. Returns the edge's index; None: dropped, and counted."""
        n = len(target)
        order = [target[(self._turn[k] + j) % n] for j in range(n)]
        while True:
            for i in order:
                data, copy = frames(self.edges[i])
                try:
                    self._sockets[i].send_multipart(data, flags=zmq.NOBLOCK, copy=copy)
                except zmq.Again:
                    continue
                self._turn[k] = (target.index(i) + 1) % n
                return i
            edge = self.edges[order[0]]
            if edge.policy != "lossless" or self._waiting():
                self._dropped[edge.name].inc()
                return None
            if n == 1:
                self._sockets[order[0]].poll(50, zmq.POLLOUT)
            else:
                zmq.select([], [self._sockets[i] for i in order], [], 0.05)

    def _count_peers(self) -> None:
        for i, (sock, mon) in enumerate(zip(self._sockets, self._monitors)):
            while True:
                try:
                    if mon is None:
                        self._peers[i] += 1 if sock.recv(zmq.NOBLOCK)[:1] == b"\x01" else -1
                    else:
                        event = recv_monitor_message(mon, zmq.NOBLOCK)["event"]
                        self._peers[i] += {zmq.EVENT_ACCEPTED: 1, zmq.EVENT_DISCONNECTED: -1}.get(event, 0)
                except zmq.Again:
                    break

    def wait_for_consumers(self, timeout_s: float) -> bool:
        """Wait until every edge has a connected consumer, so that a live
        source does not start sending into the void."""
        deadline = time.monotonic() + timeout_s
        while True:
            self._count_peers()
            if all(self._peers):
                return True
            if time.monotonic() >= deadline or self._waiting():
                return False
            time.sleep(0.01)

    def finish(self, stream: str, seq: int, wait_s: float) -> list[str]:
        """End of stream: send it on every edge, then wait until each consumer
        has read everything and hung up (a consumer closes its end of an edge
        once it reads the end of stream).

        ZeroMQ throws away what is still in flight when a sender goes away,
        so a finished producer must not leave before its consumers have read
        it all. Returns the edges whose consumer did not within wait_s.
        """
        frames = [encode_header(Header(stream=stream, seq=seq, eos=True))]
        deadline = time.monotonic() + wait_s

        def waiting() -> bool:
            return time.monotonic() < deadline and not self._waiting()

        for i, sock in enumerate(self._sockets):
            while waiting():
                self._count_peers()
                if not self._peers[i]:
                    break  # no consumer connected: nobody to tell
                try:
                    sock.send_multipart(frames, flags=zmq.NOBLOCK)
                    break
                except zmq.Again:
                    sock.poll(50, zmq.POLLOUT)
        while waiting() and any(self._peers):
            time.sleep(0.01)
            self._count_peers()
        return [e.name for e, n in zip(self.edges, self._peers) if n]

    def settle(self) -> None:
        """Before a stop: let lossless consumers take what is already sent
        (until the stop deadline), since leaving would throw it away."""
        while self._pool is not None and self._pool.in_flight() and not self._waiting():
            time.sleep(0.005)

    def close(self) -> None:
        for sock, mon in zip(self._sockets, self._monitors):
            if mon is not None:
                sock.disable_monitor()
                mon.close(0)
            sock.close()
        if self._pool is not None:
            self._pool.close()
            os.unlink(self._pool.path)  # consumers that mapped it keep their mapping


class Input:
    """One input port: a socket per arriving edge, decoded into Messages."""

    def __init__(self, ctx: zmq.Context, node: str, port: str, edges: list[Edge], readers: SlotReaders, curve=None,
                 payload: Payload = ANY, warn=None):
        self.node, self.port = node, port
        # The edges from a replicated node, one per replica, are merged back in seq order (pipeline.reorder).
        warn = warn or (lambda kind, text: log.warning("%s", text))
        self.merges = {e.group: Reorder(e.configured, e.merge, e.window, e.timeout_s, e.policy == "lossless", warn)
                       for e in edges if e.merge > 1}
        self.payload = payload  # what the port takes: every message is checked against it (pipeline.ports)
        self._readers = readers
        self.sockets: dict[zmq.Socket, Edge] = {}
        for edge in edges:
            sock = _socket(ctx, edge, sending=False, curve=curve)
            sock.connect(edge.address)
            self.sockets[sock] = edge
        self.received = metrics.MESSAGES.labels(node, port, "in")
        self.lines = metrics.LINES.labels(node, port)
        self._stale = {e.name: metrics.DROPS.labels(e.name, "stale") for e in edges}

    def read(self, sock: zmq.Socket) -> list[list]:
        """Frames of the messages to process now from this socket (empty if none).

        On a latest edge only the newest message is kept; the ones it
        overtook are released and counted.
        """
        edge = self.sockets[sock]
        try:
            frames = sock.recv_multipart(flags=zmq.NOBLOCK, copy=False)
        except zmq.Again:
            return []
        if edge.policy != "latest":
            return [frames]
        newer = []
        for _ in range(DRAIN_LIMIT):
            try:
                newer.append(sock.recv_multipart(flags=zmq.NOBLOCK, copy=False))
            except zmq.Again:
                break
        if not newer:
            return [frames]
        for stale in [frames, *newer[:-1]]:
            self._readers.discard(stale)
            self._stale[edge.name].inc()
        return [newer[-1]]

    def decode(self, frames: list, edge: Edge | None = None) -> Message:
        msg = self._readers.decode(frames)
        if edge is not None and clock.is_tcp(edge):
            try:
                clock.from_wall(msg.header)
            except MessageError:
                msg.release()
                raise
        return msg

    def end(self, sock: zmq.Socket) -> None:
        """The edge's producer has ended its stream: hang up, which tells it
        that everything it sent has been read."""
        del self.sockets[sock]
        sock.close(linger=0)

    def close(self) -> None:
        for sock in self.sockets:
            sock.close()


class SlotReaders:
    """The slot segments a node reads, opened on first use."""

    MAX_OPEN = 32

    def __init__(self, run_dir: Path | str):
        self._run_dir = Path(run_dir)
        self._open: dict[str, SlotReader] = {}

    def decode(self, frames: list) -> Message:
        if not frames:
            raise MessageError("frames", "empty message")
        header = decode_header(frames[0].buffer if hasattr(frames[0], "buffer") else frames[0])
        if header.slot is None:
            return Message(header, inline_arrays(header, frames[1:]))
        if len(frames) != 1:
            raise MessageError("frames", f"a shared-memory message has only a header, {len(frames)} frames came")
        lease, arrays = self._reader(header.slot).lease(header.slot, header.arrays)
        return Message(header, arrays, lease)

    def discard(self, frames: list) -> None:
        """Release the slot of a message that will not be processed."""
        try:
            self.decode(frames).release()
        except MessageError:
            pass  # nothing to release; the message is dropped either way

    def _reader(self, ref: SlotRef) -> SlotReader:
        reader = self._open.get(ref.segment)
        if reader is None:
            if "/" in ref.segment or ref.segment.startswith("."):
                raise MessageError("slot", f"bad segment name {ref.segment!r}")
            if len(self._open) >= self.MAX_OPEN:
                oldest = next(iter(self._open))
                self._open.pop(oldest).close()
            reader = self._open[ref.segment] = SlotReader(str(self._run_dir / ref.segment))
        return reader

    def close(self) -> None:
        for reader in self._open.values():
            reader.close()
        self._open.clear()
