"""Driving one node in memory, for unit tests of node logic (as dora-rs's MockNode does).

    h = Harness(EjectPlan, machine, params={"touching": "skip"})
    outs = h.send("in", {"classes": mask, "confidence": conf}, meta=MaskMeta(...), position=0, ticks_per_line=60)
    windows = outs[0][1].meta.windows

No processes, no sockets: the node's own `setup`, `process`, `step`,
`end_of_stream` and `teardown` run in this process. What goes in is checked
against the port's payload exactly as the runner checks it (a message the
node would never see raises MessageError here); what comes out goes through
the wire format (the header encoded and decoded) and is checked against the
receiving end of the output port's payload, so a test sees what the next
node would get. System tests (real processes, sockets, the supervisor) use
`sortline run` instead.
"""

from __future__ import annotations

import time
from typing import Any, Mapping

import numpy as np

from sortline.pipeline.config import Machine
from sortline.pipeline.messages import Header, Message, TraceEntry, decode_header, encode_header
from sortline.pipeline.node import Context, Node
from sortline.pipeline.transport import derived_header


class MemoryOutput:
    """An output port that keeps what is sent instead of sending it."""

    def __init__(self, port: str):
        self.port = port
        self.edges = [port]   # a node may look at whether anyone listens: someone does

    def new(self, arrays: dict[str, tuple[tuple[int, ...], Any]], *, like: Message | None = None,
            **fields) -> Message:
        return Message(derived_header(like, fields),
                       {name: np.empty(shape, dtype) for name, (shape, dtype) in arrays.items()})

    def abandon(self, msg: Message) -> None:
        pass

    def abandon_unsent(self) -> None:
        pass


class Harness:
    def __init__(self, cls: type[Node], machine: Machine, params: Mapping[str, Any] | None = None, name: str = "node",
                 context: Context = Context()):
        self.node = cls(name, cls.Params.model_validate(dict(params or {})), machine, context)
        self.node.out = {port: MemoryOutput(port) for port in cls.outputs}
        self.seq = dict.fromkeys(cls.inputs, 0)
        self.node.setup()

    def message(self, port: str, arrays: Mapping[str, np.ndarray], t_in_ns: int | None = None, **header) -> Message:
        """An input message as the runner would hand it over: read-only arrays, checked, meta typed.
        t_in_ns: the source's acquisition time (the first trace entry; now by default); the stream is
        the port's name and seq counts up per port unless given."""
        t = time.monotonic_ns() if t_in_ns is None else t_in_ns
        header.setdefault("trace", [TraceEntry("source", t, t)])
        header.setdefault("stream", port)
        header.setdefault("seq", self.seq[port])
        self.seq[port] = header["seq"] + 1
        msg = self._wire(Header(**header), arrays)
        self.node.inputs[port].check(msg, self.node.bound.get(port, {}))
        return msg

    def send(self, port: str, arrays: Mapping[str, np.ndarray] | None = None, t_in_ns: int | None = None,
             **header) -> list[tuple[str, Message]]:
        """process() one message; what it sends, as its consumers would receive it."""
        return self._received(self.node.process(port, self.message(port, arrays or {}, t_in_ns, **header)))

    def step(self) -> list[tuple[str, Message]]:
        return self._received(self.node.step())

    def end(self) -> list[tuple[str, Message]]:
        return self._received(self.node.end_of_stream())

    def close(self) -> None:
        self.node.teardown()

    def _received(self, outs) -> list[tuple[str, Message]]:
        got = []
        for port, msg in outs or ():
            if msg is None:
                continue
            now = time.monotonic_ns()
            header = msg.header
            header.trace = [*header.trace, TraceEntry(self.node.name, msg.t_in_ns or now, now)]
            received = self._wire(header, msg.arrays)
            self.node.outputs[port].check(received, {})
            got.append((port, received))
        return got

    @staticmethod
    def _wire(header: Header, arrays: Mapping[str, np.ndarray]) -> Message:
        """Through the wire format: the header encoded and decoded, the arrays copied and read-only."""
        copies = {}
        for name, a in arrays.items():
            copies[name] = np.array(a)
            copies[name].flags.writeable = False
        return Message(decode_header(encode_header(header)), copies)
