"""`sortline status` against a running graph's Prometheus endpoints."""

from __future__ import annotations

import pytest

from conftest import chain, free_port, metric, scrape, sortline, start, stop, wait_for, write_config


def table(stdout: str) -> dict[str, list[str]]:
    """Rows by node name, cells split on runs of two spaces."""
    import re

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
