"""Replay that reproduces the line: paced, the replay keeps each message's recorded acquisition time
however late a busy host lets it leave, and loses what is too late, as a camera does."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest

from conftest import DEMO
from sortline.nodes.replay import Replay
from sortline.pipeline import recording
from sortline.pipeline.graph import load_config
from sortline.pipeline.mcap_writer import McapWriter
from sortline.pipeline.messages import Header, TraceEntry
from sortline.pipeline.metrics import DROPS
from sortline.pipeline.testing import Harness


@pytest.fixture(scope="module")
def machine():
    return load_config(DEMO).machine()


def write_recording(path, log_times_ns, lines=32, pixels=640):
    """An RGB-only recording as the recorder writes it: frame i at log time log_times_ns[i]."""
    with open(path, "wb") as fh:
        w = McapWriter(fh, "sortline", "test")
        schema = w.register_schema(recording.SCHEMA_NAME, recording.SCHEMA_ENCODING, recording.SCHEMA_TEXT.encode())
        channel = w.register_channel("rgb", recording.MESSAGE_ENCODING, schema, {"stream": "rgb"})
        for i, t in enumerate(log_times_ns):
            header = Header(stream="rgb", seq=i, position=i * lines * 15, ticks_per_line=15, device_ts_ns=t,
                            host_ts=True, trace=[TraceEntry("belt", t, t)],
                            meta={"camera": "rgb", "serial": "SIM", "pixel_format": "RGB8", "bit_depth": 8})
            frame = recording.encode_frame(header, {"lines": np.full((lines, pixels, 3), i, np.uint8)})
            w.add_message(channel, log_time=t, data=frame, publish_time=t, sequence=i)
        w.finish()


@pytest.mark.parametrize("speed", [1.0, 2.0])
def test_a_paced_replay_held_up_keeps_the_recorded_clock_and_loses_what_is_too_late(machine, tmp_path, speed):
    """A replay that a busy host holds up stamps each message with the time it was due, not the time it left, so
    the encoder tracks downstream see the belt as recorded; what is over max_lag_ms late is lost as a camera
    loses frames (counted, the next one flagged gap and numbered on), never delivered stale."""
    period = 15_000_000   # one frame of 32 lines at 2 m/s
    log_times = [1_000_000_000_000 + i * period for i in range(48)]
    write_recording(tmp_path / "r.mcap", log_times)
    h = Harness(Replay, machine, {"path": str(tmp_path / "r.mcap"), "speed": speed}, name=f"replay-{speed:g}")
    got = []
    for step in range(len(log_times)):
        if step == 4:
            time.sleep(0.25)                     # the host is busy for a quarter of a second
        for _, msg in h.step():
            trace = msg.header.trace
            got.append((msg.header.position // 480, trace[0].t_in_ns, trace[-1].t_out_ns, msg.header.gap,
                        msg.header.seq))
    frames = [f for f, *_ in got]
    lost = sorted(set(range(len(log_times))) - set(frames))
    # Frame 3 left at its due time or later, then the host held the replay 250 ms: the frames due within
    # 250 - 100 ms of it were over 100 ms late when their turn came (a busier host may lose more).
    surely = set(range(4, 3 + math.ceil(150e6 * speed / period)))
    assert surely <= set(lost), (sorted(surely), lost)
    stamps = np.array([t for _, t, *_ in got])
    due = (np.array([log_times[f] for f in frames]) - log_times[0]) / speed
    assert np.abs((stamps - stamps[0]) - due).max() < 1e5                      # to 0.1 ms: the recorded clock
    after_lost = [i > 0 and frames[i] != frames[i - 1] + 1 for i in range(len(frames))]
    assert [g for *_, g, _ in got] == after_lost and any(after_lost)           # the one after a loss says so
    assert [q for *_, q in got] == list(range(len(got)))                        # numbered on, no hole
    status = h.node.status()
    assert status["overruns"] == len(lost) and status["behind_max_ms"] > 100
    assert DROPS.labels(f"replay-{speed:g}.rgb", "behind")._value.get() == len(lost)
