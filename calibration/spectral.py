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
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from functools import cache

import cv2
import numpy as np

from sortline.pipeline.config import cache_dir

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
        # Computed once, flat over a (pixels × bands) line: the dark level and 1 / response of each entry,
        # and for each bad (pixel, band) the good pixel of the same band nearest along the line. A bad entry
        # takes that pixel's counts, dark level and scale, so its reflectance comes out as the good one's,
        # exactly, with no pass of its own.
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
        dark = np.array(self.dark, np.float32).reshape(-1)
        scale = (self.white_reflectance / resp).astype(np.float32).reshape(-1)
        dark[self._fix], scale[self._fix] = dark[self._src], scale[self._src]
        self._dark, self._scale = dark, scale

    def check(self, raw: np.ndarray) -> None:
        """Refuse frames of another camera or resolution."""
        if raw.ndim != 3 or raw.shape[1:] != self.shape:
            raise CalibrationError(f"frames are {raw.shape[1:]} (pixels × bands), the reference is {self.shape}")
        if self._scale is None:
            self._prepare()

    def reflectance(self, raw: np.ndarray, clip: float = 1.5) -> np.ndarray:
        """(lines, pixels, bands) raw counts → float32 reflectance, bad pixels repaired. (The register node's
        path, binned into the model's bands, is BinnedReflectance: the same values, in one pass.)"""
        self.check(raw)
        lines = len(raw)
        x = np.empty((lines, *self.shape), np.float32)
        counts, flat = raw.reshape(lines, -1), x.reshape(lines, -1)
        np.copyto(flat, counts)
        if len(self._fix):
            flat[:, self._fix] = counts[:, self._src]
        np.subtract(flat, self._dark, out=flat)
        np.multiply(flat, self._scale, out=flat)
        cv2.threshold(flat, 0.0, 0.0, cv2.THRESH_TOZERO, dst=flat)    # max(x, 0): OpenCV's is faster than np.clip
        cv2.threshold(flat, clip, clip, cv2.THRESH_TRUNC, dst=flat)   # min(x, clip)
        return x

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


BLOCK_BYTES = 1 << 20   # a block of float32 worked on in a core's cache (half its L2 on the x86 boxes)


def _binned_lines(raw, fix, src, dark, scale, starts, ends, equal, inv, clip, line_buf, out):   # pragma: no cover
    """out[l, p, g] = the mean over the bands b of group g of clip((raw[l, k] - dark[k]) * scale[k], 0, clip),
    k = p * bands + b, a bad entry k = fix[i] reading the counts of src[i]: the reflectance and its binning
    in two passes over one line at a time (line_buf, a line's reflectance, stays in cache). equal: the
    groups' size when they are equal and cover every band (the sums then run straight along the line),
    else 0."""
    lines, pixels, groups = out.shape
    entries = dark.shape[0]
    bands = entries // pixels
    zero = np.float32(0.0)
    for line in range(lines):
        row = raw[line]
        for k in range(entries):
            line_buf[k] = min(max((np.float32(row[k]) - dark[k]) * scale[k], zero), clip)
        for i in range(fix.shape[0]):
            k = fix[i]
            line_buf[k] = min(max((np.float32(row[src[i]]) - dark[k]) * scale[k], zero), clip)
        if equal:   # the bands in groups of `equal`, end to end: rows of `equal` along the line, each summed
            runs = line_buf.reshape(pixels * groups, equal)
            flat = out[line].reshape(pixels * groups)
            for q in range(pixels * groups):
                total = zero
                for b in range(equal):
                    total += runs[q, b]
                flat[q] = total * inv[0]
            continue
        for p in range(pixels):
            base = p * bands
            for g in range(groups):
                total = zero
                for b in range(base + starts[g], base + ends[g]):
                    total += line_buf[b]
                out[line, p, g] = total * inv[g]


