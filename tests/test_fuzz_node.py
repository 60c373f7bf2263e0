"""Fuzzed malformed messages into a running node, over ipc and over tcp: it never crashes or restarts, and
counts each one; valid messages still flow. Besides random bytes and wrong headers: the messages that once
escaped the decoder (a 0-d array, dimensions that overflow, a NUL in a slot segment's name, meta nested
100,000 levels deep, trace times at the ends of int64) and forged ends of stream."""

from __future__ import annotations

import msgspec
import numpy as np
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import chain, free_port, metric, scrape, start, stop, wait_for, write_config
from sortline.pipeline import clock
from sortline.pipeline.messages import (SCHEMA_VERSION, ArraySpec, Header, MessageError, SlotRef, TraceEntry,
                                        encode_header, inline_frames)
from sortline.pipeline.slots import SlotPool
from sortline.pipeline.transport import SlotReaders

class Harness:
    """A relay node under test; this process plays its camera and its sink."""

    def __init__(self, tmp_path, run_dir, tcp: bool):
        self.port = free_port()
        self.run_dir, self.tcp = run_dir, tcp
        if tcp:
            ends = (f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}")
        else:
            ends = (f"ipc://{run_dir}/camera.out-relay.in.sock", f"ipc://{run_dir}/relay.out-sink.in.sock")
        cfg = write_config(tmp_path / "c.toml", chain(transport="inline", addresses=ends if tcp else ("", "")),
                           run_dir, extra=f"\n[metrics]\nport_base = {self.port}\n")
        self.ctx = zmq.Context()
        self.camera = self.ctx.socket(zmq.PUSH)
        self.camera.bind(ends[0])
        self.sink = self.ctx.socket(zmq.PULL)
        self.sink.connect(ends[1])
        # The relay is node index 1 in data-flow order; run alone, it serves on the port it is given.
        self.relay = start("node", "relay", "--config", str(cfg), "--metrics-port", str(self.port))
        self.pool = SlotPool(str(run_dir / "camera.out.1.1.slots"), 4, 4096, [False])
        self.oracle = SlotReaders(run_dir)
        wait_for(lambda: scrape(self.port), timeout=20)

    def counts(self) -> tuple[float, float]:
        samples = scrape(self.port)
        return (metric(samples, "sortline_malformed_messages_total", node="relay"),
                metric(samples, "sortline_messages_total", node="relay", direction="in"))

    def begin(self) -> None:
        """Start an example from what the node has counted so far."""
        self.settle_sink()
        self.expected_bad, self.expected_good = self.counts()
        self.forwarded = 0

    def send(self, frames: list) -> None:
        verdict = self.verdict(frames)
        self.expected_good += verdict == "good"
        self.expected_bad += verdict == "bad"
        self.camera.send_multipart(frames)

    def verdict(self, frames: list) -> str:
        """What the relay must make of it: "good" for what decodes (the trace back on this host's clock over
        tcp), "bad" for what does not and for an end of stream (this camera is no node: it has left no mark
        of having finished), "drop" for a slot overwritten (counted as a drop on the edge, not as malformed)."""
        try:
            msg = self.oracle.decode(frames)
            if self.tcp:
                clock.from_wall(msg.header)
        except MessageError as exc:
            return "drop" if exc.kind == "overwritten" else "bad"
        msg.release()
        return "bad" if msg.header.eos else "good"

    def valid(self, frames: list) -> bool:
        return self.verdict(frames) == "good"

    def settle_sink(self) -> None:
        while self.sink.poll(0):
            self.sink.recv_multipart()
            self.forwarded += 1

    def settle(self) -> None:
        def caught_up():
            self.settle_sink()
            return self.counts() == (self.expected_bad, self.expected_good)
        wait_for(caught_up, timeout=5)
        assert self.relay.poll() is None, "the node died"

    def close(self):
        rc, _, err = stop(self.relay)
        self.pool.close()
        self.ctx.destroy(0)
        return rc, err


