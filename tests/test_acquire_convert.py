"""Frame conversion and belt positions, on plain arrays: the formats and chunk data the
simulated producer cannot show (Bayer, Mono12, BGR8, encoder values)."""

from __future__ import annotations

import numpy as np
import pytest

from sortline.nodes.acquire.convert import FrameShape, convert, pixel_format
from sortline.nodes.acquire.position import BeltTracker


def run(raw: np.ndarray, fmt: str, width: int, height: int, **kw) -> np.ndarray:
    shape = FrameShape(pixel_format(fmt), width, height, **kw)
    out = np.full((shape.lines, shape.pixels, shape.channels), 0xAB, dtype=shape.dtype)
    return convert(raw.reshape(-1).view(np.uint8), shape, out)  # as a GenTL buffer: flat bytes


def test_mono12_keeps_raw_counts_in_uint16():
    frame = (np.arange(6 * 4, dtype=np.uint16) * 170 % 4096).reshape(6, 4)
    out = run(frame, "Mono12", 4, 6)
    assert out.dtype == np.uint16 and out.shape == (6, 4, 1)
    assert np.array_equal(out[:, :, 0], frame)
    assert pixel_format("Mono12").bit_depth == 12


def test_mono8_frame_of_lines():
    frame = np.random.default_rng(0).integers(0, 256, (3, 5), dtype=np.uint8)
    out = run(frame, "Mono8", 5, 3)
    assert out.shape == (3, 5, 1) and np.array_equal(out[:, :, 0], frame)


@pytest.mark.parametrize("fmt, channels", [("RGB8", 3), ("BGR8", 3), ("RGBa8", 4), ("BGRa8", 4)])
def test_colour_formats_become_rgb(fmt, channels):
    r, g, b = 10, 20, 30
    pixel = {"RGB8": [r, g, b], "BGR8": [b, g, r], "RGBa8": [r, g, b, 255], "BGRa8": [b, g, r, 255]}[fmt]
    frame = np.tile(np.array(pixel, dtype=np.uint8), (2, 7, 1))
    frame[1, 3, :3] = frame[1, 3, :3] + 1  # one distinct pixel: no axis mixed up
    out = run(frame, fmt, 7, 2)
    assert out.shape == (2, 7, 3)
    expected = np.tile(np.array([r, g, b], dtype=np.uint8), (2, 7, 1))
    expected[1, 3] += 1
    assert np.array_equal(out, expected)


