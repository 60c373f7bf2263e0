"""The message contract: round trips, zero copy, and every kind of malformed input."""

from __future__ import annotations

import msgspec
import numpy as np
import pytest
import zmq
from hypothesis import given, settings
from hypothesis import strategies as st

from sortline.pipeline.messages import (
    SCHEMA_VERSION,
    ArraySpec,
    Header,
    MessageError,
    SlotRef,
    TraceEntry,
    encode_header,
    inline_frames,
)
from sortline.pipeline.transport import SlotReaders


@pytest.fixture
def pair():
    ctx = zmq.Context()
    a, b = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
    a.bind("inproc://t")
    b.connect("inproc://t")
    yield a, b
    a.close(0)
    b.close(0)
    ctx.term()


def header(**kw) -> Header:
    base = dict(stream="rgb", seq=7, position=1050, ticks_per_line=15, device_ts_ns=123, gap=True,
                trace=[TraceEntry("camera", 1, 2)], meta={"camera": "A1"})
    return Header(**{**base, **kw})


def test_a_header_naming_an_array_twice_is_refused(tmp_path):
    # Found by the property test below: the second array would have hidden the first.
    twice = [ArraySpec("", "uint8", (0, 0)), ArraySpec("", "float16", (0,))]
    with pytest.raises(MessageError, match="array names repeat") as exc:
        SlotReaders(tmp_path).decode([encode_header(header(arrays=twice)), b"", b""])
    assert exc.value.kind == "header"


def test_round_trip_through_a_socket_is_zero_copy(pair, tmp_path):
    a, b = pair
    rgb = np.arange(64 * 640 * 3, dtype=np.uint8).reshape(64, 640, 3)
    hsi = np.random.default_rng(0).random((16, 160, 32)).astype(np.float16)
    frames = inline_frames(header(), {"rgb": rgb, "hsi": hsi})
    assert frames[1] is rgb and frames[2] is hsi  # sent as they are, no copy made
    a.send_multipart(frames, copy=False)
    msg = SlotReaders(tmp_path).decode(b.recv_multipart(copy=False))
    assert msg.header.stream == "rgb" and msg.header.seq == 7 and msg.header.position == 1050
    assert msg.header.gap and msg.header.trace == [TraceEntry("camera", 1, 2)] and msg.header.meta == {"camera": "A1"}
    assert [s.name for s in msg.header.arrays] == ["rgb", "hsi"]
    np.testing.assert_array_equal(msg.arrays["rgb"], rgb)
    np.testing.assert_array_equal(msg.arrays["hsi"], hsi)
    for arr in msg.arrays.values():
        assert not arr.flags.owndata  # a view of the received frame
        assert not arr.flags.writeable


def decode(frames, tmp_path=None):
    return SlotReaders(tmp_path or "/nonexistent").decode(frames)


@pytest.mark.parametrize(
    "frames, kind",
    [
        ([], "frames"),
        ([b"\x00\x01garbage"], "header"),
        ([msgspec.msgpack.encode({"seq": 1})], "header"),  # no stream
        ([msgspec.msgpack.encode({"stream": "x", "seq": "one"})], "header"),
        ([msgspec.msgpack.encode({"stream": "x", "seq": 1, "schema": 99})], "schema"),
        ([msgspec.msgpack.encode({"stream": "x", "seq": 1, "schema": 2, "new_field": [1]})], "schema"),
        ([encode_header(header(arrays=[ArraySpec("a", "uint8", (4, 4))]))], "frames"),
        ([encode_header(header(arrays=[ArraySpec("a", "uint8", (4, 4))])), b"x" * 15], "size"),
        ([encode_header(header(arrays=[ArraySpec("a", "object", (1,))])), b"x" * 8], "size"),
        ([encode_header(header(arrays=[ArraySpec("a", "uint8", (-1, 4))])), b""], "size"),
        ([encode_header(header()), b"extra frame"], "frames"),
        ([encode_header(header(slot=SlotRef("../etc/passwd", 0, 1, 0)))], "slot"),
        ([encode_header(header(slot=SlotRef("cam.out.1.1.slots", 0, 1, 0)))], "slot"),
        ([encode_header(header(slot=SlotRef("cam.out.1.1.slots", 0, 1, 0))), b"x"], "frames"),
    ],
)
def test_malformed_messages_raise_one_typed_error(frames, kind):
    with pytest.raises(MessageError) as exc:
        decode(frames)
    assert exc.value.kind == kind
    assert str(exc.value).startswith(kind)


def test_schema_version_is_checked():
    raw = msgspec.msgpack.encode({"stream": "x", "seq": 1, "schema": SCHEMA_VERSION + 1})
    with pytest.raises(MessageError, match=f"schema version {SCHEMA_VERSION + 1}"):
        decode([raw])


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=64), max_size=4))
def test_random_bytes_never_escape_as_another_exception(frames):
    try:
        decode(frames)
    except MessageError:
        pass


specs = st.builds(
    ArraySpec,
    name=st.text(max_size=5),
    dtype=st.sampled_from(["uint8", "float16", "float32", "int64", "object", "U4", ""]),
    shape=st.lists(st.integers(-2, 9), max_size=4).map(tuple),
    offset=st.integers(-2, 1 << 20),
)


@settings(max_examples=300, deadline=None)
@given(
    arrays=st.lists(specs, max_size=3),
    bodies=st.lists(st.binary(max_size=300), max_size=4),
    slot=st.none() | st.builds(SlotRef, st.sampled_from(["a.slots", "", "/x"]), st.integers(-1, 5),
                               st.integers(0, 3), st.integers(-1, 3)),
    schema=st.sampled_from([SCHEMA_VERSION, SCHEMA_VERSION, 0, 2]),
)
def test_plausible_headers_with_wrong_contents(arrays, bodies, slot, schema, tmp_path_factory):
    frames = [encode_header(header(arrays=arrays, slot=slot, schema=schema)), *bodies]
    try:
        msg = decode(frames, tmp_path_factory.getbasetemp())
    except MessageError:
        return
    # Anything accepted is exactly what the header promised.
    assert msg.header.schema == SCHEMA_VERSION
    for spec in msg.header.arrays:
        assert msg.arrays[spec.name].shape == spec.shape
        assert msg.arrays[spec.name].dtype == np.dtype(spec.dtype)
