"""Spatial co-registration fitted on the simulated target, checked against the simulator's true geometry."""

from __future__ import annotations

import numpy as np
import pytest

from sortline.calibration.spatial import Geometry, SpatialCalibration, blobs_from_frames, fit, residual_png, residuals, match
from sortline.calibration.spectral import CalibrationError
from sortline.nodes.simulate import Simulation
from sortline.nodes.simulate.cameras import Misregistration
from sortline.pipeline.graph import load_config
from tests.conftest import DEMO


@pytest.fixture(scope="module")
def settings():
    return load_config(DEMO)


def target_blobs(settings, mis: Misregistration, frames: int = 64, seed: int = 2, start: int = 0):
    sim = Simulation(settings, seed=seed, scene="target", misregistration=mis)
    rgb, hsi, tpm = settings.cameras.rgb, settings.cameras.hsi, settings.belt.ticks_per_mm
    rf = [(sim.position("rgb", f), sim.rgb(f)) for f in range(start, start + frames)]
    hf = [(sim.position("hsi", f), sim.hsi(f)) for f in range(start, start + frames)]
    return (blobs_from_frames(rf, rgb.ticks_per_line, rgb.mm_per_pixel, rgb.ticks_per_line / tpm),
            blobs_from_frames(hf, hsi.ticks_per_line, hsi.mm_per_pixel, hsi.ticks_per_line / tpm))


def true_mapping(settings, mis: Misregistration, u: np.ndarray):
    """The simulator's geometry (nodes/simulate/cameras.py), in the calibration's terms."""
    rgb, hsi, belt = settings.cameras.rgb, settings.cameras.hsi, settings.belt
    d = (u - hsi.pixels / 2) / (hsi.pixels / 2)
    x = belt.width_mm / 2 + mis.offset_mm + mis.scale * (u - hsi.pixels / 2) * hsi.mm_per_pixel * (1 + mis.distortion * d * d)
    scan = hsi.scan_line_mm - rgb.scan_line_mm + mis.scan_line_error_mm
    along = (-scan + np.tan(np.deg2rad(mis.rotation_deg)) * (x - belt.width_mm / 2)) * belt.ticks_per_mm
    return x / rgb.mm_per_pixel, along


MISREGISTRATIONS = [
    Misregistration(),
    Misregistration(offset_mm=-8.0, scale=0.985, rotation_deg=-0.5, distortion=0.006, scan_line_error_mm=-2.5),
    Misregistration(offset_mm=3.0, scale=1.03, rotation_deg=0.8, distortion=-0.008, scan_line_error_mm=0.9),
]


@pytest.mark.parametrize("mis", MISREGISTRATIONS, ids=["default", "shrunk-left", "wide-tilted"])
def test_fit_recovers_the_true_geometry(settings, mis):
    rgb_blobs, hsi_blobs = target_blobs(settings, mis)
    cal = fit(rgb_blobs, hsi_blobs, Geometry.from_machine(settings))
    u = np.arange(settings.cameras.hsi.pixels) + 0.5       # every HSI pixel centre
    col, along = true_mapping(settings, mis, u)
    ratio = settings.hsi_ratio
    across_hsi_px = np.abs(cal.rgb_col(u) - col) / (ratio * mis.scale)
    along_rgb_lines = np.abs(cal.along_ticks(u) - along) / settings.cameras.rgb.ticks_per_line
    assert across_hsi_px.max() <= 0.3, across_hsi_px.max()
    assert along_rgb_lines.max() <= 1.0, along_rgb_lines.max()
    # The residuals it reports itself agree: small, from hundreds of marks.
    r = cal.residuals
    assert r["matches"] > 300 and r["across_max_hsi_px"] < 0.3 and r["along_max_rgb_lines"] < 1.0
    # The inverse is the inverse.
    assert np.allclose(cal.hsi_u(cal.rgb_col(u)), u, atol=1e-6)


def test_check_mode_tells_a_moved_camera(settings, tmp_path):
    geo = Geometry.from_machine(settings)
    cal = fit(*target_blobs(settings, MISREGISTRATIONS[0]), geo)
    # Same cameras, new recording: residuals stay small without refitting.
    rgb_b, hsi_b = target_blobs(settings, MISREGISTRATIONS[0], frames=40, start=100)
    i_r, i_h = match(rgb_b, hsi_b, np.array(cal.cross), np.array(cal.along), geo)
    assert residuals(rgb_b, hsi_b, i_r, i_h, cal, geo)["across_max_hsi_px"] < 0.3
    # The HSI camera moved 3 mm across: the same check shows it.
    moved = Misregistration(offset_mm=9.0)
    rgb_b, hsi_b = target_blobs(settings, moved, frames=40, start=100)
    i_r, i_h = match(rgb_b, hsi_b, np.array(cal.cross), np.array(cal.along), geo)
    res = residuals(rgb_b, hsi_b, i_r, i_h, cal, geo)
    assert 2.5 < res["across_max_mm"] < 4.0
    png = residual_png(res, geo, tmp_path / "res.png")
    assert png.stat().st_size > 1000


def test_file_round_trip_and_refusals(settings, tmp_path):
    cal = fit(*target_blobs(settings, MISREGISTRATIONS[0], frames=40), Geometry.from_machine(settings),
              rgb_serial="SIM-RGB-2", hsi_serial="SIM-HSI-2")
    path = cal.save(tmp_path / "spatial.json")
    back = SpatialCalibration.load(path, rgb_pixels=640, hsi_pixels=160, hsi_serial="SIM-HSI-2")
    assert back.cross == cal.cross and back.along == cal.along
    with pytest.raises(CalibrationError, match="rgb_pixels = 640, this machine has 2560"):
        SpatialCalibration.load(path, rgb_pixels=2560, hsi_pixels=640)
    with pytest.raises(CalibrationError, match="made for camera 'SIM-HSI-2'"):
        SpatialCalibration.load(path, hsi_serial="FX17-001")
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(CalibrationError, match="not a sortline-spatial"):
        SpatialCalibration.load(tmp_path / "bad.json")


def test_no_target_in_view_is_a_clear_error(settings):
    sim = Simulation(settings, seed=2, scene="belt", occupancy=0.0)
    rgb, hsi, tpm = settings.cameras.rgb, settings.cameras.hsi, settings.belt.ticks_per_mm
    rf = [(sim.position("rgb", f), sim.rgb(f)) for f in range(8)]
    hf = [(sim.position("hsi", f), sim.hsi(f)) for f in range(8)]
    with pytest.raises(CalibrationError, match="target marks seen by both cameras"):
        fit(blobs_from_frames(rf, rgb.ticks_per_line, rgb.mm_per_pixel, rgb.ticks_per_line / tpm),
            blobs_from_frames(hf, hsi.ticks_per_line, hsi.mm_per_pixel, hsi.ticks_per_line / tpm),
            Geometry.from_machine(settings))
