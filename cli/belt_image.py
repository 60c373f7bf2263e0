"""A picture of a stretch of recorded belt: RGB, a false-colour HSI view, the labels.

The three panels share one grid, the RGB camera's: a row per RGB line (the
belt runs down the picture), a column per RGB pixel. HSI lines are placed by
belt position, corrected for the HSI scan line's distance from the RGB one
(from the attached configuration), and resized onto that grid. The HSI
view shows three bands (near 1600, 1300 and 1100 nm as red, green and blue
when the wavelength range is known, else three evenly spaced bands), each
stretched between its 1st and 99th percentile in the picture. Labels are
coloured with the palette the truth stream carries. A scale on the left
marks belt positions in mm.
"""

from __future__ import annotations

import cv2
import numpy as np

from sortline.nodes.views import hsi_bands, stretch
from sortline.pipeline import recording

SCALE_W = 90
GAP_W = 6
TITLE_H = 18  # a strip above the panels naming them
SCALE_STEPS_MM = (10, 20, 50, 100, 200, 500, 1000, 2000, 5000)


def render(path: str, start_ticks: int, length_mm: float) -> tuple[np.ndarray, dict]:
    """The picture (BGR, for OpenCV) and what it holds, for [start, start + length)."""
    info = recording.contents(path)
    cfg = info.config()
    belt, cams = cfg.get("belt", {}), cfg.get("cameras", {})
    run_meta = info.metadata.get(recording.META_RUN, {})
    ticks_per_mm = float(belt.get("ticks_per_mm") or run_meta.get("belt_ticks_per_mm", 0))
    if not ticks_per_mm:
        raise ValueError(f"{path}: no belt.ticks_per_mm in the attached configuration")
    rgb_stats = info.streams.get("rgb")
    if rgb_stats is None or not rgb_stats.ticks_per_line:
        raise ValueError(f"{path}: no rgb stream to lay the picture out on")
    tpl = rgb_stats.ticks_per_line
    end_ticks = start_ticks + int(length_mm * ticks_per_mm)
    rows = -(-(end_ticks - start_ticks) // tpl)
    hsi_cam = cams.get("hsi", {})
    # An HSI line at encoder position p sees the belt point that reaches the RGB line at p + offset.
    hsi_offset = int(round((cams.get("rgb", {}).get("scan_line_mm", 0.0) - hsi_cam.get("scan_line_mm", 0.0))
                           * ticks_per_mm))
    panels: dict[str, np.ndarray] = {}
    filled: dict[str, np.ndarray] = {}
    hsi_rows: list[tuple[int, int, np.ndarray]] = []  # first position, ticks per line, lines
    palette = None
    try:
        for frame in recording.frames(path):
            if frame.stream not in ("rgb", "hsi", "truth"):
                continue
            header, start = recording.decode_frame_header(frame.data)
            first = header.position + (hsi_offset if frame.stream == "hsi" else 0)
            n = recording.lines_of(header)
            if first >= end_ticks or first + n * header.ticks_per_line <= start_ticks:
                continue
            _, arrays = recording.decode_frame(frame.data)
            if frame.stream == "hsi":
                hsi_rows.append((first, header.ticks_per_line, np.array(arrays["lines"])))
                continue
            name = "lines" if frame.stream == "rgb" else "labels"
            data = arrays[name]
            if frame.stream not in panels:
                panels[frame.stream] = np.zeros((rows, *data.shape[1:]), dtype=data.dtype)
                filled[frame.stream] = np.zeros(rows, dtype=bool)
            if frame.stream == "truth":
                palette = header.meta.get("palette", palette)
            _place(panels[frame.stream], filled[frame.stream], data, first, header.ticks_per_line, start_ticks, tpl)
    except recording.Damage:
        pass  # the picture shows what is valid
    width = panels["rgb"].shape[1] if "rgb" in panels else int(cams.get("rgb", {}).get("pixels", 640))
    blank = np.zeros((rows, width, 3), dtype=np.uint8)
    rgb = panels["rgb"][..., ::-1] if "rgb" in panels else blank  # R,G,B lines to OpenCV's B,G,R
    hsi_view = _hsi_view(hsi_rows, rows, width, start_ticks, tpl, hsi_cam)
    labels = blank
    if "truth" in panels:
        labels = _label_view(panels["truth"], palette, width)
        labels[~filled["truth"]] = 0  # no truth there: black, not the colour of class 0
    panels_row = np.concatenate([_scale(rows, start_ticks, tpl, ticks_per_mm), rgb, _gap(rows), hsi_view, _gap(rows),
                                 labels], axis=1)
    hsi_title = "HSI " + "/".join(f"{nm:.0f}" for nm in _band_nm(hsi_rows, hsi_cam)) if hsi_rows else "HSI"
    titles = [("mm", 0), ("RGB", SCALE_W), (hsi_title, SCALE_W + width + GAP_W),
              ("labels", SCALE_W + 2 * (width + GAP_W))]
    picture = np.concatenate([_title(panels_row.shape[1], titles), panels_row], axis=0)
    return picture, {"rows": rows, "streams": sorted([*panels, *(["hsi"] if hsi_rows else [])])}


def _band_nm(hsi_rows, hsi_cam) -> list[float]:
    """Wavelengths (or, without a known range, band numbers) shown as R, G, B."""
    bands = hsi_rows[0][2].shape[2]
    shown = hsi_bands(bands, hsi_cam.get("wavelength_nm"))
    if not hsi_cam.get("wavelength_nm"):
        return [float(b) for b in shown]
    lo, hi = hsi_cam["wavelength_nm"]
    return [lo + b * (hi - lo) / (bands - 1) for b in shown]


def _title(width: int, titles) -> np.ndarray:
    strip = np.full((TITLE_H, width, 3), 255, dtype=np.uint8)
    for text, x in titles:
        cv2.putText(strip, text, (x + 2, TITLE_H - 5), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 0), 1, cv2.LINE_AA)
    return strip


