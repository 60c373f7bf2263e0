"""Live view benchmark: what the live_view node costs the machine it runs on.

The node (nodes/live_view.py) in this process (set up by pipeline.testing's Harness),
fed the demo
profile's strips and masks (or the production profile's, --profile production), with a
Foxglove WebSocket client connected and subscribed to every topic (the `websockets`
library, in a thread), so that every picture, annotation and state is made and sent.

- per strip, per mask: the node's work on one message (its payload checked, as the
  runner does, and into its ring of picture rows);
- per publish: one round of pictures, annotations and state, encoded and handed to
  the server (what the node's thread does `hz` times a second);
- baseline: one copy of the strip's RGB array (np.copyto), the least a consumer of a
  strip pays: the figures are given as multiples of it too;
- CPU share: the core the view takes at the profile's nominal belt speed and hz = 4
  (strips and masks a second times their cost, plus four publishes).

    python benchmarks/live_view.py [--quick] [--json PATH] [--profile demo|production]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sortline.nodes.live_view import LiveView  # noqa: E402
from sortline.nodes.streams import EjectMeta, MaskMeta, ObjectReport, StripMeta  # noqa: E402
from sortline.pipeline.graph import load_config  # noqa: E402
from sortline.pipeline.testing import Harness  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
HZ = 4.0


def subscribe(port: int, stop: threading.Event, received: list) -> threading.Thread:
    """A Foxglove client subscribed to every topic, counting the bytes of message data it gets."""
    from websockets.sync.client import connect

    ready = threading.Event()

    def run():
        with connect(f"ws://127.0.0.1:{port}", subprotocols=["foxglove.sdk.v1", "foxglove.websocket.v1"]) as ws:
            channels = {}
            while len(channels) < 4:
                msg = json.loads(ws.recv(timeout=30))
                if msg["op"] == "advertise":
                    channels.update({c["topic"]: c["id"] for c in msg["channels"]})
            ws.send(json.dumps({"op": "subscribe", "subscriptions": [
                {"id": i, "channelId": c} for i, c in enumerate(channels.values())]}))
            ready.set()
            while not stop.is_set():
                try:
                    data = ws.recv(timeout=0.2)
                except TimeoutError:
                    continue
                if isinstance(data, bytes):
                    received.append(len(data))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    if not ready.wait(30):
        raise RuntimeError("the client did not subscribe within 30 s")
    return thread


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a short run (under a minute)")
    parser.add_argument("--json", metavar="PATH", help="write the figures as one flat JSON object")
    parser.add_argument("--profile", choices=("demo", "production"), default="demo")
    args = parser.parse_args(argv)
    settings = load_config(ROOT / "configs" / f"{args.profile}.toml")
    machine = settings.machine()
    m, rgb_cam = machine.model, machine.cameras.rgb
    h = Harness(LiveView, machine, {"bind": "127.0.0.1:0", "hz": HZ}, name="live_view")
    node = h.node
    node.closing.set()   # the benchmark publishes itself: the node's own thread stands down
    node.thread.join(2)
    stop, received = threading.Event(), []
    client = subscribe(node.server.port, stop, received)
    time.sleep(0.5)   # the server has the subscriptions

    n = 60 if args.quick else 300
    lines, core, k = m.strip_lines + 2 * m.overlap_lines, m.strip_lines, m.mask_stride
    r = settings.hsi_ratio
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, (lines, rgb_cam.pixels, 3), dtype=np.uint8)
    hsi = np.zeros((lines // r, rgb_cam.pixels // r, machine.cameras.hsi.bands), np.float16)
    classes = rng.integers(0, 4, (core // k, rgb_cam.pixels // k), dtype=np.uint8)
    conf = np.full_like(classes, 200)
    names = ["belt", "PET", "PP", "paper"]
    tpl = rgb_cam.ticks_per_line
    strip_s, mask_s, publish_s, copy_s = [], [], [], []
    dst = np.empty_like(rgb)

    def arrived(port, msg):
        """What the runner does with a message on the node's input: its payload checked, then process()."""
        node.inputs[port].check(msg, node.bound.get(port, {}))
        node.process(port, msg)

    for i in range(n):
        first = 1000 + i * core
        strip_msg = h.message("strip", {"rgb": rgb, "hsi": hsi}, meta=StripMeta(m.overlap_lines, r, core),
                              position=(first - m.overlap_lines) * tpl, ticks_per_line=tpl, seq=i)
        mask_msg = h.message("mask", {"classes": classes, "confidence": conf},
                             meta=MaskMeta(names, "bench", k, core // k), position=first * tpl,
                             ticks_per_line=tpl * k, seq=i)
        t0 = time.perf_counter()
        arrived("strip", strip_msg)
        t1 = time.perf_counter()
        arrived("mask", mask_msg)
        t2 = time.perf_counter()
        np.copyto(dst, rgb)
        t3 = time.perf_counter()
        strip_s.append(t1 - t0)
        mask_s.append(t2 - t1)
        copy_s.append(t3 - t2)
        if i % 4 == 0:   # objects decided now and then: boxes to draw
            objs = [ObjectReport(i * 10 + j, "PET", "eject" if j % 2 else "not_target", 500, 40.0 + 50 * j,
                                 80.0 + 50 * j, first * tpl, (first + 40) * tpl) for j in range(8)]
            h.send("plan", meta=EjectMeta([], objs), position=first * tpl, ticks_per_line=tpl * k, seq=i // 4)
        if i % 8 == 7:
            t4 = time.perf_counter()
            node._publish()
            publish_s.append(time.perf_counter() - t4)
    time.sleep(0.5)
    stop.set()
    client.join(5)
    h.close()

    strip, mask, publish, copy = (statistics.median(x) for x in (strip_s, mask_s, publish_s, copy_s))
    strips_per_s = machine.line_rate_hz("rgb") / core
    share = strips_per_s * (strip + mask) + HZ * publish
    figures = {
        "strip_us": strip * 1e6, "mask_us": mask * 1e6, "publish_ms": publish * 1e3,
        "strip_copy_us": copy * 1e6, "strip_vs_copy": strip / copy, "mask_vs_copy": mask / copy,
        "strips_per_s": strips_per_s, "cpu_share": share, "hz": HZ,
        "picture_px": node.cols * node.rows, "received_mb": sum(received) / 1e6, "publishes": len(publish_s),
        "messages": n,
    }
    print(f"live view, {args.profile} profile: strips of {lines} x {rgb_cam.pixels}, pictures of {node.cols} x "
          f"{node.rows} (one line and column in {node.step}), {n} strips and masks, a client subscribed to all")
    print(f"  per strip   {figures['strip_us']:8.0f} us   {figures['strip_vs_copy']:.2f}x a copy of the strip's RGB "
          f"({figures['strip_copy_us']:.0f} us)")
    print(f"  per mask    {figures['mask_us']:8.0f} us   {figures['mask_vs_copy']:.2f}x that copy")
    print(f"  per publish {figures['publish_ms']:8.2f} ms   (pictures, annotations, state; {figures['publishes']} "
          f"publishes, {figures['received_mb']:.1f} MB to the client)")
    print(f"  CPU share at {machine.belt.speed_m_s:g} m/s ({strips_per_s:.0f} strips/s) and {HZ:g} Hz: "
          f"{100 * share:.1f} % of a core")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
