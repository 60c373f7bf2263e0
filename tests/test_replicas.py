"""Replicated nodes: N processes fed round robin, merged back in order, a replica killed, config errors."""

from __future__ import annotations

import os
import signal
import sys
import time

import pytest

from conftest import (demo_toml, edge_toml, free_port, load_json, metric, node_toml, pid_of, scrape, sortline, start,
                      stop, wait_for, write_config)
from sortline.pipeline.config import ConfigError
from sortline.pipeline.graph import cpus_of, edges, load_config, processes, topo_order
from sortline.pipeline.messages import Header, Message
from sortline.pipeline.reorder import Reorder

FRAME = "lines = 4, pixels = 64, bands = 3"


def replicated(camera: str, relay: str = "replicas = 2", policy: str = "lossless", sink: str = "",
               edge_keys: tuple[str, str] = ("", "")) -> str:
    """camera -> relay (replicated) -> sink; edge_keys: more TOML for each of the two edges."""
    def edge(src: str, dst: str, keys: str) -> str:
        return edge_toml(src, dst) + f'policy = "{policy}"\n' + keys + "\n"

    return (node_toml("camera", "pattern", camera) + node_toml("relay", "relay") + relay + "\n"
            + node_toml("sink", "sink", sink) + edge("camera.out", "relay.in", edge_keys[0])
            + edge("relay.out", "sink.in", edge_keys[1]))


def report(path) -> dict:
    return load_json(path)["nodes"]


def messages(node: dict, direction: str, which: str = "totals") -> float:
    return sum(v for k, v in node[which].items() if k.startswith("sortline_messages_total") and direction in k)


def restarted(name: str, old_pid: int, config: str) -> bool:
    try:
        return pid_of("node", name, config) != old_pid
    except LookupError:   # between the death and the restart
        return False


# The merge on its own: values in, values out.

def _msg(seq: int) -> Message:
    return Message(Header(stream="s", seq=seq))


def _seqs(out) -> list[tuple[int, bool]]:
    return [(m.header.seq, m.header.gap) for m, _ in out]


def _merge(name: str, window: int, lossless: bool = False, timeout_s: float = 10) -> Reorder:
    """A merge of two replicas; its counters (this process's, labelled by name) start at 0 for a new name."""
    return Reorder(name, replicas=2, window=window, timeout_s=timeout_s, lossless=lossless,
                   warn=lambda kind, text: None)


def test_the_merge_puts_messages_back_in_order_and_flags_what_never_came():
    merge = _merge("order", window=3)
    push = lambda seq, replica: _seqs(merge.push(_msg(seq), 0, replica))  # noqa: E731
    assert push(1, 1) == []                                  # not started: waits for a message from each replica
    assert push(0, 0) == [(0, False), (1, False)]
    assert push(3, 1) == [] and push(2, 0) == [(2, False), (3, False)]
    assert push(5, 0) == []                                  # 4 may still come from replica 1
    assert push(6, 1) == [(5, True), (6, False)]             # both replicas are past 4: a gap, at once
    assert push(8, 0) == [] and push(9, 0) == []
    assert push(10, 0) == [(8, True), (9, False), (10, False)]   # live edge, window full: 7 is given up
    assert merge.gaps._value.get() == 2 and merge.missing._value.get() == 2
    assert push(7, 1) == []                                  # late: dropped, counted, never spliced in
    assert merge.late._value.get() == 1
    assert push(11, 1) == [(11, False)]
    assert push(0, 0) == [] and push(1, 1) == [(0, False), (1, False)]   # the producer started again


def test_a_lossless_merge_waits_for_what_may_still_come_and_holds_back_a_replica_that_runs_ahead():
    merge = _merge("lossless", window=2, lossless=True)
    push = lambda seq, replica: _seqs(merge.push(_msg(seq), 0, replica))  # noqa: E731
    assert push(0, 0) == [] and push(2, 0) == []
    assert merge.blocked(0) and not merge.blocked(1)         # full: read replica 1, which has the next one
    assert push(1, 1) == [(0, False), (1, False), (2, False)]
    assert push(4, 0) == [] and push(5, 0) == [] and merge.blocked(0)
    assert merge.due_ns() is None                             # no timeout: 3 is not given up while it may come
    assert push(3, 1) == [(3, False), (4, False), (5, False)] and not merge.blocked(0)
    assert push(7, 0) == [] and push(8, 1) == [(7, True), (8, False)]   # 6 died with replica 1
    assert push(10, 0) == [] and _seqs(merge.ended(1)) == [(10, True)]
    assert merge.missing._value.get() == 2


