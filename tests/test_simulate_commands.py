"""`sortline simulate` and `sortline calibrate` end to end: real processes, real recordings."""

from __future__ import annotations

from pathlib import Path

import msgspec
import numpy as np
import pytest

from sortline.calibration.spatial import SpatialCalibration
from sortline.calibration.spectral import SpectralReference
from sortline.nodes.simulate import Simulation
from sortline.pipeline.graph import load_config
from sortline.pipeline.recording import decode_frame, frames
from tests.conftest import DEMO, ROOT, belt_graph, machine_toml, sortline, write_config


def messages(path: Path) -> dict[str, list]:
    out: dict[str, list] = {}
    for frame in frames(path):
        header, arrays = decode_frame(frame.data)
        out.setdefault(frame.stream, []).append((header, {k: np.array(v) for k, v in arrays.items()}))
    return out


def simulate(tmp_path: Path, name: str, *args: str, config: Path = DEMO) -> Path:
    path = tmp_path / name
    res = sortline("simulate", "--config", str(config), "--record", str(path), *args, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    return path


@pytest.mark.system
def test_same_seed_same_recording_and_it_replays_bit_for_bit(tmp_path, run_dir):
    a = messages(simulate(tmp_path, "a.mcap", "--seed", "7", "--seconds", "0.3", "--drop-rate", "0.1"))
    b = messages(simulate(tmp_path, "b.mcap", "--seed", "7", "--seconds", "0.3", "--drop-rate", "0.1"))
    assert set(a) == {"rgb", "hsi", "truth"} and len(a["rgb"]) >= 15
    for stream in a:
        assert len(a[stream]) == len(b[stream])
        for (ha, aa), (hb, ab) in zip(a[stream], b[stream]):
            assert (ha.seq, ha.position, ha.gap, ha.meta) == (hb.seq, hb.position, hb.gap, hb.meta)
            assert all(np.array_equal(aa[k], ab[k]) for k in aa)
    assert any(h.gap for h, _ in a["rgb"])                  # lost frames are flagged
    # The recorded frames are the simulator's, whichever process made them.
    settings = load_config(DEMO)
    sim = Simulation(settings, seed=7)
    span = settings.cameras.rgb.lines_per_frame * settings.cameras.rgb.ticks_per_line
    for (h, arrays), (ht, truth) in zip(a["rgb"][:6], a["truth"][:6]):
        frame = h.position // span
        assert np.array_equal(arrays["lines"], sim.rgb(frame))
        maps, objects = sim.truth(frame)
        assert np.array_equal(truth["labels"], maps["labels"]) and ht.meta["objects"] == msgspec.to_builtins(objects)
        assert (ht.seq, ht.position) == (h.seq, h.position)

    # Replay it as fast as the graph takes it, recording again: every message comes back.
    cfg = write_config(tmp_path / "g.toml", belt_graph("", "verify = false"), run_dir)
    res = sortline("replay", str(tmp_path / "a.mcap"), "--config", str(cfg), "--speed", "0",
                   "--record", str(tmp_path / "again.mcap"), timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    again = messages(tmp_path / "again.mcap")
    for stream in a:
        assert len(again[stream]) == len(a[stream])
        for (ha, aa), (hb, ab) in zip(a[stream], again[stream]):
            assert (ha.seq, ha.position, ha.gap, ha.meta, ha.device_ts_ns) == \
                (hb.seq, hb.position, hb.gap, hb.meta, hb.device_ts_ns)
            assert all(np.array_equal(aa[k], ab[k]) for k in aa)


@pytest.mark.system
def test_calibration_commands_remake_the_shipped_files_and_check_catches_a_moved_camera(tmp_path):
    """The commands of docs/calibration.md, run as a technician would, on the synthetic belt."""
    dark = simulate(tmp_path, "dark.mcap", "--scene", "dark", "--seconds", "0.3")
    white = simulate(tmp_path, "white.mcap", "--scene", "white", "--seconds", "0.3")
    target = simulate(tmp_path, "target.mcap", "--scene", "target", "--seconds", "1.5")
    res = sortline("calibrate", "spectral", "--config", str(DEMO), "--dark", str(dark), "--white", str(white),
                   "--white-reflectance", "0.92", "--out", str(tmp_path / "spectral.npz"), timeout=60)
    assert res.returncode == 0, res.stderr
    assert "9 bad pixels of 35840" in res.stdout
    res = sortline("calibrate", "spatial", "--config", str(DEMO), str(target), "--out", str(tmp_path / "spatial.json"),
                   "--png", str(tmp_path / "res.png"), timeout=60)
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "res.png").stat().st_size > 1000

    # Deterministic: the same as the files the demo profile ships (dates aside).
    shipped = ROOT / "configs" / "calibration"
    made, ref = SpectralReference.load(tmp_path / "spectral.npz"), SpectralReference.load(shipped / "demo-spectral.npz")
    assert np.array_equal(made.dark, ref.dark) and np.array_equal(made.white, ref.white)
    assert np.array_equal(made.bad, ref.bad)
    made_s, ref_s = SpatialCalibration.load(tmp_path / "spatial.json"), SpatialCalibration.load(shipped / "demo-spatial.json")
    assert np.allclose(made_s.cross, ref_s.cross, rtol=1e-9) and np.allclose(made_s.along, ref_s.along, rtol=1e-9)

    # The check: the same cameras pass; an HSI camera knocked 3 mm sideways fails, exit 1.
    res = sortline("calibrate", "check", "--config", str(DEMO), str(target), timeout=60)
    assert res.returncode == 0 and "within limits" in res.stdout, res.stdout + res.stderr
    moved_cfg = tmp_path / "moved.toml"
    moved_cfg.write_text(machine_toml() + """
[nodes.belt]
kind = "simulate"
params = { misregistration = { offset_mm = 9.0 } }
""")
    moved = simulate(tmp_path, "moved.mcap", "--scene", "target", "--seconds", "1.0", config=moved_cfg)
    res = sortline("calibrate", "check", "--config", str(DEMO), str(moved), timeout=60)
    assert res.returncode == 1 and "OUT OF LIMITS" in res.stdout, res.stdout + res.stderr
    across_mm = float(res.stdout.split(" HSI px = ")[1].split(" mm")[0])
    assert 2.5 < across_mm < 4.0


@pytest.mark.system
@pytest.mark.parametrize("args, expected", [
    (["spectral", "--dark", "{white}", "--white", "{dark}"], "barely brighter than the dark one"),
    (["spatial", "{dark}"], "target marks seen by both cameras"),
])
def test_calibration_from_the_wrong_recording_says_why(tmp_path, args, expected):
    dark = simulate(tmp_path, "dark.mcap", "--scene", "dark", "--seconds", "0.2")
    white = simulate(tmp_path, "white.mcap", "--scene", "white", "--seconds", "0.2")
    args = [a.format(dark=dark, white=white) for a in args]
    res = sortline("calibrate", *args[:1], "--config", str(DEMO), *args[1:], "--out", str(tmp_path / "out"), timeout=60)
    assert res.returncode == 2
    assert expected in res.stderr
