"""Replicas: strips per second through the demo's infer node with 1 replica and with 2.

The demo profile's infer node (the shipped nano model, ONNX Runtime, one
thread) runs as real node processes, `sortline node infer` (1 replica, pinned
to core 0) and `sortline node infer#0` / `infer#1` (2 replicas, pinned to
cores 0 and 1), between the two ends of the graph the runtime wires for them:

- the producer is this process, standing in for the register node: it sends
  held-out synthetic strips of the demo profile (64 + 2 x 16 lines x 640 px
  RGB, 24 x 160 x 32 bands HSI; made beforehand, so that the feed costs a
  copy per strip and not a belt simulation) on the lossless edge
  register.out -> infer.in, as fast as the replicas take them (round robin);
- the consumer is a real sink node (`sortline node sink`) behind the merge:
  it counts what arrives, lost (a hole in the seqs) and reordered messages.

The feed starts once every node has sent its first heartbeat (it is ready:
the model loaded), as a graph's sources start once every node is up, and
the infer node infers every strip however long it waited (timing = false).
strips/s is the sink's: received strips over the time from the first to the
last. The baseline is the 1-replica run, in the same invocation:
`infer_replicas_speedup_2` = 2-replica strips/s / 1-replica strips/s (2.0 at
best on two free cores). The machine's load (`uptime`) goes in the figures:
a core busy with other work takes a replica's share.

Where the difference goes: each replica's time in the model per strip
(infer_ms_per_strip_*, from the nodes' last heartbeats) and the feed's CPU
per strip (feed_cpu_ms_per_strip), which in the 2-replica run is taken from
the replicas' cores.

Rounds of (1 replica, 2 replicas) are interleaved, so that a change in the
machine's load hits both; the figures are the medians.

    python benchmarks/replicas.py [--quick] [--json PATH] [--strips N] [--rounds N] [--config MACHINE]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import msgspec
import numpy as np
import tomli_w
import zmq

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sortline.calibration.spectral import bin_bands  # noqa: E402
from sortline.nodes.simulate import Simulation  # noqa: E402
from sortline.nodes.streams import StripMeta  # noqa: E402
from sortline.pipeline.config import compose  # noqa: E402
from sortline.pipeline.graph import load_config, outputs_of  # noqa: E402
from sortline.pipeline.graph import finished_mark, heartbeat_address  # noqa: E402
from sortline.pipeline.transport import Output  # noqa: E402

DEMO = ROOT / "configs" / "demo.toml"
VARIANTS = 8  # distinct strips, cycled


def strips(settings, count: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Held-out synthetic strips of the machine (a seed the model was not trained on)."""
    m = settings.model
    sim = Simulation(settings, seed=1100, occupancy=0.5)
    out = []
    for i in range(count):
        s = sim.strip(i * m.strip_lines, m.strip_lines + 2 * m.overlap_lines)
        out.append((s["rgb"], bin_bands(s["hsi"], m.bands, dtype=np.float16)))
    return out


def config(machine: Path, path: Path, run_dir: Path, replicas: int, report: Path) -> Path:
    """The machine (the demo's by default), with register -> infer (replicas, one core each) -> sink; only infer
    and sink run."""
    data = compose(machine)

    def beside(v: str) -> str:
        return v if not v or os.path.isabs(v) or ":" in v else str(machine.parent / v)

    data["calibration"] = {k: beside(v) for k, v in data["calibration"].items()}
    data["ejector"]["key"] = beside(data["ejector"]["key"])
    data["model"]["path"] = beside(data["model"]["path"])
    data.pop("supervisor", None)
    data["graph"] = {"name": f"bench-replicas-{replicas}", "runtime_dir": str(run_dir)}
    data["nodes"] = {
        "belt": {"kind": "simulate"},
        "register": {"kind": "register"},
        # A throughput run: every strip is inferred however long it waited (a live node drops late ones).
        "infer": {"kind": "infer", "replicas": replicas, "cpus": list(range(replicas)), "params": {"timing": False}},
        "sink": {"kind": "sink", "params": {"report": str(report), "verify": False}},
    }
    data["edges"] = [
        {"from": "belt.rgb", "to": "register.rgb"}, {"from": "belt.hsi", "to": "register.hsi"},
        {"from": "register.out", "to": "infer.in", "policy": "lossless", "hwm": 4},
        {"from": "infer.out", "to": "sink.in", "policy": "lossless", "hwm": 16},
    ]
    path.write_text(tomli_w.dumps(data))
    return path


