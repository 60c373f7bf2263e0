"""Transport benchmark: shared-memory slots against plain ZeroMQ, next to memcpy.

One producer process, one consumer process, lossless. For each payload
(64 KiB, 2 MiB, and a production-profile strip: 256x2560x3 uint8 RGB plus
64x640x32 float16 HSI) and each path:

- shm: sortline's own Output/Input over ipc://, arrays in a slot pool. The
  producer writes the payload into the slot (as a camera node would), sends
  the header; the consumer gets zero-copy views.
- zmq: plain inline ZeroMQ over ipc://: header frame plus array frames sent
  with copy=False, read back with copy=False and numpy.frombuffer.

The producer and the consumer are pinned to one CPU each (as a machine
would place its nodes); --no-pin leaves them to the scheduler.

Throughput is back-to-back (MB/s, MB = 10^6 bytes). Latency is paced at 200
messages/s, one way, from the publish call (after the producer has written
its payload) to the moment the consumer holds a usable view. The time to
write the payload into a slot after an idle gap (cold pages, caches) is
reported apart, as shm_*_write_p50_us. The physical limit, an in-process
numpy copy of the same bytes, is measured in the same run.

    python benchmarks/transport.py [--quick] [--json PATH] [--runs N]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

PAYLOADS = {
    "64kib": {"a": ((64 * 1024,), "uint8")},
    "2mib": {"a": ((2 * 1024 * 1024,), "uint8")},
    "strip": {"rgb": ((256, 2560, 3), "uint8"), "hsi": ((64, 640, 32), "float16")},
}
PACED_HZ = 200


def nbytes(payload) -> int:
    return sum(int(np.prod(shape)) * np.dtype(dtype).itemsize for shape, dtype in payload.values())


def make_edge(run_dir: Path, shm: bool):
    from sortline.pipeline.graph import Edge

    address = f"ipc://{run_dir}/bench-{'shm' if shm else 'zmq'}.sock"
    return Edge(name="bench", src="p", src_port="out", dst="c", dst_port="in", policy="lossless",
                pattern="pushpull", shm=shm, hwm=4, slots=8, address=address, bind=address, lane=0)


# The consumer process.

def pin(cpu: int | None) -> None:
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})


def consume(path: str, run_dir: str, total: int, results, cpu: int | None) -> None:
    pin(cpu)
    import zmq

    from sortline.pipeline.messages import decode_header, inline_arrays
    from sortline.pipeline.transport import Input, SlotReaders

    ctx = zmq.Context()
    edge = make_edge(Path(run_dir), shm=path == "shm")
    if path == "shm":
        inp = Input(ctx, "c", "in", [edge], SlotReaders(run_dir))
        sock = next(iter(inp.sockets))
    else:
        sock = ctx.socket(zmq.PULL)
        sock.setsockopt(zmq.RCVHWM, 4)
        sock.connect(edge.address)
    arrivals = np.zeros(total, dtype=np.int64)
    sent_at = np.zeros(total, dtype=np.int64)
    for i in range(total):
        sock.poll(-1)
        if path == "shm":
            msg = inp.decode(inp.read(sock)[0])
            views, stamp = msg.arrays, msg.header.trace[-1].t_out_ns
        else:
            frames = sock.recv_multipart(copy=False)
            header = decode_header(frames[0].buffer)
            views, stamp = inline_arrays(header, frames[1:]), header.meta["t"]
        arrivals[i] = time.monotonic_ns()  # the consumer holds usable views now
        sent_at[i] = stamp
        for v in views.values():
            v.reshape(-1)[-1]  # touch it: a view of real memory
        if path == "shm":
            msg.release()
    results.put((arrivals, sent_at))
    sock.close()
    ctx.term()


# The producer (this process).

def produce(path: str, payload: dict, n_fast: int, n_paced: int, cpus: tuple = (None, None)) -> dict:
    import zmq

    from sortline.pipeline.messages import Header, inline_frames
    from sortline.pipeline.transport import Output

    run_dir = Path(tempfile.mkdtemp(prefix="slb-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None))
    results = mp.get_context("spawn").Queue()
    child = mp.get_context("spawn").Process(target=consume,
                                            args=(path, str(run_dir), n_fast + n_paced, results, cpus[1]))
    child.start()
    pin(cpus[0])
    ctx = zmq.Context()
    edge = make_edge(run_dir, shm=path == "shm")
    rng = np.random.default_rng(1)
    src = {name: rng.integers(0, 255, size=int(np.prod(shape)) * np.dtype(dtype).itemsize, dtype=np.uint8)
           .view(dtype).reshape(shape) for name, (shape, dtype) in payload.items()}
    write_ns = []
    if path == "shm":
        out = Output(ctx, "p", "out", [edge], run_dir, lambda: False)
        out.wait_for_consumers(30)

        def send(i: int, paced: bool) -> None:
            msg = out.new({k: (a.shape, a.dtype) for k, a in src.items()}, stream="bench", seq=i)
            t = time.perf_counter_ns()
            for k, a in src.items():
                np.copyto(msg.arrays[k], a)
            if paced:
                write_ns.append(time.perf_counter_ns() - t)
            out.send(msg, 0, "p")  # stamps the publish time into the trace
    else:
        sock = ctx.socket(zmq.PUSH)
        sock.setsockopt(zmq.SNDHWM, 4)
        sock.bind(edge.bind)
        while not sock.poll(50, zmq.POLLOUT):
            pass

        def send(i: int, paced: bool) -> None:
            frames = inline_frames(Header(stream="bench", seq=i, meta={"t": time.monotonic_ns()}), src)
            sock.send_multipart(frames, copy=False)

    t0 = time.monotonic_ns()
    for i in range(n_fast):
        send(i, False)
    period = 1e9 / PACED_HZ
    start = time.monotonic_ns() + 50_000_000
    for j in range(n_paced):
        target = start + int(j * period)
        while (left := target - time.monotonic_ns()) > 0:
            time.sleep(left / 1e9)
        send(n_fast + j, True)
    arrivals, sent_at = results.get(timeout=120)
    child.join()
    if path == "shm":
        out.close()
    else:
        sock.close()
    ctx.term()
    for leftover in run_dir.iterdir():
        leftover.unlink()
    run_dir.rmdir()

    size = nbytes(payload)
    fast_s = (arrivals[n_fast - 1] - t0) / 1e9
    lat_us = (arrivals[n_fast:] - sent_at[n_fast:]) / 1e3
    result = {
        "mb_s": n_fast * size / fast_s / 1e6,
        "p50_us": float(np.percentile(lat_us, 50)),
        "p99_us": float(np.percentile(lat_us, 99)),
    }
    if write_ns:
        result["write_p50_us"] = float(np.median(write_ns) / 1e3)
    return result


def memcpy(payload: dict, repeats: int = 200) -> dict:
    size = nbytes(payload)
    src = np.random.default_rng(2).integers(0, 255, size=size, dtype=np.uint8)
    # Offset the destination by a cache line so its address does not alias the source modulo 4 KiB.
    dst = np.empty(size + 4096 + 64, dtype=np.uint8)[64:64 + size]
    times = []
    for _ in range(repeats):
        t = time.perf_counter_ns()
        np.copyto(dst, src)
        times.append(time.perf_counter_ns() - t)
    us = float(np.median(times) / 1e3)
    return {"mb_s": size / us, "us": us}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a short run (under a minute)")
    parser.add_argument("--json", metavar="PATH", help="write the figures as one flat JSON object")
    parser.add_argument("--runs", type=int, default=3, help="runs per case; medians are reported (default 3)")
    parser.add_argument("--no-pin", action="store_true",
                        help="let the scheduler place the processes (default: producer on CPU 0, consumer on CPU 1)")
    args = parser.parse_args(argv)
    cpus = (None, None) if args.no_pin or len(os.sched_getaffinity(0)) < 2 else tuple(sorted(os.sched_getaffinity(0))[:2])
    fast = {"64kib": 2000, "2mib": 300, "strip": 200} if args.quick else {"64kib": 6000, "2mib": 1000, "strip": 600}
    paced = 150 if args.quick else 600

    figures: dict[str, float] = {}
    for name, payload in PAYLOADS.items():
        copy = memcpy(payload)
        figures[f"copy_{name}_mb_s"] = copy["mb_s"]
        figures[f"copy_{name}_us"] = copy["us"]
        for path in ("shm", "zmq"):
            runs = [produce(path, payload, fast[name], paced, cpus) for _ in range(args.runs)]
            for key in runs[0]:
                figures[f"{path}_{name}_{key}"] = statistics.median(r[key] for r in runs)
    figures["shm_vs_zmq_throughput"] = figures["shm_2mib_mb_s"] / figures["zmq_2mib_mb_s"]
    figures["shm_vs_copy_throughput"] = figures["shm_2mib_mb_s"] / figures["copy_2mib_mb_s"]
    figures["shm_vs_zmq_p50"] = figures["shm_2mib_p50_us"] / figures["zmq_2mib_p50_us"]
    figures["runs"] = args.runs
    figures["pinned"] = cpus[0] is not None

    where = f"producer on CPU {cpus[0]}, consumer on CPU {cpus[1]}" if cpus[0] is not None else "unpinned"
    print(f"transport, lossless, one producer -> one consumer process ({where}); medians of {args.runs} runs; "
          f"latency paced at {PACED_HZ}/s, publish call to usable view")
    print(f"{'payload':<8} {'path':<5} {'MB/s':>9} {'p50 us':>9} {'p99 us':>9}")
    for name, payload in PAYLOADS.items():
        for path in ("shm", "zmq"):
            print(f"{name:<8} {path:<5} {figures[f'{path}_{name}_mb_s']:>9.0f} "
                  f"{figures[f'{path}_{name}_p50_us']:>9.0f} {figures[f'{path}_{name}_p99_us']:>9.0f}")
        print(f"{name:<8} {'copy':<5} {figures[f'copy_{name}_mb_s']:>9.0f} {figures[f'copy_{name}_us']:>9.1f}"
              f"   (in-process numpy copy)")
        print(f"{'':<8} shm: writing the payload into its slot takes {figures[f'shm_{name}_write_p50_us']:.0f} us "
              f"(p50, paced: after an idle gap; not in the latency above)")
    print(f"2 MiB: shm/zmq throughput {figures['shm_vs_zmq_throughput']:.2f}x, "
          f"shm/copy throughput {figures['shm_vs_copy_throughput']:.2f}x, shm/zmq p50 {figures['shm_vs_zmq_p50']:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
