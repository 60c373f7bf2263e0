"""`sortline install-service` and the shipped systemd units, checked by systemd's own tools."""

from __future__ import annotations

import pytest

import os
import shutil
import subprocess
import sys

from conftest import DEMO, edge_toml, node_toml, sortline, write_config


def verify(unit_dir, *units) -> subprocess.CompletedProcess:
    # Instances are loaded from the unit directory with their drop-ins, as systemd would.
    env = {**os.environ, "SYSTEMD_UNIT_PATH": f"{unit_dir}:"}
    return subprocess.run(["systemd-analyze", "verify", "--man=no", *units], capture_output=True, text=True,
                          env=env, cwd=unit_dir, timeout=120)


@pytest.mark.system
def test_installed_units_verify_clean_with_the_config_and_the_order_of_the_graph(tmp_path):
    assert shutil.which("systemd-analyze"), "systemd's tools are missing: `make test` installs them"
    root = tmp_path / "root"
    res = sortline("install-service", "--config", str(DEMO), "--root", str(root), "--prefix", sys.prefix,
                   "--realtime-cpus", "0", timeout=60)
    assert res.returncode == 0, res.stderr
    etc, units = root / "etc/sortline", root / "etc/systemd/system"
    assert (etc / "sortline.toml").read_text() == DEMO.read_text()
    # The calibration files the demo names relative to itself go beside it, so it loads from there.
    for name in ("demo-spectral.npz", "demo-spatial.json"):
        assert (etc / "calibration" / name).read_bytes() == (DEMO.parent / "calibration" / name).read_bytes()
    assert sortline("check", "--config", str(etc / "sortline.toml"), timeout=60).returncode == 0

    template = (units / "sortline@.service").read_text()
    assert f"ExecStart={sys.prefix}/bin/sortline node %I --config /etc/sortline/sortline.toml\n" in template
    for line in ("Type=notify", "WatchdogSec=5s", "Restart=on-failure", "RestartPreventExitStatus=78",
                 "NoNewPrivileges=yes", "ProtectSystem=strict", "StateDirectory=sortline", "RuntimeDirectory=sortline"):
        assert f"\n{line}\n" in template, line
    # Consumers start first (each READY once set up), sources stop first.
    def after(node):
        text = (units / f"sortline@{node}.service.d/node.conf").read_text()
        return next((line[6:].split() for line in text.splitlines() if line.startswith("After=")), [])

    assert after("belt") == ["sortline@ejector.service", "sortline@plan.service", "sortline@register.service",
                            "sortline@valve_sim.service"]
    assert after("register") == ["sortline@infer.service", "sortline@live_view.service"]
    assert after("infer") == ["sortline@live_view.service", "sortline@plan.service"]
    assert after("valve_sim") == []
    # The ejector, and only it, fires valves: real-time priority, on the CPUs given.
    realtime = (units / "sortline@ejector.service.d/realtime.conf").read_text()
    assert "CPUSchedulingPolicy=fifo\n" in realtime and realtime.endswith("CPUAffinity=0\n")
    assert "CPUSchedulingResetOnFork=no\n" in realtime   # else the threads it starts run at normal priority
    assert sorted(p.parent.name for p in units.glob("*/realtime.conf")) == ["sortline@ejector.service.d"]
    wants = sorted(p.name for p in (units / "sortline.target.wants").iterdir())
    assert wants == ["sortline-control.service"] + [
        f"sortline@{n}.service" for n in ("belt", "ejector", "infer", "live_view", "plan", "register", "valve_sim")]
    # The control process (recipes, OPC UA): this installation's sortline, up before every node, watching all.
    control = (units / "sortline-control.service").read_text()
    assert f"ExecStart={sys.prefix}/bin/sortline control --config /etc/sortline/sortline.toml\n" in control
    assert "\nType=notify\n" in control and "\nUser=sortline\n" in control and "\nRuntimeDirectory=sortline\n" in control
    nodes_conf = (units / "sortline-control.service.d/nodes.conf").read_text()
    before = next(line[7:].split() for line in nodes_conf.splitlines() if line.startswith("Before="))
    assert sorted(before) == wants[1:] and "ExecStart" not in nodes_conf
    assert os.readlink(units / "sortline.target.wants/sortline@infer.service") == "../sortline@.service"
    assert (units / "multi-user.target.wants/sortline.target").resolve() == units / "sortline.target"

    # The service user, as systemd-sysusers makes it at boot.
    res = subprocess.run(["systemd-sysusers", f"--root={root}"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert "\nsortline:x:" in "\n" + (root / "etc/passwd").read_text()

    # Unknown keys and bad values are only warnings to systemd: any output is a failure.
    res = verify(units, "sortline.target", *wants)
    assert res.returncode == 0 and res.stderr == "" and res.stdout == "", res.stderr


@pytest.mark.system
def test_verify_catches_a_broken_unit(tmp_path):
    # The check above can fail: a misspelt key in a drop-in is reported.
    root = tmp_path / "root"
    assert sortline("install-service", "--config", str(DEMO), "--root", str(root), "--prefix", sys.prefix,
                    "--nodes", "valve_sim", timeout=60).returncode == 0
    units = root / "etc/systemd/system"
    assert sorted(p.name for p in (units / "sortline.target.wants").iterdir()) == ["sortline-control.service",
                                                                                  "sortline@valve_sim.service"]
    # The control process of a host with some of the nodes watches those.
    assert (f"ExecStart={sys.prefix}/bin/sortline control --config /etc/sortline/sortline.toml --nodes valve_sim\n"
            in (units / "sortline-control.service.d/nodes.conf").read_text())
    assert verify(units, "sortline-control.service").stderr == ""
    (units / "sortline@valve_sim.service.d/node.conf").write_text("[Service]\nRestartPreventExitStatuss=78\n")
    res = verify(units, "sortline@valve_sim.service")
    assert "Unknown key 'RestartPreventExitStatuss'" in res.stderr


@pytest.mark.system
def test_install_refuses_a_bad_config_a_wrong_prefix_and_unknown_nodes(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text(DEMO.read_text().replace("speed_m_s = 2.0", "speed_m_s = -2.0"))
    cases = [
        (["--config", str(bad)], "belt.speed_m_s = -2.0: Input should be greater than or equal to 0.01"),
        (["--config", str(DEMO), "--prefix", str(tmp_path)], f"{tmp_path}/bin/sortline is not an executable"),
        (["--config", str(DEMO), "--prefix", sys.prefix, "--nodes", "belt,camera"], "no node named 'camera'"),
    ]
    for args, expected in cases:
        res = sortline("install-service", "--root", str(tmp_path / "root"), *args, timeout=60)
        assert res.returncode == 78 and expected in res.stderr, res.stderr
        assert len(res.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "root").exists()  # nothing half-installed



@pytest.mark.system
def test_a_restarted_node_removes_the_slot_segments_its_dead_predecessor_left(tmp_path, run_dir):
    # Under systemd no supervisor cleans up after a node that died: the node does, as it starts.
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    left = run_dir / f"camera.out.{dead}.1.slots"
    other = run_dir / f"camera.out.{os.getpid()}.1.slots"  # a live process's: not touched
    for path in (left, other):
        path.write_bytes(b"\0" * 4096)
    graph = (node_toml("camera", "pattern", "count = 1") + node_toml("sink", "sink")
             + edge_toml("camera.out", "sink.in") + 'policy = "bounded"\n')  # no sink runs: nothing waits for it
    cfg = write_config(tmp_path / "c.toml", graph, run_dir)
    res = sortline("node", "camera", "--config", str(cfg), timeout=60)
    assert res.returncode == 0, res.stderr
    assert not left.exists() and other.exists()
    assert f"removed {left.name}, left by an earlier process of this node" in res.stderr
