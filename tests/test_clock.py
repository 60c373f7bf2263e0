"""The trace across tcp edges: wall-clock time on the wire, latency reported only with synchronised clocks."""

from __future__ import annotations

import time

import pytest
import zmq

from conftest import edge_toml, free_port, load_json, node_toml, sortline, start, stop, write_config
from sortline.pipeline.messages import decode_header


def tcp_graph(port: int, camera: str, sink: str = "") -> str:
    return (node_toml("camera", "pattern", camera) + node_toml("sink", "sink", sink)
            + edge_toml("camera.out", "sink.in") + f'address = "tcp://127.0.0.1:{port}"\n')


@pytest.mark.system
def test_a_trace_leaves_over_tcp_in_wall_clock_time(tmp_path, run_dir):
    port = free_port()
    cfg = write_config(tmp_path / "c.toml", tcp_graph(port, "lines = 4, pixels = 64, bands = 3, count = 5"), run_dir)
    ctx = zmq.Context()
    pull = ctx.socket(zmq.PULL)  # another host's consumer, as far as the camera can tell
    pull.connect(f"tcp://127.0.0.1:{port}")
    camera = start("node", "camera", "--config", str(cfg))
    try:
        traces = []
        while len(traces) < 5 and pull.poll(30_000):
            header = decode_header(pull.recv_multipart()[0])
            traces.append((time.time_ns(), header.trace))
    finally:
        pull.close(0)
        ctx.term()
        stop(camera, timeout=30)
    assert len(traces) == 5
    for received, trace in traces:
        (entry,) = trace
        assert entry.stage == "camera"
        # Wall-clock nanoseconds, within seconds of this process's clock: not a monotonic reading.
        assert abs(received - entry.t_out_ns) < 10e9 and entry.t_in_ns <= entry.t_out_ns


@pytest.mark.system
@pytest.mark.parametrize("synchronised", [False, True])
def test_latency_across_a_tcp_edge_is_reported_only_with_synchronised_clocks(tmp_path, run_dir, synchronised):
    graph = tcp_graph(free_port(), "lines = 4, pixels = 64, bands = 3, count = 300",
                      f'report = "{tmp_path}/sink.json"')
    extra = f"\n[clock]\nptp_synchronised = {'true' if synchronised else 'false'}\n"
    cfg = write_config(tmp_path / "c.toml", graph, run_dir, extra=extra)
    res = sortline("run", "--config", str(cfg), timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    sink = load_json(tmp_path / "sink.json")
    assert sink["received"] == 300
    if synchronised:
        # Back in the sink's monotonic clock: a real latency on loopback, not a clock difference.
        assert 0 < sink["e2e"]["p50_ms"] < 1000, sink["e2e"]
        assert "not reported" not in res.stdout + res.stderr
    else:
        assert sink["e2e"] == {"not_reported": "clocks not synchronised"}
        assert ("end-to-end latency not reported: its path crosses tcp edges (camera.out->sink.in) "
                "and clock.ptp_synchronised is false") in res.stderr
        assert "e2e=not reported (clocks not synchronised)" in res.stdout  # the status table says so
    assert sink["stages"]["camera"]["p50_ms"] >= 0  # per-stage figures come from one host's clock: always there
