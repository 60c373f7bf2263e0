"""Spectral calibration: references from dark/white frames, reflectance, bad pixels, binning, the file."""

from __future__ import annotations

import numpy as np
import pytest

from sortline.calibration.spectral import BinnedReflectance, CalibrationError, SpectralReference, bin_bands
from sortline.nodes.simulate import Simulation
from sortline.nodes.simulate.materials import ENDMEMBER
from sortline.pipeline.graph import load_config
from tests.conftest import DEMO


@pytest.fixture(scope="module")
def settings():
    return load_config(DEMO)


@pytest.fixture(scope="module")
def reference(settings):
    dark = np.concatenate([Simulation(settings, seed=9, scene="dark").hsi(f) for f in range(8)])
    white = np.concatenate([Simulation(settings, seed=9, scene="white").hsi(f) for f in range(8)])
    return SpectralReference.from_frames(dark, white, white_reflectance=0.92, serial="SIM-HSI-9")


def test_bad_pixels_are_exactly_the_dead_and_hot_ones(settings, reference):
    cam = Simulation(settings, seed=9).hsi_cam
    truth = np.zeros(reference.bad.size, bool)
    truth[cam.dead] = truth[cam.hot] = True
    assert np.array_equal(reference.bad.ravel(), truth)


def test_reflectance_of_a_white_scene_is_the_tile_everywhere(settings, reference):
    raw = Simulation(settings, seed=9, scene="white").hsi(20)      # the same camera, frames not averaged
    refl = reference.reflectance(raw)
    assert refl.dtype == np.float32 and refl.shape == raw.shape
    assert np.median(refl) == pytest.approx(0.92, abs=0.005)
    # Noise only: bad pixels were repaired from their neighbours, none reads 0 or saturated.
    assert np.percentile(np.abs(refl - 0.92), 99.9) < 0.08
    assert refl.min() > 0.6


def test_material_reflectance_matches_the_true_spectrum(settings, reference):
    sim = Simulation(settings, seed=9, occupancy=0.6, mix={"HDPE": 1, "PET": 1})
    cam = sim.hsi_cam
    raw = np.concatenate([sim.hsi(f) for f in range(60)])
    refl = reference.reflectance(raw)
    rows = np.concatenate([np.floor(cam.belt_rows(sim.position("hsi", f), 8)) for f in range(60)]).astype(int)
    endm = sim.scene.rows(0, rows.max() + 1)["endmember"][rows, np.broadcast_to(cam.cols, rows.shape)]
    endm = endm.reshape(len(raw), cam.ss, cam.pixels, cam.ss).transpose(0, 2, 1, 3).reshape(len(raw), cam.pixels, -1)
    for key in [("HDPE", "white"), ("PET", "clear")]:
        sel = (endm == ENDMEMBER[key]).all(-1)
        assert sel.sum() > 30, key
        seen = np.median(refl[sel], axis=0)
        expected = cam.spectra[ENDMEMBER[key]]
        # Shading scales an object's brightness; the shape is the material's, within noise.
        scale = np.median(seen / expected)
        assert 0.7 < scale < 1.3
        assert np.abs(seen / scale - expected).max() < 0.06, key


def test_binning_equal_groups_and_ranges():
    cube = np.arange(2 * 3 * 8, dtype=np.float32).reshape(2, 3, 8)
    assert np.array_equal(bin_bands(cube, 4), cube.reshape(2, 3, 4, 2).mean(-1))
    assert bin_bands(cube, 4, np.float16).dtype == np.float16
    ranged = bin_bands(cube, [(0, 3), (5, 8)])
    assert np.allclose(ranged[..., 0], cube[..., :3].mean(-1)) and np.allclose(ranged[..., 1], cube[..., 5:].mean(-1))
    assert np.allclose(bin_bands(cube, 3), np.stack([cube[..., 0:3].mean(-1), cube[..., 3:5].mean(-1),
                                                     cube[..., 5:8].mean(-1)], -1))
    with pytest.raises(ValueError):
        bin_bands(cube, [(0, 4), (3, 8)])


