"""The synthetic belt: determinism, physics that match the truth, and the node on real sockets."""

from __future__ import annotations

import numpy as np
import pytest

from sortline.nodes.simulate import Simulation
from sortline.nodes.simulate.belt import BeltMotion
from sortline.nodes.simulate.materials import CLASS_ID, ENDMEMBER
from sortline.pipeline.graph import load_config
from tests.conftest import DEMO, belt_graph, load_json, sortline, write_config


@pytest.fixture(scope="module")
def settings():
    return load_config(DEMO)


@pytest.fixture(scope="module")
def sim(settings):
    return Simulation(settings, seed=5)


def test_same_seed_same_bytes_in_any_order(settings, sim):
    other = Simulation(settings, seed=5)
    frames = [40, 3, 0, 41, 17]            # out of order: content must depend on position only
    for f in frames:
        assert np.array_equal(other.hsi(f), sim.hsi(f))
    for f in reversed(frames):
        assert np.array_equal(other.rgb(f), sim.rgb(f))
        a, objs_a = other.truth(f)
        b, objs_b = sim.truth(f)
        assert all(np.array_equal(a[k], b[k]) for k in a) and objs_a == objs_b
    different = Simulation(settings, seed=6)
    assert not np.array_equal(different.rgb(3), sim.rgb(3))
    assert not np.array_equal(different.hsi(3), sim.hsi(3))


def test_the_belt_seed_leaves_the_machines_camera_alone(settings):
    """A technician's runs (teach-in, calibration) differ in belt, not in camera: the HSI camera's fixed pattern
    is the node's `camera`, whatever its belt `seed`; another camera has another pattern."""
    from sortline.nodes.simulate import Simulate

    assert Simulate.Params(seed=7).camera == 1

    def dark(seed, camera):
        return np.mean([Simulation(settings, seed=seed, scene="dark", camera=camera).hsi(f) for f in range(4)],
                       axis=(0, 1))

    same, other = dark(2, 1), dark(3, 1)
    replaced = dark(3, 2)
    assert np.abs(same - other).mean() < np.abs(same - replaced).mean() / 3     # read noise only, not ±6 counts
    a, b = Simulation(settings, seed=2, camera=1).hsi_cam, Simulation(settings, seed=3, camera=1).hsi_cam
    assert np.array_equal(a.dark, b.dark) and np.array_equal(a.dead, b.dead) and np.array_equal(a.hot, b.hot)
    assert not np.array_equal(a.dead, Simulation(settings, seed=3, camera=2).hsi_cam.dead)


def test_message_shapes_and_raw_counts(settings, sim):
    rgb, hsi = settings.cameras.rgb, settings.cameras.hsi
    r, h = sim.rgb(1), sim.hsi(1)
    assert r.shape == (rgb.lines_per_frame, rgb.pixels, 3) and r.dtype == np.uint8
    assert h.shape == (hsi.lines_per_frame, hsi.pixels, 224) and h.dtype == np.uint16
    assert h.max() <= 4095                   # 12-bit counts
    dark = Simulation(settings, seed=5, scene="dark").hsi(1).astype(float)
    white = Simulation(settings, seed=5, scene="white").hsi(1).astype(float)
    live = np.median(dark, axis=0)
    # Dark current sits well above zero; the white reference is bright but not saturated
    # (except hot pixels), and dimmer at the ends of the line (illumination fall-off).
    assert 140 < np.median(live) < 220
    w = np.median(white, axis=0) - live
    assert 2000 < np.median(w) < 3700
    assert np.median(w[:5]) < 0.85 * np.median(w[75:85])
    # A few dead pixels read 0 in every frame, whatever the light.
    dead = (white == 0).all(axis=0)
    assert 1 <= dead.sum() <= hsi.pixels * 224 // 1000


def test_truth_matches_what_the_cameras_see(settings):
    """Pixels the truth calls a material show that material's spectrum, within noise."""
    sim = Simulation(settings, seed=2, occupancy=0.5)
    cam = sim.hsi_cam
    n = 120
    raw = np.concatenate([sim.hsi(f) for f in range(n)]).astype(np.float32)
    dark = np.mean([Simulation(settings, seed=2, scene="dark").hsi(f) for f in range(4)], axis=(0, 1))
    white = np.mean([Simulation(settings, seed=2, scene="white").hsi(f) for f in range(4)], axis=(0, 1)) - dark
    refl = (raw - dark) / np.maximum(white, 1) * 0.92      # the white tile reflects 92 %

    # Which scene pixels each HSI pixel looks at, from the camera's own geometry.
    lines = settings.cameras.hsi.lines_per_frame
    rows = np.concatenate([np.floor(cam.belt_rows(sim.position("hsi", f), lines)) for f in range(n)]).astype(int)
    maps = sim.scene.rows(0, rows.max() + 1)
    endm = maps["endmember"][rows, np.broadcast_to(cam.cols, rows.shape)]
    endm = endm.reshape(len(raw), cam.ss, cam.pixels, cam.ss).transpose(0, 2, 1, 3).reshape(len(raw), cam.pixels, -1)
    pure = (endm == endm[..., :1]).all(-1)
    good = np.ones(224, bool)
    good[np.unique(cam.dead % 224)] = False
    good[np.unique(cam.hot % 224)] = False
    checked = 0
    for key in [("PET", "clear"), ("HDPE", "white"), ("PP", "white"), ("paper", "brown"), ("aluminium", "metal")]:
        sel = pure & (endm[..., 0] == ENDMEMBER[key])
        if sel.sum() < 20:
            continue
        seen = np.median(refl[sel], axis=0)
        expected = cam.spectra[ENDMEMBER[key]]
        shape = np.corrcoef(seen[good], expected[good])[0, 1]
        assert shape > 0.97, (key, shape)
        # Brightness varies with shading per object; the spectral shape does not.
        ratio = np.median(seen[good] / expected[good])
        assert 0.7 < ratio < 1.3, (key, ratio)
        checked += 1
    assert checked >= 3

    # The RGB truth: belt pixels are dark, the labels follow the scene.
    rgb = np.concatenate([sim.rgb(f) for f in range(20)]).astype(float)
    labels = np.concatenate([sim.truth(f)[0]["labels"] for f in range(20)])
    assert np.percentile(rgb[labels == 0].mean(-1), 95) < 45
    white_items = (labels == CLASS_ID["HDPE"]) | (labels == CLASS_ID["paper"])
    if white_items.any():
        assert rgb[white_items].mean() > rgb[labels == 0].mean() + 40


