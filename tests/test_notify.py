"""The sd_notify protocol as systemd sees it: a real datagram listener on NOTIFY_SOCKET."""

from __future__ import annotations

import pytest

import os
import socket
import time

from conftest import edge_toml, node_toml, start, stop, wait_for, write_config


class Listener:
    """What systemd's end of NOTIFY_SOCKET receives: (time, {key: value}) per datagram."""

    def __init__(self, path):
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.settimeout(0.05)
        self.got: list[tuple[float, dict]] = []

    def env(self, watchdog_usec: int = 600_000) -> dict:
        return {**os.environ, "NOTIFY_SOCKET": self.path, "WATCHDOG_USEC": str(watchdog_usec)}

    def drain(self) -> list[tuple[float, dict]]:
        while True:
            try:
                data = self.sock.recv(4096)
            except (TimeoutError, BlockingIOError):
                return self.got
            fields = dict(line.split("=", 1) for line in data.decode().splitlines())
            self.got.append((time.monotonic(), fields))

    def with_key(self, key: str) -> list[tuple[float, dict]]:
        return [(t, f) for t, f in self.drain() if key in f]

    def close(self):
        self.sock.close()


@pytest.mark.system
def test_ready_after_setup_watchdog_from_the_loop_stops_while_it_stalls_then_stopping(tmp_path, run_dir):
    # The sink takes 3 s over the one message: its loop stalls, and so must its pings.
    # Then the end of stream: the sink finishes by itself.
    graph = (node_toml("camera", "pattern", "lines = 4, pixels = 64, bands = 3, count = 1")
             + node_toml("sink", "sink", "delay_ms = 3000") + edge_toml("camera.out", "sink.in"))
    cfg = write_config(tmp_path / "c.toml", graph, run_dir)
    listener = Listener(run_dir / "notify.sock")
    sink = start("node", "sink", "--config", str(cfg), env=listener.env())
    camera = None
    try:
        wait_for(lambda: len(listener.with_key("WATCHDOG")) >= 4, timeout=30)
        first = listener.got[0][1]
        assert first["READY"] == "1"  # READY before any ping, and only once setup is done
        assert first["STATUS"].startswith("running (pid ")
        pings = listener.with_key("WATCHDOG")
        assert all(f["STATUS"].startswith("in 0.0/s, out 0.0/s, 0 dropped, 0 malformed") for _, f in pings)
        assert all("received=0" in f["STATUS"] for _, f in pings)  # the node's own figures ride along

        camera = start("node", "camera", "--config", str(cfg))
        # The first ping that counts a message comes after the 3 s the loop spent on it.
        wait_for(lambda: any("received=1" in f["STATUS"] for _, f in listener.with_key("WATCHDOG")), timeout=30)
        pings = listener.with_key("WATCHDOG")
        idle = [t for t, f in pings if "received=0" in f["STATUS"]]
        busy = [t for t, f in pings if "received=1" in f["STATUS"]]
        # Pings resume with the loop; none came while it was stuck.
        assert busy[0] - idle[-1] >= 3.0, "a watchdog ping was sent while the loop was stuck"
        sink.wait(timeout=60)  # the end of stream finishes it
    finally:
        rc, _, err = stop(sink, timeout=30)
        if camera is not None:
            stop(camera, timeout=30)
        listener.drain()
        listener.close()
    assert rc == 0, err[-2000:]
    keys = [f for _, f in listener.got]
    assert sum("READY" in f for f in keys) == 1
    stopping = next(i for i, f in enumerate(keys) if "STOPPING" in f)
    assert not any("WATCHDOG" in f for f in keys[stopping:])  # nothing pings for a node on its way out


@pytest.mark.system
def test_a_node_that_fails_setup_never_says_ready(tmp_path, run_dir):
    graph = (node_toml("camera", "pattern") + node_toml("sink", "sink", f'report = "{tmp_path}/no/such/dir/sink.json"')
             + edge_toml("camera.out", "sink.in"))
    cfg = write_config(tmp_path / "c.toml", graph, run_dir)
    listener = Listener(run_dir / "notify.sock")
    try:
        sink = start("node", "sink", "--config", str(cfg), env=listener.env())
        _, err = sink.communicate(timeout=60)
        rc = sink.returncode
        listener.drain()
    finally:
        listener.close()
    assert rc == 78
    assert not any("READY" in f or "WATCHDOG" in f for _, f in listener.got)
    lines = [line for line in err.splitlines() if " ERROR " in line]
    assert len(lines) == 1 and "directory" in lines[0] and "not writable" in lines[0], err