def test_a_held_message_waits_no_longer_than_the_timeout():
    merge = _merge("timeout", window=8, timeout_s=0.05)
    merge.push(_msg(0), 0, 0), merge.push(_msg(1), 0, 1)
    assert _seqs(merge.push(_msg(3), 0, 1)) == []
    assert _seqs(merge.expire(time.monotonic_ns())) == []
    time.sleep(0.06)
    assert _seqs(merge.expire(time.monotonic_ns())) == [(3, True)]
    assert merge.due_ns() is None


# The graph expansion: one place turns replicas into processes, edges and cores.

def test_replicas_expand_into_processes_edges_and_cores(tmp_path, run_dir):
    cfg = write_config(tmp_path / "c.toml", replicated(FRAME, 'replicas = 2\ncpus = [0, 1]'), run_dir,
                       extra="\n[metrics]\nport_base = 9100\n")
    settings = load_config(cfg)
    assert processes(settings) == ["camera", "relay#0", "relay#1", "sink"]
    assert topo_order(settings) == ["camera", "relay#0", "relay#1", "sink"]
    assert cpus_of(settings, "relay#0") == [0] and cpus_of(settings, "relay#1") == [1]
    by_name = {e.name: e for e in edges(settings)}
    assert set(by_name) == {"camera.out->relay#0.in", "camera.out->relay#1.in", "relay#0.out->sink.in",
                            "relay#1.out->sink.in"}
    assert [by_name[f"camera.out->relay#{i}.in"].lane for i in (0, 1)] == [0, 1]   # one pool, a lane each
    assert all(by_name[f"camera.out->relay#{i}.in"].fanout == 2 for i in (0, 1))
    merge = by_name["relay#1.out->sink.in"]
    assert (merge.merge, merge.replica, merge.window, merge.timeout_s) == (2, 1, 8, 0.05)
    assert merge.configured == "relay.out->sink.in"


@pytest.mark.parametrize("graph, line", [
    (replicated(FRAME, "replicas = 0"), "nodes.relay.replicas = 0: Input should be greater than or equal to 1"),
    (replicated(FRAME, "replicas = 3\ncpus = [0, 1]"),
     "nodes.relay.replicas = 3 with cpus = [0, 1]: each replica needs its own cores"),
    (replicated(FRAME, "replicas = 2\ncpus = [0, 1, 2, 3]"), None),   # two cores each: fine
    (replicated(FRAME, "").replace('[nodes.camera]\nkind = "pattern"', '[nodes.camera]\nkind = "pattern"\nreplicas = 2'),
     "nodes.camera.replicas = 2: a source (a node without inputs) cannot have replicas"),
    (replicated(FRAME, "replicas = 2").replace('kind = "sink"', 'kind = "relay"\nreplicas = 2')
     + node_toml("end", "sink") + edge_toml("sink.out", "end.in"),
     "edges[1]: relay and sink both have replicas: an edge between two replicated nodes is not supported"),
    (replicated(FRAME, "replicas = 2", edge_keys=('address = "tcp://127.0.0.1:5601"', "")),
     "edges[0].address = 'tcp://127.0.0.1:5601': a tcp edge at a node with replicas = 2 needs one address per "
     "replica"),
    (replicated(FRAME, "replicas = 2", edge_keys=('address = ["tcp://127.0.0.1:5601"]', "")),
     "edges[0].address: 1 entries for relay, which has replicas = 2"),
])
def test_replicas_that_cannot_work_are_one_clear_line_each(tmp_path, run_dir, graph, line):
    cfg = write_config(tmp_path / "c.toml", graph, run_dir)
    if line is None:
        load_config(cfg)
        return
    with pytest.raises(ConfigError) as exc:
        load_config(cfg)
    assert len(exc.value.lines) == 1 and line in exc.value.lines[0], exc.value.lines


# Real processes and sockets.

