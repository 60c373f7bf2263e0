"""The merge behind a replicated node: its replicas' messages back in sequence order.

A node with `replicas = N` runs as N processes (NAME#0 .. NAME#N-1). The
producer upstream sends each message to one of them, round robin, so their
outputs reach the consumer downstream out of order. The consumer's input
puts them back in the order of the header's `seq` (the producer's: a
replica's output carries the seq of the input it came from, as every
`Output.new(like=msg)` does) through a bounded window.

What makes this exact: each replica handles its input in order, so the seqs
arriving from one replica only grow. Once every replica has sent a seq past
the one the merge waits for, that one will never come: it is a gap at once,
with no timeout. So:

- the message the merge expects next goes to the node at once, uncopied;
- one that comes early waits in the window, copied out of its shared-memory
  slot (a replica's pool never waits on the merge, and a lane has one reading
  mark);
- the expected message is a gap when every replica is past it; on a live
  edge (bounded, latest) also when the window holds `window` messages or the
  oldest of them has waited `timeout_s`: latency stays bounded. A gap is
  counted (`sortline_reorder_gaps_total{edge}`, and the messages lost in
  `sortline_reorder_missing_total{edge}`), logged, and the next message handed
  on is flagged `gap=True`, the way a camera node flags lost lines (the eject
  plan ends its objects there). A lost message is never spliced over;
- on a lossless edge nothing is given up while it may still come: a full
  window stops the input from reading the replicas that are past the expected
  message (`blocked`), so they wait, and the producer feeds the others;
- a message that comes after it was given up (a live edge) is dropped and
  counted (`sortline_edge_drops_total{reason="late"}`): handed on, it would
  break the order;
- a replica whose seq goes back means the producer started again (its seq
  restarts at 0): what the window holds goes on, and the merge starts again.

At the start the merge does not know the first seq: it begins at the lowest
it holds once every replica has sent one (on a live edge: or once the window
is full or its oldest has waited `timeout_s`).
"""

from __future__ import annotations

import math
import time

import numpy as np

from sortline.pipeline import metrics
from sortline.pipeline.messages import Message


