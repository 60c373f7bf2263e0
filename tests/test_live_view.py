"""The live view as Foxglove sees it: a WebSocket client on the foxglove.websocket.v1 protocol.

The client here is the `websockets` library speaking the protocol itself (serverInfo,
advertise, subscribe, binary message data), and it decodes each message with the protobuf
schema the server advertised, as Foxglove does: nothing of sortline's on the reading side.
foxglove-sdk's server names the protocol `foxglove.sdk.v1` in the WebSocket handshake (the
same messages under a new name; it refuses the old name alone), so the client offers both
names, as Foxglove's app does.
"""

from __future__ import annotations

import base64
import json
import struct
import time
from contextlib import contextmanager

import msgspec
import numpy as np
import pytest
import zmq
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from websockets.sync.client import connect

from conftest import ROOT, demo_toml, free_port, start, stop, write_config
from sortline.nodes.streams import EjectMeta, ObjectReport, Window
from sortline.pipeline.graph import load_config, outputs_of
from sortline.pipeline.transport import Output

SUBPROTOCOLS = ["foxglove.sdk.v1", "foxglove.websocket.v1"]
TOPICS = ("/live/rgb", "/live/mask", "/live/annotations", "/live/state")

# The live view as a process; this test process plays the nodes that feed it (relays in the configuration), on
# lossless edges: what the client is shown is checked against every message sent (the shipped graphs' are lossy).
GRAPH = """
[nodes.camera]
kind = "pattern"

[nodes.strips]
kind = "relay"

[nodes.masks]
kind = "relay"

[nodes.plans]
kind = "relay"

[nodes.live]
kind = "live_view"
params = {{ bind = "127.0.0.1:{port}", hz = 10 }}

[[edges]]
from = "camera.out"
to = "strips.in"

[[edges]]
from = "camera.out"
to = "masks.in"

[[edges]]
from = "camera.out"
to = "plans.in"

[[edges]]
from = "strips.out"
to = "live.strip"
policy = "lossless"

[[edges]]
from = "masks.out"
to = "live.mask"
policy = "lossless"

[[edges]]
from = "plans.out"
to = "live.plan"
policy = "lossless"
"""


