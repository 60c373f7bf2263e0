"""The trace's clock, on one host and across hosts.

On one host the trace is `time.monotonic_ns`: immune to clock steps, and
the same clock in every process. Monotonic clocks of two hosts have nothing
in common, though, so a message leaving over a tcp edge carries its trace in
wall-clock time (CLOCK_REALTIME) and the receiver turns it back into its own
monotonic clock. That is exact on one host (a tcp edge on loopback) and as
good as the hosts' clock agreement otherwise: with PTP (linuxptp: ptp4l
disciplining the NIC's hardware clock, phc2sys the system clock) well under
a millisecond; without it, tens of milliseconds or worse. So latency measured
across a tcp edge is only reported when `clock.ptp_synchronised` says the
hosts are synchronised (docs/service.md).
"""

from __future__ import annotations

import time

import msgspec

from sortline.pipeline.config import Settings
from sortline.pipeline.graph import edges
from sortline.pipeline.messages import CLOCK_MAX_NS, Header, MessageError, TraceEntry


def _shifted(trace: list[TraceEntry], delta_ns: int) -> list[TraceEntry]:
    return [TraceEntry(e.stage, e.t_in_ns + delta_ns, e.t_out_ns + delta_ns) for e in trace]


def to_wall(header: Header) -> Header:
    """A copy of the header whose trace is in wall-clock time (what crosses a tcp edge)."""
    return msgspec.structs.replace(header, trace=_shifted(header.trace, time.time_ns() - time.monotonic_ns()))


def from_wall(header: Header) -> None:
    """Back into this host's monotonic clock, in place (what arrives over a tcp edge); MessageError
    for a trace that lands outside it (another host's clock is not to be trusted that far)."""
    header.trace = _shifted(header.trace, time.monotonic_ns() - time.time_ns())
    if any(not 0 <= t <= CLOCK_MAX_NS for e in header.trace for t in (e.t_in_ns, e.t_out_ns)):
        raise MessageError("header", "a trace time outside this host's clock")


def is_tcp(edge) -> bool:
    return edge.address.startswith("tcp://")


def tcp_edges_upstream(settings: Settings, node: str) -> list[str]:
    """The tcp edges on the paths from the sources to this node: the hosts whose
    clocks its end-to-end latency depends on."""
    found, todo, seen = [], [node], {node}
    all_edges = edges(settings)
    while todo:
        here = todo.pop()
        for e in all_edges:
            if e.dst != here:
                continue
            if is_tcp(e):
                found.append(e.name)
            if e.src not in seen:
                seen.add(e.src)
                todo.append(e.src)
    return sorted(found)