class Reorder:
    """The merge of one replicated edge group at a consumer's input port."""

    def __init__(self, name: str, replicas: int, window: int, timeout_s: float, lossless: bool, warn):
        self.name = name            # the configured edge, "infer.out->plan.in"
        self.replicas = replicas
        self.window = window
        self.timeout_ns = int(timeout_s * 1e9)
        self.lossless = lossless
        self._warn = warn           # a rate-limited log (pipeline.node.RateLimitedLog)
        self.next: int | None = None                       # the seq to hand on next; None: not started
        self.last: dict[int, float] = {}                   # per replica: the last seq it sent (inf: ended)
        self.held: dict[int, tuple[Message, int, int]] = {}   # seq -> (message, t_in, arrived_ns)
        self.gap_pending = False
        self.gaps = metrics.REORDER_GAPS.labels(name)
        self.missing = metrics.REORDER_MISSING.labels(name)
        self.late = metrics.DROPS.labels(name, "late")

    def push(self, msg: Message, t_in: int, replica: int) -> list[tuple[Message, int]]:
        """A message from a replica (checked against the port's payload): the messages to process now, in
        order, with their arrival times. The caller still owns (and releases) msg; what the merge keeps, it copies."""
        seq, ready = msg.header.seq, []
        if seq <= self.last.get(replica, -1):
            self._warn(f"restart:{self.name}", f"{self.name}: message {seq} from replica {replica} after "
                       f"{self.last[replica]:.0f}: the producer started again; so does the merge")
            ready, self.last = self.flush(), {}
        self.last[replica] = seq
        if self.next is not None and seq < self.next or seq in self.held:
            self.late.inc()
            self._warn(f"late:{self.name}", f"{self.name}: dropped message {seq}: it came after the merge had "
                       "given it up as a gap")
        elif seq == self.next:
            ready += self._release(msg, t_in)
        else:
            kept = _copy(msg)
            if kept is None:   # overwritten while it was copied (a latest edge): as lost as any drop
                metrics.DROPS.labels(self.name, "overwritten").inc()
            else:
                self.held[seq] = (kept, t_in, time.monotonic_ns())
        return ready + self.expire(time.monotonic_ns())

    def ended(self, replica: int) -> list[tuple[Message, int]]:
        """A replica's edge ended (end of stream): it sends nothing more."""
        self.last[replica] = math.inf
        if all(self.last.get(r) == math.inf for r in range(self.replicas)):
            return self.flush()
        return self.expire(time.monotonic_ns())

    def expire(self, now_ns: int) -> list[tuple[Message, int]]:
        """What may go on now: the messages after a gap that is certain (every replica is past it), or on a
        live edge one given up because the window is full or its oldest has waited too long."""
        ready = []
        while self.held and self._give_up(now_ns):
            first = min(self.held)
            if self.next is not None:
                self._gap(self.next, first)
            self.next = first
            ready += self._release()
        return ready

    def blocked(self, replica: int) -> bool:
        """On a lossless edge: whether the input should stop reading this replica for now (the window is full,
        and what it sends next cannot be the message the merge waits for)."""
        if not self.lossless or len(self.held) < self.window:
            return False
        sent = self.last.get(replica)
        return sent is not None and (self.next is None or sent > self.next)

    def due_ns(self) -> int | None:
        """When expire() has something to do on a live edge (monotonic ns); None: nothing held, or lossless."""
        if self.lossless or not self.held:
            return None
        return min(arrived for _, _, arrived in self.held.values()) + self.timeout_ns

    def flush(self) -> list[tuple[Message, int]]:
        """Everything held, in order, with its gaps (every replica ended, a stop, a restarted producer)."""
        ready = []
        while self.held:
            first = min(self.held)
            if self.next is not None:
                self._gap(self.next, first)
            self.next = first
            ready += self._release()
        self.next = None
        return ready

    def _give_up(self, now_ns: int) -> bool:
        """Whether to stop waiting for the expected message (or, not started, for the first)."""
        if self.next is None:
            certain = all(r in self.last for r in range(self.replicas))
        else:
            certain = all(self.last.get(r, -1) > self.next for r in range(self.replicas))
        if certain or self.lossless:
            return certain
        return len(self.held) >= self.window or now_ns >= self.due_ns()

    def _release(self, msg: Message | None = None, t_in: int = 0) -> list[tuple[Message, int]]:
        """msg (the expected one) and the held messages that follow on from it, in order."""
        ready = []
        if msg is not None:
            ready.append((self._flagged(msg), t_in))
        while self.next in self.held:
            held, t, _ = self.held.pop(self.next)
            ready.append((self._flagged(held), t))
        return ready

    def _flagged(self, msg: Message) -> Message:
        """The message about to go on: next moves past it, and it carries the gap before it."""
        self.next = msg.header.seq + 1
        if self.gap_pending:
            msg.header.gap = True
            self.gap_pending = False
        return msg

    def _gap(self, lo: int, hi: int) -> None:
        if hi <= lo:
            return
        self.gaps.inc()
        self.missing.inc(hi - lo)
        self.gap_pending = True
        what = f"message {lo}" if hi - lo == 1 else f"messages {lo} to {hi - 1}"
        self._warn(f"gap:{self.name}", f"{self.name}: {what} never came (a replica died or dropped it); "
                   "the next message is flagged as after a gap")


def _copy(msg: Message) -> Message | None:
    """The message with its arrays copied out of their slot (None: the slot changed under the copy)."""
    kept = Message(msg.header, {name: np.array(a) for name, a in msg.arrays.items()}, t_in_ns=msg.t_in_ns)
    kept.meta = msg.meta
    return kept if msg.intact() else None