@contextmanager
def foxglove_client(port: int, topics=TOPICS, timeout: float = 30.0):
    """A client subscribed to `topics` of the server on `port` (waiting for it to come up)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            ws = connect(f"ws://127.0.0.1:{port}", subprotocols=SUBPROTOCOLS, open_timeout=2)
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    with ws:
        yield Client(ws, topics, timeout)


class Client:
    """A Foxglove WebSocket client: the protocol's own messages, decoded with the advertised schemas."""

    def __init__(self, ws, topics, timeout: float):
        self.ws = ws
        assert ws.subprotocol in SUBPROTOCOLS
        self.channels: dict[str, dict] = {}
        while set(topics) - set(self.channels):
            msg = json.loads(ws.recv(timeout=timeout))
            if msg["op"] == "advertise":
                self.channels.update({c["topic"]: c for c in msg["channels"]})
        self.by_sub = {i: self.channels[t] for i, t in enumerate(topics)}
        ws.send(json.dumps({"op": "subscribe", "subscriptions": [
            {"id": i, "channelId": c["id"]} for i, c in self.by_sub.items()]}))
        self.decoders = {c["topic"]: self._decoder(c) for c in self.by_sub.values()}

    @staticmethod
    def _decoder(channel: dict):
        if channel["encoding"] == "json":
            return json.loads
        assert channel["encoding"] == "protobuf" and channel["schemaEncoding"] == "protobuf"
        files = descriptor_pb2.FileDescriptorSet.FromString(base64.b64decode(channel["schema"]))
        pool = descriptor_pool.DescriptorPool()
        for fd in files.file:   # imports first, as the server sent them
            pool.Add(fd)
        cls = message_factory.GetMessageClass(pool.FindMessageTypeByName(channel["schemaName"]))
        return cls.FromString

    def messages(self, timeout: float = 30.0):
        """(topic, log time, decoded message), as they come."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            data = self.ws.recv(timeout=max(0.1, deadline - time.monotonic()))
            if isinstance(data, str):
                continue   # a status or advertise of the server's
            assert data[0] == 0x01   # message data
            sub, log_time = struct.unpack_from("<IQ", data, 1)
            topic = self.by_sub[sub]["topic"]
            yield topic, log_time, self.decoders[topic](data[13:])
        raise AssertionError("no more messages within the timeout")


def picture(image) -> np.ndarray:
    assert image.encoding == "rgb8" and image.step == 3 * image.width and len(image.data) == image.height * image.step
    return np.frombuffer(image.data, np.uint8).reshape(image.height, image.width, 3)


@pytest.mark.system
def test_a_foxglove_client_sees_the_strips_masks_and_decisions_it_was_sent(tmp_path, run_dir):
    port = free_port()
    cfg = write_config(tmp_path / "c.toml", GRAPH.format(port=port), run_dir)
    settings = load_config(cfg)
    m = settings.model
    ctx = zmq.Context()
    outs = {name: Output(ctx, name, "out", outputs_of(settings, name)["out"], run_dir, lambda: False)
            for name in ("strips", "masks", "plans")}
    classes = ["belt", "PET", "PP", "paper"]
    cores, masks = [], []
    node = start("node", "live", "--config", str(cfg))
    try:
        with foxglove_client(port) as client:
            # The server comes up in the node's setup, its inputs after it: a bounded edge drops what is sent
            # before they are there (a loaded machine leaves time for that between the two).
            assert all(out.wait_for_consumers(30) for out in outs.values())
            shown, log_time = send_and_watch(client, outs, m, classes, cores, masks)
    finally:
        rc, _, err = stop(node)
        for out in outs.values():
            out.close()
        ctx.destroy(0)
    assert rc == 0, err[-3000:]

    # 600 mm of belt (the belt's width) on a grid of every 2nd line and column: 320 x 320, the newest at the bottom.
    state = shown["/live/state"]
    assert state["view"] == {"rows": 320, "cols": 320, "step": 2, "first_position": (1768 - 640) * 15,
                             "end_position": 1768 * 15}
    lines_sent = np.concatenate(cores)          # RGB lines 1000 .. 1767
    rgb = picture(shown["/live/rgb"])
    assert rgb.shape == (320, 320, 3)
    assert np.array_equal(rgb, lines_sent[1128 - 1000::2, ::2])
    legend = {cls: bytes.fromhex(colour[1:]) for cls, colour in state["legend"].items()}
    assert list(legend) == classes and len(set(legend.values())) == 4
    cells = np.concatenate(masks)[(np.arange(1128, 1768, 2) - 1000) // 4][:, np.arange(320) * 2 // 4]
    colours = np.array([list(legend[c]) for c in classes], np.uint8)
    assert np.array_equal(picture(shown["/live/mask"]), colours[cells])
    assert shown["/live/rgb"].timestamp.ToNanoseconds() == log_time
    # The object's box in picture pixels: 60..120 mm across at 1.875 mm per pixel, lines 1700..1740 from row 0 at
    # line 1128, 2 lines a row; the air over valves 4 and 5 (12.5 mm pitch, valve 0 centred at 6.25 mm).
    notes = shown["/live/annotations"]
    boxes = [[(round(p.x, 2), round(p.y, 2)) for p in shape.points] for shape in notes.points]
    assert [(31.5, 286.0), (64.5, 286.0), (64.5, 306.0), (31.5, 306.0)] in boxes
    assert [(26.67, 286.0), (40.0, 286.0), (40.0, 306.0), (26.67, 306.0)] in boxes
    assert [t.text for t in notes.texts] == ["PET eject"]
    assert state["objects"] == {"PET": {"eject": 1}} and state["ejected"] == 1 and state["valve_windows"] == 1
    assert state["belt"] in ("running", "idle") and state["recipe"]["targets"] == ["PET"]


def send_and_watch(client, outs, m, classes, cores, masks):
    """Twelve strips, then their masks and one plan; what the client was shown once the view had them all.

    The masks go once the view has drawn every strip: the view keeps a mask only for belt it has seen (in a
    graph the mask of a strip comes after it, through inference), and two edges give no order between them."""
    rng = np.random.default_rng(4)
    lines, core = m.strip_lines + 2 * m.overlap_lines, m.strip_lines
    strip_cells = []
    for k in range(12):
        first_line = 1000 + k * core   # the strip's first core line; its overlap starts 16 lines before
        rgb = rng.integers(0, 256, (lines, 640, 3), dtype=np.uint8)
        msg = outs["strips"].new(
            {"rgb": ((lines, 640, 3), np.uint8), "hsi": ((lines // 4, 160, 224), np.float16)}, stream="strip",
            seq=k, position=(first_line - m.overlap_lines) * 15, ticks_per_line=15,
            meta={"overlap": m.overlap_lines, "ratio": 4, "valid_lines": core})
        msg.arrays["rgb"][...] = rgb
        msg.arrays["hsi"][...] = 0
        outs["strips"].send(msg, time.monotonic_ns(), "strips")
        cores.append(rgb[m.overlap_lines:m.overlap_lines + core])
        strip_cells.append((first_line, rng.integers(0, 4, (core // 4, 160), dtype=np.uint8)))
    watch(client, {"strip": 12})
    for k, (first_line, cells) in enumerate(strip_cells):
        msg = outs["masks"].new({"classes": (cells.shape, np.uint8), "confidence": (cells.shape, np.uint8)},
                                stream="mask", seq=k, position=first_line * 15, ticks_per_line=60,
                                meta={"classes": classes, "model": "test", "stride": 4, "valid_lines": core // 4})
        msg.arrays["classes"][...] = cells
        msg.arrays["confidence"][...] = 200
        outs["masks"].send(msg, time.monotonic_ns(), "masks")
        masks.append(cells)
    # One object near the end of the belt shown, ejected: its box, and the air on valves 4..5.
    obj = ObjectReport(id=7, cls="PET", decision="eject", area_px=900, x0_mm=60.0, x1_mm=120.0,
                       p0=1700 * 15, p1=1740 * 15)
    travel = int(round(300 * 16))   # 300 mm from the scan line to the valve bar, 16 ticks per mm
    air = Window(4, 5, 1700 * 15 + travel, 1740 * 15 + travel, 7, "PET", 0.9)
    msg = outs["plans"].new({}, stream="eject", seq=0, position=1700 * 15, ticks_per_line=60,
                            meta=msgspec.to_builtins(EjectMeta([air], [obj])))
    outs["plans"].send(msg, time.monotonic_ns(), "plans")

    return watch(client, {"strip": 12, "mask": 12, "plan": 1})


def watch(client, counts: dict[str, int]):
    """The first publication (all four topics at one log time) whose state counts `counts` messages in."""
    got: dict[int, dict] = {}
    for topic, log_time, message in client.messages():
        got.setdefault(log_time, {})[topic] = message
        state = got[log_time].get("/live/state")
        if state and len(got[log_time]) == 4 and all(
                state["inputs"][port]["messages"] == n for port, n in counts.items()):
            return got[log_time], log_time



@pytest.mark.system
def test_the_demo_graph_serves_its_live_view_to_a_foxglove_client(tmp_path, run_dir):
    """The shipped demo graph (the belt's truth for masks, to spare the CPU) as it runs: the client sees the belt,
    its mask and the objects decided on it, 600 mm of belt on the 320 x 320 grid, and the machine's state."""
    port = free_port()
    cfg = tmp_path / "demo.toml"
    cfg.write_text(demo_toml(free_port(), oracle=True, live_view=True,
                             graph={"name": "live", "runtime_dir": str(run_dir)},
                             nodes={"live_view": {"params": {"bind": f"127.0.0.1:{port}", "hz": 10}},
                                    "belt": {"params": {"seed": 2}}}))
    sup = start("run", "--config", str(cfg), "--seconds", "30")
    seen: dict[str, object] = {}
    try:
        with foxglove_client(port, timeout=60) as client:
            for topic, log_time, message in client.messages(timeout=60):
                seen[topic] = message
                state = seen.get("/live/state")
                if (len(seen) == 4 and state["belt"] == "running" and state["objects"] and state["belt_speed_m_s"]
                        and seen["/live/annotations"].points):
                    break
    finally:
        rc, _, err = stop(sup, timeout=30)
    assert rc == 0, err[-3000:]
    rgb, mask = picture(seen["/live/rgb"]), picture(seen["/live/mask"])
    assert rgb.shape == mask.shape == (320, 320, 3) and rgb.std() > 10   # the belt and what lies on it
    state = seen["/live/state"]
    legend = {bytes.fromhex(c[1:]) for c in state["legend"].values()}
    assert {bytes(p) for p in np.unique(mask.reshape(-1, 3), axis=0)} <= legend | {b"\0\0\0"}
    assert state["recipe"] == {"targets": ["PET"], "priority": "balanced"} and state["profile"] == "demo"
    assert 1.5 < state["belt_speed_m_s"] < 2.5 and state["inputs"]["strip"]["messages"] > 0
    decisions = {d for by_class in state["objects"].values() for d in by_class}
    assert decisions <= {"eject", "not_target", "small", "unsure", "touching"}


def test_the_shipped_foxglove_layout_shows_the_channels_the_live_view_and_the_recorder_publish():
    from sortline.nodes.foxglove_layout import layout_json

    shipped = (ROOT / "docs" / "foxglove" / "sortline-layout.json").read_text()
    assert shipped == layout_json()   # made by Foxglove's own layout types (foxglove-sdk), from the nodes' topics
    layout = json.loads(shipped)

    def panels(content):
        if content["type"] == "panel":
            yield content
        for item in content.get("items", []) + content.get("tabs", []):
            yield from panels(item["content"])

    shown = list(panels(layout["content"]))
    images = {p["config"]["imageMode"]["imageTopic"]: p["config"]["imageMode"].get("annotations", {})
              for p in shown if p["panelType"] == "Image"}
    assert images == {"/live/rgb": {"/live/annotations": {"visible": True}},
                      "/live/mask": {"/live/annotations": {"visible": True}}, "/rgb/image": {}, "/hsi/image": {}}
    assert {p["config"].get("topicPath") for p in shown if p["panelType"] == "RawMessages"} == {"/live/state"}


@pytest.mark.system
def test_a_live_view_whose_port_is_taken_stops_start_up_with_one_line(tmp_path, run_dir):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cfg = write_config(tmp_path / "c.toml", GRAPH.format(port=port), run_dir)
        node = start("node", "live", "--config", str(cfg))
        _, err = node.communicate(timeout=60)
    assert node.returncode == 78, err[-3000:]
    assert f"nodes.live.params.bind = '127.0.0.1:{port}': " in err and "Address already in use" in err
