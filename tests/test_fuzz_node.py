"""Fuzzed malformed messages into a running node: it never crashes and counts each one."""

from __future__ import annotations

import msgspec
import numpy as np
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import chain, free_port, metric, scrape, start, stop, wait_for, write_config
from sortline.pipeline.messages import SCHEMA_VERSION, ArraySpec, Header, MessageError, SlotRef, encode_header, inline_frames
from sortline.pipeline.slots import SlotPool
from sortline.pipeline.transport import SlotReaders

class Harness:
    """A relay node under test; this process plays its camera and its sink."""

    def __init__(self, tmp_path, run_dir):
        self.port = free_port()
        self.run_dir = run_dir
        cfg = write_config(tmp_path / "c.toml", chain(transport="inline"), run_dir, extra=f"\n[metrics]\nport_base = {self.port}\n")
        self.ctx = zmq.Context()
        self.camera = self.ctx.socket(zmq.PUSH)
        self.camera.bind(f"ipc://{run_dir}/camera.out-relay.in.sock")
        self.sink = self.ctx.socket(zmq.PULL)
        self.sink.connect(f"ipc://{run_dir}/relay.out-sink.in.sock")
        # The relay is node index 1 in data-flow order; run alone, it serves on the port it is given.
        self.relay = start("node", "relay", "--config", str(cfg), "--metrics-port", str(self.port))
        self.pool = SlotPool(str(run_dir / "camera.out.fuzz.slots"), 4, 4096, [False])
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
        try:
            msg = self.oracle.decode(frames)
        except MessageError as exc:
            self.expected_bad += exc.kind != "overwritten"
        else:
            msg.release()
            self.expected_good += not msg.header.eos
        self.camera.send_multipart(frames)

    def valid(self, frames: list) -> bool:
        try:
            self.oracle.decode(frames).release()
            return True
        except MessageError:
            return False

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


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    import shutil
    import tempfile
    from pathlib import Path

    run_dir = Path(tempfile.mkdtemp(prefix="sl-", dir="/dev/shm"))
    h = Harness(tmp_path_factory.mktemp("fuzz"), run_dir)
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
    shape=st.lists(st.integers(-1, 6), max_size=3).map(tuple),
    offset=st.integers(-1, 8192),
)

messages = st.one_of(
    st.lists(st.binary(max_size=40), min_size=1, max_size=3),  # garbage
    st.builds(lambda a: inline_frames(Header(stream="rgb", seq=1), {"lines": a}), good_array),  # valid
    st.builds(lambda a, b: [encode_header(Header(stream="rgb", seq=1, arrays=a)), *b],
              st.lists(specs, max_size=2), st.lists(st.binary(max_size=64), max_size=3)),
    st.builds(lambda v: [msgspec.msgpack.encode({"stream": "rgb", "seq": 1, "schema": v})],
              st.integers(-3, 5).filter(lambda v: v != SCHEMA_VERSION)),
    st.builds(lambda seg, i, g, lane, a: [encode_header(Header(stream="rgb", seq=1, arrays=a,
                                                               slot=SlotRef(seg, i, g, lane)))],
              st.sampled_from(["camera.out.fuzz.slots", "nope.slots", "../x", ""]),
              st.integers(-1, 6), st.integers(0, 3), st.integers(-1, 2), st.lists(specs, max_size=2)),
)


@pytest.mark.system
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
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

