"""Acquisition benchmark: what the acquire node publishes from viky.cti, against a bare fetch loop.

viky.cti, the simulated GenTL producer shipped with genicam, at its largest
frame (800x800 RGBa8) and its highest frame rate setting (200/s; a timer in
the producer caps it near 187/s whatever the size). Two measurements, each in
its own process (harvesters allows one working Harvester per process):

- bare: a plain harvesters loop, `try_fetch` then `queue`, nothing else:
  the producer's own rate on this machine, the ceiling for any consumer.
- node: `sortline node camera` publishing into a lossless shared-memory edge
  read by this process through a real sortline Input: the rate of messages
  (800 lines x 800 px x 3 RGB), their MB/s, lost frames (from the positions
  and gap flags the messages carry), and the latency from the fetch of a
  frame to the consumer holding its message.

acquire_vs_bare = node frames/s / bare frames/s; CPU is each process's own
user+system time over the window, as a share of one core.

    python benchmarks/acquire.py [--quick] [--json PATH] [--runs N]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

WIDTH = HEIGHT = 800
RATE = 200.0
BUFFERS = 16  # the node's default


def viky() -> str:
    import genicam

    return os.path.join(os.path.dirname(genicam.__file__), "viky.cti")


def cpu_seconds(pid: int | None = None) -> float:
    if pid is None:
        t = os.times()
        return t.user + t.system
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def bare(frames: int, results) -> None:
    """A child process: harvesters alone."""
    from harvesters.core import Harvester

    h = Harvester()
    h.add_file(viky())
    h.update()
    ia = h.create({"serial_number": "1"})
    nm = ia.remote_device.node_map
    nm.Width.value, nm.Height.value, nm.PixelFormat.value = WIDTH, HEIGHT, "RGBa8"
    nm.AcquisitionFrameRate.value = RATE
    nm.ChunkModeActive.value = False
    ia.num_buffers = BUFFERS
    ia.start()
    ids, stamps, got = [], [], 0
    while got < 100:  # warm up as long as the node does: the first frames come while the producer settles
        buf = ia.try_fetch(timeout=0.5)
        if buf is not None:
            buf.queue()
            got += 1
    t0, c0 = time.monotonic(), cpu_seconds()
    while len(ids) < frames:
        buf = ia.try_fetch(timeout=0.5)
        if buf is not None:
            stamps.append(time.monotonic_ns())
            ids.append(buf.module.frame_id)
            buf.queue()
    seconds, cpu = time.monotonic() - t0, cpu_seconds() - c0
    fps = steady_rate(stamps)
    ia.stop()
    ia.destroy()
    h.reset()
    results.put({"fps": fps, "cpu": cpu / seconds, "lost": ids[-1] - ids[0] + 1 - len(ids),
                 "mb_s": fps * WIDTH * HEIGHT * 4 / 1e6})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def lost_by_reason(port: int) -> dict[str, float]:
    """The node's own count of lost frames by reason (the whole run, warm-up included)."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    found = re.findall(r'^sortline_camera_lost_frames_total\{camera="camera",reason="(\w+)"\} (\S+)$', text, re.M)
    return {reason: float(value) for reason, value in found}


def steady_rate(stamps_ns: list[int]) -> float:
    """Frames per second from fetch times, counted from the first frame fetched after a pause:
    frames that waited in the producer's buffers (at start-up) come in a burst that would
    inflate the rate of a short run."""
    t = np.asarray(stamps_ns, dtype=np.int64)
    pauses = np.nonzero(np.diff(t) > 2_000_000)[0]  # 2 ms: well under viky's ~5.3 ms frame period
    first = int(pauses[0]) + 1 if len(pauses) else 0
    return (len(t) - 1 - first) / ((t[-1] - t[first]) / 1e9)


def write_config(run_dir: Path, count: int) -> Path:
    demo = (ROOT / "configs" / "demo.toml").read_text()
    machine = demo[: demo.index("[graph]")].replace("pixels = 640", f"pixels = {WIDTH}")
    machine = machine.replace("lines_per_frame = 32", f"lines_per_frame = {HEIGHT}")
    features = ", ".join(f'{{ name = "{n}", value = {json.dumps(v)} }}' for n, v in
                         (("Width", WIDTH), ("Height", HEIGHT), ("PixelFormat", "RGBa8"), ("AcquisitionFrameRate", RATE)))
    cfg = run_dir / "bench.toml"
    cfg.write_text(machine + f"""
[genicam]
cti = [{json.dumps(viky())}]

[graph]
name = "bench"
runtime_dir = "{run_dir}"

[nodes.camera]
kind = "acquire"
params = {{ serial = "1", count = {count}, buffers = {BUFFERS}, features = [{features}] }}

[nodes.sink]
kind = "sink"

[[edges]]
from = "camera.out"
to = "sink.in"
policy = "lossless"
""")
    return cfg


