"""Real graphs of real processes: source -> pass-through -> sink over real sockets."""

from __future__ import annotations

import os
import signal
import time

import pytest

from conftest import chain, free_port, load_json, metric, pid_of, scrape, sortline, start, stop, wait_for, write_config


def drops(report: dict) -> float:
    return sum(metric(node["metrics"], "sortline_edge_drops_total") for node in report["nodes"].values())


@pytest.mark.system
@pytest.mark.parametrize("transport", ["shm", "inline"])
def test_lossless_chain_moves_10000_messages_in_order(tmp_path, run_dir, transport):
    graph = chain("lines = 4, pixels = 64, bands = 3, count = 10000, paced = false",
                  f'report = "{tmp_path}/sink.json"', transport=transport)
    cfg = write_config(tmp_path / "c.toml", graph, run_dir)
    res = sortline("run", "--config", str(cfg), "--report", str(tmp_path / "run.json"), timeout=240)
    assert res.returncode == 0, res.stderr[-3000:]
    sink = load_json(tmp_path / "sink.json")
    assert sink["received"] == 10000
    assert sink["lost"] == 0 and sink["gaps"] == 0 and sink["reordered"] == 0 and sink["corrupt"] == 0
    run = load_json(tmp_path / "run.json")
    assert {n["state"] for n in run["nodes"].values()} == {"finished"}  # ended by end-of-stream, not a timeout
    assert drops(run) == 0
    assert set(sink["stages"]) == {"camera", "relay"}  # every node left its trace entry
    assert list(run_dir.glob("*.slots")) == [] and list(run_dir.glob("*.sock")) == []


