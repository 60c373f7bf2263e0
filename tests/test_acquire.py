"""GenICam acquisition against the simulated GenTL producer that ships with genicam (viky.cti).

viky offers three devices (serials 0, 1, 2), Width/Height 100..800, Mono8 and
RGBa8, up to ~187 frames/s, frame ids from 1 on every start, and none of the
line-scan features (trigger, line rate, exposure, encoder chunks). So an
800x100 RGBa8 frame stands in for 100 RGB lines, and a 160x224 Mono8 frame
for one hyperspectral line of 160 pixels x 224 bands. What viky cannot show
(Bayer, Mono12, encoder chunks) is tested on arrays in test_acquire_convert.py.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import threading
import time

import genicam
import numpy as np
import pytest
import zmq

from conftest import load_json, metric, sortline, start, stop, wait_for, write_config

VIKY = os.path.join(os.path.dirname(genicam.__file__), "viky.cti")
RGB = {"lines": 100, "ticks": 15, "pixels": 800}
# 100 frames/s, half of viky's rate, and a deep ring: on a loaded 2-core machine the
# node or its consumer can pause for tens of ms, and these tests check continuity, not how much
# load it takes to lose frames (benchmarks/acquire.py measures that).
RGB_FEATURES = [("Width", 800), ("Height", 100), ("PixelFormat", "RGBa8"), ("AcquisitionFrameRate", 100.0),
                # What a line-scan camera has and viky lacks: optional, so skipped with a log line.
                ("TriggerSelector", "LineStart", False), ("TriggerMode", "On", False),
                ("TriggerSource", "Encoder0", False), ("AcquisitionLineRate", 20000.0, False)]
HSI_FEATURES = [("Width", 160), ("Height", 224), ("PixelFormat", "Mono8"), ("AcquisitionFrameRate", 100.0)]


def toml(value) -> str:
    return json.dumps(value)  # TOML and JSON agree on strings, numbers and booleans


def acquire_node(features=RGB_FEATURES, name="camera", **params) -> str:
    lines = [f"[nodes.{name}]", 'kind = "acquire"', "", f"[nodes.{name}.params]"]
    lines += [f"{k} = {toml(v)}" for k, v in {"serial": "1", "ring": 64, **params}.items()]
    lines.append("features = [")
    for name_, value, *required in features:
        opt = f", required = {toml(required[0])}" if required else ""
        lines.append(f"  {{ name = {toml(name_)}, value = {toml(value)}{opt} }},")
    lines.append("]")
    return "\n".join(lines) + "\n"


def camera_config(tmp_path, run_dir, node: str, sink: str = "", policy: str = "lossless", hwm: int = 4):
    """acquire -> sink, over shared memory; the machine's cameras sized as viky delivers them."""
    graph = node + f"""
[nodes.sink]
kind = "sink"
params = {{ {", ".join(["verify = false", *filter(None, [sink])])} }}

[[edges]]
from = "camera.out"
to = "sink.in"
policy = "{policy}"
hwm = {hwm}
"""
    # The demo profile's RGB camera is 640 px x 32 lines; viky's closest frame is 800 x 100.
    return write_config(tmp_path / "c.toml", graph, run_dir, genicam={"cti": [str(VIKY)]},
                        cameras={"rgb": {"pixels": RGB["pixels"], "lines_per_frame": RGB["lines"]}})


class Collector:
    """A real consumer: a sortline Input socket on the sink's port, keeping every header."""

    def __init__(self, cfg):
        from sortline.pipeline.graph import load_config
        from sortline.pipeline.graph import inputs_of
        from sortline.pipeline.transport import Input, SlotReaders

        settings = load_config(cfg)
        self.ctx = zmq.Context()
        self.readers = SlotReaders(settings.runtime_dir())
        self.input = Input(self.ctx, "sink", "in", inputs_of(settings, "sink")["in"], self.readers)
        self.headers, self.shapes, self.first = [], set(), None
        self.ended = False

    def run(self, timeout: float) -> "Collector":
        deadline = time.monotonic() + timeout
        while not self.ended and time.monotonic() < deadline:
            for sock in list(self.input.sockets):
                if not sock.poll(100):
                    continue
                for frames in self.input.read(sock):
                    msg = self.input.decode(frames)
                    if msg.header.eos:
                        self.input.end(sock)
                        self.ended = True
                        break
                    lines = msg.arrays["lines"]
                    self.headers.append(msg.header)
                    self.shapes.add((lines.shape, lines.dtype.name))
                    if self.first is None:
                        self.first = lines.copy()
                    msg.release()
        self.input.close()
        self.readers.close()
        self.ctx.term()
        return self


