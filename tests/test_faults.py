"""Faults on the whole pipeline under load: a stage killed -9 comes back, and what it cost is counted."""

from __future__ import annotations

import pytest

import os
import signal
import time
from pathlib import Path

from sortline.pipeline.graph import load_config
from sortline.pipeline.graph import topo_order
from tests.conftest import demo_toml, free_port, load_json, metric, pid_of, scrape, sortline, start, stop, wait_for


def test_a_spare_node_process_ends_at_the_end_of_its_input_and_refuses_a_node_the_graph_lacks(tmp_path, run_dir):
    """The supervisor's spare (`sortline node --standby`) becomes nothing when the supervisor goes away without
    needing it, and the name it is given is checked like a name on the command line."""
    cfg = tmp_path / "demo.toml"
    cfg.write_text(demo_toml(free_port(), graph={"name": "spare", "runtime_dir": str(run_dir)}))
    idle = sortline("node", "--standby", "--config", str(cfg), input="", timeout=60)
    assert idle.returncode == 0, idle.stderr
    wrong = sortline("node", "--standby", "--config", str(cfg), input="nosuch 0\n", timeout=60)
    assert wrong.returncode == 78 and "no node named 'nosuch'" in wrong.stderr, wrong.stderr


@pytest.mark.system
def test_a_stage_killed_under_load_is_back_within_two_seconds_and_the_loss_is_counted(tmp_path, run_dir):
    port, udp = free_port(), free_port()
    cfg = tmp_path / "demo.toml"
    cfg.write_text(demo_toml(udp, graph={"name": "faults", "runtime_dir": str(run_dir)}, metrics={"port_base": port}))
    sup = start("run", "--config", str(cfg), "--seconds", "14", "--report", str(tmp_path / "run.json"))
    try:
        # Node i in data-flow order serves port_base + i.
        plan_port = port + topo_order(load_config(cfg)).index("plan")

        def planned():
            return metric(scrape(plan_port), "sortline_messages_total", node="plan", direction="in")

        wait_for(lambda: planned() > 100, timeout=30)
        victim = pid_of("node", "plan", str(cfg))
        os.kill(victim, signal.SIGKILL)
        killed = time.monotonic()
        # A fresh process serves the port again and takes messages: the pipeline is back.
        wait_for(lambda: planned() > 5, timeout=15, every=0.02)
        back_s = time.monotonic() - killed
        # It was the supervisor's spare, and it goes by the node's command line like any node.
        assert pid_of("node", "plan", str(cfg)) != victim
    finally:
        rc, out, err = stop(sup, timeout=30)
    assert rc == 0, err[-3000:]
    assert "plan died (signal 9); restart 1" in err
    assert back_s < 2.0, back_s
    run = load_json(tmp_path / "run.json")
    assert run["nodes"]["plan"]["restarts"] == 1
    # Its totals are over both its processes: the killed one's counts are not lost with it.
    plan = run["nodes"]["plan"]
    before_kill = metric(plan["totals"], "sortline_messages_total", direction="in") - \
        metric(plan["metrics"], "sortline_messages_total", direction="in")
    assert before_kill > 0           # (up to its last heartbeat before the kill)
    # While it was down, what did not fit its input queue (16 masks, under half a second of belt) was
    # dropped at the sender and counted; a restart quick enough loses only what the killed process
    # held (bounded by that queue), and the restart itself is counted above.
    drops = sum(v for node in run["nodes"].values() for k, v in node["metrics"].items()
                if k == 'sortline_edge_drops_total{edge="infer.out->plan.in",reason="queue_full"}')
    assert 0 <= drops < 200
    # Only the killed stage was restarted: the rest carried on (the cameras never wait for a stage).
    assert [n for n, node in run["nodes"].items() if node["restarts"]] == ["plan"], err[-4000:]
    assert run["nodes"]["infer"]["status"]["strips"] > 0


@pytest.mark.system
def test_a_stalled_stage_drops_and_counts_while_the_recording_loses_nothing(tmp_path, run_dir):
    """The demo pipeline with every source recorded; the model's stage is frozen (SIGSTOP) for 1.5 s
    under load. The live edge into it drops and counts what does not fit its queue, the stage catches
    up when it thaws, and the lossless recorder beside the live consumers gets every camera frame."""
    from tests.test_recording import read_all

    port, udp = free_port(), free_port()
    cfg = tmp_path / "demo.toml"
    cfg.write_text(demo_toml(udp, graph={"name": "stall", "runtime_dir": str(run_dir)}, metrics={"port_base": port}))
    rec = tmp_path / "belt.mcap"
    # Long enough for a slow machine to start, stall and catch up; the test stops it as soon as it has.
    sup = start("run", "--config", str(cfg), "--seconds", "40", "--record", str(rec), "--report",
                str(tmp_path / "run.json"))
    try:
        # The recorder joins the graph, so the nodes' metric ports move: find the model's.
        def strips():
            seen = 0.0
            for p in range(port, port + 8):
                try:
                    seen = max(seen, metric(scrape(p), "sortline_messages_total", node="infer", direction="in"))
                except OSError:   # not up yet, or no node there
                    pass
            return seen

        wait_for(lambda: strips() > 30, timeout=30)
        # The recorder made the supervisor rewrite the config (in the runtime dir): find the node by that.
        pid = next(int(e.name) for e in Path("/proc").iterdir() if e.name.isdigit()
                   and _runs(e, "infer", str(run_dir)))
        os.kill(pid, signal.SIGSTOP)
        time.sleep(1.5)
        os.kill(pid, signal.SIGCONT)
        thawed = strips()
        wait_for(lambda: strips() > thawed + 30, timeout=10)     # it catches up and carries on
    finally:
        rc, out, err = stop(sup, timeout=60)
    assert rc == 0, err[-3000:]
    run = load_json(tmp_path / "run.json")
    restarts = {n: node["restarts"] for n, node in run["nodes"].items() if node["restarts"]}
    assert not restarts, (restarts, err[-3000:])                           # a stall is not a crash
    drops = sum(v for node in run["nodes"].values() for k, v in node["metrics"].items()
                if k.startswith('sortline_edge_drops_total{edge="register.out->infer.in"'))
    assert drops > 0                                                      # counted, at the sender
    got = read_all(rec)
    belt = run["nodes"]["belt"]["status"]
    for stream in ("rgb", "hsi"):
        seqs = [h["seq"] for h, _ in got[stream]]
        assert seqs == list(range(belt[stream])), stream                   # every frame, in order


def _runs(proc: Path, node: str, run_dir: str) -> bool:
    try:
        argv = (proc / "cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return False
    return "node" in argv and node in argv and any(run_dir in a for a in argv)
