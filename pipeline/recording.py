"""The recording file: MCAP with one channel per stream, one MCAP message per sortline message.

This module is the file format, shared by the `record` and `replay` nodes
and by `sortline inspect`; docs/recording.md describes the same layout for
readers without sortline. Each MCAP message is one frame:

    bytes 0..4      H, uint32 little-endian: length of the header
    bytes 4..4+H    the sortline Header (msgpack, pipeline.messages), without
                    its shared-memory slot; each array spec's offset counts
                    from the start of the data section
    bytes 4+H..     the data section: each array's raw bytes (C order,
                    little-endian), back to back in the header's order

Beside the frames, a recording may hold pictures for people (the recorder's image
channels, `/rgb/image`, in Foxglove's protobuf schemas): readers of frames skip every
channel whose message encoding is not MESSAGE_ENCODING.

Reading goes record by record (mcap's StreamReader), never through the
summary, so that a file cut short (power loss, a killed recorder) still
yields every message before the damage; the damage itself is reported as
`Damage` with the byte offset up to which the file was valid.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import msgspec
import numpy as np
from mcap.reader import make_reader
from mcap.records import Attachment, Channel, Footer, Message, Metadata
from mcap.stream_reader import StreamReader

from sortline.pipeline.messages import ArraySpec, Header, MessageError, decode_header, encode_header

SCHEMA_NAME = "sortline.Frame"
SCHEMA_ENCODING = "text/markdown"  # the schema record holds the layout below, for people and tools that list it
MESSAGE_ENCODING = "x-sortline-frame-v1"
PROFILE = "sortline"
META_RUN = "sortline"  # metadata record: version, profile, start time, ...
META_STREAMS = "sortline.streams"  # metadata record written at the end: per-stream figures (JSON)
CONFIG_ATTACHMENT = "config.toml"
MAX_RECORD_BYTES = 256 << 20  # a longer record is damage, not data: do not try to allocate it

_LEN = struct.Struct("<I")

SCHEMA_TEXT = """\
# sortline.Frame, layout version 1

One MCAP message = one sortline message (one frame of a stream). Little-endian.

| bytes | content |
|---|---|
| 0..4 | H: uint32, length of the header |
| 4..4+H | header: msgpack map (below) |
| 4+H.. | data section: the arrays' raw bytes, C order, back to back in header order |

Header keys (a key at its default value is left out):
stream (str), seq (int), position (int, encoder ticks of the first line, default 0),
ticks_per_line (int, 0), device_ts_ns (int, 0), host_ts (bool, false), gap (bool, false),
eos (bool, false), arrays (list of [name, dtype, shape, offset]; offset counts from the
start of the data section), trace (list of [stage, t_in_ns, t_out_ns]), meta (map, {}),
schema (int, 1: the sortline header schema version).