def check_continuity(headers):
    """seq contiguous; each message starts where the previous one's lines end, unless flagged."""
    seqs = [h.seq for h in headers]
    assert seqs == list(range(len(seqs))), "seq must be contiguous"
    for prev, h in zip(headers, headers[1:]):
        end = prev.position + prev.arrays[0].shape[0] * prev.ticks_per_line
        if h.gap:
            assert h.position > end, (prev.seq, end, h.position)
        else:
            assert h.position == end, (prev.seq, end, h.position)


@pytest.mark.system
def test_cameras_lists_the_producers_devices_and_their_features():
    res = sortline("cameras", "--cti", VIKY, timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("3 device(s) from ")
    for serial in "012":
        assert f"Machine Vision Games Ltd. Viky serial {serial}\n" in res.stdout
    assert res.stdout.count("Width: 400  (range 100..800)") == 3
    assert res.stdout.count("PixelFormat: 'RGBa8'  (choices: RGBa8, Mono8)") == 3
    assert res.stdout.count("AcquisitionFrameRate: 20  (range 1..200)") == 3
    assert res.stdout.count("TriggerSelector: not offered") == 3


@pytest.mark.system
def test_cameras_with_a_config_says_which_device_each_node_selects(tmp_path, run_dir):
    cfg = camera_config(tmp_path, run_dir, acquire_node(serial="2"))
    res = sortline("cameras", "--config", str(cfg), timeout=60)
    assert res.returncode == 0, res.stderr
    assert "node camera (serial='2'): Machine Vision Games Ltd. Viky serial 2" in res.stdout


@pytest.mark.system
@pytest.mark.parametrize("select, expected", [
    ({"serial": "7"}, "no device matches serial '7'; found 3: Machine Vision Games Ltd. Viky serial 0; "
                      "Machine Vision Games Ltd. Viky serial 1; Machine Vision Games Ltd. Viky serial 2"),
    ({"serial": "", "model": "Viky"}, "3 devices match model 'Viky', choose one by serial or user_name; found 3:"),
])
def test_a_selection_matching_no_device_or_several_stops_startup_listing_what_was_found(
        tmp_path, run_dir, select, expected):
    cfg = camera_config(tmp_path, run_dir, acquire_node(startup_wait_s=0, **select))
    res = sortline("node", "camera", "--config", str(cfg), timeout=60)
    assert res.returncode == 78, res.stderr
    assert f"nodes.camera.params: {expected}" in res.stderr


@pytest.mark.system
@pytest.mark.parametrize("feature, expected", [
    (("TriggerSelector", "LineStart"), "feature TriggerSelector = 'LineStart' on Machine Vision Games Ltd. Viky "
                                       "serial 1: the device has no such feature"),
    (("Width", 2048), "feature Width = 2048 on Machine Vision Games Ltd. Viky serial 1: "
                      "Value = 2048 must be equal or smaller than Max = 800"),
    (("PixelFormat", "Mono16"), "feature PixelFormat = 'Mono16' on Machine Vision Games Ltd. Viky serial 1: "
                                "Feature 'PixelFormat' : cannot convert value 'Mono16'"),
])
def test_a_required_feature_missing_or_rejected_stops_startup_naming_it(tmp_path, run_dir, feature, expected):
    cfg = camera_config(tmp_path, run_dir, acquire_node(RGB_FEATURES[:4] + [feature]))
    res = sortline("node", "camera", "--config", str(cfg), timeout=60)
    assert res.returncode == 78, res.stderr
    assert expected in res.stderr


@pytest.mark.system
def test_a_producer_that_does_not_load_stops_startup(tmp_path, run_dir):
    junk = tmp_path / "junk.cti"
    junk.write_bytes(b"not a shared library")
    cfg = camera_config(tmp_path, run_dir, acquire_node(cti=[str(junk)]))
    res = sortline("node", "camera", "--config", str(cfg), timeout=60)
    assert res.returncode == 78, res.stderr
    assert f"nodes.camera.params: GenTL producer could not be loaded: GenTL exception: Failed to load CTI file; {junk}" \
        in res.stderr


@pytest.mark.system
def test_a_device_geometry_that_does_not_fit_the_camera_config_stops_startup(tmp_path, run_dir):
    features = [("Width", 640), *RGB_FEATURES[1:4]]
    cfg = camera_config(tmp_path, run_dir, acquire_node(features))
    res = sortline("node", "camera", "--config", str(cfg), timeout=60)
    assert res.returncode == 78, res.stderr
    assert ("Viky serial 1 delivers 640 pixels x 3 channels per line; cameras.rgb says pixels = 800, bands = 3"
            in res.stderr)


@pytest.mark.system
def test_rgb_frames_become_messages_with_contiguous_positions(tmp_path, run_dir):
    count = 150
    cfg = camera_config(tmp_path, run_dir, acquire_node(count=count))
    collector = Collector(cfg)
    proc = start("node", "camera", "--config", str(cfg))
    got = collector.run(timeout=60)
    rc, _, err = stop(proc, timeout=30)
    assert rc == 0, err[-3000:]
    assert got.ended and len(got.headers) == count
    assert got.shapes == {((RGB["lines"], RGB["pixels"], 3), "uint8")}
    frame_ticks = RGB["lines"] * RGB["ticks"]
    check_continuity(got.headers)
    assert not any(h.gap for h in got.headers)
    # Frame ids start at 1 on every start: the first message is at position 0.
    assert [h.position for h in got.headers[:3]] == [0, frame_ticks, 2 * frame_ticks]
    h = got.headers[0]
    assert h.stream == "rgb" and h.ticks_per_line == RGB["ticks"] and h.host_ts  # viky has no device clock
    assert h.meta == {"camera": "rgb", "serial": "1", "pixel_format": "RGBa8", "bit_depth": 8}
    stamps = [h.device_ts_ns for h in got.headers]
    assert all(b > a for a, b in zip(stamps, stamps[1:]))
    # viky draws a black ball on white: most pixels are 255 in every channel, some are dark.
    lines = got.first
    assert np.mean(lines == 255) > 0.5 and lines.min() < 64
    # Optional line-scan features are skipped with a log line each; what was applied is logged.
    assert "optional feature TriggerSelector = 'LineStart' skipped on Machine Vision Games Ltd. Viky serial 1" in err
    assert "optional feature AcquisitionLineRate = 20000.0 skipped" in err
    assert "feature PixelFormat = 'RGBa8'" in err and "chunk data: none (not offered: FrameID, Timestamp" in err


@pytest.mark.system
def test_a_hyperspectral_frame_becomes_one_line_of_pixels_by_bands(tmp_path, run_dir):
    count = 30
    cfg = camera_config(tmp_path, run_dir, acquire_node(HSI_FEATURES, camera="hsi", serial="2",
                                                        layout="spectral_rows", count=count))
    collector = Collector(cfg)
    proc = start("node", "camera", "--config", str(cfg))
    got = collector.run(timeout=60)
    rc, _, err = stop(proc, timeout=30)
    assert rc == 0, err[-3000:]
    assert len(got.headers) == count
    # demo profile: HSI messages of 8 lines (8 pushbroom frames), 160 pixels x 224 bands, 60 ticks per line.
    assert got.shapes == {((8, 160, 224), "uint8")}
    check_continuity(got.headers)
    assert [h.position for h in got.headers[:2]] == [0, 8 * 60]
    assert got.headers[0].stream == "hsi" and got.headers[0].meta["pixel_format"] == "Mono8"


@pytest.mark.system
def test_under_the_supervisor_with_metrics_and_a_report(tmp_path, run_dir):
    count = 200
    cfg = camera_config(tmp_path, run_dir, acquire_node(count=count), sink=f'report = "{tmp_path}/sink.json"')
    res = sortline("run", "--config", str(cfg), "--report", str(tmp_path / "run.json"), timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    sink, run = load_json(tmp_path / "sink.json"), load_json(tmp_path / "run.json")
    assert sink["received"] == count and sink["lost"] == 0 and sink["gap_flags"] == 0, (sink, run["nodes"]["camera"]["status"], res.stderr[-2000:])
    cam = run["nodes"]["camera"]
    assert cam["state"] == "finished"
    status = cam["status"]
    assert status["connected"] == 1 and status["messages"] == count and status["frames"] >= count
    assert status["lost"] == 0 and status["gaps"] == 0 and status["reconnects"] == 0
    m = cam["metrics"]
    assert metric(m, "sortline_camera_frames_total", camera="camera") == status["frames"]
    assert metric(m, "sortline_camera_lost_frames_total", camera="camera") == 0
    assert metric(m, "sortline_camera_producer_delivered_total", camera="camera") > 0


@pytest.mark.system
def test_a_graph_slower_than_the_camera_drops_counts_and_flags_the_gap(tmp_path, run_dir):
    # ~187 frames/s into a lossless edge whose sink takes 20 ms a message: the ring fills,
    # frames are dropped and counted, and the message after each drop is flagged.
    features = [*RGB_FEATURES[:3], ("AcquisitionFrameRate", 200.0)]
    cfg = camera_config(tmp_path, run_dir, acquire_node(features, ring=4), sink=f'delay_ms = 20, report = "{tmp_path}/sink.json"')
    res = sortline("run", "--config", str(cfg), "--seconds", "4", "--report", str(tmp_path / "run.json"), timeout=60)
    assert res.returncode == 0, res.stderr[-3000:]
    sink, run = load_json(tmp_path / "sink.json"), load_json(tmp_path / "run.json")
    status = run["nodes"]["camera"]["status"]
    assert status["lost_ring_full"] > 100 and status["reconnects"] == 0
    assert sink["lost"] == 0  # seq stays contiguous: nothing was lost between camera and sink
    assert 1 <= sink["gap_flags"] <= status["gaps"]
    assert "ring full: the graph downstream does not keep up; frame dropped" in res.stderr


def _camera_with_faults(cfg: str, faults: list[str], out: str) -> None:
    """In a child process: the acquire node under the real Runner (in this process's main
    thread), and a thread that breaks the real device under it, one fault at a time, each
    once the node is acquiring again after the previous one."""
    import logging

    from sortline.nodes.acquire import device
    from sortline.pipeline.graph import load_config
    from sortline.pipeline.node import Runner

    logging.basicConfig(level=logging.INFO, format="%(name)s %(levelname)s %(message)s")
    runner = Runner(load_config(cfg), "camera")
    node = runner.node
    injected, recovered, during = [], {}, {}

    def acquiring_beyond(frames: int) -> bool:
        acq = getattr(node, "acq", None)
        return acq is not None and acq.connected and acq.counts["frames"] > frames

    def inject() -> None:
        try:
            for fault in faults:
                wait_for(lambda: acquiring_beyond(30) and node.seq > (injected[-1][1] if injected else 0) + 20,
                         timeout=30, every=0.01)
                acq = node.acq
                with acq.lock:  # between two fetches
                    injected.append((fault, node.seq))
                    if fault == "stall":  # the fetch thread is held up: the producer runs out of buffers
                        time.sleep(0.5)
                    elif fault == "stop":  # the camera stops delivering, without an error
                        acq.camera.ia.remote_device.node_map.AcquisitionStop.execute()
                    elif fault == "destroy":  # the device goes away under the node
                        acq.camera.ia.destroy()
                    elif fault == "unplug":  # ... and is not on the bus for the first three attempts
                        acq._open = absent_for(3, acq._open)
                        acq.camera.ia.destroy()
                if fault == "unplug":
                    wait_for(lambda: acq.state == "reconnecting" and acq.error.startswith("attempt 3:"),
                             timeout=30, every=0.01)
                    injected.append(("unplug: " + acq.error, -1))
                    during.update(node.status())  # the health a heartbeat carries meanwhile
            frames = node.acq.counts["frames"]
            wait_for(lambda: acquiring_beyond(frames + 10), timeout=30, every=0.01)
            recovered.update(node.status())
        except BaseException as exc:
            injected.append((f"injector failed: {exc!r}", -1))

    def absent_for(attempts: int, open_camera):
        def absent():
            if attempts > len(tried):
                tried.append(1)
                device.select([], serial="1")  # what opening meets when the device is not listed
            return open_camera()
        tried = []
        return absent

    threading.Thread(target=inject, daemon=True).start()
    rc = runner.run()
    with open(out, "w") as fh:
        json.dump({"rc": rc, "status": node.status(), "recovered": recovered, "during": during,
                   "injected": injected}, fh)


def run_with_faults(cfg, faults: list[str], out) -> tuple[Collector, dict]:
    collector = Collector(cfg)
    child = mp.get_context("spawn").Process(target=_camera_with_faults, args=(str(cfg), faults, str(out)),
                                            daemon=True)
    child.start()
    try:
        got = collector.run(timeout=90)
        child.join(30)
    finally:
        if child.is_alive():
            child.kill()
    assert child.exitcode == 0
    result = load_json(out)
    assert result["rc"] == 0
    return got, result


@pytest.mark.system
def test_a_stalled_fetch_a_silent_camera_and_a_vanished_device_are_survived_with_gaps_flagged(tmp_path, run_dir):
    # In turn: the fetch thread held up for 0.5 s (frames lost in the producer), the camera
    # stopping without an error (stall timeout), the device destroyed under the node, and
    # the device destroyed and missing from the device list for three reconnect attempts.
    count = 400
    cfg = camera_config(tmp_path, run_dir, acquire_node(count=count, stall_timeout_s=1.0, reconnect_backoff_s=0.2))
    got, result = run_with_faults(cfg, ["stall", "stop", "destroy", "unplug"], tmp_path / "out.json")
    unplugged = result["injected"].pop()[0]
    assert unplugged == "unplug: attempt 3: no device matches serial '1'; found 0: none"
    during = result["during"]
    assert during["connected"] == 0 and during["state"] == "reconnecting" and during["fps"] == 0
    assert during["error"] == unplugged.removeprefix("unplug: ")
    assert [f for f, _ in result["injected"]] == ["stall", "stop", "destroy", "unplug"], result["injected"]
    assert got.ended and len(got.headers) == count
    frame_ticks = RGB["lines"] * RGB["ticks"]
    check_continuity(got.headers)
    gaps = [h for h in got.headers if h.gap]
    assert len(gaps) == 4, [(h.seq, h.position) for h in gaps]
    # Each gap comes after its fault was injected, in order.
    for (fault, seq_at), h in zip(result["injected"], gaps):
        assert h.seq >= seq_at, (fault, seq_at, h.seq)
    status = result["status"]
    assert status["gaps"] == 4 and status["reconnects"] == 3
    assert result["recovered"]["connected"] == 1 and result["recovered"]["state"] == "acquiring"
    assert status["connected"] == 0  # stopped at the end of the stream
    # The stall is seen in the frame ids: exactly the frames the ids skip are counted lost,
    # and the position after it jumps by exactly that many frames.
    stall = gaps[0]
    prev = got.headers[stall.seq - 1]
    assert stall.position - prev.position == (status["lost_device"] + 1) * frame_ticks
    assert status["lost_device"] > 20
    assert status["lost_outage"] > 0  # estimated from the frame rate over each outage


@pytest.mark.system
def test_a_gap_inside_a_hyperspectral_message_ends_it_early_and_flags_the_next(tmp_path, run_dir):
    # Eight pushbroom frames make a message; a stalled fetch loses frames in the middle of one.
    count = 40
    cfg = camera_config(tmp_path, run_dir, acquire_node(HSI_FEATURES, camera="hsi", serial="2",
                                                        layout="spectral_rows", count=count))
    got, result = run_with_faults(cfg, ["stall"], tmp_path / "out.json")
    assert got.ended and len(got.headers) == count
    check_continuity(got.headers)
    gaps = [h for h in got.headers if h.gap]
    assert len(gaps) == 1
    before = got.headers[gaps[0].seq - 1]
    lines_before = before.arrays[0].shape[0]
    lost = result["status"]["lost_device"]
    assert lost > 20
    # The message before the gap holds only the lines that came; the next starts after the lost ones.
    assert gaps[0].position == before.position + (lines_before + lost) * 60
    assert 1 <= lines_before <= 8
    assert all(h.arrays[0].shape[0] == 8 for h in got.headers if h is not before)
    assert {h.arrays[0].shape[1:] for h in got.headers} == {(160, 224)}