@pytest.mark.system
def test_lossless_chain_across_tcp(tmp_path, run_dir):
    # Nodes on different hosts talk tcp; here both ends are on loopback.
    a, b = free_port(), free_port()
    graph = chain("lines = 16, pixels = 640, bands = 3, count = 2000, paced = false",
                  f'report = "{tmp_path}/sink.json"', addresses=(f"tcp://127.0.0.1:{a}", f"tcp://127.0.0.1:{b}"))
    cfg = write_config(tmp_path / "c.toml", graph, run_dir)
    check = sortline("check", "--config", str(cfg), timeout=60)
    assert check.stdout.count("inline, tcp://127.0.0.1:") == 2, check.stdout
    res = sortline("run", "--config", str(cfg), timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    sink = load_json(tmp_path / "sink.json")
    assert sink["received"] == 2000 and sink["lost"] == 0 and sink["corrupt"] == 0 and sink["reordered"] == 0


@pytest.mark.system
@pytest.mark.parametrize("pattern", ["pushpull", "pubsub"])
def test_latest_chain_drops_and_counts_when_the_sink_is_slow(tmp_path, run_dir, pattern):
    # 533 frames/s into a sink that takes 10 ms each: about four in five must go.
    sent = 1600
    graph = chain(f"lines = 4, pixels = 64, bands = 3, count = {sent}",
                  f'delay_ms = 10, report = "{tmp_path}/sink.json"', policy="latest", pattern=pattern)
    cfg = write_config(tmp_path / "c.toml", graph, run_dir)
    res = sortline("run", "--config", str(cfg), "--report", str(tmp_path / "run.json"), timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    sink, run = load_json(tmp_path / "sink.json"), load_json(tmp_path / "run.json")
    assert run["nodes"]["camera"]["status"]["frames"] == sent
    assert 50 < sink["received"] < sent * 0.5
    assert sink["received"] + drops(run) == sent  # every message is delivered or counted as dropped
    assert sink["lost"] > 0 and sink["reordered"] == 0 and sink["corrupt"] == 0
    # Latency stays bounded: the sink always takes the newest frame, never a queue of old ones.
    assert sink["e2e"]["p99_ms"] < 100, sink["e2e"]


@pytest.mark.system
def test_bounded_chain_reads_every_queued_message_and_drops_only_when_full(tmp_path, run_dir):
    # The same overload as above on a bounded edge: the sink reads every message that
    # was queued, in order, and the sender drops (and counts) the ones that find the queue full.
    sent = 1600
    graph = chain(f"lines = 4, pixels = 64, bands = 3, count = {sent}",
                  f'delay_ms = 10, report = "{tmp_path}/sink.json"', policy="bounded")
    cfg = write_config(tmp_path / "c.toml", graph, run_dir)
    res = sortline("run", "--config", str(cfg), "--report", str(tmp_path / "run.json"), timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    sink, run = load_json(tmp_path / "sink.json"), load_json(tmp_path / "run.json")
    assert 50 < sink["received"] < sent * 0.5
    assert sink["received"] + drops(run) == sent
    reasons = {k.split('reason="')[1].rstrip('"}') for n in run["nodes"].values() for k, v in n["metrics"].items()
               if k.startswith("sortline_edge_drops_total") and v > 0}
    assert reasons == {"queue_full"}                  # never a stale drop: the consumer reads all it got
    assert sink["reordered"] == 0 and sink["corrupt"] == 0


@pytest.mark.system
def test_killed_consumer_holding_slots_is_restarted_and_the_producer_carries_on(tmp_path, run_dir):
    # Lossless and a sink slower than the camera: the camera's slot pool is full of
    # messages the relay holds or has queued when the relay is killed.
    port = free_port()
    graph = chain("lines = 4, pixels = 64, bands = 3, paced = false", 'delay_ms = 2')
    cfg = write_config(tmp_path / "c.toml", graph, run_dir, extra=f"\n[metrics]\nport_base = {port}\n")
    sup = start("run", "--config", str(cfg), "--seconds", "12", "--report", str(tmp_path / "run.json"))
    try:
        camera, sink = port + 0, port + 2
        wait_for(lambda: metric(scrape(sink), "sortline_messages_total", direction="in") > 300, timeout=20)
        relay_pid = pid_of("node", "relay", str(cfg))
        sent_before = metric(scrape(camera), "sortline_messages_total", direction="out")
        got_before = metric(scrape(sink), "sortline_messages_total", direction="in")
        killed = time.monotonic()
        os.kill(relay_pid, signal.SIGKILL)
        # The sink had a few messages queued; well past those, data flows again.
        wait_for(lambda: metric(scrape(sink), "sortline_messages_total", direction="in") > got_before + 100, timeout=10)
        recovery_s = time.monotonic() - killed
        cam = scrape(camera)
        assert metric(cam, "sortline_messages_total", direction="out") > sent_before + 100  # carried on
        assert metric(cam, "sortline_slot_lane_reclaims_total", node="camera") >= 1  # got its slots back
        assert recovery_s < 5.0
    finally:
        rc, out, err = stop(sup, timeout=30)
    assert rc == 0, err[-3000:]
    assert "relay died (signal 9); restart 1" in err
    run = load_json(tmp_path / "run.json")
    assert run["nodes"]["relay"]["restarts"] == 1
    assert run["nodes"]["sink"]["status"]["corrupt"] == 0


@pytest.mark.system
def test_every_node_stops_within_a_second_with_messages_still_queued(tmp_path, run_dir):
    # Lossless, a producer far faster than the sink: every queue and slot pool is full
    # when all three nodes get SIGTERM at once (as systemd stops a target).
    graph = chain("lines = 16, pixels = 640, bands = 3, paced = false", 'delay_ms = 20')
    cfg = write_config(tmp_path / "c.toml", graph, run_dir)
    procs = {name: start("node", name, "--config", str(cfg)) for name in ("sink", "relay", "camera")}
    time.sleep(3.0)
    assert all(p.poll() is None for p in procs.values())
    t0 = time.monotonic()
    for p in procs.values():
        p.send_signal(signal.SIGTERM)
    for name, p in procs.items():
        rc, _, err = stop(p, timeout=10)
        assert rc == 0, (name, err[-2000:])
    elapsed = time.monotonic() - t0
    assert elapsed < 1.5, elapsed


@pytest.mark.system
def test_supervisor_stops_the_graph_cleanly_on_sigterm(tmp_path, run_dir):
    graph = chain("lines = 16, pixels = 640, bands = 3, paced = false", 'delay_ms = 5')
    cfg = write_config(tmp_path / "c.toml", graph, run_dir)
    sup = start("run", "--config", str(cfg))
    time.sleep(4.0)
    t0 = time.monotonic()
    rc, out, err = stop(sup, timeout=20)
    assert rc == 0, err[-3000:]
    assert time.monotonic() - t0 < 6.0
    assert "sortline final" in out
    assert "did not stop" not in err and "Traceback" not in err
    assert list(run_dir.glob("*.slots")) == []


@pytest.mark.system
def test_a_node_whose_loop_stalls_is_killed_and_restarted(tmp_path, run_dir):
    # A sink that takes 3 s over one message sends no heartbeat for 3 s.
    graph = chain("lines = 4, pixels = 64, bands = 3", "delay_ms = 3000")
    cfg = write_config(tmp_path / "c.toml", graph, run_dir)
    cfg.write_text(cfg.read_text().replace("heartbeat_s = 0.2", "heartbeat_s = 0.2\nheartbeat_timeout_s = 1.0"))
    res = sortline("run", "--config", str(cfg), "--seconds", "6", "--report", str(tmp_path / "run.json"), timeout=60)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "sink sent no heartbeat for" in res.stderr
    assert load_json(tmp_path / "run.json")["nodes"]["sink"]["restarts"] >= 1


@pytest.mark.system
def test_a_configuration_fault_found_at_setup_is_not_restarted(tmp_path, run_dir):
    graph = chain("lines = 4, pixels = 64, bands = 3", f'report = "{tmp_path}/no/such/dir/sink.json"')
    cfg = write_config(tmp_path / "c.toml", graph, run_dir)
    t0 = time.monotonic()
    res = sortline("run", "--config", str(cfg), timeout=60)
    assert res.returncode == 78
    assert time.monotonic() - t0 < 15
    assert f"nodes.sink.params.report = '{tmp_path}/no/such/dir/sink.json': directory" in res.stderr
    assert "sink cannot start: configuration error (see above); not restarting it" in res.stderr
    assert "restart 1" not in res.stderr