@pytest.mark.system
def test_a_replicated_stage_delivers_every_message_once_and_in_order(tmp_path, run_dir):
    sent = 600
    graph = replicated(f"{FRAME}, count = {sent}, paced = false",
                       sink=f'report = "{tmp_path / "sink.json"}"')
    cfg = write_config(tmp_path / "c.toml", graph, run_dir)
    res = sortline("run", "--config", str(cfg), "--seconds", "60", "--report", str(tmp_path / "run.json"),
                   timeout=90)
    assert res.returncode == 0, res.stderr[-3000:]
    sink, nodes = load_json(tmp_path / "sink.json"), report(tmp_path / "run.json")
    assert (sink["received"], sink["lost"], sink["reordered"], sink["corrupt"], sink["gap_flags"]) == (sent, 0, 0, 0, 0)
    share = [messages(nodes[f"relay#{i}"], 'direction="in"') for i in (0, 1)]
    assert sum(share) == sent and min(share) > 0, share      # each message went to one replica, both worked
    assert {"relay#0", "relay#1"} <= set(nodes) and "relay" not in nodes
    assert "relay#0" in res.stdout and "relay#1" in res.stdout   # the status table names the replicas


@pytest.mark.system
def test_a_killed_replica_is_a_counted_gap_and_the_merge_carries_on(tmp_path, run_dir):
    """One replica is frozen (SIGSTOP) so that it surely holds messages, then killed with SIGKILL: what it held
    is a gap, counted and flagged; the other replica carries the stream meanwhile; the restarted one rejoins."""
    graph = replicated("pixels = 64, bands = 3, speed_m_s = 6", policy="bounded",   # 200 frames/s
                       sink=f'report = "{tmp_path / "sink.json"}"')
    port = free_port()
    cfg = write_config(tmp_path / "c.toml", graph, run_dir, extra=f"\n[metrics]\nport_base = {port}\n")
    sup = start("run", "--config", str(cfg), "--report", str(tmp_path / "run.json"))
    try:
        relay1, sink = port + 2, port + 3   # camera, relay#0, relay#1, sink: data-flow order
        wait_for(lambda: metric(scrape(sink), "sortline_messages_total", direction="in") > 100, timeout=30)
        victim = pid_of("node", "relay#1", str(cfg))
        os.kill(victim, signal.SIGSTOP)
        time.sleep(0.5)
        os.kill(victim, signal.SIGKILL)
        wait_for(lambda: restarted("relay#1", victim, str(cfg)), timeout=10)
        # `sortline status` names the replicas, each on its own metrics port; the restarted one is up again.
        status = wait_for(lambda: (res := sortline("status", "--config", str(cfg), "--interval", "0.3",
                                                    timeout=30)).returncode == 0 and res.stdout, timeout=30)
        rows = {line.split()[0]: line.split()[1] for line in status.splitlines()[1:]}
        assert rows == {"camera": "up", "relay#0": "up", "relay#1": "up", "sink": "up"}, status
        wait_for(lambda: metric(scrape(relay1), "sortline_messages_total", direction="in") > 50, timeout=30)
    finally:
        rc, out, err = stop(sup, timeout=60)
    assert rc == 0, err[-3000:]
    sink, nodes = load_json(tmp_path / "sink.json"), report(tmp_path / "run.json")
    assert nodes["relay#1"]["restarts"] == 1 and nodes["relay#0"]["restarts"] == 0
    assert messages(nodes["relay#1"], 'direction="in"', "metrics") > 50   # the new process got its share again
    gaps = sum(v for k, v in nodes["sink"]["totals"].items() if k.startswith("sortline_reorder_gaps_total"))
    missing = sum(v for k, v in nodes["sink"]["totals"].items() if k.startswith("sortline_reorder_missing_total"))
    assert gaps >= 1 and missing >= 1
    assert sink["reordered"] == 0 and sink["corrupt"] == 0          # order kept, nothing twice
    assert sink["lost"] == missing and sink["gap_flags"] == gaps     # every hole is a counted, flagged gap
    assert "relay.out->sink.in: message" in err and "never came" in err