Array i: numpy.frombuffer(data, dtype, count=prod(shape), offset=4 + H + offset).reshape(shape).
"""


class Damage(Exception):
    """A recording that cannot be read past some byte: cut short or corrupted."""

    def __init__(self, path: str, valid_to: int, size: int, reason: str, messages: int):
        self.path, self.valid_to, self.size, self.reason, self.messages = path, valid_to, size, reason, messages
        super().__init__(f"{path}: damaged at byte {valid_to} of {size} ({reason}); "
                         f"the {messages} messages before it are valid")


# One frame.

def encode_frame(header: Header, arrays: dict[str, np.ndarray], alloc=bytearray) -> memoryview:
    """The frame of a message: one copy of its arrays, into one buffer from
    `alloc(nbytes)` (which may be longer; the frame is its first nbytes)."""
    specs, offset = [], 0
    for name, array in arrays.items():
        spec = next((s for s in header.arrays if s.name == name), None)
        dtype = spec.dtype if spec is not None else array.dtype.name
        specs.append(ArraySpec(name, dtype, tuple(array.shape), offset))
        offset += array.nbytes
    head = encode_header(msgspec.structs.replace(header, arrays=specs, slot=None))
    start = _LEN.size + len(head)
    buf = memoryview(alloc(start + offset))[:start + offset]
    _LEN.pack_into(buf, 0, len(head))
    buf[_LEN.size:start] = head
    dst = np.frombuffer(buf, dtype=np.uint8)
    for spec, array in zip(specs, arrays.values()):
        flat = np.ascontiguousarray(array).reshape(-1).view(np.uint8)
        dst[start + spec.offset:start + spec.offset + flat.size] = flat
    return buf


def decode_frame_header(data) -> tuple[Header, int]:
    """The header of a frame and where its data section starts."""
    if len(data) < _LEN.size:
        raise MessageError("frames", f"a frame of {len(data)} bytes has no header length")
    (n,) = _LEN.unpack_from(data, 0)
    if _LEN.size + n > len(data):
        raise MessageError("header", f"header length {n} runs past the frame's {len(data)} bytes")
    return decode_header(memoryview(data)[_LEN.size:_LEN.size + n]), _LEN.size + n


def decode_frame(data) -> tuple[Header, dict[str, np.ndarray]]:
    """Header and zero-copy array views of a frame; MessageError if it does not fit."""
    header, start = decode_frame_header(data)
    arrays = {}
    for spec in header.arrays:
        end = start + spec.offset + spec.nbytes
        if spec.offset < 0 or end > len(data):
            raise MessageError("size", f"array {spec.name!r} ({spec.nbytes} bytes at {spec.offset}) "
                                       f"runs past the frame's {len(data) - start} data bytes")
        arrays[spec.name] = np.frombuffer(data, dtype=spec.dtype, count=spec.count,
                                          offset=start + spec.offset).reshape(spec.shape)
    return header, arrays


def lines_of(header: Header) -> int:
    return header.arrays[0].shape[0] if header.arrays and header.arrays[0].shape else 0


# Per-stream figures: kept by the recorder (written at the end) and by a scan.

@dataclass
class StreamStats:
    messages: int = 0
    lines: int = 0
    bytes: int = 0
    ticks_per_line: int = 0
    first_seq: int = -1
    last_seq: int = -1
    first_position: int | None = None
    end_position: int | None = None  # position after the last line
    first_time_ns: int = 0
    last_time_ns: int = 0
    gaps: list[int] = field(default_factory=list)  # belt positions where lines are missing

    MAX_GAPS = 1000  # positions kept; `gap_count` counts them all
    gap_count: int = 0

    def add(self, header: Header, nbytes: int, log_time: int) -> None:
        lines = lines_of(header)
        end = header.position + lines * header.ticks_per_line
        if self.messages:
            broken = header.gap or header.seq != self.last_seq + 1 or header.position != self.end_position
            if broken:
                self.gap_count += 1
                if len(self.gaps) < self.MAX_GAPS:
                    self.gaps.append(header.position)
        else:
            self.first_seq, self.first_position, self.first_time_ns = header.seq, header.position, log_time
        self.messages += 1
        self.lines += lines
        self.bytes += nbytes
        self.ticks_per_line = header.ticks_per_line
        self.last_seq, self.end_position = header.seq, end
        self.last_time_ns = max(self.last_time_ns, log_time)

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}

    @classmethod
    def from_dict(cls, d: dict) -> StreamStats:
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


# Reading.

@dataclass
class Frame:
    stream: str
    log_time: int
    data: bytes


def frames(path: str | Path, on_record=None) -> Iterator[Frame]:
    """Every sortline frame of a recording, in file order (messages of other channels are skipped).

    Raises Damage where the file stops being readable (after yielding all
    that came before). A file without its end (no footer) is damage too: it
    was cut. `on_record` sees every other record (attachments, metadata, and the channels
    and messages of pictures).
    """
    path = str(path)
    size = Path(path).stat().st_size
    channels: dict[int, str] = {}
    others: set[int] = set()   # channels of something else than frames (pictures for people)
    count = 0
    with open(path, "rb") as fh:
        reader = StreamReader(fh, validate_crcs=True, record_size_limit=MAX_RECORD_BYTES)
        records = reader.records
        valid_to = 0
        while True:
            try:
                record = next(records)
            except StopIteration:
                return
            except Exception as exc:  # the parser of a damaged file may fail in any way
                if fh.tell() >= size:  # the record ran into the end of the file
                    reason = "the file ends in the middle of a record: the recording was cut short"
                else:
                    reason = f"the record after it is corrupted: {type(exc).__name__}: {exc}"
                raise Damage(path, valid_to, size, reason, count) from None
            valid_to = fh.tell()
            if isinstance(record, Channel):
                if record.message_encoding == MESSAGE_ENCODING:
                    channels[record.id] = record.topic
                else:
                    others.add(record.id)
                    if on_record is not None:
                        on_record(record)
            elif isinstance(record, Message):
                if record.channel_id in others:
                    if on_record is not None:
                        on_record(record)
                    continue
                stream = channels.get(record.channel_id)
                if stream is None:
                    raise Damage(path, valid_to, size, f"a message on unknown channel {record.channel_id}", count)
                count += 1
                yield Frame(stream, record.log_time, record.data)
            elif isinstance(record, Footer):
                return
            elif on_record is not None:
                on_record(record)


def check_mcap(path: str | Path) -> str | None:
    """Why a file cannot be a recording at all (None when it starts like one)."""
    try:
        with open(path, "rb") as fh:
            magic = fh.read(8)
    except OSError as exc:
        return exc.strerror
    if magic != b"\x89MCAP0\r\n":
        return "not an MCAP file (it does not start with the MCAP magic bytes)"
    return None


@dataclass
class Contents:
    """What `sortline inspect` prints about a recording."""

    path: str
    size: int
    streams: dict[str, StreamStats]
    attachments: dict[str, bytes]
    metadata: dict[str, dict[str, str]]
    from_summary: bool
    damage: Damage | None = None
    pictures: dict[str, int] = field(default_factory=dict)   # topic of each picture channel -> its messages

    def config(self) -> dict:
        import tomllib

        text = self.attachments.get(CONFIG_ATTACHMENT)
        return tomllib.loads(text.decode()) if text else {}


def contents(path: str | Path, verify: bool = False) -> Contents:
    """The recording's summary and sortline's own end-of-file figures, or, for a
    file without them (cut short, or written by another tool) or to `verify`
    every chunk's checksum, a full scan."""
    path = str(path)
    size = Path(path).stat().st_size
    if verify:
        return scan(path)
    try:
        with open(path, "rb") as fh:
            reader = make_reader(fh)
            summary = reader.get_summary()
            metadata = {m.name: dict(m.metadata) for m in reader.iter_metadata()} if summary else {}
            if summary is not None and META_STREAMS in metadata:
                attachments = {a.name: a.data for a in reader.iter_attachments()}
                streams = {name: StreamStats.from_dict(d)
                           for name, d in json.loads(metadata[META_STREAMS]["json"]).items()}
                counts = summary.statistics.channel_message_counts if summary.statistics else {}
                pictures = {c.topic: counts.get(c.id, 0) for c in summary.channels.values()
                            if c.message_encoding != MESSAGE_ENCODING}
                return Contents(path, size, streams, attachments, metadata, from_summary=True, pictures=pictures)
    except Exception:  # no usable summary: a scan tells what is there
        pass
    return scan(path)


def scan(path: str | Path) -> Contents:
    path = str(path)
    attachments, metadata, streams = {}, {}, {}
    topics, pictures = {}, {}

    def other(record):
        if isinstance(record, Attachment):
            attachments[record.name] = record.data
        elif isinstance(record, Metadata):
            metadata[record.name] = dict(record.metadata)
        elif isinstance(record, Channel):
            topics[record.id] = record.topic
            pictures.setdefault(record.topic, 0)
        elif isinstance(record, Message):
            pictures[topics[record.channel_id]] += 1

    damage = None
    try:
        for frame in frames(path, other):
            try:
                header, _ = decode_frame_header(frame.data)
            except MessageError:
                continue
            streams.setdefault(frame.stream, StreamStats()).add(header, len(frame.data), frame.log_time)
    except Damage as exc:
        damage = exc
    return Contents(path, Path(path).stat().st_size, streams, attachments, metadata, from_summary=False,
                    damage=damage, pictures=pictures)