@cache
def _binned_kernel():
    """_binned_lines compiled. numba is imported here, by the node that bins, not by every process that
    imports this module to check a graph (a third of a restarted node's start-up). It keeps what it
    compiles in sortline's cache directory (the unit's CacheDirectory= under systemd; nothing is written
    beside the package): a node's start then loads the kernel instead of compiling it."""
    os.environ.setdefault("NUMBA_CACHE_DIR", str(cache_dir() / "numba"))
    import numba
    return numba.njit(nogil=True, cache=True, fastmath=True)(_binned_lines)


class BinnedReflectance:
    """bin_bands(reference.reflectance(raw), groups), made for a stream of frames at line rate.

    What is exact and what is not. Reflectance is affine in the counts per (pixel, band),
    r = (raw − dark) × s with s = white_reflectance / (white − dark), then clipped to [0, clip],
    and a model band is the mean of r over its group. Binning counts first is not the same:
    (Σraw − Σdark) / (Σwhite − Σdark) weighs the bands of a group by their response instead of
    equally (s differs from band to band: lamp, optics, sensor), and the clip is not linear (a
    band below its dark level or above `clip` changes its group's mean, not the others). Even
    the dark subtraction, linear as it is, cannot move after the binning without the clip. So
    the reflectance stays per band, and each group's mean is a sum of x × 1/n in its bands'
    order: the result differs from bin_bands(reflectance(raw)) by float32 rounding (a few 1e-7
    on values up to `clip`), well inside float16's step (2**-11 of a value), which is what a
    strip carries.

    All of it is one compiled kernel (numba) that takes a frame a line at a time: the line's
    reflectance (counts to float, dark, scale, both clips in one loop) into a buffer of one line
    that stays in the core's cache, then the mean of each group along it; numpy and OpenCV need
    a pass over memory per step. A bad pixel reads its good neighbour's counts (`src`), with
    that neighbour's dark and scale, as SpectralReference.reflectance repairs it.
    """

    def __init__(self, reference: SpectralReference, groups: int | list[tuple[int, int]], clip: float = 1.5):
        self.ref, self.clip = reference, np.float32(clip)
        pixels, bands = reference.shape
        edges = band_groups(bands, groups)
        spans = np.stack([edges[:-1], edges[1:]], 1) if edges.ndim == 1 else edges
        self.groups = len(spans)
        self.starts, self.ends = (np.ascontiguousarray(spans[:, i], np.int64) for i in (0, 1))
        self.inv = (1.0 / (self.ends - self.starts)).astype(np.float32)
        size = int(self.ends[0] - self.starts[0])
        covers = np.array_equal(self.starts, np.arange(self.groups) * size) and self.groups * size == bands
        self.equal = size if covers and (self.ends - self.starts == size).all() else 0
        if reference._scale is None:
            reference._prepare()
        self.fix = np.ascontiguousarray(reference._fix, np.int64)
        self.src = np.ascontiguousarray(reference._src, np.int64)
        self.line_buf = np.empty(pixels * bands, np.float32)
        self.dark = np.ascontiguousarray(reference._dark, np.float32)
        self.scale = np.ascontiguousarray(reference._scale, np.float32)
        self.kernel = _binned_kernel()
        for dtype in (np.uint8, np.uint16):   # compiled (or loaded) now for either kind of count, not at a frame
            self.kernel(np.zeros((0, pixels * bands), dtype), self.fix, self.src, self.dark, self.scale,
                           self.starts, self.ends, self.equal, self.inv, self.clip, self.line_buf,
                           np.empty((0, pixels, self.groups), np.float32))

    def __call__(self, raw: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """(lines, pixels, bands) raw counts → (lines, pixels, groups) float32 binned reflectance (into `out`)."""
        self.ref.check(raw)
        lines, (pixels, bands) = len(raw), self.ref.shape
        out = np.empty((lines, pixels, self.groups), np.float32) if out is None else out
        self.kernel(np.ascontiguousarray(raw).reshape(lines, pixels * bands), self.fix, self.src, self.dark,
                       self.scale, self.starts, self.ends, self.equal, self.inv, self.clip, self.line_buf, out)
        return out
