"""Spectral calibration: raw HSI counts → reflectance, bad pixels repaired, bands binned.

A pushbroom camera's raw counts mix the material's reflectance with the
lamp's spectrum, the sensor's response, the optics' fall-off along the line
and a dark level. Two references take all of that out, per spatial pixel and
band: a dark frame (lamp off or shutter closed) and a white frame (a white
tile under the whole line):

    reflectance = (raw − dark) / (white − dark) × white_reflectance

Pixels that cannot be trusted (dead: no response to light; hot or saturated
in the white reference; far off their neighbours) are marked in a bad-pixel
map and replaced by the nearest good pixel of the same band along the line.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

FORMAT = "sortline-spectral"
VERSION = 1


class CalibrationError(Exception):
    """A calibration that cannot be used here (wrong camera, resolution, corrupt file)."""


def band_groups(n_bands: int, groups: int | list[tuple[int, int]]) -> np.ndarray:
    """Start indices of each output band: N equal groups, or explicit [start, end) ranges."""
    if isinstance(groups, int):
        if not 0 < groups <= n_bands:
            raise ValueError(f"cannot bin {n_bands} bands into {groups} groups")
        return np.linspace(0, n_bands, groups + 1).round().astype(int)
    edges = np.asarray(groups, dtype=int)
    if edges.ndim != 2 or edges.shape[1] != 2 or (edges[:, 0] >= edges[:, 1]).any() \
            or edges.min() < 0 or edges.max() > n_bands or (edges[1:, 0] < edges[:-1, 1]).any():
        raise ValueError(f"model.band_ranges must be increasing, non-overlapping [start, end) within "
                         f"0..{n_bands}: {[tuple(g) for g in groups]}")
    return edges


def bin_bands(cube: np.ndarray, groups: int | list[tuple[int, int]], dtype=np.float32) -> np.ndarray:
    """Mean over groups of bands on the last axis (equal groups, or explicit ranges)."""
    n = cube.shape[-1]
    edges = band_groups(n, groups)
    if edges.ndim == 1:
        if n % (len(edges) - 1) == 0:   # the common case: a reshape, no copy
            k = n // (len(edges) - 1)
            return cube.reshape(*cube.shape[:-1], -1, k).mean(-1, dtype=np.float32).astype(dtype, copy=False)
        sums = np.add.reduceat(cube, edges[:-1], axis=-1, dtype=np.float32)
        return (sums / np.diff(edges)).astype(dtype, copy=False)
    out = np.stack([cube[..., a:b].mean(-1, dtype=np.float32) for a, b in edges], -1)
    return out.astype(dtype, copy=False)


@dataclass
class SpectralReference:
    """Dark and white references of one HSI camera, with its bad-pixel map."""
    dark: np.ndarray                 # (pixels, bands) float32, counts
    white: np.ndarray                # (pixels, bands) float32, counts
    bad: np.ndarray                  # (pixels, bands) bool
    serial: str = ""
    exposure_us: float = 0.0
    white_reflectance: float = 1.0   # of the white tile (e.g. 0.92 for a painted panel, 0.99 Spectralon)
    date: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%S%z"))

    @classmethod
    def from_frames(cls, dark: np.ndarray, white: np.ndarray, *, max_count: int = 4095, min_response: float = 50.0,
                    outlier: float = 0.35, **meta) -> "SpectralReference":
        """Average many lines of (lines, pixels, bands) dark and white frames; find bad pixels.

        Bad: saturated in any white line, responding less than `min_response`
        counts to light (dead), or a white response more than `outlier` away
        (relative) from the median of its neighbours along the line (hot,
        stuck, dust on the slit).
        """
        dark = np.asarray(dark)
        white = np.asarray(white)
        if dark.ndim != 3 or white.ndim != 3 or dark.shape[1:] != white.shape[1:]:
            raise CalibrationError(f"dark {dark.shape} and white {white.shape} must both be lines × pixels × bands")
        d = dark.mean(0, dtype=np.float64).astype(np.float32)
        w = white.mean(0, dtype=np.float64).astype(np.float32)
        response = w - d
        bad = (white >= max_count).any(0) | (response < min_response)
        padded = np.pad(response, ((2, 2), (0, 0)), mode="edge")
        neighbours = np.median(np.stack([padded[i:i + len(response)] for i in (0, 1, 3, 4)]), axis=0)
        bad |= np.abs(response - neighbours) > outlier * np.maximum(neighbours, 1.0)
        return cls(dark=d, white=w, bad=bad, **meta)

    def __post_init__(self):
        self._scale = None

    @property
    def shape(self) -> tuple[int, int]:
        return self.dark.shape

    def _prepare(self):
        # Per (pixel, band): the pixel to read (itself, or the nearest good one
        # along the line) and 1 / response, computed once.
        pixels, bands = self.shape
        idx = np.broadcast_to(np.arange(pixels)[:, None], (pixels, bands)).copy()
        for b in np.nonzero(self.bad.any(0))[0]:
            good = np.nonzero(~self.bad[:, b])[0]
            if len(good) == 0:
                raise CalibrationError(f"band {b} has no good pixel")
            nearest = good[np.abs(np.arange(pixels)[:, None] - good[None, :]).argmin(1)]
            idx[:, b] = nearest
        self._src = idx * bands + np.arange(bands)[None, :]     # flat index into a (pixels, bands) line
        self._needs_repair = bool(self.bad.any())
        resp = np.maximum(self.white - self.dark, 1.0)
        self._scale = (self.white_reflectance / resp).astype(np.float32)

    def reflectance(self, raw: np.ndarray, clip: float = 1.5) -> np.ndarray:
        """(lines, pixels, bands) raw counts → float32 reflectance, bad pixels repaired."""
        if raw.shape[1:] != self.shape:
            raise CalibrationError(f"frames are {raw.shape[1:]} (pixels × bands), the reference is {self.shape}")
        if self._scale is None:
            self._prepare()
        refl = raw.astype(np.float32)
        refl -= self.dark
        refl *= self._scale
        np.clip(refl, 0.0, clip, out=refl)
        if self._needs_repair:
            lines = refl.reshape(len(refl), -1)
            lines[:] = lines[:, self._src.ravel()]
        return refl

    # The file: one .npz, arrays plus a JSON header that says what it is.

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        meta = {k: v for k, v in asdict(self).items() if k not in ("dark", "white", "bad")}
        header = json.dumps({"format": FORMAT, "version": VERSION, "pixels": self.shape[0],
                             "bands": self.shape[1], **meta})
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as fh:
            np.savez_compressed(fh, header=np.frombuffer(header.encode(), np.uint8),
                                dark=self.dark, white=self.white, bad=self.bad)
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path, *, pixels: int | None = None, bands: int | None = None,
             serial: str | None = None) -> "SpectralReference":
        """Read a reference file; refuse one made for another camera or resolution."""
        try:
            with np.load(path) as z:
                header = json.loads(bytes(z["header"]).decode())
                arrays = {k: z[k] for k in ("dark", "white", "bad")}
        except (OSError, ValueError, KeyError) as exc:
            raise CalibrationError(f"{path}: not a readable spectral calibration ({exc})") from exc
        if header.get("format") != FORMAT or header.get("version") != VERSION:
            raise CalibrationError(f"{path}: format {header.get('format')!r} version {header.get('version')!r}, "
                                   f"expected {FORMAT!r} version {VERSION}")
        if (pixels, bands) != (None, None) and (header["pixels"], header["bands"]) != (pixels, bands):
            raise CalibrationError(f"{path}: made for {header['pixels']} pixels × {header['bands']} bands, "
                                   f"this camera has {pixels} × {bands}; recalibrate")
        if serial and header.get("serial") and header["serial"] != serial:
            raise CalibrationError(f"{path}: made for camera {header['serial']!r}, this is {serial!r}; recalibrate")
        meta = {k: header[k] for k in ("serial", "exposure_us", "white_reflectance", "date") if k in header}
        return cls(**arrays, **meta)
