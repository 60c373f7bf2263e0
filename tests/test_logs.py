"""Log lines for journald under systemd, with their own time stamps elsewhere."""

from __future__ import annotations

import pytest

import os
import re
import subprocess
import sys
import threading

from conftest import ROOT, chain, free_port, write_config

STAMP = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d")


def logged(*args: str, journal: bool, timeout: float = 120) -> tuple[int, int, list[str]]:
    """Run `sortline ARGS` with its stderr on a pipe, JOURNAL_STREAM naming that pipe (as systemd names the
    journal's stream) or another stream (a shell started from a service inherits the variable); returns the
    exit code, the pid and the stderr lines of the process and of every node process it started."""
    read, write = os.pipe()
    st = os.fstat(write)
    env = {k: v for k, v in os.environ.items() if k not in ("JOURNAL_STREAM", "INVOCATION_ID")}
    env["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}" if journal else f"{st.st_dev}:{st.st_ino + 1}"
    proc = subprocess.Popen([sys.executable, "-m", "sortline", *args], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=write, cwd=ROOT, env=env)
    os.close(write)
    text: list[str] = []
    with os.fdopen(read, errors="replace") as fh:   # read while it runs: a full pipe would stop the writers
        reader = threading.Thread(target=lambda: text.append(fh.read()), daemon=True)
        reader.start()
        rc = proc.wait(timeout)
        reader.join(timeout)   # EOF once the node processes, which share the pipe, are gone too
    assert text, "a node process kept stderr open after the supervisor ended"
    return rc, proc.pid, text[0].splitlines()


def graph(tmp_path, run_dir, sink: str = ""):
    """camera -> relay -> sink over tcp edges without synchronised clocks: the sink warns at setup that it
    reports no end-to-end latency."""
    addresses = (f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}")
    return write_config(tmp_path / "c.toml", chain("lines = 4, pixels = 64, bands = 3", sink, addresses=addresses),
                        run_dir)


def node_lines(lines: list[str], supervisor_pid: int) -> list[str]:
    """The lines of node processes saying they run (each names its own pid)."""
    return [line for line in lines if "running (pid " in line
            and int(line.rsplit("running (pid ", 1)[1].rstrip(")")) != supervisor_pid]


@pytest.mark.system
def test_under_journald_lines_carry_a_priority_and_no_time_stamp_in_every_node(tmp_path, run_dir):
    rc, pid, lines = logged("run", "--config", str(graph(tmp_path, run_dir)), "--seconds", "2", journal=True)
    assert rc == 0, lines[-20:]
    assert lines and all(re.match(r"<[2-7]>sortline", line) for line in lines), lines
    assert not [line for line in lines if STAMP.search(line)]
    # The node processes the supervisor started log the same way (info: <6>), and the sink's warning is one.
    started = node_lines(lines, pid)
    assert len(started) == 3 and all(line.startswith("<6>sortline.") and " INFO " in line for line in started)
    assert ("<4>sortline.sink WARNING end-to-end latency not reported: its path crosses tcp edges "
            "(camera.out->relay.in, relay.out->sink.in) and clock.ptp_synchronised is false") in lines


@pytest.mark.system
def test_under_journald_errors_are_priority_3_those_printed_by_commands_too(tmp_path, run_dir):
    """`journalctl -p err` shows why a node did not start: its own line, the supervisor's, a config error."""
    cfg = graph(tmp_path, run_dir, sink=f'report = "{tmp_path}/no/such/dir/sink.json"')
    rc, _, lines = logged("run", "--config", str(cfg), journal=True)
    assert rc == 78, lines[-20:]
    assert any(line.startswith("<3>sortline.sink ERROR nodes.sink.params.report = ") for line in lines), lines
    assert "<3>sortline.supervisor ERROR sink cannot start: configuration error (see above); not restarting it" in lines
    bad = tmp_path / "bad.toml"
    bad.write_text(cfg.read_text().replace("speed_m_s = 2.0", "speed_m_s = 0"))
    rc, _, lines = logged("node", "sink", "--config", str(bad), journal=True)
    assert rc == 78
    assert lines == [f"<3>sortline: config error: {bad}: belt.speed_m_s = 0: Input should be greater than or "
                     "equal to 0.01"]


@pytest.mark.system
def test_elsewhere_lines_keep_their_time_stamp_and_no_priority(tmp_path, run_dir):
    """JOURNAL_STREAM naming another stream than stderr (a terminal opened from a service): today's format."""
    rc, pid, lines = logged("run", "--config", str(graph(tmp_path, run_dir)), "--seconds", "2", journal=False)
    assert rc == 0, lines[-20:]
    stamped = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} sortline\.\S+ (DEBUG|INFO|WARNING|ERROR) ")
    assert lines and all(stamped.match(line) for line in lines), lines
    assert len(node_lines(lines, pid)) == 3
    assert any(" sortline.sink WARNING end-to-end latency not reported" in line for line in lines)