def run(machine: Path, replicas: int, count: int, made: list, workdir: Path) -> dict:
    run_dir = Path(tempfile.mkdtemp(prefix=f"slr{replicas}-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None))
    report = workdir / f"sink-{replicas}.json"
    cfg = config(machine, workdir / f"replicas-{replicas}.toml", run_dir, replicas, report)
    settings = load_config(cfg)
    names = ["infer"] if replicas == 1 else [f"infer#{i}" for i in range(replicas)]
    ctx, last = zmq.Context(), {}
    beats = ctx.socket(zmq.PULL)   # where the supervisor would listen: a node's first beat says it is ready
    beats.setsockopt(zmq.LINGER, 0)
    beats.bind(heartbeat_address(run_dir))
    procs = [subprocess.Popen([sys.executable, "-m", "sortline", "node", name, "--config", str(cfg)],
                              stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for name in ["sink", *names]]
    out = Output(ctx, "register", "out", outputs_of(settings, "register")["out"], run_dir, lambda: False)
    m = settings.model
    r = settings.hsi_ratio
    tpl = settings.cameras.rgb.ticks_per_line
    try:
        if not out.wait_for_consumers(60):
            raise SystemExit("the infer replicas did not connect within 60 s")
        # A replica connects before it has loaded its model: timed from when all are ready, as a live graph's
        # sources start once every node is (a replica still loading would stall the merge and count as slow).
        ready, deadline = set(), time.monotonic() + 60
        while not ready >= {"sink", *names}:
            if not beats.poll(max(0, int((deadline - time.monotonic()) * 1000))):
                raise SystemExit(f"not ready within 60 s: {sorted({'sink', *names} - ready)}")
            ready.add(msgspec.msgpack.decode(beats.recv())["node"])
        t0, cpu0 = time.monotonic(), time.process_time()
        for seq in range(count):
            rgb, hsi = made[seq % len(made)]
            msg = out.new({"rgb": (rgb.shape, np.uint8), "hsi": (hsi.shape, np.float16)}, stream="strip", seq=seq,
                          position=seq * m.strip_lines * tpl, ticks_per_line=tpl,
                          meta=StripMeta(m.overlap_lines, r, m.strip_lines))
            msg.arrays["rgb"][...] = rgb
            msg.arrays["hsi"][...] = hsi
            msg.t_in_ns = time.monotonic_ns()
            out.send(msg, msg.t_in_ns, "register")
        fed_s, feed_cpu_s = time.monotonic() - t0, time.process_time() - cpu0
        finished_mark(run_dir, "register").write_text(f"{os.getpid()}\n")
        late = out.finish("register", 0, 120)
        if late:
            raise SystemExit(f"consumers did not finish: {late}")
        for p in procs:
            p.wait(120)
        while beats.poll(0):   # each node's last beat (its final counts): how long a strip took in the model
            beat = msgspec.msgpack.decode(beats.recv())
            last[beat["node"]] = beat["status"]
    finally:
        out.close()
        beats.close()
        ctx.term()
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    failed = [p.stderr.read()[-2000:] for p in procs if p.returncode != 0]
    if failed:
        raise SystemExit("a node failed:\n" + "\n".join(failed))
    sink = json.loads(report.read_text())
    return {"strips_per_s": sink["rate_per_s"], "received": sink["received"], "lost": sink["lost"],
            "reordered": sink["reordered"], "fed_s": fed_s, "feed_ms_per_strip": feed_cpu_s / count * 1000,
            "ms_per_strip": statistics.mean(last[n].get("ms_per_strip", float("nan")) for n in names)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a short run (under a minute)")
    parser.add_argument("--json", metavar="PATH", help="write the figures as one flat JSON object")
    parser.add_argument("--strips", type=int, default=0, help="strips per run (default 300, 150 with --quick)")
    parser.add_argument("--rounds", type=int, default=0, help="rounds of (1 replica, 2 replicas) (default 3, 1 "
                        "with --quick): the medians are the figures")
    parser.add_argument("--config", type=Path, default=DEMO, help="the machine (default: the demo profile; "
                        "configs/production-twin.toml: the production strip and model)")
    args = parser.parse_args()
    count = args.strips or (150 if args.quick else 300)
    rounds = args.rounds or (1 if args.quick else 3)
    settings = load_config(args.config)
    made = strips(settings, VARIANTS)
    load_before = os.getloadavg()[0]
    results: dict[int, list[dict]] = {1: [], 2: []}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(rounds):   # interleaved, so that a change in the machine's load hits both alike
            for replicas in (1, 2):
                results[replicas].append(run(args.config, replicas, count, made, Path(tmp)))
    rate = {n: statistics.median(r["strips_per_s"] for r in runs) for n, runs in results.items()}
    every = results[1] + results[2]
    figures = {
        "infer_replicas_speedup_2": round(rate[2] / rate[1], 3),
        "strips_per_s_1": round(rate[1], 2),
        "strips_per_s_2": round(rate[2], 2),
        # Time in the model per strip, in each replica (mean over replicas): if it grows from 1 to 2 replicas the
        # cores are contended; if it does not while strips/s falls short, the replicas waited for strips.
        "infer_ms_per_strip_1": round(statistics.median(r["ms_per_strip"] for r in results[1]), 2),
        "infer_ms_per_strip_2": round(statistics.median(r["ms_per_strip"] for r in results[2]), 2),
        # CPU the feed (this process) spent per strip: what the replicas' cores lose to it
        "feed_cpu_ms_per_strip": round(statistics.median(r["feed_ms_per_strip"] for r in every), 3),
        "lost": sum(r["lost"] for r in every),
        "reordered": sum(r["reordered"] for r in every),
        "received": sum(r["received"] for r in every),
        "sent": count * len(every),
        "strips": count,
        "rounds": rounds,
        "cores": os.cpu_count(),
        "load_1min_before": round(load_before, 2),
        "load_1min_after": round(os.getloadavg()[0], 2),
        "model": settings.model.path,
    }
    for key, value in figures.items():
        print(f"{key:>26}: {value}")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")
    return 0 if figures["lost"] == 0 and figures["reordered"] == 0 and figures["received"] == figures["sent"] else 1


if __name__ == "__main__":
    sys.exit(main())
