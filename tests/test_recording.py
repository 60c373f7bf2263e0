"""Recording, replay and inspection, with real processes, sockets and files.

Recordings are read back here with the `mcap` library and the layout of
docs/recording.md, not with sortline's own reader, so that the file format
is checked as an outside tool sees it.
"""

from __future__ import annotations

import math
import os
import signal
import struct
import threading
import time
from pathlib import Path

import cv2
import lz4.frame
import msgspec
import numpy as np
import pytest
from mcap.reader import make_reader
from mcap.data_stream import ReadDataStream
from mcap.records import Channel, Chunk, MessageIndex
from mcap.records import Message as McapMessage
from mcap.stream_reader import StreamReader, breakup_chunk
from mcap.writer import CompressionType, Writer

from conftest import (edge_toml, free_port, load_json, metric, node_toml, pid_of, scrape, sortline, start, stop,
                      wait_for, write_config)
from sortline.nodes.pattern import pattern

N = 300  # messages per stream in the shared recording
RGB = "camera = 'rgb', lines = 8, pixels = 64, bands = 3, paced = false"
HSI = "camera = 'hsi', dtype = 'uint16', lines = 2, pixels = 16, bands = 224, paced = false"
DEFAULTS = {"position": 0, "ticks_per_line": 0, "device_ts_ns": 0, "host_ts": False, "gap": False, "eos": False,
            "arrays": [], "trace": [], "meta": {}, "schema": 1}


def recorder(params: str, *sources: str) -> str:
    """A record node fed by each of these source nodes."""
    return node_toml("record", "record", params) + "".join(edge_toml(f"{src}.out", "record.in") for src in sources)


def sources_graph(rgb: str, hsi: str, sink: str, extra: str = "", truth: str = "") -> str:
    """Test-pattern cameras into a sink (a replay takes the cameras' places)."""
    sources = {"rgbcam": rgb, "hsicam": hsi, **({"truthsrc": truth} if truth else {})}
    return (node_toml("sink", "sink", sink)
            + "".join(node_toml(name, "pattern", params) + edge_toml(f"{name}.out", "sink.in")
                      for name, params in sources.items())
            + extra)


# Reading a recording the way an outside tool would (docs/recording.md).

def decode(data: bytes) -> tuple[dict, dict[str, np.ndarray]]:
    (n,) = struct.unpack_from("<I", data, 0)
    head = {**DEFAULTS, **msgspec.msgpack.decode(data[4:4 + n])}
    arrays = {name: np.frombuffer(data, dtype=dtype, count=math.prod(shape), offset=4 + n + offset).reshape(shape)
              for name, dtype, shape, offset in head["arrays"]}
    return head, arrays


def read_all(path: Path) -> dict[str, list[tuple[dict, dict]]]:
    """Per stream, in file order: (header, arrays) of every frame (the image channels left out)."""
    out: dict[str, list] = {}
    with open(path, "rb") as fh:
        for schema, channel, message in make_reader(fh).iter_messages(log_time_order=False):
            if channel.message_encoding == "x-sortline-frame-v1":
                out.setdefault(channel.topic, []).append(decode(message.data))
    return out


