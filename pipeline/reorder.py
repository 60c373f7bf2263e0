"""The merge behind a replicated node: its replicas' messages back in sequence order.

A node with `replicas = N` runs as N processes (NAME#0 .. NAME#N-1). The
producer upstream sends each message to one of them, round robin, so their
outputs reach the consumer downstream out of order. The consumer's input
puts them back in the order of the header's `seq` (the producer's: a
replica's output carries the seq of the input it came from, as every
`Output.new(like=msg)` does) through a bounded window:

- the message the merge expects next goes to the node at once, uncopied;
- one that comes early waits in the window, copied out of its shared-memory
  slot (a replica's pool never waits on the merge, and a lane has one reading
  mark);
- the expected message is given up as a gap when the window holds `window`
  messages, or when the oldest of them has waited `timeout_s`: counted
  (`sortline_reorder_gaps_total{edge}`, and the messages lost in
  `sortline_reorder_missing_total{edge}`), logged, and the next message
  handed on is flagged `gap=True`, the way a camera node flags lost lines (the
  eject plan ends its objects there). A lost message is never spliced over;
- a message that arrives after it was given up is dropped and counted
  (`sortline_edge_drops_total{reason="late"}`): handed on, it would break the
  order;
- a seq below the expected one that was never given up means the producer
  started again (its seq restarts at 0): what the window holds goes on in
  order, and the merge starts again.

At the start (and after such a restart) the merge does not know the first
seq: it waits until it holds one message per replica, or for `timeout_s`,
and starts at the lowest it holds.
"""

from __future__ import annotations

import time
from collections import deque

import numpy as np

from sortline.pipeline import metrics
from sortline.pipeline.messages import Message

GIVEN_UP_KEPT = 256  # ranges of given-up seqs remembered, to tell a late message from a restarted producer


class Reorder:
    """The merge of one replicated edge group at a consumer's input port."""

    def __init__(self, name: str, replicas: int, window: int, timeout_s: float, warn):
        self.name = name            # the configured edge, "infer.out->plan.in"
        self.replicas = replicas
        self.window = window
        self.timeout_ns = int(timeout_s * 1e9)
        self._warn = warn           # a rate-limited log (pipeline.node.RateLimitedLog)
        self.next: int | None = None
        self.held: dict[int, tuple[Message, int, int]] = {}   # seq -> (message, t_in, arrived_ns)
        self.given_up: deque[tuple[int, int]] = deque(maxlen=GIVEN_UP_KEPT)   # [lo, hi) ranges
        self.gap_pending = False
        self.gaps = metrics.REORDER_GAPS.labels(name)
        self.missing = metrics.REORDER_MISSING.labels(name)
        self.late = metrics.DROPS.labels(name, "late")

    def push(self, msg: Message, t_in: int) -> list[tuple[Message, int]]:
        """A message that arrived (checked against the port's payload): the messages to process now, in order.
        The caller still owns (and releases) msg; what the merge keeps, it copies."""
        seq = msg.header.seq
        if self.next is not None and seq < self.next:
            if any(lo <= seq < hi for lo, hi in self.given_up):
                self.late.inc()
                self._warn(f"late:{self.name}", f"{self.name}: dropped message {seq}: it came after the merge had "
                           "given it up as a gap")
                return []
            self._warn(f"restart:{self.name}", f"{self.name}: message {seq} after {self.next - 1}: the producer "
                       "started again; the merge starts again")
            ready = self.flush()
            return ready + self.push(msg, t_in)
        if seq == self.next:
            return [(self._flagged(msg), t_in), *self._ready()]
        if seq in self.held:
            self.late.inc()   # the same seq twice: only a broken producer sends that
            return []
        kept = _copy(msg)
        if kept is None:      # overwritten while it was copied (a latest edge): as lost as any drop
            metrics.DROPS.labels(self.name, "overwritten").inc()
            return []
        self.held[seq] = (kept, t_in, time.monotonic_ns())
        return self.expire(time.monotonic_ns())

    def expire(self, now_ns: int) -> list[tuple[Message, int]]:
        """The messages that may go on now that the window is full or its oldest has waited too long."""
        ready = []
        while self.held and (len(self.held) >= self._limit() or now_ns - self._oldest() >= self.timeout_ns):
            first = min(self.held)
            if self.next is not None and first > self.next:
                self._give_up(self.next, first)
            self.next = first
            ready += self._ready()
        return ready

    def due_ns(self) -> int | None:
        """When expire() next has something to do (monotonic ns), None: nothing held."""
        return self._oldest() + self.timeout_ns if self.held else None

    def flush(self) -> list[tuple[Message, int]]:
        """Everything held, in order (end of stream, a stop, a restarted producer); the merge starts again."""
        ready = []
        for seq in sorted(self.held):
            if self.next is not None and seq > self.next:
                self._give_up(self.next, seq)
            self.next = seq
            ready += self._ready()
        self.next = None
        return ready

    def _limit(self) -> int:
        # Not started: one message from each replica shows where the stream starts.
        return self.window if self.next is not None else min(self.replicas, self.window)

    def _oldest(self) -> int:
        return min(arrived for _, _, arrived in self.held.values())

    def _ready(self) -> list[tuple[Message, int]]:
        """The held messages that follow on from next, in order; next moves past them."""
        ready = []
        while self.next is not None and self.next in self.held:
            msg, t_in, _ = self.held.pop(self.next)
            ready.append((self._flagged(msg), t_in))
        return ready

    def _flagged(self, msg: Message) -> Message:
        """The message about to go on: next moves past it, and it carries the gap before it."""
        if msg.header.seq == self.next:
            self.next += 1
        if self.gap_pending:
            msg.header.gap = True
            self.gap_pending = False
        return msg

    def _give_up(self, lo: int, hi: int) -> None:
        self.gaps.inc()
        self.missing.inc(hi - lo)
        self.given_up.append((lo, hi))
        self.gap_pending = True
        what = f"message {lo}" if hi - lo == 1 else f"messages {lo} to {hi - 1}"
        self._warn(f"gap:{self.name}", f"{self.name}: {what} never came (a replica died or dropped it); "
                   "the next message is flagged as after a gap")


def _copy(msg: Message) -> Message | None:
    """The message with its arrays copied out of their slot (None: the slot changed under the copy)."""
    kept = Message(msg.header, {name: np.array(a) for name, a in msg.arrays.items()}, t_in_ns=msg.t_in_ns)
    kept.meta = msg.meta
    return kept if msg.intact() else None
