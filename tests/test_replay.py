"""Replay that reproduces the line: a live run recorded, replayed by belt position, twice.

`sortline replay --speed 0` runs the whole graph lossless and decides by belt position, so a
recording gives every message to every node and the same commands on every replay; paced, the
replay keeps each message's recorded acquisition time however late a busy host lets it leave.
"""

from __future__ import annotations

import math
import socket
import time

import numpy as np
import pytest
import tomli_w

from conftest import DEMO, demo_config, demo_toml, free_port, load_json, merged, sortline
from sortline.cli.replay import compare, replay_graph
from sortline.nodes.ejector import Ejector
from sortline.nodes.replay import Replay
from sortline.nodes.streams import EjectMeta, Window
from sortline.pipeline import recording
from sortline.pipeline.graph import load_config
from sortline.pipeline.mcap_writer import McapWriter
from sortline.pipeline.messages import Header, TraceEntry
from sortline.pipeline.metrics import DROPS
from sortline.pipeline.testing import Harness

# The live run: a slow belt, dense and mostly PET (enough ejected objects for a share to mean something).
BELT = {"seed": 3, "seconds": 5.0, "occupancy": 0.5, "mix": {"PET": 0.6, "PP": 0.2, "paper": 0.2}}
SPEED_M_S = 0.5
# Into the stages that decide, the demo's live edges with deeper queues: still never waiting, but a shared 2-core
# machine that holds a stage back for a second drops nothing there, so the live line decides on everything the
# recording holds (what it lost, a replay would have and it had not: other objects, not the same ones).
DECIDING = ("register.rgb", "register.hsi", "infer.in", "plan.in", "ejector.in")


