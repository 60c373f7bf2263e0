"""`sortline status` against a running graph's Prometheus endpoints."""

from __future__ import annotations

import pytest

import platform
import re
from importlib.metadata import version

from conftest import chain, demo_toml, free_port, metric, scrape, sortline, start, stop, wait_for, write_config
from sortline.pipeline import metrics
from sortline.pipeline.graph import load_config, topo_order


def table(stdout: str) -> dict[str, list[str]]:
    """Rows by node name, cells split on runs of two spaces."""
    lines = stdout.strip().splitlines()
    return {cells[0]: cells for cells in (re.split(r"\s{2,}", line.strip()) for line in lines[1:])}


@pytest.mark.system
def test_status_shows_each_node_rates_and_latency_then_down_when_stopped(tmp_path, run_dir):
    port = free_port()
    cfg = write_config(tmp_path / "c.toml", chain("lines = 4, pixels = 64, bands = 3"), run_dir,
                       extra=f"\n[metrics]\nport_base = {port}\n")
    sup = start("run", "--config", str(cfg))
    try:
        wait_for(lambda: metric(scrape(port + 2), "sortline_messages_total", direction="in") > 100, timeout=60)
        res = sortline("status", "--config", str(cfg), timeout=60)
        assert res.returncode == 0, res.stderr
        rows = table(res.stdout)
        assert res.stdout.splitlines()[0].split()[:4] == ["node", "state", "in/s", "out/s"]
        assert list(rows) == ["camera", "relay", "sink"]  # data-flow order
        assert all(r[1] == "up" for r in rows.values())
        # The pattern camera sends 533 frames of 4 lines a second (2133 lines/s at 2 m/s).
        camera, relay, sink = rows["camera"], rows["relay"], rows["sink"]
        assert float(camera[2]) == 0 and 200 < float(camera[3]) < 800
        assert 200 < float(relay[2]) < 800 and 800 < float(relay[4]) < 3200
        assert 200 < float(sink[2]) < 800 and sink[5:8] == ["0", "0", "0"]
        assert sink[8].startswith("<= ") and sink[8].endswith(" ms")  # e2e p50 from the sink's histogram
        assert camera[8] == "-"  # a source measures no end-to-end latency
    finally:
        rc, _, err = stop(sup, timeout=30)
    assert rc == 0, err[-2000:]
    res = sortline("status", "--config", str(cfg), "--interval", "0.1", timeout=60)
    assert res.returncode == 3
    assert all(r[1] == "down" for r in table(res.stdout).values())


@pytest.mark.system
def test_status_needs_metrics(tmp_path, run_dir):
    cfg = write_config(tmp_path / "c.toml", chain(), run_dir)
    res = sortline("status", "--config", str(cfg), timeout=60)
    assert res.returncode == 78 and "metrics.port_base is 0" in res.stderr


@pytest.mark.system
def test_a_second_supervisor_of_a_running_graph_is_refused(tmp_path, run_dir):
    """Two supervisors of one graph would bind the same sockets and take each other's messages."""
    port = free_port()
    graph = chain("lines = 4, pixels = 64, bands = 3")
    cfg = write_config(tmp_path / "c.toml", graph, run_dir, extra=f"\n[metrics]\nport_base = {port}\n")
    other = write_config(tmp_path / "d.toml", graph, run_dir, extra=f"\n[metrics]\nport_base = {free_port()}\n")
    sup = start("run", "--config", str(cfg))
    try:
        wait_for(lambda: metric(scrape(port + 2), "sortline_messages_total", direction="in") > 10, timeout=60)
        second = sortline("run", "--config", str(other), "--seconds", "5", timeout=60)
        assert second.returncode == 78, second.stderr[-2000:]
        assert f"graph test is already running in {run_dir} (supervisor pid {sup.pid})" in second.stderr
        # The first one lost nothing to it.
        before = metric(scrape(port + 2), "sortline_messages_total", direction="in")
        wait_for(lambda: metric(scrape(port + 2), "sortline_messages_total", direction="in") > before + 10)
    finally:
        rc, _, err = stop(sup, timeout=30)
    assert rc == 0, err[-2000:]
    # Once it is gone, the graph starts again.
    again = sortline("run", "--config", str(other), "--seconds", "2", timeout=60)
    assert again.returncode == 0, again.stderr[-2000:]


@pytest.mark.system
def test_status_of_the_demo_graph_shows_the_ejectors_latency_and_every_node_its_build(tmp_path, run_dir):
    """The ejector observes end-to-end latency where commands leave (exposure -> sent) and its decision latency;
    `sortline status` shows both in its row. Every node's endpoint says what it runs (sortline_build_info).
    The whole demo graph, the shipped model included: the latency a line would see."""
    port = free_port()
    cfg = tmp_path / "demo.toml"
    cfg.write_text(demo_toml(free_port(), metrics={"port_base": port},
                             graph={"name": "status", "runtime_dir": str(run_dir)}))
    settings = load_config(cfg)
    ports = {name: metrics.port_of(settings, name) for name in topo_order(settings)}
    sup = start("run", "--config", str(cfg))
    try:
        ejector = ports["ejector"]
        wait_for(lambda: metric(scrape(ejector), "sortline_latency_seconds_count") >= 20, timeout=120)

        def ejector_row():   # of a reading whose 2 s held commands (a loaded machine can hold them all back)
            res = sortline("status", "--config", str(cfg), "--interval", "2", timeout=60)
            assert res.returncode == 0, res.stdout + res.stderr
            row = table(res.stdout)["ejector"]
            return row if row[8] != "-" else None

        row = wait_for(ejector_row, timeout=60)
        samples = scrape(ejector)
        builds = {name: [k for k, v in scrape(p).items() if k.startswith("sortline_build_info{") and v == 1]
                  for name, p in ports.items()}
    finally:
        rc, _, err = stop(sup, timeout=30)
    assert rc == 0, err[-2000:]
    # A command leaves by its deadline: the belt's 150 ms from the scan line to the valves less the valve's
    # opening (5 ms) and the driver's latency (1 ms) after the object's front was taken, so at most 144 ms
    # after the last lines it was decided on (the front's or later ones).
    e2e = metric(samples, "sortline_latency_seconds_sum") / metric(samples, "sortline_latency_seconds_count")
    decision = (metric(samples, "sortline_ejector_decision_seconds_sum")
                / metric(samples, "sortline_ejector_decision_seconds_count"))
    assert 0.005 < e2e < 0.15 and 0 < decision < 10, (e2e, decision)
    p50, p99 = (float(cell.removeprefix("<= ").removesuffix(" ms")) for cell in row[8:10])
    assert 5 <= p50 <= 140 and p50 <= p99 <= 200, row   # bucket bounds: 140 ms, then 200 ms
    assert "decision p99 <= " in row[10], row
    expect = {"version": version("sortline"), "python": platform.python_version()}
    for name, keys in builds.items():
        (key,) = keys
        labels = dict(re.findall(r'(\w+)="([^"]*)"', key))
        assert labels | expect == labels and labels["node"] == name, key
        assert "onnxruntime" in labels["backends"].split(","), key   # the infer node runs on it