def test_materials_are_told_apart_by_their_bands(sim):
    """The absorption bands sit where the literature puts them."""
    wl, spectra = sim.hsi_cam.wavelengths, sim.hsi_cam.spectra

    def dip(key, lo, hi):
        s = spectra[ENDMEMBER[key]]
        window = (wl >= lo) & (wl <= hi)
        return wl[window][np.argmin(s[window])]

    assert abs(dip(("PET", "white"), 1600, 1700) - 1660) < 10
    assert abs(dip(("PS", "white"), 1600, 1700) - 1680) < 10
    assert abs(dip(("PP", "white"), 1600, 1700) - 1700) < 10
    assert abs(dip(("HDPE", "white"), 1150, 1300) - 1210) < 10
    assert abs(dip(("paper", "brown"), 1400, 1600) - 1480) < 30
    # Carbon black flattens everything: a black item's bands are a small fraction of a white one's.
    black, white = spectra[ENDMEMBER[("PP", "black")]], spectra[ENDMEMBER[("PP", "white")]]
    assert np.ptp(black) < 0.1 * np.ptp(white)
    assert black.max() < 0.08


def test_belt_motion_drifts_but_keeps_its_mean():
    motion = BeltMotion(1, 2.0, 16.0, drift=0.02, jitter=0.005)
    ticks_per_m = 16_000
    assert motion.time_s(100 * ticks_per_m) == pytest.approx(50.0, rel=0.01)
    speeds = [motion.speed_m_s(p) for p in range(0, 100 * ticks_per_m, 3200)]
    assert 1.93 < min(speeds) < 1.99 and 2.01 < max(speeds) < 2.07
    again = BeltMotion(1, 2.0, 16.0)
    assert again.time_s(5 * ticks_per_m) == motion.time_s(5 * ticks_per_m)


@pytest.mark.system
def test_node_publishes_every_frame_and_flags_gaps(tmp_path, run_dir, settings):
    """simulate -> sink over real sockets, unpaced and lossless, with frames lost on purpose."""
    seconds, rate = 0.6, 0.1
    graph = belt_graph(f"seed = 3, paced = false, seconds = {seconds}, drop_rate = {rate}",
                       f'verify = false, report = "{tmp_path / "sink.json"}"')
    cfg = write_config(tmp_path / "sim.toml", graph, run_dir)
    result = sortline("run", "--config", str(cfg), "--seconds", "60", timeout=90)
    assert result.returncode == 0, result.stderr[-2000:]
    report = load_json(tmp_path / "sink.json")

    # What the belt should have produced: frames starting before `seconds`, minus the dropped ones.
    motion = BeltMotion(3, settings.belt.speed_m_s, settings.belt.ticks_per_mm)
    expected, gaps = 0, 0
    for stream, cam in (("rgb", settings.cameras.rgb), ("hsi", settings.cameras.hsi)):
        span = cam.lines_per_frame * cam.ticks_per_line
        frames = [f for f in range(10_000) if motion.time_s(f * span) < seconds]
        dropped = [f for f in frames
                   if np.random.default_rng([3, 99, {"rgb": 1, "hsi": 2}[stream], f]).random() < rate]
        kept = len(frames) - len(dropped)
        expected += kept * (2 if stream == "rgb" else 1)          # truth goes with every RGB message
        # A gap flag goes on the first message after each run of drops (if one follows).
        runs = sum(1 for i, f in enumerate(dropped) if i == 0 or dropped[i - 1] != f - 1)
        last_dropped = dropped and dropped[-1] == frames[-1]
        gaps += (runs - last_dropped) * (2 if stream == "rgb" else 1)
    assert gaps > 0
    assert report["received"] == expected
    assert report["lost"] == 0 and report["reordered"] == 0
    assert report["gap_flags"] == gaps


@pytest.mark.system
def test_bad_params_are_refused_with_the_key(tmp_path, run_dir):
    graph = """
[nodes.belt]
kind = "simulate"
params = { mix = { PET = 1.0, glass = 0.5 }, occupancy = 2 }

[nodes.sink]
kind = "sink"

[[edges]]
from = "belt.rgb"
to = "sink.in"
"""
    cfg = write_config(tmp_path / "bad.toml", graph, run_dir)
    result = sortline("check", "--config", str(cfg))
    assert result.returncode == 78
    assert "nodes.belt.params.occupancy" in result.stderr
    assert "glass" in result.stderr
