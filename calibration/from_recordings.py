"""Calibration files from recordings, and a check of one against a new recording (`sortline calibrate`).

Each step reads a recording of the machine's own cameras (dark and white references, the calibration
target), writes or checks a calibration file, and says what it found. docs/calibration.md has the
procedure on the machine.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from sortline.calibration.spatial import (Geometry, SpatialCalibration, blobs_from_frames, fit, match, residual_png,
                                          residuals)
from sortline.calibration.spectral import CalibrationError, SpectralReference
from sortline.pipeline.messages import MessageError
from sortline.pipeline.recording import Damage, decode_frame, frames

def camera_frames(path: str, stream: str) -> tuple[list[tuple[int, np.ndarray]], dict]:
    """(position, lines) of one stream of a recording, and the camera meta of its first frame (serial, ...)."""
    out, meta = [], {}
    try:
        for frame in frames(path):
            if frame.stream != stream:
                continue
            try:
                header, arrays = decode_frame(frame.data)
            except MessageError:
                continue
            if "lines" in arrays:
                out.append((header.position, arrays["lines"]))
                meta = meta or dict(header.meta)
    except Damage as exc:
        print(f"sortline: {exc}; using the {len(out)} frames before it", file=sys.stderr)
    if not out:
        raise CalibrationError(f"{path}: no {stream!r} frames in this recording")
    return out, meta


def spectral(settings, dark: str, white: str, out: str, white_reflectance: float,
             exposure_us: float | None = None) -> int:
    hsi = settings.cameras.hsi
    dark_frames, dark_meta = camera_frames(dark, "hsi")
    white_frames, white_meta = camera_frames(white, "hsi")
    serial, white_serial = str(dark_meta.get("serial", "")), str(white_meta.get("serial", ""))
    if exposure_us is None:
        exposure_us = float(white_meta.get("exposure_us", 0.0))
    if serial and white_serial and serial != white_serial:
        raise CalibrationError(f"the dark recording is from camera {serial!r}, the white one from {white_serial!r}")
    d = np.concatenate([a for _, a in dark_frames])
    w = np.concatenate([a for _, a in white_frames])
    if d.shape[1:] != (hsi.pixels, hsi.bands):
        raise CalibrationError(f"the recording's HSI frames are {d.shape[1]} × {d.shape[2]} (pixels × bands), "
                               f"cameras.hsi is {hsi.pixels} × {hsi.bands}")
    if np.median(w.astype(np.float32) - d.mean(0)) < 50:
        raise CalibrationError("the white recording is barely brighter than the dark one: lamp off, or files swapped?")
    ref = SpectralReference.from_frames(d, w, white_reflectance=white_reflectance, serial=serial or white_serial,
                                        exposure_us=exposure_us)
    ref.save(out)
    response = ref.white - ref.dark
    print(f"{out}: {len(d)} dark and {len(w)} white lines of camera {ref.serial or '(no serial)'}; "
          f"dark level {np.median(ref.dark):.0f} counts, white response {np.median(response):.0f} counts (median); "
          f"{int(ref.bad.sum())} bad pixels of {ref.bad.size} ({int(ref.bad.all(1).sum())} bad in every band)")
    return 0


def _blobs(settings, recording: str):
    rgb, hsi, tpm = settings.cameras.rgb, settings.cameras.hsi, settings.belt.ticks_per_mm
    rgb_frames, rgb_meta = camera_frames(recording, "rgb")
    hsi_frames, hsi_meta = camera_frames(recording, "hsi")
    rgb_serial, hsi_serial = str(rgb_meta.get("serial", "")), str(hsi_meta.get("serial", ""))
    return (blobs_from_frames(rgb_frames, rgb.ticks_per_line, rgb.mm_per_pixel, rgb.ticks_per_line / tpm),
            blobs_from_frames(hsi_frames, hsi.ticks_per_line, hsi.mm_per_pixel, hsi.ticks_per_line / tpm),
            rgb_serial, hsi_serial)


def _report(res: dict) -> str:
    return (f"matches {res['matches']} ({res.get('rejected', 0)} rejected)\n"
            f"across: rms {res['across_rms_rgb_px']:.2f} RGB px, max {res['across_max_rgb_px']:.2f} RGB px = "
            f"{res['across_max_hsi_px']:.2f} HSI px = {res['across_max_mm']:.2f} mm\n"
            f"along:  rms {res['along_rms_rgb_lines']:.2f} RGB lines, max {res['along_max_rgb_lines']:.2f} RGB lines = "
            f"{res['along_max_mm']:.2f} mm")


def spatial(settings, recording: str, out: str, png: str | None) -> int:
    rgb_blobs, hsi_blobs, rgb_serial, hsi_serial = _blobs(settings, recording)
    geo = Geometry.from_machine(settings)
    cal = fit(rgb_blobs, hsi_blobs, geo, rgb_serial=rgb_serial, hsi_serial=hsi_serial)
    cal.save(out)
    print(f"{out}: HSI pixel u -> RGB column {cal.cross[0]:.2f} + {cal.cross[1]:.4f} u + ...; "
          f"HSI -> RGB delay {cal.along[0] / settings.belt.ticks_per_mm:.2f} mm at u = 0")
    print(_report(cal.residuals))
    if png:
        residual_png(cal.residuals, geo, png, title=Path(recording).name)
        print(f"residuals drawn in {png}")
    return 0


def check(settings, recording: str, png: str | None, max_across: float, max_along: float) -> int:
    if not settings.calibration.spatial:
        raise CalibrationError("calibration.spatial is not set in the config: nothing to check against")
    rgb_blobs, hsi_blobs, rgb_serial, hsi_serial = _blobs(settings, recording)
    cal = SpatialCalibration.load(settings.calibration.spatial, rgb_pixels=settings.cameras.rgb.pixels,
                                  hsi_pixels=settings.cameras.hsi.pixels, rgb_serial=rgb_serial, hsi_serial=hsi_serial)
    geo = Geometry.from_machine(settings)
    i_r, i_h = match(rgb_blobs, hsi_blobs, np.array(cal.cross), np.array(cal.along), geo)
    if len(i_r) < 12:
        raise CalibrationError(f"only {len(i_r)} target marks matched under {settings.calibration.spatial}: the "
                               f"target is not in view, or a camera moved by more than 12 mm; recalibrate")
    res = residuals(rgb_blobs, hsi_blobs, i_r, i_h, cal, geo)
    print(f"{recording} under {settings.calibration.spatial} (made {cal.date}):")
    print(_report(res))
    if png:
        residual_png(res, geo, png, title=f"check {Path(recording).name}")
    ok = res["across_max_hsi_px"] <= max_across and res["along_max_rgb_lines"] <= max_along
    print("within limits" if ok else
          f"OUT OF LIMITS (across {max_across} HSI px, along {max_along} RGB lines): a camera has moved; recalibrate")
    return 0 if ok else 1