@pytest.mark.system
def test_replicas_join_over_tcp_with_curve(tmp_path, run_dir):
    res = sortline("keys", "host", "--out", str(tmp_path / "keys"), timeout=60)
    assert res.returncode == 0, res.stderr
    (tmp_path / "authorized").mkdir()
    (tmp_path / "authorized" / "host.key").write_bytes((tmp_path / "keys" / "host.key").read_bytes())
    ports = [free_port() for _ in range(4)]
    sent = 300
    keys = 'server_key = ["keys/host.key", "keys/host.key"]\naddress = '
    graph = replicated(f"{FRAME}, count = {sent}, paced = false", sink=f'report = "{tmp_path / "sink.json"}"',
                       edge_keys=(f'{keys}["tcp://127.0.0.1:{ports[0]}", "tcp://127.0.0.1:{ports[1]}"]',
                                  f'{keys}["tcp://127.0.0.1:{ports[2]}", "tcp://127.0.0.1:{ports[3]}"]'))
    extra = '\n[security]\ncurve = true\nkey = "keys/host.key_secret"\nauthorized = "authorized"\n'
    cfg = write_config(tmp_path / "c.toml", graph, run_dir, extra=extra)
    res = sortline("run", "--config", str(cfg), "--seconds", "60", "--report", str(tmp_path / "run.json"),
                   timeout=90)
    assert res.returncode == 0, res.stderr[-3000:]
    sink, nodes = load_json(tmp_path / "sink.json"), report(tmp_path / "run.json")
    assert (sink["received"], sink["lost"], sink["reordered"], sink["corrupt"]) == (sent, 0, 0, 0)
    assert min(messages(nodes[f"relay#{i}"], 'direction="in"') for i in (0, 1)) > 0


def _demo_with_replicas(tmp_path, run_dir, name: str, **sections):
    cfg = tmp_path / "demo.toml"
    cfg.write_text(demo_toml(free_port(), graph={"name": name, "runtime_dir": str(run_dir)},
                             nodes={"infer": {"replicas": 2, "cpus": [0, 1]}}, **sections))
    return cfg


@pytest.mark.system
def test_the_demo_runs_with_two_infer_replicas(tmp_path, run_dir):
    port = free_port()
    cfg = _demo_with_replicas(tmp_path, run_dir, "demo-replicas", metrics={"port_base": port})
    order = topo_order(load_config(cfg))
    sup = start("run", "--config", str(cfg), "--report", str(tmp_path / "run.json"))
    try:
        for name in ("infer#0", "infer#1", "plan"):   # until both replicas have made masks and the plan took them
            wait_for(lambda: metric(scrape(port + order.index(name)), "sortline_messages_total", port="in",
                                    direction="in") > 20, timeout=60)
    finally:
        rc, out, err = stop(sup, timeout=60)
    assert rc == 0, err[-3000:]
    nodes = report(tmp_path / "run.json")
    assert "infer" not in nodes and all(nodes[f"infer#{i}"]["status"]["strips"] > 0 for i in (0, 1))
    assert all(node["restarts"] == 0 for node in nodes.values())
    # Every strip the register node made went to one replica, or was dropped and counted at the sender.
    made = nodes["register"]["status"]["strips"]
    dropped = sum(v for k, v in nodes["register"]["totals"].items()
                  if k.startswith('sortline_edge_drops_total{edge="register.out->infer#'))
    assert made > 10 and sum(messages(nodes[f"infer#{i}"], 'direction="in"') for i in (0, 1)) + dropped == made
    plan = nodes["plan"]["status"]
    assert plan["eject"] + plan["not_target"] > 0    # the masks, merged, became objects


@pytest.mark.system
def test_replicas_are_a_unit_each_under_systemd(tmp_path, run_dir):
    from test_service import verify

    cfg = _demo_with_replicas(tmp_path, run_dir, "demo-units")
    root = tmp_path / "root"
    res = sortline("install-service", "--config", str(cfg), "--root", str(root), "--prefix", sys.prefix, timeout=60)
    assert res.returncode == 0, res.stderr
    units = root / "etc/systemd/system"
    replicas = ["sortline@infer\\x230.service", "sortline@infer\\x231.service"]
    wants = sorted(p.name for p in (units / "sortline.target.wants").iterdir())
    assert set(replicas) <= set(wants) and "sortline@infer.service" not in wants
    register = (units / "sortline@register.service.d/node.conf").read_text()
    assert f"After={' '.join(replicas)}\n" in register
    res = verify(units, "sortline.target", *wants)
    assert res.returncode == 0 and res.stderr == "" and res.stdout == "", res.stderr
