"""Recording and replay benchmark: the record node against a plain file write.

The payload is the demo profile's cameras at the 3 m/s stress speed: RGB
frames of 32 x 640 x 3 uint8 and HSI frames of 8 x 160 x 224 uint16, one of
each per 10 ms (3200 RGB and 800 HSI lines/s, 63.4 MB/s together; the rate
is computed from configs/demo.toml). Frame content is camera-like: a smooth
scene plus sensor noise, HSI as 12-bit raw counts, so that lz4 finds what it
would find in real frames (little).

- record: sortline's record node itself (nodes/record.py, its writer thread,
  pipeline/mcap_writer.py with lz4 chunks of 1 MiB), fed messages as fast as
  it takes them, from the first message until the file is finished and fsynced.
- record, no compression: the same with `compression = "none"`.
- record, no pictures: the default recorder with `image_hz = 0`, i.e. without its
  image channels for Foxglove (/rgb/image, /hsi/image): what those cost.
- mcap library: the same frames, encoded beforehand, written by the mcap
  library's own Writer (lz4, 1 MiB chunks) in one thread, then fsynced: what
  the recorder would manage with it (why it has its own writer).
- plain: the same frame bytes written with one `write` each to a file on
  the same disk, then fsynced: what the disk and the page cache allow.
- replay: the recording read back as the replay node does (record by record,
  lz4, CRC checked) and each frame's arrays copied out, as into a slot.

MB = 10^6 bytes of frame payload (header bytes included).

    python benchmarks/record.py [--quick] [--json PATH] [--runs N] [--dir DIR]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sortline.pipeline import recording  # noqa: E402
from sortline.pipeline.graph import load_config  # noqa: E402
from sortline.pipeline.messages import Header, Message  # noqa: E402

SPEED_M_S = 3.0
VARIANTS = 8  # distinct frames per stream, cycled


def demo_streams():
    """(stream, shape, dtype, frames per second) for each camera of the demo profile at 3 m/s."""
    settings = load_config(Path(__file__).resolve().parent.parent / "configs" / "demo.toml")
    out = []
    for name, dtype, itemsize in (("rgb", "uint8", 1), ("hsi", "uint16", 2)):
        cam = getattr(settings.cameras, name)
        rate = settings.line_rate_hz(name, SPEED_M_S)
        out.append((name, (cam.lines_per_frame, cam.pixels, cam.bands), dtype, rate / cam.lines_per_frame))
    return settings, out


def camera_like(shape, dtype, rng) -> np.ndarray:
    """A smooth scene plus noise: what a line-scan camera sees of a belt."""
    lines, pixels, bands = shape
    top = 255 if dtype == "uint8" else 4095
    x = np.linspace(0, 6 * np.pi, pixels)[None, :, None]
    y = np.linspace(0, np.pi, lines)[:, None, None]
    b = np.linspace(0, 2 * np.pi, bands)[None, None, :]
    scene = 0.5 + 0.25 * np.sin(x + rng.uniform(0, 6)) * np.cos(y) + 0.15 * np.sin(b + x / 3)
    noisy = scene * top + rng.normal(0, top * 0.02, shape)
    return np.clip(noisy, 0, top).astype(dtype)


def messages(streams, pairs: int):
    rng = np.random.default_rng(3)
    frames = {name: [camera_like(shape, dtype, rng) for _ in range(VARIANTS)] for name, shape, dtype, _ in streams}
    for i in range(pairs):
        for name, shape, _, _ in streams:
            header = Header(stream=name, seq=i, position=i * shape[0] * (15 if name == "rgb" else 60),
                            ticks_per_line=15 if name == "rgb" else 60, device_ts_ns=i * 10_000_000, host_ts=True)
            yield Message(header, {"lines": frames[name][i % VARIANTS]})


def run_record(settings, streams, pairs: int, path: Path, compression: str = "lz4",
               image_hz: float = 2.0) -> tuple[float, int]:
    from sortline.nodes.record import Recorder

    node = Recorder("record", Recorder.Params(path=str(path), overwrite=True, compression=compression,
                                              image_hz=image_hz), settings)
    node.setup()
    t0 = time.perf_counter()
    for msg in messages(streams, pairs):
        node.process("in", msg)
    node.teardown()  # writes what is queued, the summary, closes the file
    with open(path, "rb+") as fh:
        os.fsync(fh.fileno())
    seconds = time.perf_counter() - t0
    total = sum(s.bytes for s in node.stats.values())
    return total / seconds / 1e6, node.stalls


def encoded(streams) -> list[bytes]:
    """The frames of VARIANTS pairs of messages, encoded beforehand."""
    return [bytes(recording.encode_frame(m.header, m.arrays)) for m in messages(streams, VARIANTS)]


def run_mcap_library(streams, pairs: int, path: Path) -> float:
    from mcap.writer import CompressionType, Writer

    frames, per = encoded(streams), len(streams)
    total = 0
    t0 = time.perf_counter()
    with open(path, "wb") as fh:
        writer = Writer(fh, chunk_size=1 << 20, compression=CompressionType.LZ4)
        writer.start()
        schema = writer.register_schema(recording.SCHEMA_NAME, recording.SCHEMA_ENCODING, b"")
        channels = [writer.register_channel(name, recording.MESSAGE_ENCODING, schema) for name, *_ in streams]
        for i in range(pairs):
            for j in range(per):
                frame = frames[(i % VARIANTS) * per + j]
                writer.add_message(channels[j], log_time=i, data=frame, publish_time=i)
                total += len(frame)
        writer.finish()
        fh.flush()
        os.fsync(fh.fileno())
    return total / (time.perf_counter() - t0) / 1e6


def run_plain(streams, pairs: int, path: Path) -> float:
    # The same frames, encoded beforehand: this path only writes.
    frames, per = encoded(streams), len(streams)
    total = 0
    t0 = time.perf_counter()
    with open(path, "wb") as fh:
        for i in range(pairs):
            for j in range(per):
                total += fh.write(frames[(i % VARIANTS) * per + j])
        fh.flush()
        os.fsync(fh.fileno())
    return total / (time.perf_counter() - t0) / 1e6


def run_replay(path: Path) -> float:
    total = 0
    dest: dict = {}
    t0 = time.perf_counter()
    for frame in recording.frames(path):
        _, arrays = recording.decode_frame(frame.data)
        for name, a in arrays.items():
            out = dest.setdefault((frame.stream, name), np.empty_like(a))
            np.copyto(out, a)
        total += len(frame.data)
    return total / (time.perf_counter() - t0) / 1e6


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a short run (under a minute)")
    parser.add_argument("--json", metavar="PATH", help="write the figures as one flat JSON object")
    parser.add_argument("--runs", type=int, default=None,
                        help="runs per case; medians are reported (default 3, --quick 1)")
    parser.add_argument("--dir", default=None, help="where to write the files (default: the system's temp dir, a disk)")
    args = parser.parse_args(argv)
    settings, streams = demo_streams()
    demo_rate = sum(int(np.prod(shape)) * np.dtype(dtype).itemsize * fps for _, shape, dtype, fps in streams) / 1e6
    pairs = 300 if args.quick else 1500  # 10 ms of belt each: 3 s or 15 s of recording
    runs = args.runs or (1 if args.quick else 3)
    logging.basicConfig(level=logging.ERROR)  # the recorder's stall warnings are expected here: it is fed flat out

    work = Path(tempfile.mkdtemp(prefix="sortline-bench-", dir=args.dir))
    rec, rec_none, rec_bare, library, plain, replay, stalls = [], [], [], [], [], [], []
    try:
        for _ in range(runs):
            mb_s, n_stalls = run_record(settings, streams, pairs, work / "rec.mcap")
            rec.append(mb_s)
            stalls.append(n_stalls)
            replay.append(run_replay(work / "rec.mcap"))
            size = (work / "rec.mcap").stat().st_size
            plain.append(run_plain(streams, pairs, work / "plain.bin"))
            rec_none.append(run_record(settings, streams, pairs, work / "none.mcap", "none")[0])
            rec_bare.append(run_record(settings, streams, pairs, work / "bare.mcap", image_hz=0)[0])
            library.append(run_mcap_library(streams, pairs, work / "library.mcap"))
            plain_size = (work / "plain.bin").stat().st_size
    finally:
        for f in work.iterdir():
            f.unlink()
        work.rmdir()

    figures = {
        "record_mb_s": statistics.median(rec),
        "record_none_mb_s": statistics.median(rec_none),
        "record_no_images_mb_s": statistics.median(rec_bare),
        "mcap_library_mb_s": statistics.median(library),
        "plain_write_mb_s": statistics.median(plain),
        "replay_mb_s": statistics.median(replay),
        "demo_3ms_mb_s": demo_rate,
        "size_ratio": size / plain_size,
        "record_stalls": max(stalls),
        "recorded_mb": plain_size / 1e6,
        "runs": runs,
    }
    figures["record_vs_plain_write"] = figures["record_mb_s"] / figures["plain_write_mb_s"]
    figures["record_images_vs_none"] = figures["record_mb_s"] / figures["record_no_images_mb_s"]
    figures["record_margin"] = figures["record_mb_s"] / demo_rate
    figures["replay_margin"] = figures["replay_mb_s"] / demo_rate

    print(f"record/replay, demo profile at {SPEED_M_S:g} m/s: "
          + ", ".join(f"{name} {shape} {dtype} at {fps:.0f}/s" for name, shape, dtype, fps in streams)
          + f" = {demo_rate:.1f} MB/s; {figures['recorded_mb']:.0f} MB per run, median of {runs}")
    print(f"  record (lz4, node + writer thread, fsync)  {figures['record_mb_s']:8.0f} MB/s  "
          f"{figures['record_margin']:.1f}x the demo rate, {figures['record_stalls']} stalls, "
          f"file {figures['size_ratio']:.2f} of the raw size")
    print(f"  record, no compression                     {figures['record_none_mb_s']:8.0f} MB/s")
    print(f"  record, no image channels (image_hz = 0)   {figures['record_no_images_mb_s']:8.0f} MB/s  "
          f"with them {figures['record_images_vs_none']:.2f}x as fast")
    print(f"  mcap library's Writer (lz4, one thread)    {figures['mcap_library_mb_s']:8.0f} MB/s")
    print(f"  plain write (same bytes, fsync)            {figures['plain_write_mb_s']:8.0f} MB/s")
    print(f"  record_vs_plain_write                      {figures['record_vs_plain_write']:8.2f}")
    print(f"  replay (read, lz4, crc, copy out)          {figures['replay_mb_s']:8.0f} MB/s  "
          f"{figures['replay_margin']:.1f}x the demo rate")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