def node(frames: int) -> dict:
    import zmq

    from sortline.pipeline.graph import load_config
    from sortline.pipeline.graph import inputs_of
    from sortline.pipeline.transport import Input, SlotReaders

    warmup = 100  # messages before the window: the start-up is not the steady state (its losses are in node_lost_*)
    run_dir = Path(tempfile.mkdtemp(prefix="slb-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None))
    cfg = write_config(run_dir, warmup + frames)
    settings = load_config(cfg)
    ctx = zmq.Context()
    readers = SlotReaders(run_dir)
    inp = Input(ctx, "sink", "in", inputs_of(settings, "sink")["in"], readers)
    sock = next(iter(inp.sockets))
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "sortline", "node", "camera", "--config", str(cfg),
                             "--metrics-port", str(port)],
                            cwd=ROOT, stderr=subprocess.PIPE, text=True)
    stamps, positions, gaps, latency = [], [], 0, []
    t0 = c0 = None
    while True:
        if not sock.poll(10_000):
            raise RuntimeError("no message for 10 s: " + (proc.stderr.read() if proc.poll() is not None else ""))
        msg = inp.decode(inp.read(sock)[0])
        if msg.header.eos:
            inp.end(sock)
            break
        now = time.monotonic_ns()
        if msg.header.seq == warmup:
            t0, c0 = now, cpu_seconds(proc.pid)
        if t0 is not None:
            msg.arrays["lines"].reshape(-1)[-1]  # touch: a view of real memory
            stamps.append(msg.header.device_ts_ns)  # when the node fetched the frame (host clock: viky has none)
            positions.append(msg.header.position)
            gaps += msg.header.gap
            latency.append(now - msg.header.trace[0].t_in_ns)
            if len(stamps) == frames:
                c1, stop_ns = cpu_seconds(proc.pid), now
                lost_by = lost_by_reason(port)  # the node is still up: it waits for us to read its end
        msg.release()
    _, err = proc.communicate(timeout=30)
    if proc.returncode:
        raise RuntimeError(f"the node exited with {proc.returncode}: {err[-2000:]}")
    inp.close()
    readers.close()
    ctx.term()
    shutil.rmtree(run_dir)
    fps = steady_rate(stamps)
    frame_ticks = HEIGHT * settings.cameras.rgb.ticks_per_line
    lost = (positions[-1] - positions[0]) // frame_ticks + 1 - len(positions)
    lat_ms = np.array(latency) / 1e6
    return {"fps": fps, "mb_s": fps * WIDTH * HEIGHT * 3 / 1e6,
            "cpu": (c1 - c0) / ((stop_ns - t0) / 1e9), "lost": lost, "gaps": gaps,
            **{f"lost_{reason}": n for reason, n in lost_by.items()},
            "latency_p50_ms": float(np.percentile(lat_ms, 50)), "latency_p99_ms": float(np.percentile(lat_ms, 99))}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a short run (under a minute)")
    parser.add_argument("--json", metavar="PATH", help="write the figures as one flat JSON object")
    parser.add_argument("--runs", type=int, default=3, help="runs of each; medians are reported (default 3)")
    args = parser.parse_args(argv)
    frames = 300 if args.quick else 1000
    runs = 1 if args.quick else args.runs

    results = mp.get_context("spawn").Queue()
    bare_runs, node_runs = [], []
    for _ in range(runs):  # interleaved, so that a change in the machine's load hits both
        child = mp.get_context("spawn").Process(target=bare, args=(frames, results))
        child.start()
        bare_runs.append(results.get(timeout=120))
        child.join()
        node_runs.append(node(frames))

    figures: dict[str, float] = {}
    for prefix, rs in (("bare", bare_runs), ("node", node_runs)):
        for key in rs[0]:
            figures[f"{prefix}_{key}"] = statistics.median(r[key] for r in rs)
    figures["acquire_vs_bare"] = figures["node_fps"] / figures["bare_fps"]
    figures["frames"] = frames
    figures["runs"] = runs

    print(f"acquire: viky.cti {WIDTH}x{HEIGHT} RGBa8 at AcquisitionFrameRate {RATE:g}, {BUFFERS} buffers; "
          f"{frames} frames per run, medians of {runs} run(s)")
    print(f"{'':<6} {'frames/s':>9} {'MB/s':>8} {'CPU':>6} {'lost':>5}")
    for prefix, what in (("bare", "harvesters try_fetch + queue, RGBa8 as delivered"),
                         ("node", "messages of 800x800x3 RGB through shared memory")):
        print(f"{prefix:<6} {figures[f'{prefix}_fps']:>9.1f} {figures[f'{prefix}_mb_s']:>8.0f} "
              f"{figures[f'{prefix}_cpu'] * 100:>5.0f}% {figures[f'{prefix}_lost']:>5.0f}   {what}")
    print(f"node: fetch to consumer latency p50 {figures['node_latency_p50_ms']:.2f} ms, "
          f"p99 {figures['node_latency_p99_ms']:.2f} ms; gap-flagged messages {figures['node_gaps']:.0f}; "
          f"the node's own loss counts: " + ", ".join(f"{k.removeprefix('node_lost_')} {v:.0f}"
                                                     for k, v in figures.items() if k.startswith("node_lost_")))
    print(f"acquire_vs_bare (node frames/s / bare frames/s): {figures['acquire_vs_bare']:.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