@pytest.fixture(scope="module", params=["ipc", "tcp"])
def harness(request, tmp_path_factory):
    import shutil
    import tempfile
    from pathlib import Path

    run_dir = Path(tempfile.mkdtemp(prefix="sl-", dir="/dev/shm"))
    h = Harness(tmp_path_factory.mktemp("fuzz"), run_dir, tcp=request.param == "tcp")
    yield h
    rc, err = h.close()
    shutil.rmtree(run_dir, ignore_errors=True)
    assert rc == 0, err[-2000:]
    assert "Traceback" not in err


good_array = st.builds(lambda n: np.arange(n * 3, dtype=np.uint8).reshape(n, 3), st.integers(1, 8))

specs = st.builds(
    ArraySpec,
    name=st.sampled_from(["lines", "x", ""]),
    dtype=st.sampled_from(["uint8", "float16", "int64", "object", "complex64"]),
    shape=st.one_of(st.lists(st.integers(-1, 6), max_size=3).map(tuple),
                    st.sampled_from([(), (0, 2**63), (0, 2**40, 2**40), (2**31, 2**31)])),   # 0-d; overflowing
    offset=st.integers(-1, 8192),
)


def deep(levels: int) -> list:
    """A header whose meta nests `levels` tables deep (as raw msgpack: no encoder would write it)."""
    head = msgspec.msgpack.encode({"stream": "rgb", "seq": 1})
    return [b"\x83" + head[1:] + b"\xa4meta" + b"\x81\xa1a" * levels + b"\x80"]


traces = st.lists(st.builds(lambda t: TraceEntry("cam", t, t), st.sampled_from([0, 1, 2**62, -2**63, 2**63 - 1])),
                  min_size=1, max_size=2)

messages = st.one_of(
    st.lists(st.binary(max_size=40), min_size=1, max_size=3),  # garbage
    st.builds(lambda a: inline_frames(Header(stream="rgb", seq=1), {"lines": a}), good_array),  # valid
    st.builds(lambda a, b: [encode_header(Header(stream="rgb", seq=1, arrays=a)), *b],
              st.lists(specs, max_size=2), st.lists(st.binary(max_size=64), max_size=3)),
    st.builds(lambda v: [msgspec.msgpack.encode({"stream": "rgb", "seq": 1, "schema": v})],
              st.integers(-3, 5).filter(lambda v: v != SCHEMA_VERSION)),
    st.builds(lambda seg, i, g, lane, a: [encode_header(Header(stream="rgb", seq=1, arrays=a,
                                                               slot=SlotRef(seg, i, g, lane)))],
              st.sampled_from(["camera.out.1.1.slots", "nope.slots", "../x", "", "camera.out.1.1\0.slots",
                               "camera\0.out.1.1.slots"]),
              st.integers(-1, 6), st.integers(0, 3), st.integers(-1, 2), st.lists(specs, max_size=2)),
    st.builds(deep, st.sampled_from([3, 17, 100_000])),
    st.builds(lambda tr, a: inline_frames(Header(stream="rgb", seq=1, trace=tr), {"lines": a}), traces, good_array),
    st.just([encode_header(Header(stream="rgb", seq=1, eos=True))]),   # a forged end of stream
)


@pytest.mark.system
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(batch=st.lists(messages, min_size=1, max_size=25))
def test_fuzzed_messages_are_counted_and_the_node_carries_on(harness, batch):
    harness.begin()
    for frames in batch:
        harness.send(frames)
    harness.settle()
    # The node still does its job after all that.
    a = np.full((2, 3), 7, np.uint8)
    harness.send(inline_frames(Header(stream="rgb", seq=2), {"lines": a}))
    harness.settle()
    expected = sum(1 for f in batch if harness.valid(f)) + 1
    wait_for(lambda: harness.settle_sink() or harness.forwarded >= expected, timeout=5)
    assert harness.forwarded == expected