def _place(canvas, filled, lines, first, ticks_per_line, start_ticks, tpl) -> None:
    """Copy lines onto the canvas rows their belt positions fall in."""
    rows = (first + np.arange(len(lines)) * ticks_per_line - start_ticks) // tpl
    keep = (rows >= 0) & (rows < len(canvas))
    canvas[rows[keep]] = lines[keep]
    filled[rows[keep]] = True


def _hsi_view(hsi_rows, rows, width, start_ticks, tpl, hsi_cam) -> np.ndarray:
    if not hsi_rows:
        return np.zeros((rows, width, 3), dtype=np.uint8)
    sample = hsi_rows[0][2]
    bands = hsi_bands(sample.shape[2], hsi_cam.get("wavelength_nm"))
    # Place HSI lines on an HSI-resolution grid first, then scale to the RGB grid.
    hsi_tpl = hsi_rows[0][1]
    hsi_n = -(-rows * tpl // hsi_tpl)
    canvas = np.zeros((hsi_n, sample.shape[1], 3), dtype=sample.dtype)
    filled = np.zeros(hsi_n, dtype=bool)
    for first, ticks_per_line, lines in hsi_rows:
        _place(canvas, filled, lines[..., bands], first, ticks_per_line, start_ticks, hsi_tpl)
    view = stretch(canvas, filled)
    view[~filled] = 0
    return cv2.resize(view, (width, rows), interpolation=cv2.INTER_NEAREST)[..., ::-1]


def _label_view(labels, palette, width) -> np.ndarray:
    if palette is None:  # no palette recorded: spread grey levels over the classes
        n = int(labels.max()) + 1
        palette = [[int(255 * i / max(n - 1, 1))] * 3 for i in range(n)]
    lut = np.zeros((256, 3), dtype=np.uint8)
    lut[: len(palette)] = np.asarray(palette, dtype=np.uint8)[:256]
    view = lut[labels][..., ::-1]
    return cv2.resize(view, (width, labels.shape[0]), interpolation=cv2.INTER_NEAREST)


def _gap(rows: int) -> np.ndarray:
    return np.full((rows, GAP_W, 3), 255, dtype=np.uint8)


def _scale(rows: int, start_ticks: int, tpl: int, ticks_per_mm: float) -> np.ndarray:
    """Belt position in mm: a labelled mark at least every 40 rows or so, a short one halfway."""
    scale = np.full((rows, SCALE_W, 3), 255, dtype=np.uint8)
    rows_per_mm = ticks_per_mm / tpl
    step = next((s for s in SCALE_STEPS_MM if s * rows_per_mm >= 40), SCALE_STEPS_MM[-1])
    half = step / 2
    mm = np.ceil(start_ticks / ticks_per_mm / half) * half
    while (row := int(round((mm * ticks_per_mm - start_ticks) / tpl))) < rows:
        major = mm % step == 0
        cv2.line(scale, (SCALE_W - (20 if major else 10), row), (SCALE_W - 1, row), (0, 0, 0), 1)
        if major:
            cv2.putText(scale, f"{mm:.0f} mm", (2, min(max(row + 4, 10), rows - 2)), cv2.FONT_HERSHEY_SIMPLEX, 0.35,
                        (0, 0, 0), 1, cv2.LINE_AA)
        mm += half
    return scale


def save(path: str, out: str, start_ticks: int, length_mm: float) -> dict:
    picture, info = render(path, start_ticks, length_mm)
    if not cv2.imwrite(out, picture):
        raise OSError(f"could not write {out}")
    return {**info, "width": picture.shape[1]}
