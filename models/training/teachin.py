"""Teach-in: labels for a technician's own recordings, without anybody drawing them.

One material at a time runs over the belt, and the empty belt once. The empty
belt gives, per pixel column, the mean and spread of what the cameras see of
it (RGB and HSI reflectance: lighting, vignetting, the belt's own grain). An
object is what lies far from that (`EmptyBelt.distances`: a z-score per
pixel, RGB and HSI apart, since a clear film barely shows in RGB and a
printed label barely in HSI), cleaned up morphologically (`object_mask`:
open, close, holes filled, specks dropped), and labelled with its run's
material. The data set folder these labels go into: models.training.data
(`Folder`, `write_strip`).
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np


@dataclass
class EmptyBelt:
    """Per-column mean and spread of the empty belt: rgb (W, 3), hsi (W/r, bands), spreads floored."""

    rgb_mean: np.ndarray
    rgb_std: np.ndarray
    hsi_mean: np.ndarray
    hsi_std: np.ndarray
    lines: int          # RGB lines it was fitted on

    @classmethod
    def fit(cls, strips) -> "EmptyBelt":
        """From (rgb (H, W, 3) uint8, hsi (H/r, W/r, bands)) strips of the empty belt."""
        sums, n = None, [0, 0]
        for rgb, hsi in strips:
            parts = (rgb.astype(np.float64), hsi.astype(np.float64))
            if sums is None:
                sums = [[np.zeros(p.shape[1:]), np.zeros(p.shape[1:])] for p in parts]
            for i, p in enumerate(parts):
                sums[i][0] += p.sum(0)
                sums[i][1] += (p * p).sum(0)
                n[i] += len(p)
        if sums is None:
            raise ValueError("no strips of the empty belt: is the recording empty, or are its lines all in gaps?")
        stats = []
        for (s, q), k in zip(sums, n):
            mean = s / k
            stats += [mean.astype(np.float32), np.sqrt(np.maximum(q / k - mean * mean, 0)).astype(np.float32)]
        rgb_mean, rgb_std, hsi_mean, hsi_std = stats
        # A floor under the spread: a column that never varied (a saturated pixel) must not make noise an object.
        return cls(rgb_mean, np.maximum(rgb_std, 1.0), hsi_mean, np.maximum(hsi_std, 0.002), n[0])

    def distances(self, rgb: np.ndarray, hsi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """RMS z-scores over the channels: RGB (H, W) and HSI (H/r, W/r), float32."""
        z_rgb = (rgb.astype(np.float32) - self.rgb_mean) / self.rgb_std
        z_hsi = (hsi.astype(np.float32) - self.hsi_mean) / self.hsi_std
        return np.sqrt((z_rgb * z_rgb).mean(-1)), np.sqrt((z_hsi * z_hsi).mean(-1))

    def to_arrays(self) -> dict[str, np.ndarray]:
        return {"rgb_mean": self.rgb_mean, "rgb_std": self.rgb_std, "hsi_mean": self.hsi_mean,
                "hsi_std": self.hsi_std, "lines": np.array(self.lines)}

    @classmethod
    def from_arrays(cls, z) -> "EmptyBelt":
        return cls(z["rgb_mean"], z["rgb_std"], z["hsi_mean"], z["hsi_std"], int(z["lines"]))


@dataclass
class Segmentation:
    """How far from the empty belt an object is, and how it is cleaned up (lengths in RGB pixels).

    The defaults are measured on the synthetic demo belt (docs/teach-in.md): RGB finds an object's outline
    to the pixel; the HSI, 4 × coarser and blurred by its optics, finds what RGB cannot see (clear film on
    a dark belt) but spreads it, so its mask is eroded by its blur before it is added."""

    rgb_threshold: float = 3.5     # RMS z over R, G, B
    hsi_threshold: float = 4.0     # RMS z over the bands
    hsi_erode_px: int = 8          # the HSI mask shrunk by this: its cells and blur reach past an object
    open_px: int = 5               # opening: noise specks and one-pixel bridges go
    close_px: int = 7              # closing: an object's parts that noise split come back together
    min_area: int = 150            # smaller components are dropped (~130 mm² on the demo belt)


def _disc(px: int) -> np.ndarray:
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (px, px))


def object_mask(belt: EmptyBelt, rgb: np.ndarray, hsi: np.ndarray, seg: Segmentation = Segmentation()) -> np.ndarray:
    """(H, W) bool: the pixels of objects in a strip, against the empty belt."""
    h, w = rgb.shape[:2]
    z_rgb, z_hsi = belt.distances(rgb, hsi)
    hsi_far = (cv2.resize(z_hsi, (w, h), interpolation=cv2.INTER_LINEAR) > seg.hsi_threshold).astype(np.uint8)
    if seg.hsi_erode_px:
        hsi_far = cv2.erode(hsi_far, _disc(2 * seg.hsi_erode_px + 1))
    mask = ((z_rgb > seg.rgb_threshold) | (hsi_far > 0)).astype(np.uint8)
    if seg.open_px > 1:
        mask = cv2.morphologyEx(mask, cv2.MORPH_OPEN, _disc(seg.open_px))
    if seg.close_px > 1:
        mask = cv2.morphologyEx(mask, cv2.MORPH_CLOSE, _disc(seg.close_px))
    # Holes: the outer contours filled. A hole open to the strip's edge is not one (it is belt, or the
    # neighbouring strip closes it).
    contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    cv2.drawContours(mask, contours, -1, 1, thickness=cv2.FILLED)
    n, comp, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    keep = stats[:, cv2.CC_STAT_AREA] >= seg.min_area
    keep[0] = False
    return keep[comp]


def objects_per_class(labels: np.ndarray, classes: int) -> np.ndarray:
    """Connected regions of each class (8-connected) in a label image; index 0, the background, counts none."""
    counts = np.zeros(classes, np.int64)
    for c in np.unique(labels):
        if c and c < classes:
            counts[c] = cv2.connectedComponents((labels == c).astype(np.uint8), connectivity=8)[0] - 1
    return counts