def same_message(a: tuple[dict, dict], b: tuple[dict, dict]) -> bool:
    """Bit for bit: every header field but the trace, every array's bytes, dtype and shape."""
    (ha, aa), (hb, ab) = a, b
    strip = lambda h: {k: v for k, v in h.items() if k != "trace"}  # noqa: E731
    return (strip(ha) == strip(hb) and aa.keys() == ab.keys()
            and all(aa[k].dtype == ab[k].dtype and aa[k].shape == ab[k].shape
                    and aa[k].tobytes() == ab[k].tobytes() for k in aa))


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """One run of two test-pattern cameras recorded by a record node (small chunks: many of them)."""
    tmp = tmp_path_factory.mktemp("rec")
    run_dir = Path(f"/dev/shm/sl-rec-{os.getpid()}")
    (tmp / "spectral.cal").write_bytes(bytes(range(256)) * 4)
    record = recorder(f"path = '{tmp}/a.mcap', chunk_mb = 0.25, calibration = ['{tmp}/spectral.cal']",
                      "rgbcam", "hsicam")
    graph = sources_graph(f"{RGB}, count = {N}", f"{HSI}, count = {N}", f'report = "{tmp}/sink.json"', record)
    cfg = write_config(tmp / "c.toml", graph, run_dir)
    res = sortline("run", "--config", str(cfg), "--report", str(tmp / "run.json"), timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    yield tmp, cfg, run_dir
    for leftover in run_dir.glob("*"):
        leftover.unlink()
    run_dir.rmdir()


@pytest.mark.system
def test_a_recording_holds_every_message_and_reads_with_the_mcap_library_alone(recorded):
    tmp, cfg, _ = recorded
    path = tmp / "a.mcap"
    streams = read_all(path)
    assert sorted(streams) == ["hsi", "rgb"]
    for name, shape, dtype in (("rgb", (8, 64, 3), "uint8"), ("hsi", (2, 16, 224), "uint16")):
        msgs = streams[name]
        assert [h["seq"] for h, _ in msgs] == list(range(N))
        tpl = 15 if name == "rgb" else 60
        assert [h["position"] for h, _ in msgs] == [seq * shape[0] * tpl for seq in range(N)]
        for head, arrays in msgs:
            assert head["stream"] == name and head["ticks_per_line"] == tpl and head["host_ts"] is True
            assert [t[0] for t in head["trace"]] == [f"{name}cam"]
            assert arrays["lines"].dtype == dtype and arrays["lines"].shape == shape
            assert np.array_equal(arrays["lines"], pattern(shape, dtype, head["seq"]))
    with open(path, "rb") as fh:
        reader = make_reader(fh)
        summary = reader.get_summary()
        frames = {c.id for c in summary.channels.values() if c.message_encoding == "x-sortline-frame-v1"}
        assert {c.topic for c in summary.channels.values() if c.id in frames} == {"rgb", "hsi"}
        assert {c.topic: c.message_encoding for c in summary.channels.values() if c.id not in frames} == {
            "/rgb/image": "protobuf", "/hsi/image": "protobuf"}   # pictures for Foxglove beside the frames
        assert {(s.name, s.encoding) for s in summary.schemas.values()} == {("sortline.Frame", "text/markdown"),
                                                                            ("foxglove.RawImage", "protobuf")}
        assert summary.statistics.chunk_count > 4  # 0.25 MiB chunks
        counts = summary.statistics.channel_message_counts
        assert sorted(n for c, n in counts.items() if c in frames) == [N, N]
        # In log-time order through the chunk indexes, one topic through the message indexes, CRCs checked.
        fh.seek(0)
        ordered = make_reader(fh, validate_crcs=True).iter_messages(topics=["hsi"])
        hsi = [decode(m.data)[0]["seq"] for _, _, m in ordered]
        assert sorted(hsi) == list(range(N))
        check_message_indexes(fh, summary)
        fh.seek(0)
        meta = {m.name: m.metadata for m in reader.iter_metadata()}
        assert meta["sortline"]["profile"] == "demo" and meta["sortline"]["sortline_version"]
        attachments = {a.name: a.data for a in reader.iter_attachments()}
    import tomllib

    assert attachments["calibration/spectral.cal"] == (tmp / "spectral.cal").read_bytes()
    config = tomllib.loads(attachments["config.toml"].decode())
    assert config["cameras"]["hsi"]["bands"] == 224 and config["nodes"]["record"]["kind"] == "record"
    sink = load_json(tmp / "sink.json")
    assert sink["received"] == 2 * N and sink["corrupt"] == 0
    assert load_json(tmp / "run.json")["nodes"]["record"]["status"]["messages"] == 2 * N


@pytest.mark.system
def test_a_recordings_image_channels_decode_as_foxglove_raw_images_with_the_mcap_librarys_own_decoder(recorded):
    """What Foxglove shows of a recording: /rgb/image and /hsi/image, foxglove.RawImage in protobuf, decoded by
    mcap-protobuf-support from the schema the file carries (no sortline, no generated classes). The RGB pictures
    are the camera's lines, every one of them here (64 pixels wide: under image_px), tiling the belt in order."""
    from mcap_protobuf.decoder import DecoderFactory

    tmp, _, _ = recorded
    pictures: dict[str, list] = {}
    with open(tmp / "a.mcap", "rb") as fh:
        reader = make_reader(fh, decoder_factories=[DecoderFactory()])
        for schema, channel, message, image in reader.iter_decoded_messages(topics=["/rgb/image", "/hsi/image"],
                                                                            log_time_order=False):
            assert schema.name == "foxglove.RawImage" and type(image).DESCRIPTOR.full_name == "foxglove.RawImage"
            assert image.encoding == "rgb8" and image.step == 3 * image.width
            assert len(image.data) == image.height * image.step and image.frame_id == "belt"
            assert image.timestamp.ToNanoseconds() == message.log_time
            pictures.setdefault(channel.topic, []).append(
                np.frombuffer(image.data, np.uint8).reshape(image.height, image.width, 3))
    rgb = pictures["/rgb/image"]
    # A picture is half a second of belt at the demo's 2 m/s (image_hz = 2): 1000 mm / 0.9375 mm per line.
    assert [p.shape[0] for p in rgb] == [1067, 1067, 8 * N - 2134] and {p.shape[1] for p in rgb} == {64}
    lines = np.concatenate([pattern((8, 64, 3), "uint8", seq) for seq in range(N)])
    assert np.array_equal(np.concatenate(rgb), lines)
    hsi = pictures["/hsi/image"]
    assert sum(p.shape[0] for p in hsi) == 2 * N and {p.shape[1] for p in hsi} == {16}   # false colour, 16 px
    assert all(p.std() > 0 for p in hsi)
    # `sortline inspect` lists the picture channels, from the summary and from a scan of every message alike.
    for how in ([], ["--verify"]):
        res = sortline("inspect", *how, str(tmp / "a.mcap"), timeout=60)
        assert res.returncode == 0, res.stderr[-3000:]
        assert f"pictures /rgb/image: {len(rgb)} messages" in res.stdout
        assert f"pictures /hsi/image: {len(hsi)} messages" in res.stdout


def check_message_indexes(fh, summary) -> None:
    """Every message index entry points at a message record with that log time in its chunk."""
    for chunk_index in summary.chunk_indexes:
        fh.seek(chunk_index.chunk_start_offset + 9)  # past the record's opcode and length
        chunk = Chunk.read(ReadDataStream(fh))
        records = lz4.frame.decompress(chunk.data) if chunk.compression == "lz4" else chunk.data
        assert len(records) == chunk_index.uncompressed_size
        entries = 0
        for channel_id, offset in chunk_index.message_index_offsets.items():
            fh.seek(offset + 9)
            index = MessageIndex.read(ReadDataStream(fh))
            assert index.channel_id == channel_id
            for log_time, at in index.records:
                opcode, _, channel, _, logged = struct.unpack_from("<BQHIQ", records, at)
                assert (opcode, channel, logged) == (0x05, channel_id, log_time)
            entries += len(index.records)
        assert entries > 0


@pytest.mark.system
def test_replay_gives_back_every_message_bit_for_bit(recorded, tmp_path, run_dir):
    tmp, _, _ = recorded
    graph = sources_graph(RGB, HSI, f'report = "{tmp_path}/sink.json"')
    cfg = write_config(tmp_path / "c.toml", graph, run_dir)
    res = sortline("replay", str(tmp / "a.mcap"), "--config", str(cfg), "--speed", "0",
                   "--record", str(tmp_path / "b.mcap"), "--report", str(tmp_path / "run.json"), timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    sink = load_json(tmp_path / "sink.json")
    assert sink["received"] == 2 * N and sink["lost"] == 0 and sink["corrupt"] == 0 and sink["reordered"] == 0
    assert set(sink["stages"]) == {"replay"}  # the trace starts anew at the replay
    a, b = read_all(tmp / "a.mcap"), read_all(tmp_path / "b.mcap")
    assert {k: len(v) for k, v in b.items()} == {"rgb": N, "hsi": N}
    for stream in ("rgb", "hsi"):
        assert all(same_message(x, y) for x, y in zip(a[stream], b[stream]))
    assert [t[0] for t in b["rgb"][0][0]["trace"]] == ["replay"]


def write_truth_recording(path: Path, n: int = 40, gap_at: int = 20) -> dict[str, list]:
    """A recording with all three streams, written with the mcap library and the
    documented layout (no sortline code); rgb skips two messages at `gap_at`."""
    rng = np.random.default_rng(7)
    palette = [[40, 40, 40], [255, 0, 0], [0, 200, 0], [0, 0, 255]]
    written: dict[str, list] = {}
    with open(path, "wb") as fh:
        w = Writer(fh, compression=CompressionType.LZ4, chunk_size=64 * 1024)
        w.start(profile="sortline", library="test")
        schema = w.register_schema("sortline.Frame", "text/markdown", b"layout 1")
        channels = {s: w.register_channel(s, "x-sortline-frame-v1", schema) for s in ("rgb", "hsi", "truth")}
        w.add_attachment(0, 0, "config.toml", "application/toml", (Path(__file__).parent.parent / "configs"
                                                                      / "demo.toml").read_bytes())
        for seq in range(n):
            skip = 2 if seq >= gap_at else 0
            pos = (seq + skip) * 8 * 15
            t = 1_000_000_000 + seq * 50_000_000  # log times 50 ms apart
            labels = rng.integers(0, 4, (8, 32), dtype=np.uint8)
            frames = {
                "rgb": ({"position": pos, "ticks_per_line": 15, "gap": seq == gap_at, "meta": {"exposure_us": 50}},
                        {"lines": rng.integers(0, 256, (8, 32, 3), dtype=np.uint8)}),
                "truth": ({"position": pos, "ticks_per_line": 15,
                           "meta": {"classes": ["belt", "pet", "pp", "paper"], "palette": palette}},
                          {"labels": labels, "instances": (labels * 7).astype(np.uint16)}),
            }
            if seq % 4 == 0:  # an HSI message of 8 lines per 4 RGB messages (RGB:HSI 4:1)
                frames["hsi"] = ({"position": pos, "ticks_per_line": 60, "seq": seq // 4},
                                 {"lines": rng.integers(0, 4096, (8, 8, 224), dtype=np.uint16)})
            for stream, (fields, arrays) in frames.items():
                specs, offset = [], 0
                for name, a in arrays.items():
                    specs.append([name, a.dtype.name, list(a.shape), offset])
                    offset += a.nbytes
                head = {"stream": stream, "seq": seq, "device_ts_ns": t, "arrays": specs,
                        "trace": [["sim", t, t + 1000]], "schema": 1, **fields}
                raw = msgspec.msgpack.encode(head)
                data = struct.pack("<I", len(raw)) + raw + b"".join(a.tobytes() for a in arrays.values())
                w.add_message(channels[stream], log_time=t, data=data, publish_time=t, sequence=seq)
                written.setdefault(stream, []).append(decode(data))
        w.finish()
    return written


@pytest.mark.system
def test_replay_of_all_three_streams_with_meta_is_bit_for_bit(tmp_path, run_dir):
    src = tmp_path / "truth.mcap"
    written = write_truth_recording(src)
    graph = sources_graph(RGB, HSI, f'verify = false, report = "{tmp_path}/sink.json"',
                          truth="stream = 'truth', lines = 8, pixels = 32, bands = 1")
    cfg = write_config(tmp_path / "c.toml", graph, run_dir)
    res = sortline("replay", str(src), "--config", str(cfg), "--speed", "0", "--record", str(tmp_path / "b.mcap"),
                   timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    b = read_all(tmp_path / "b.mcap")
    assert {k: len(v) for k, v in b.items()} == {"rgb": 40, "truth": 40, "hsi": 10}
    for stream, msgs in written.items():
        assert all(same_message(x, y) for x, y in zip(msgs, b[stream])), stream
    assert [h["seq"] for h, _ in b["rgb"] if h["gap"]] == [20]
    assert b["truth"][3][0]["meta"]["palette"][1] == [255, 0, 0]


def chunk_ends(path: Path) -> list[tuple[int, int, int]]:
    """(byte offset where each chunk ends, frames in it, its data's length), read with the mcap library."""
    ends, frames = [], set()
    with open(path, "rb") as fh:
        for record in StreamReader(fh, emit_chunks=True).records:
            if isinstance(record, Channel) and record.message_encoding == "x-sortline-frame-v1":
                frames.add(record.id)   # the frames' channels: pictures are not replayed
            if isinstance(record, Chunk):
                count = sum(isinstance(r, McapMessage) and r.channel_id in frames for r in breakup_chunk(record))
                ends.append((fh.tell(), count, len(record.data)))
    return ends


@pytest.mark.system
@pytest.mark.parametrize("case", ["chunk_end", "mid_chunk", "mid_record_header", "file_header", "corrupt"])
def test_a_damaged_recording_replays_up_to_the_damage_then_ends(recorded, tmp_path, run_dir, case):
    tmp, _, _ = recorded
    data = (tmp / "a.mcap").read_bytes()
    ends = chunk_ends(tmp / "a.mcap")
    assert len(ends) > 4
    k = len(ends) // 2
    if case == "corrupt":  # bytes flipped in the middle of chunk k: its CRC fails
        start = ends[k][0] - ends[k][2] // 2  # a chunk's data is the end of its record
        damaged = bytearray(data)
        damaged[start:start + 16] = bytes(b ^ 0x5A for b in damaged[start:start + 16])
        expected = sum(c for _, c, _ in ends[:k])
    else:
        cut = {"chunk_end": ends[k][0], "mid_chunk": (ends[k][0] + ends[k + 1][0]) // 2,
               "mid_record_header": ends[k][0] + 5, "file_header": 40}[case]
        damaged = data[:cut]
        expected = sum(c for end, c, _ in ends if end <= cut)
    path = tmp_path / "damaged.mcap"
    path.write_bytes(bytes(damaged))

    graph = sources_graph(RGB, HSI, f'report = "{tmp_path}/sink.json"')
    cfg = write_config(tmp_path / "c.toml", graph, run_dir)
    res = sortline("replay", str(path), "--config", str(cfg), "--speed", "0", "--report", str(tmp_path / "run.json"),
                   timeout=60)
    assert res.returncode == 0, res.stderr[-3000:]
    sink = load_json(tmp_path / "sink.json")
    assert sink["received"] == expected
    assert sink["corrupt"] == 0 and sink["lost"] == 0 and sink["reordered"] == 0
    assert f"{path}: damaged at byte" in res.stderr and "stopping the replay there" in res.stderr
    run = load_json(tmp_path / "run.json")
    assert run["nodes"]["replay"]["state"] == "finished" and run["nodes"]["replay"]["restarts"] == 0
    assert run["nodes"]["replay"]["status"] == {"published": expected, "passes": 1, "damaged": 1}
    inspect = sortline("inspect", "--verify", str(path), timeout=60)
    assert inspect.returncode == 2 and "DAMAGED" in inspect.stdout
    assert f"the {expected} messages before it are valid" in inspect.stdout


@pytest.mark.system
def test_replay_range_and_loop_keep_counting_and_flag_each_wrap(recorded, tmp_path, run_dir):
    tmp, _, _ = recorded
    graph = sources_graph(RGB, HSI, f'verify = false, report = "{tmp_path}/sink.json"')
    cfg = write_config(tmp_path / "c.toml", graph, run_dir)
    # rgb and hsi messages cover 120 ticks each: positions [1200, 3600) are seq 10..29 of each.
    res = sortline("replay", str(tmp / "a.mcap"), "--config", str(cfg), "--speed", "0", "--from", "1200",
                   "--to", "3600", "--loop", "--seconds", "4", "--record", str(tmp_path / "b.mcap"), timeout=60)
    assert res.returncode == 0, res.stderr[-3000:]
    with open(tmp_path / "b.mcap", "rb") as fh:
        assert make_reader(fh).get_summary() is not None  # the recorder finished the file on SIGTERM
    a, b = read_all(tmp / "a.mcap"), read_all(tmp_path / "b.mcap")
    sink = load_json(tmp_path / "sink.json")
    assert sink["lost"] == 0 and sink["reordered"] == 0
    for stream in ("rgb", "hsi"):
        msgs = b[stream]
        assert len(msgs) >= 60, len(msgs)  # at least three passes
        seqs = [h["seq"] for h, _ in msgs]
        assert seqs == list(range(10, 10 + len(msgs)))  # keeps counting across wraps
        assert [i for i, (h, _) in enumerate(msgs) if h["gap"]] == list(range(20, len(msgs), 20))
        for i, (head, arrays) in enumerate(msgs):
            original = a[stream][10 + i % 20]
            assert head["position"] == original[0]["position"] + (i // 20) * 2400  # the belt runs on
            assert arrays["lines"].tobytes() == original[1]["lines"].tobytes()
    assert sink["gap_flags"] == sum(h["gap"] for s in ("rgb", "hsi") for h, _ in b[s])


@pytest.mark.system
def test_replay_is_paced_as_recorded_or_by_a_speed_factor(tmp_path, run_dir):
    # 90 frames of 32 lines at the demo's 2133 lines/s: 1.35 s as recorded.
    rec = recorder(f"path = '{tmp_path}/paced.mcap'", "rgbcam", "hsicam")
    graph = sources_graph("camera = 'rgb', lines = 32, pixels = 64, count = 90", f"{HSI}, count = 1",
                          f'report = "{tmp_path}/sink.json"', rec)
    cfg = write_config(tmp_path / "c.toml", graph, run_dir)
    res = sortline("run", "--config", str(cfg), timeout=60)
    assert res.returncode == 0, res.stderr[-3000:]
    recorded_rate = 2133.33 / 32
    rates = {}
    for speed in ("1", "3"):
        res = sortline("replay", str(tmp_path / "paced.mcap"), "--config", str(cfg), "--speed", speed,
                       "--streams", "rgb", "--report", str(tmp_path / "run.json"), timeout=60)
        assert res.returncode == 0, res.stderr[-3000:]
        sink = load_json(tmp_path / "sink.json")
        # Every message arrives, or was lost for being over 100 ms late (a busy host), and counted.
        overruns = load_json(tmp_path / "run.json")["nodes"]["replay"]["status"]["overruns"]
        assert sink["received"] + overruns == 90 and overruns <= 9 and sink["corrupt"] == 0
        assert res.stderr.count("recorded stream 'hsi': not replayed") == 1
        rates[speed] = sink["rate_per_s"]
    assert rates["1"] == pytest.approx(recorded_rate, rel=0.15), rates
    assert rates["3"] == pytest.approx(3 * recorded_rate, rel=0.2), rates
    # A consumer that cannot keep up loses frames on its live edge, as from a camera: the survivors are
    # intact, each hole is flagged on the message after it and left in the sequence numbers, where the
    # sink counts it.
    slow_sink = f'report = "{tmp_path}/sink.json", delay_ms = 40'
    lossy = write_config(tmp_path / "lossy.toml", node_toml("sink", "sink", slow_sink)
                         + node_toml("replay", "replay", f"path = '{tmp_path}/paced.mcap'")
                         + edge_toml("replay.rgb", "sink.in"), run_dir)
    res = sortline("run", "--config", str(lossy), timeout=60)
    assert res.returncode == 0, res.stderr[-3000:]
    sink = load_json(tmp_path / "sink.json")
    assert sink["received"] >= 10 and sink["lost"] >= 10 and sink["received"] + sink["lost"] <= 90, sink
    assert sink["corrupt"] == 0 and sink["gap_flags"] == sink["gaps"] > 0 and sink["reordered"] == 0, sink


@pytest.mark.system
def test_a_slow_disk_holds_the_lossless_input_back_loudly_and_loses_nothing(tmp_path, run_dir):
    # The recording goes into a pipe that this test drains at about 4 MB/s: a disk far
    # slower than the camera. Uncompressed, 600 frames of 24 KiB are 15 MB.
    fifo = tmp_path / "slow.mcap"
    os.mkfifo(fifo)
    rec = recorder(f"path = '{fifo}', overwrite = true, compression = 'none', queue_mb = 0.5, chunk_mb = 0.25",
                   "rgbcam")
    graph = sources_graph("camera = 'rgb', lines = 32, pixels = 256, count = 600, paced = false",
                          f"{HSI}, count = 1", f'report = "{tmp_path}/sink.json"', rec)
    cfg = write_config(tmp_path / "c.toml", graph, run_dir)
    received = bytearray()

    def drain():
        with open(fifo, "rb") as fh:
            while block := fh.read(64 * 1024):
                received.extend(block)
                time.sleep(0.016)

    reader = threading.Thread(target=drain)
    reader.start()
    t0 = time.monotonic()
    res = sortline("run", "--config", str(cfg), "--report", str(tmp_path / "run.json"), timeout=120)
    elapsed = time.monotonic() - t0
    reader.join(30)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "the disk is not keeping up with the recording" in res.stderr
    run = load_json(tmp_path / "run.json")
    assert run["nodes"]["record"]["status"]["stalls"] > 0
    assert sum(v for k, v in run["nodes"]["record"]["metrics"].items()
               if k.startswith("sortline_record_stall_seconds_total")) > 0.5
    (tmp_path / "got.mcap").write_bytes(received)
    got = read_all(tmp_path / "got.mcap")
    assert [h["seq"] for h, _ in got["rgb"]] == list(range(600))  # nothing dropped
    assert all(np.array_equal(a["lines"], pattern((32, 256, 3), "uint8", h["seq"])) for h, a in got["rgb"])
    assert elapsed > 2.0  # the camera was held to the pipe's pace
    assert load_json(tmp_path / "sink.json")["received"] == 601  # and the one HSI frame


@pytest.mark.system
def test_inspect_prints_the_streams_and_draws_the_belt(tmp_path):
    src = tmp_path / "truth.mcap"
    written = write_truth_recording(src)
    res = sortline("inspect", str(src), "--png", str(tmp_path / "belt.png"), "--from", "0", "--length-mm", "60",
                   timeout=60)
    assert res.returncode == 0, res.stderr[-3000:]
    out = res.stdout
    assert "figures from a scan of every message" in out  # written without sortline's end-of-file figures
    # 40 messages of 8 lines; the rgb stream skips 2 messages (240 ticks) at seq 20, position 2640.
    assert "stream rgb: 40 messages, 320 lines" in out and "1 gaps at 2640" in out
    assert "(positions 0..5040)" in out and "stream hsi: 10 messages, 80 lines" in out
    assert "attachment config.toml" in out
    picture = cv2.imread(str(tmp_path / "belt.png"))
    rows = 64  # 60 mm * 16 ticks/mm / 15 ticks per line
    assert picture.shape == (18 + rows, 90 + 32 + 6 + 32 + 6 + 32, 3)  # a title strip, then the panels
    picture = picture[18:]
    rgb = np.concatenate([a["lines"] for _, a in written["rgb"][:8]])
    assert np.array_equal(picture[:, 90:122], rgb[..., ::-1])
    palette = np.array([[40, 40, 40], [255, 0, 0], [0, 200, 0], [0, 0, 255]], dtype=np.uint8)
    labels = np.concatenate([a["labels"] for _, a in written["truth"][:8]])
    assert np.array_equal(picture[:, 90 + 76:], palette[labels][..., ::-1])
    # The HSI camera scans 50 mm upstream: its line at position p shows what RGB sees at p + 800
    # ticks, so the first HSI message (positions 0..480) fills HSI rows 13..15 (60 ticks each),
    # RGB rows 52..63.
    hsi = picture[:, 90 + 38:90 + 70]
    assert [r for r in range(rows) if hsi[r].any()] == list(range(52, 64))


@pytest.mark.system
def test_bad_recording_and_recorder_settings_stop_with_a_clear_error(tmp_path, run_dir):
    not_mcap = tmp_path / "notes.mcap"
    not_mcap.write_text("not a recording")
    graph = sources_graph(RGB, HSI, "")
    cfg = write_config(tmp_path / "c.toml", graph, run_dir)
    res = sortline("replay", str(not_mcap), "--config", str(cfg), timeout=60)
    assert res.returncode == 78 and "not an MCAP file" in res.stderr
    res = sortline("run", "--config", str(cfg), "--record", str(tmp_path / "no" / "dir" / "x.mcap"), timeout=60)
    assert res.returncode == 78
    assert f"nodes.record.params.path = '{tmp_path}/no/dir/x.mcap': directory" in res.stderr
    assert "restart 1" not in res.stderr


@pytest.mark.system
def test_record_takes_the_cameras_alone_so_a_machine_without_calibration_records_its_first_target(tmp_path, run_dir):
    """docs/calibration.md: the first target recording is made before there is any calibration file, which the
    register node needs (and `run --record` runs it): `sortline record` runs the sources alone."""
    from conftest import demo_toml

    cfg = tmp_path / "machine.toml"
    cfg.write_text(demo_toml(free_port(), calibration={"spectral": "", "spatial": ""},
                             nodes={"belt": {"params": {"scene": "target", "paced": False, "seconds": 1.5}}},
                             graph={"name": "first-calibration", "runtime_dir": str(run_dir)}))
    res = sortline("record", str(tmp_path / "target.mcap"), "--config", str(cfg), "--report",
                   str(tmp_path / "run.json"), timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    assert sorted(load_json(tmp_path / "run.json")["nodes"]) == ["belt", "record"]   # no register, no valves
    streams = read_all(tmp_path / "target.mcap")
    assert sorted(streams) == ["hsi", "rgb", "truth"] and len(streams["rgb"]) == len(streams["hsi"]) > 40
    res = sortline("calibrate", "spatial", str(tmp_path / "target.mcap"), "--config", str(cfg), "--out",
                   str(tmp_path / "spatial.json"), timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    assert load_json(tmp_path / "spatial.json")["residuals"]["matches"] >= 12, res.stdout


def test_the_graph_rewrites_for_replay_and_recording(tmp_path, run_dir):
    from sortline.pipeline.config import ConfigError, config_toml
    from sortline.pipeline.graph import load_config
    from sortline.cli.replay import replay_graph
    from sortline.cli.run import with_recorder

    graph = sources_graph(RGB, HSI, "", truth="stream = 'truth'").replace('to = "sink.in"\n',
                                                                         'to = "sink.in"\npolicy = "latest"\n')
    settings = load_config(write_config(tmp_path / "c.toml", graph, run_dir))

    fast = replay_graph(settings, "belt.mcap", speed=0)
    assert set(fast.nodes) == {"sink", "replay"}
    assert fast.nodes["replay"].params == {"path": str(Path("belt.mcap").absolute()), "speed": 0}
    assert sorted((e.src, e.dst, e.policy) for e in fast.edges) == [
        ("replay.hsi", "sink.in", "lossless"), ("replay.rgb", "sink.in", "lossless"),
        ("replay.truth", "sink.in", "lossless")]
    paced = replay_graph(settings, "belt.mcap", speed=1.0)
    assert {e.policy for e in paced.edges} == {"latest"}  # paced: the edges as configured

    recorded = with_recorder(fast, "out.mcap", chunk_mb=2)
    assert recorded.nodes["record"].params == {"path": str(Path("out.mcap").absolute()), "chunk_mb": 2}
    assert sorted((e.src, e.policy) for e in recorded.edges if e.dst == "record.in") == [
        ("replay.hsi", "lossless"), ("replay.rgb", "lossless"), ("replay.truth", "lossless")]
    # What `sortline replay` runs: the derived graph written out and read back, checked like any config.
    (tmp_path / "derived.toml").write_text(config_toml(recorded))
    assert load_config(tmp_path / "derived.toml").model_dump() == recorded.model_dump()

    with pytest.raises(ConfigError, match="already has a node of that name"):
        with_recorder(recorded, "again.mcap")
    odd = load_config(write_config(tmp_path / "odd.toml", sources_graph(RGB, "stream = 'nir'", ""), run_dir))
    with pytest.raises(ConfigError, match=r"edges\[1\].from = 'hsicam.out': no recorded stream"):
        replay_graph(odd, "belt.mcap")


@pytest.mark.system
def test_a_recorder_killed_mid_run_leaves_a_file_that_replays_and_its_restart_writes_a_new_one(tmp_path, run_dir):
    from sortline.pipeline.graph import load_config
    from sortline.pipeline.graph import topo_order

    port = free_port()
    rec = recorder(f"path = '{tmp_path}/a.mcap', flush_s = 0.3", "rgbcam")
    graph = sources_graph("camera = 'rgb', lines = 32, pixels = 64", f"{HSI}, count = 1", "", rec)
    cfg = write_config(tmp_path / "c.toml", graph, run_dir, extra=f"\n[metrics]\nport_base = {port}\n")
    record_port = port + topo_order(load_config(cfg)).index("record")
    sup = start("run", "--config", str(cfg), "--seconds", "30")
    try:
        recorded = lambda: metric(scrape(record_port), "sortline_record_messages_total")  # noqa: E731
        wait_for(lambda: recorded() >= 100, timeout=20)  # 1.5 s of frames, several closed chunks
        os.kill(pid_of("node", "record", str(cfg)), signal.SIGKILL)  # a power cut, as the recorder sees it
        wait_for(lambda: (tmp_path / "a.1.mcap").exists() and recorded() >= 20, timeout=20)
    finally:
        rc, out, err = stop(sup, timeout=30)
    assert rc == 0, err[-3000:]
    assert "record died (signal 9)" in err and f"{tmp_path}/a.mcap exists" in err
    cut = sortline("inspect", "--verify", str(tmp_path / "a.mcap"), timeout=60)
    assert cut.returncode == 2 and "the recording was cut short" in cut.stdout, cut.stdout
    # What the cut file holds is every frame from the first on, up to the last chunk closed
    # before the kill (flush_s = 0.3 s: at most some 20 frames of 66/s are lost).
    assert "stream rgb: " in cut.stdout and ", seq 0.." in cut.stdout and ", 0 gaps" in cut.stdout
    kept = read_frames_of(tmp_path / "a.mcap")
    assert kept == list(range(len(kept))) and len(kept) >= 80
    after = sortline("inspect", str(tmp_path / "a.1.mcap"), timeout=60)
    assert after.returncode == 0 and "figures from the recorder's summary" in after.stdout, after.stdout


def read_frames_of(path: Path) -> list[int]:
    """Sequence numbers of the rgb frames in a file without its end, read with the mcap library."""
    seqs, frames = [], set()
    with open(path, "rb") as fh:
        try:
            for record in StreamReader(fh).records:
                if isinstance(record, Channel) and record.message_encoding == "x-sortline-frame-v1":
                    frames.add(record.id)   # not the pictures' channel
                if isinstance(record, McapMessage) and record.channel_id in frames:
                    seqs.append(decode(record.data)[0]["seq"])
        except Exception:  # the cut: everything before it has been read
            pass
    return seqs


@pytest.mark.system
def test_a_recorder_that_cannot_write_says_so_and_the_line_goes_on(tmp_path, run_dir):
    # /dev/full: every write fails with "No space left on device", as on a full disk. The recorder says so
    # once, counts what it lets go, and stays up: its lossless edge never holds the camera back.
    rec = recorder("path = '/dev/full', overwrite = true, flush_s = 0.2", "rgbcam")
    graph = sources_graph("camera = 'rgb', lines = 32, pixels = 64", f"{HSI}, count = 1",
                          f'report = "{tmp_path}/sink.json"', rec)
    cfg = write_config(tmp_path / "c.toml", graph, run_dir)
    res = sortline("run", "--config", str(cfg), "--seconds", "4", "--report", str(tmp_path / "run.json"), timeout=60)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stderr.count("cannot write /dev/full ([Errno 28] No space left on device): recording stopped") == 1
    run = load_json(tmp_path / "run.json")
    record = run["nodes"]["record"]
    assert record["restarts"] == 0 and "No space left" in record["status"]["failed"]
    assert record["status"]["lost"] > 0 and metric(record["metrics"], "sortline_record_failed") == 1
    assert metric(record["metrics"], "sortline_record_lost_total") == record["status"]["lost"]
    received = load_json(tmp_path / "sink.json")["received"]
    assert received > 0 and record["status"]["lost"] >= received - 1   # the recorder let it all go, counted
    assert Path("/dev/full").exists()


@pytest.mark.parametrize("compression", ["lz4", "none"])
def test_the_mcap_writer_writes_what_the_mcap_library_reads(tmp_path, compression):
    # Messages larger than a chunk, smaller ones between, two channels, attachments and
    # metadata between chunks: read back through the summary, the indexes and record by record.
    from sortline.pipeline.mcap_writer import McapWriter

    rng = np.random.default_rng(5)
    sent = [(1 + i % 2, 1000 + 10 * i, rng.bytes(int(rng.choice([40, 900, 5000])))) for i in range(60)]
    path = tmp_path / "w.mcap"
    with open(path, "wb") as fh:
        w = McapWriter(fh, "sortline", "test", chunk_size=1024, compression=compression)
        schema = w.register_schema("s", "text/plain", b"layout")
        channels = [w.register_channel("a", "x", schema), w.register_channel("b", "x", schema, {"k": "v"})]
        assert channels == [1, 2]
        for i, (channel, t, data) in enumerate(sent):
            w.add_message(channel, log_time=t, data=data, publish_time=t + 1, sequence=i)
            if i == 30:
                w.add_attachment(5, 6, "cal.bin", "application/octet-stream", b"\x00\x01" * 100)
                w.add_metadata("run", {"profile": "demo"})
        w.flush()
        w.finish()
    with open(path, "rb") as fh:
        reader = make_reader(fh, validate_crcs=True)
        summary = reader.get_summary()
        assert summary.statistics.message_count == 60 and summary.statistics.channel_message_counts == {1: 30, 2: 30}
        assert (summary.statistics.message_start_time, summary.statistics.message_end_time) == (1000, 1590)
        assert summary.channels[2].metadata == {"k": "v"} and summary.schemas[1].data == b"layout"
        got = [(c.id, m.log_time, m.data, m.publish_time, m.sequence) for _, c, m in reader.iter_messages()]
        assert got == [(c, t, d, t + 1, i) for i, (c, t, d) in enumerate(sent)]
        assert [(a.name, a.data) for a in reader.iter_attachments()] == [("cal.bin", b"\x00\x01" * 100)]
        assert [(m.name, m.metadata) for m in reader.iter_metadata()] == [("run", {"profile": "demo"})]
        assert {ci.compression for ci in summary.chunk_indexes} == {"" if compression == "none" else "lz4"}
        check_message_indexes(fh, summary)
        fh.seek(0)
        records = list(StreamReader(fh, validate_crcs=True).records)  # every record, CRCs, the closing magic
    assert sum(isinstance(r, McapMessage) for r in records) == 60
