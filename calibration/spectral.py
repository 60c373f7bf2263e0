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

import cv2
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


def bin_matrix(n_bands: int, groups: int | list[tuple[int, int]]) -> np.ndarray:
    """(n_bands, groups) float32: bin_bands as a matrix product, 1 / len(group) for each band in a group."""
    edges = band_groups(n_bands, groups)
    spans = np.stack([edges[:-1], edges[1:]], 1) if edges.ndim == 1 else edges
    m = np.zeros((n_bands, len(spans)), np.float32)
    for g, (a, b) in enumerate(spans):
        m[a:b, g] = 1.0 / (b - a)
    return m


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
        # Computed once: 1 / response per (pixel, band), and for each bad (pixel, band) the good pixel
        # of the same band nearest along the line, as flat indices into a (pixels × bands) line.
        pixels, bands = self.shape
        fix, src = [], []
        for b in np.nonzero(self.bad.any(0))[0]:
            good = np.nonzero(~self.bad[:, b])[0]
            if len(good) == 0:
                raise CalibrationError(f"band {b} has no good pixel")
            bad = np.nonzero(self.bad[:, b])[0]
            fix.append(bad * bands + b)
            src.append(good[np.abs(bad[:, None] - good[None, :]).argmin(1)] * bands + b)
        self._fix = np.concatenate(fix) if fix else np.zeros(0, np.intp)
        self._src = np.concatenate(src) if src else np.zeros(0, np.intp)
        resp = np.maximum(self.white - self.dark, 1.0)
        self._scale = (self.white_reflectance / resp).astype(np.float32)

    def reflectance(self, raw: np.ndarray, clip: float = 1.5) -> np.ndarray:
        """(lines, pixels, bands) raw counts → float32 reflectance, bad pixels repaired."""
        if raw.shape[1:] != self.shape:
            raise CalibrationError(f"frames are {raw.shape[1:]} (pixels × bands), the reference is {self.shape}")
        if self._scale is None:
            self._prepare()
        # One pass per step over the frame as a flat (lines, pixels × bands) array, clipped by OpenCV's
        # thresholds (line rate: this is most of the register node's work).
        x = raw.reshape(len(raw), -1).astype(np.float32)
        np.subtract(x, self.dark.reshape(-1), out=x)
        np.multiply(x, self._scale.reshape(-1), out=x)
        cv2.threshold(x, 0.0, 0.0, cv2.THRESH_TOZERO, dst=x)   # max(x, 0)
        cv2.threshold(x, clip, clip, cv2.THRESH_TRUNC, dst=x)  # min(x, clip)
        self._repair(x)
        return x.reshape(raw.shape)

    def _repair(self, lines: np.ndarray) -> None:
        """Bad pixels of (lines, pixels × bands) reflectance take their good neighbour's value, in place."""
        if len(self._fix):
            lines[:, self._fix] = lines[:, self._src]   # the right side is read whole first: sources are good

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


class BinnedReflectance:
    """bin_bands(reference.reflectance(raw), groups), made for a stream of frames at line rate.

    What is exact and what is not. Reflectance is affine in the counts per (pixel, band),
    r = (raw − dark) × s with s = white_reflectance / (white − dark), then clipped to [0, clip],
    and a model band is the mean of r over its group. Binning counts first is not the same:
    (Σraw − Σdark) / (Σwhite − Σdark) weighs the bands of a group by their response instead of
    equally (s differs from band to band: lamp, optics, sensor), and the clip is not linear (a
    band below its dark level or above `clip` changes its group's mean, not the others). Even
    the dark subtraction, linear as it is, cannot move after the binning without the clip. So
    the reflectance stays per band (SpectralReference.reflectance), and the mean is taken by
    OpenCV's area resize (equal groups that divide the bands) or a product with bin_matrix (any
    other groups). Those sum in another order than numpy's mean: the result differs from
    bin_bands(reflectance(raw)) by float32 rounding (a few 1e-7 on values up to `clip`), well
    inside float16's step (2**-11 of a value), which is what a strip carries.
    """

    def __init__(self, reference: SpectralReference, groups: int | list[tuple[int, int]], clip: float = 1.5):
        self.ref, self.clip = reference, float(clip)
        bands = reference.shape[1]
        self.matrix = bin_matrix(bands, groups)
        self.groups = self.matrix.shape[1]
        edges = band_groups(bands, groups)
        self.area = edges.ndim == 1 and bands % self.groups == 0   # N equal groups of whole bands

    def __call__(self, raw: np.ndarray) -> np.ndarray:
        """(lines, pixels, bands) raw counts → (lines, pixels, groups) float32 binned reflectance."""
        pixels, bands = self.ref.shape
        if not len(raw) and raw.shape[1:] == self.ref.shape:
            return np.zeros((0, pixels, self.groups), np.float32)
        x = self.ref.reflectance(raw, self.clip).reshape(-1, bands)
        if self.area:
            out = cv2.resize(x, (self.groups, len(x)), interpolation=cv2.INTER_AREA)
        else:
            out = x @ self.matrix
        return out.reshape(len(raw), pixels, self.groups)
