"""CURVE on tcp edges, with real sockets on loopback: known hosts get the stream, others are refused and counted."""

from __future__ import annotations

import pytest

import zmq
import zmq.auth

from conftest import (edge_toml, free_port, metric, node_toml, scrape, sortline, start, stop, wait_for,
                      write_config)


def curve_config(tmp_path, run_dir, port: int, metrics_port: int, server_key: str = "keys/cam.key"):
    res = sortline("keys", "cam", "--out", str(tmp_path / "keys"), timeout=60)
    assert res.returncode == 0, res.stderr
    (tmp_path / "authorized").mkdir()
    (tmp_path / "authorized" / "cam.key").write_bytes((tmp_path / "keys" / "cam.key").read_bytes())
    graph = (node_toml("camera", "pattern", "lines = 4, pixels = 64, bands = 3")
             + node_toml("sink", "sink")
             + edge_toml("camera.out", "sink.in")
             + f'address = "tcp://127.0.0.1:{port}"\nserver_key = "{server_key}"\npolicy = "bounded"\n')
    extra = (f'\n[security]\ncurve = true\nkey = "keys/cam.key_secret"\nauthorized = "authorized"\n'
             f"\n[metrics]\nport_base = {metrics_port}\n")
    return write_config(tmp_path / "c.toml", graph, run_dir, extra=extra)


def intruder(ctx, port: int, keys: tuple[bytes, bytes] | None, server_key: bytes | None) -> zmq.Socket:
    sock = ctx.socket(zmq.PULL)
    sock.linger = 0
    if keys is not None:
        sock.curve_publickey, sock.curve_secretkey = keys
        sock.curve_serverkey = server_key
    sock.connect(f"tcp://127.0.0.1:{port}")
    return sock


@pytest.mark.system
def test_a_known_host_gets_the_stream_and_a_peer_without_the_key_is_refused_and_counted(tmp_path, run_dir):
    port, metrics_port = free_port(), free_port()
    cfg = curve_config(tmp_path, run_dir, port, metrics_port)
    camera, sink = metrics_port, metrics_port + 1  # data-flow order
    sup = start("run", "--config", str(cfg))
    ctx = zmq.Context()
    try:
        wait_for(lambda: metric(scrape(sink), "sortline_messages_total", direction="in") > 50, timeout=60)
        server_key, _ = zmq.auth.load_certificate(str(tmp_path / "keys" / "cam.key"))
        strangers = [
            intruder(ctx, port, zmq.curve_keypair(), server_key),  # speaks CURVE, its key is not authorised
            intruder(ctx, port, None, None),  # does not speak CURVE at all
        ]
        wait_for(lambda: metric(scrape(camera), "sortline_auth_refused_total", node="camera") >= 1, timeout=30)
        got_before = metric(scrape(sink), "sortline_messages_total", direction="in")
        for sock in strangers:
            assert sock.poll(1500) == 0  # not one message reaches them
        # The known consumer keeps getting the stream meanwhile.
        wait_for(lambda: metric(scrape(sink), "sortline_messages_total", direction="in") > got_before + 50, timeout=30)
        cam = scrape(camera)
        assert metric(cam, "sortline_auth_refused_total", node="camera") == 1  # the stranger, once; the sink never
        for sock in strangers:
            sock.close()
    finally:
        ctx.term()
        rc, out, err = stop(sup, timeout=30)
    assert rc == 0, err[-3000:]
    assert "refused a connection from 127.0.0.1" in err


@pytest.mark.system
def test_curve_settings_that_cannot_work_stop_startup_with_one_line(tmp_path, run_dir):
    cfg = curve_config(tmp_path, run_dir, free_port(), 0, server_key="")
    res = sortline("check", "--config", str(cfg), timeout=60)
    assert res.returncode == 78
    assert "a tcp edge with security.curve needs server_key" in res.stderr
    cfg.write_text(cfg.read_text().replace('server_key = ""', 'server_key = "keys/cam.key"')
                   .replace("cam.key_secret", "missing.key_secret"))
    res = sortline("node", "sink", "--config", str(cfg), timeout=60)
    assert res.returncode == 78
    errors = [line for line in res.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and "security.key = " in errors[0] and "missing.key_secret" in errors[0], res.stderr
