"""Pictures of the belt for people: coarse grids of camera lines, false colour, class colours.

Shared by the recorder's image channels, the live view and `sortline inspect --png`,
so that a recording, the live view and a picture of a recording show the belt alike:
rows in belt-position order (the first line at the top), a pixel for every `step`-th
line and column, the lines picked by their belt position (line number a multiple of
`step`), so that pictures cut from different messages line up and can be checked
against the camera's own lines.
"""

from __future__ import annotations

import cv2
import numpy as np

FALSE_COLOUR_NM = (1600.0, 1300.0, 1100.0)  # HSI bands shown as R, G, B
STRETCH_SAMPLE = 4096

# Class colours of a mask view, by class index (0, the belt, dark grey); a class past the
# list takes the colours again from the first target colour on.
CLASS_COLOURS = np.array([
    [40, 40, 40], [230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48],
    [145, 30, 180], [70, 240, 240], [240, 50, 230], [210, 245, 60], [250, 190, 212], [0, 128, 128],
], dtype=np.uint8)


def grid_step(pixels: int, view_px: int) -> int:
    """Camera pixels per picture pixel, along and across: the picture at most `view_px` wide."""
    return max(1, -(-pixels // view_px))


def on_grid(lines: np.ndarray, first_line: int, step: int) -> np.ndarray:
    """The lines whose line number (first_line + i) is a multiple of step, every step-th column."""
    rows = lines[(-first_line) % step::step]
    if step == 1:
        return rows
    if rows.shape[2] <= 4 and len(rows) and rows.shape[1] % step == 0:
        # OpenCV picks the same columns (x * step, where step divides the width) a few times faster
        # than numpy's strided copy of 3-byte pixels.
        return cv2.resize(rows, (rows.shape[1] // step, len(rows)), interpolation=cv2.INTER_NEAREST).reshape(
            len(rows), rows.shape[1] // step, rows.shape[2])
    return rows[:, ::step]


def hsi_bands(bands: int, wavelength_nm) -> list[int]:
    """Band indices shown as red, green, blue."""
    if wavelength_nm:
        lo, hi = wavelength_nm
        if lo <= min(FALSE_COLOUR_NM) and max(FALSE_COLOUR_NM) <= hi:
            return [round((nm - lo) / (hi - lo) * (bands - 1)) for nm in FALSE_COLOUR_NM]
    return [round(bands * f) for f in (0.75, 0.5, 0.25)]


def stretch(planes: np.ndarray, valid: np.ndarray | None = None) -> np.ndarray:
    """Each band to 0..255 between its 1st and 99th percentile (over the valid rows; of at most
    STRETCH_SAMPLE of their pixels, evenly spread, so that a picture's costs a small partition)."""
    out = np.zeros(planes.shape, dtype=np.uint8)
    for b in range(planes.shape[-1]):
        band = planes[..., b].astype(np.float32)
        sample = (band if valid is None else band[valid]).ravel()
        if sample.size == 0:
            continue
        sample = sample[::-(-sample.size // STRETCH_SAMPLE)]
        k = (round(0.01 * (sample.size - 1)), round(0.99 * (sample.size - 1)))
        lo, hi = np.partition(sample, k)[list(k)]   # np.percentile's own overhead is a millisecond
        out[..., b] = np.clip((band - lo) * (255.0 / max(hi - lo, 1e-6)), 0, 255).astype(np.uint8)
    return out


def class_colours(n: int) -> np.ndarray:
    """(n, 3) uint8: the colour of each of n classes."""
    idx = np.arange(n)
    wrapped = np.where(idx < len(CLASS_COLOURS), idx, 1 + (idx - 1) % (len(CLASS_COLOURS) - 1))
    return CLASS_COLOURS[wrapped]


class Tiles:
    """Pictures of one camera stream that tile the belt: each `rows` picture rows long, starting at a
    picture row that is a multiple of `rows` (the same belt positions whatever the messages were),
    cut short where lines are missing."""

    def __init__(self, rows: int):
        self.rows = rows
        self.buf: np.ndarray | None = None
        self.first = 0   # picture row of buf[0]
        self.fill = 0

    def add(self, grid: np.ndarray, first_row: int) -> list[np.ndarray]:
        """Picture rows (the lines on the grid) from picture row `first_row` on; the tiles now complete."""
        done = []
        if self.fill and first_row != self.first + self.fill:   # not where the last ended: a gap
            done.append(self.flush())
        if self.buf is None or self.buf.shape[1:] != grid.shape[1:] or self.buf.dtype != grid.dtype:
            self.buf = np.empty((self.rows, *grid.shape[1:]), grid.dtype)
        row, i = first_row, 0
        while i < len(grid):
            if not self.fill:
                self.first = row
            limit = (self.first // self.rows + 1) * self.rows   # where this tile ends
            n = min(len(grid) - i, limit - row)
            self.buf[self.fill:self.fill + n] = grid[i:i + n]
            self.fill += n
            row += n
            i += n
            if row == limit:
                done.append(self.flush())
        return done

    def flush(self) -> np.ndarray | None:
        """The tile begun, as it is (None if none)."""
        if not self.fill:
            return None
        tile = self.buf[:self.fill]
        self.buf = np.empty_like(self.buf)   # the tile is handed over, not copied
        self.fill = 0
        return tile