@pytest.mark.parametrize("cell", ["RG", "GR", "GB", "BG"])
def test_bayer_demosaics_a_uniform_colour_to_that_colour(cell):
    # Mosaic a uniform (R, G, B) image with the PFNC cell layout; the interior must come back as (R, G, B).
    rgb = {"R": 200, "G": 120, "B": 40}
    layout = {"RG": "RGGB", "GR": "GRBG", "GB": "GBRG", "BG": "BGGR"}[cell]
    mosaic = np.zeros((8, 10), dtype=np.uint8)
    for i, colour in enumerate(layout):
        mosaic[i // 2::2, i % 2::2] = rgb[colour]
    out = run(mosaic, f"Bayer{cell}8", 10, 8)
    assert out.shape == (8, 10, 3)
    assert np.array_equal(out[2:-2, 2:-2], np.broadcast_to([200, 120, 40], (4, 6, 3)))


def test_bayer_12_bit_stays_uint16():
    mosaic = np.full((4, 4), 3000, dtype=np.uint16)
    out = run(mosaic, "BayerRG12", 4, 4)
    assert out.dtype == np.uint16 and np.all(out == 3000)


def test_hsi_frame_with_bands_along_rows_becomes_one_line_of_pixels_by_bands():
    bands, pixels = 6, 4
    frame = (np.arange(bands)[:, None] * 100 + np.arange(pixels)[None, :]).astype(np.uint16)  # row = band
    out = run(frame, "Mono12", pixels, bands, layout="spectral_rows")
    assert out.shape == (1, pixels, bands)
    assert np.array_equal(out[0], frame.T)  # out[0, pixel, band] = band*100 + pixel
    rev = run(frame, "Mono12", pixels, bands, layout="spectral_rows", reverse_bands=True)
    assert np.array_equal(rev[0], frame.T[:, ::-1])


def test_hsi_frame_with_bands_along_columns():
    pixels, bands = 5, 3
    frame = (np.arange(pixels)[:, None] * 10 + np.arange(bands)[None, :]).astype(np.uint8)  # row = pixel
    out = run(frame, "Mono8", bands, pixels, layout="spectral_columns")
    assert out.shape == (1, pixels, bands) and np.array_equal(out[0], frame)


def test_unsupported_formats_and_short_frames_are_clear_errors():
    with pytest.raises(ValueError, match="pixel format 'Mono12p' is not supported"):
        pixel_format("Mono12p")
    with pytest.raises(ValueError, match="needs a mono pixel format, not RGB8"):
        FrameShape(pixel_format("RGB8"), 4, 4, layout="spectral_rows")
    shape = FrameShape(pixel_format("Mono16"), 4, 4)
    with pytest.raises(ValueError, match="frame of 16 bytes, 4x4 Mono16 needs 32"):
        convert(np.zeros(16, np.uint8), shape, np.empty((4, 4, 1), np.uint16))


def test_positions_from_frame_ids_count_and_flag_gaps():
    t = BeltTracker(frame_lines=100, ticks_per_line=15)
    placed = [t.place(i, None) for i in (1, 2, 3, 7, 8)]
    assert [p.position for p in placed] == [0, 1500, 3000, 9000, 10500]
    assert [p.lost for p in placed] == [0, 0, 0, 3, 0]
    assert [p.gap for p in placed] == [False, False, False, True, False]


def test_positions_from_encoder_values_with_wrap_and_gap():
    t = BeltTracker(frame_lines=4, ticks_per_line=10, encoder_bits=16)
    values = [65_480, 65_520, 24, 64, 184, 224]  # wraps after 65_520; 104..144 missing
    placed = [t.place(None, v) for v in values]
    assert [p.position - values[0] for p in placed] == [0, 40, 80, 120, 240, 280]  # the encoder's own count
    assert [p.gap for p in placed] == [False, False, False, False, True, False]
    assert placed[4].lost == 2


def test_with_frame_ids_and_encoder_values_the_ids_count_losses_and_the_encoder_places():
    t = BeltTracker(frame_lines=4, ticks_per_line=10)
    # A free-running camera on a belt that speeds up: encoder steps grow, ids stay contiguous.
    placed = [t.place(i, v) for i, v in ((1, 1000), (2, 1040), (3, 1100), (5, 1250))]
    assert [p.position for p in placed] == [1000, 1040, 1100, 1250]
    assert [(p.lost, p.gap) for p in placed] == [(0, False), (0, False), (0, False), (1, True)]


def test_after_a_restart_positions_continue_past_the_outage_and_the_next_frame_is_flagged():
    t = BeltTracker(frame_lines=1, ticks_per_line=60)
    for i in (1, 2, 3):
        t.place(i, None)
    t.restart(missed_frames=10)  # frame ids start again at 1
    first, second = t.place(1, None), t.place(2, None)
    assert (first.position, first.gap, first.lost) == (180 + 600, True, 0)
    assert (second.position, second.gap) == (840, False)


def test_after_a_restart_an_encoder_that_kept_counting_places_exactly():
    t = BeltTracker(frame_lines=1, ticks_per_line=60)
    for i, v in ((1, 600), (2, 660)):
        t.place(i, v)
    t.restart(missed_frames=3)  # estimated; the encoder knows better
    back = t.place(1, 660 + 60 * 11)
    assert (back.position, back.gap) == (1320, True)
    reset = BeltTracker(frame_lines=1, ticks_per_line=60)
    reset.place(1, 5000)
    reset.restart(missed_frames=2)
    after = reset.place(1, 7)  # the camera's counter was reset: fall back on the estimate
    assert (after.position, after.gap) == (5000 + 60 + 2 * 60, True)


def test_a_frame_id_that_goes_backwards_is_a_gap_of_unknown_size():
    t = BeltTracker(frame_lines=1, ticks_per_line=1)
    t.place(50, None)
    back = t.place(3, None)
    assert back.gap and back.lost == 0 and back.position == 1