def line_toml(udp_port: int, run_dir) -> str:
    data = merged(demo_config(), {"ejector": {"address": f"127.0.0.1:{udp_port}"}, "belt": {"speed_m_s": SPEED_M_S},
                                  "nodes": {"belt": {"params": BELT}},
                                  "graph": {"name": "replay-test", "runtime_dir": str(run_dir)}})
    for edge in data["edges"]:
        if edge["to"] in DECIDING:
            assert edge["policy"] == "bounded"
            edge["hwm"] = 64
    return tomli_w.dumps(data)


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
    loses frames (counted, the next one flagged gap, the hole left in the numbering), never delivered stale."""
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
    assert [q for *_, q in got] == frames                  # each keeps its number: a consumer sees the hole
    status = h.node.status()
    assert status["overruns"] == len(lost) and status["behind_max_ms"] > 100
    assert DROPS.labels(f"replay-{speed:g}.rgb", "behind")._value.get() == len(lost)


def test_the_ejector_writes_every_command_it_sent_by_belt_position(machine, tmp_path):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as listener:
        listener.bind(("127.0.0.1", 0))
        m = machine.model_copy(update={"ejector": machine.ejector.model_copy(
            update={"address": f"127.0.0.1:{listener.getsockname()[1]}"})})
        h = Harness(Ejector, m, {"timing": False, "samples": str(tmp_path / "c.npz")}, name="ejector-commands")
        h.send("in", meta=EjectMeta([Window(3, 4, 1000, 1600, 77, "PET", 0.9), Window(9, 9, 5000, 5400, 78, "PET", 0.8),
                                     Window(20, 20, 900, 990, 79, "paper", 0.7)]))
        h.close()
    with np.load(tmp_path / "c.npz") as z:
        assert z["windows"].tolist() == [[3, 1000, 1600, 77], [4, 1000, 1600, 77], [9, 5000, 5400, 78]]


def test_comparing_two_runs_commands():
    live = np.array([[3, 1000, 1600, 77], [4, 1100, 1900, 77],    # 77's front clipped on valve 4, merged on
                     [9, 5000, 5400, 78], [11, 7000, 7400, 80]])
    again = np.array([[3, 1000, 1600, 77], [4, 1000, 1600, 77], [9, 5000, 5400, 78], [11, 7500, 7900, 80],
                      [12, 8000, 8200, 81]])
    c = compare(again, live)
    # 80 is commanded again, but elsewhere on the belt: not the same ejection.
    assert (c["other_objects"], c["ejected_again"], c["identical"]) == (3, 2, False)
    assert c["ejected_again_share"] == pytest.approx(2 / 3)
    assert compare(again[::-1], again)["identical"] and compare(again, again)["ejected_again_share"] == 1


def test_replay_as_fast_as_accepted_is_the_graph_lossless_and_by_position(tmp_path):
    cfg = tmp_path / "demo.toml"
    cfg.write_text(demo_toml(free_port()))
    settings = load_config(cfg)
    fast = replay_graph(settings, "belt.mcap", speed=0)
    assert {(e.policy, e.pattern) for e in fast.edges} == {("lossless", "pushpull")}
    assert all(fast.nodes[n].params["timing"] is False for n in ("infer", "plan", "ejector"))   # nothing late
    assert fast.nodes["valve_sim"].params["by_position"] is True
    paced = replay_graph(settings, "belt.mcap", speed=1)   # as the line runs: as configured
    assert [(e.dst, e.policy) for e in paced.edges] == [(e.dst, e.policy) for e in settings.edges]
    assert "timing" not in paced.nodes["plan"].params and "timing" not in paced.nodes["infer"].params and "by_position" not in paced.nodes["valve_sim"].params


def drops(report: dict) -> dict[str, float]:
    """Every drop counter of every node in a supervisor report that is not zero."""
    return {k: v for node in report["nodes"].values() for k, v in node["totals"].items()
            if k.startswith("sortline_edge_drops_total") and v}


def ejected_again(live: np.ndarray, replayed: np.ndarray) -> tuple[int, int]:
    """(objects the live run sent commands for, those of them the replay commanded on the same valves, opening
    where the live command opened or before it, within the same air)."""
    ids = set(live[:, 3].tolist())
    again = {o for o in ids if all(
        ((replayed[:, 3] == o) & (replayed[:, 0] == v) & (replayed[:, 1] <= a) & (a < replayed[:, 2])).any()
        for v, a, _, oo in live.tolist() if oo == o)}
    return len(ids), len(again)


@pytest.mark.system
def test_a_live_run_replayed_by_belt_position_is_ejected_again_and_the_same_every_time(tmp_path, run_dir):
    cfg = tmp_path / "line.toml"
    cfg.write_text(line_toml(free_port(), run_dir))
    # The live line, paced, live-camera edges, recorded.
    res = sortline("run", "--config", str(cfg), "--record", str(tmp_path / "belt.mcap"), "--commands",
                   str(tmp_path / "live.npz"), "--report", str(tmp_path / "live.json"), timeout=180)
    assert res.returncode == 0, res.stderr[-3000:]
    live_report = load_json(tmp_path / "live.json")
    lost = {k: v for k, v in drops(live_report).items() if any(f'->{to}"' in k for to in DECIDING)}
    assert not lost, f"the live line lost messages on the way to its decisions (a machine too busy): {lost}"
    live = np.load(tmp_path / "live.npz")["windows"]
    said = {}
    for i in (1, 2):
        other = tmp_path / ("live.npz" if i == 1 else "replay1.npz")
        res = sortline("replay", str(tmp_path / "belt.mcap"), "--config", str(cfg), "--speed", "0", "--commands",
                       str(tmp_path / f"replay{i}.npz"), "--report", str(tmp_path / f"replay{i}.json"),
                       "--compare", str(other), timeout=300)
        assert res.returncode == 0, res.stderr[-3000:]
        said[i] = res.stdout
        report = load_json(tmp_path / f"replay{i}.json")
        # Nothing dropped anywhere. The register's one possible count is of RGB lines the recording has no HSI
        # lines for, the same as in the live run: the frames a busy machine made the live camera lose. (The first
        # 50 mm of belt, which passed the HSI scan line before the recording began, are its lead-in, no drop.)
        no_hsi = 'sortline_edge_drops_total{edge="register.hsi",reason="hsi_missing"}'
        assert drops(report).keys() <= {no_hsi}, drops(report)
        assert drops(report).get(no_hsi, 0) == drops(live_report).get(no_hsi, 0)
        assert report["nodes"]["register"]["status"]["lead_in_lines"] == 58
        published = report["nodes"]["replay"]["status"]["published"]
        assert published == live_report["nodes"]["record"]["status"]["messages"] > 0
        assert report["nodes"]["valve_sim"]["status"]["bad_datagrams"] == 0
    first, second = (np.load(tmp_path / f"replay{i}.npz")["windows"] for i in (1, 2))
    objects, again = ejected_again(live, first)
    assert objects >= 10 and again >= 0.98 * objects, (objects, again)   # 21 on a quiet machine
    assert f"{objects} objects ejected there, {again} (" in said[1], said[1][-2000:]
    # Replayed twice: the same commands, valve for valve, position for position.
    assert len(first) > 0 and sorted(map(tuple, first.tolist())) == sorted(map(tuple, second.tolist()))
    assert "identical: yes" in said[2], said[2][-2000:]