def test_file_round_trip_and_refusals(tmp_path, reference):
    path = reference.save(tmp_path / "hsi.npz")
    loaded = SpectralReference.load(path, pixels=160, bands=224, serial="SIM-HSI-9")
    assert np.array_equal(loaded.dark, reference.dark) and np.array_equal(loaded.bad, reference.bad)
    assert loaded.serial == "SIM-HSI-9" and loaded.white_reflectance == 0.92
    with pytest.raises(CalibrationError, match="640 × 224"):
        SpectralReference.load(path, pixels=640, bands=224)
    with pytest.raises(CalibrationError, match="made for camera 'SIM-HSI-9'"):
        SpectralReference.load(path, pixels=160, bands=224, serial="FX17-123")
    (tmp_path / "junk.npz").write_bytes(b"not a calibration")
    with pytest.raises(CalibrationError, match="not a readable"):
        SpectralReference.load(tmp_path / "junk.npz")


def previous_reflectance(ref: SpectralReference, raw: np.ndarray, clip: float = 1.5) -> np.ndarray:
    """The definition the register node used before BinnedReflectance: every (pixel, band) read through the
    nearest-good-pixel map, the whole frame gathered."""
    pixels, bands = ref.shape
    idx = np.broadcast_to(np.arange(pixels)[:, None], (pixels, bands)).copy()
    for b in np.nonzero(ref.bad.any(0))[0]:
        good = np.nonzero(~ref.bad[:, b])[0]
        idx[:, b] = good[np.abs(np.arange(pixels)[:, None] - good[None, :]).argmin(1)]
    scale = (ref.white_reflectance / np.maximum(ref.white - ref.dark, 1.0)).astype(np.float32)
    refl = raw.astype(np.float32)
    refl -= ref.dark
    refl *= scale
    np.clip(refl, 0.0, clip, out=refl)
    lines = refl.reshape(len(refl), -1)
    lines[:] = lines[:, (idx * bands + np.arange(bands)[None, :]).ravel()]
    return refl


@pytest.fixture(scope="module")
def belt_raw(settings):
    """Belt frames, with counts under the dark level and over 1.5 reflectance, so that both clips act."""
    sim = Simulation(settings, seed=9, occupancy=0.6)
    raw = np.concatenate([sim.hsi(f) for f in range(6)])
    rng = np.random.default_rng(9)
    raw.reshape(-1)[rng.choice(raw.size, raw.size // 50, replace=False)] = 0
    raw.reshape(-1)[rng.choice(raw.size, raw.size // 50, replace=False)] = 4095
    return raw


def test_reflectance_repairs_exactly_as_the_whole_frame_gather(reference, belt_raw):
    assert reference.bad.sum() > 0
    assert np.array_equal(reference.reflectance(belt_raw), previous_reflectance(reference, belt_raw))


@pytest.mark.parametrize("groups", [32, 30, [(10, 20), (100, 140), (200, 224)]],
                        ids=["equal", "uneven", "ranges"])
def test_binned_reflectance_is_the_mean_of_the_reflectance_within_float_rounding(reference, belt_raw, groups):
    """The fast path against bin_bands(previous reflectance): float32 rounding apart, and in float16 (what a
    strip carries) equal but for a rare value on a rounding boundary, one step off."""
    refl = previous_reflectance(reference, belt_raw)
    assert (refl == 0).mean() > 0.01 and (refl == 1.5).mean() > 0.002     # both clips in play
    expected = bin_bands(refl, groups)
    got = BinnedReflectance(reference, groups)(belt_raw)
    assert got.shape == expected.shape and got.dtype == np.float32
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-7)
    g16, e16 = got.astype(np.float16), expected.astype(np.float16)
    steps = np.abs(g16.view(np.int16).astype(int) - e16.view(np.int16).astype(int))
    assert steps.max() <= 1 and (steps > 0).mean() < 1e-3


def test_binned_reflectance_of_no_lines_and_of_another_camera(reference):
    assert BinnedReflectance(reference, 32)(np.zeros((0, 160, 224), np.uint16)).shape == (0, 160, 32)
    with pytest.raises(CalibrationError, match="pixels × bands"):
        BinnedReflectance(reference, 32)(np.zeros((4, 100, 224), np.uint16))
