"""Spatial co-registration: where each HSI pixel and line lands on the RGB grid.

The two cameras look at the belt on different scan lines and through
different lenses. Two functions of the HSI pixel index u (0 … pixels, pixel
centres at j + 0.5) describe it:

- across the belt: the RGB column under HSI position u, a cubic polynomial
  (offset, scale, and the lens' radial distortion, which is odd-order
  across the line);
- along the belt: how many encoder ticks after the HSI line sees a point the
  RGB line sees it, a linear function of u (the scan-line distance, and the
  tilt of one scan line against the other).

Both are fitted to a calibration target seen by both cameras (bright discs on
a dark board: `scene = "target"` on the synthetic belt), robustly: matches
are found with the nominal geometry from the config, the fit is iterated
with outliers beyond 3 σ (and at least 1 px) dropped.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import cv2
import numpy as np

from sortline.calibration.spectral import CalibrationError

FORMAT = "sortline-spatial"
VERSION = 1
MATCH_RADIUS_MM = 12.0     # under half the target's disc pitch: a match is never ambiguous


@dataclass
class Blobs:
    """Bright blobs found in a stream: centre across (pixels), along (encoder ticks), size."""
    col: np.ndarray
    position: np.ndarray
    area: np.ndarray


def find_blobs(image: np.ndarray, positions: np.ndarray, min_area: int, max_area: int) -> Blobs:
    """Intensity-weighted centres of bright blobs in a (lines, pixels) image.

    `positions` gives the encoder position of each line's centre, so lines on
    either side of a gap still land where they belong. The background is the
    median of each pixel's column (the board), which also takes out the
    illumination fall-off along the line.
    """
    img = image.astype(np.float32)
    img -= np.median(img, axis=0, keepdims=True)
    hi = np.percentile(img, 99.5)
    if hi <= 0:
        return Blobs(np.zeros(0), np.zeros(0), np.zeros(0))
    mask = (img > 0.5 * hi).astype(np.uint8)
    n, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    keep = (stats[:, cv2.CC_STAT_AREA] >= min_area) & (stats[:, cv2.CC_STAT_AREA] <= max_area)
    keep[0] = False
    # Blobs cut by the image's edges have a biased centre: drop them.
    top, bottom = stats[:, cv2.CC_STAT_TOP], stats[:, cv2.CC_STAT_TOP] + stats[:, cv2.CC_STAT_HEIGHT]
    left, right = stats[:, cv2.CC_STAT_LEFT], stats[:, cv2.CC_STAT_LEFT] + stats[:, cv2.CC_STAT_WIDTH]
    keep &= (top > 0) & (bottom < img.shape[0]) & (left > 0) & (right < img.shape[1])
    # Weighted centres over a dilated mask, so the blob's soft edge counts too.
    grown = cv2.dilate(labels.astype(np.float32), np.ones((3, 3), np.uint8)).astype(np.int64)
    grown = np.where(labels > 0, labels, grown)
    w = np.clip(img, 0, None).ravel()
    lab = grown.ravel()
    total = np.bincount(lab, weights=w, minlength=n)
    rows, cols = np.indices(img.shape)
    rc = np.bincount(lab, weights=w * rows.ravel(), minlength=n) / np.maximum(total, 1e-9)
    cc = np.bincount(lab, weights=w * cols.ravel(), minlength=n) / np.maximum(total, 1e-9)
    idx = np.nonzero(keep)[0]
    # Pixel centres are at index + 0.5; positions are interpolated between line centres.
    pos = np.interp(rc[idx], np.arange(len(positions)), positions)
    return Blobs(col=cc[idx] + 0.5, position=pos, area=stats[idx, cv2.CC_STAT_AREA].astype(float))


@dataclass
class Geometry:
    """What is needed of the machine config to predict and to report."""
    rgb_pixels: int
    rgb_mm_per_pixel: float
    hsi_pixels: int
    hsi_mm_per_pixel: float
    ticks_per_mm: float
    rgb_ticks_per_line: int
    hsi_ticks_per_line: int
    hsi_scan_line_mm: float     # relative to the RGB scan line (negative: upstream)

    @classmethod
    def from_machine(cls, machine) -> "Geometry":
        rgb, hsi = machine.cameras.rgb, machine.cameras.hsi
        return cls(rgb.pixels, rgb.mm_per_pixel, hsi.pixels, hsi.mm_per_pixel, machine.belt.ticks_per_mm,
                   rgb.ticks_per_line, hsi.ticks_per_line, hsi.scan_line_mm - rgb.scan_line_mm)

    def nominal(self) -> tuple[np.ndarray, np.ndarray]:
        """The mapping the config implies: both lines centred, no distortion, no tilt."""
        scale = self.hsi_mm_per_pixel / self.rgb_mm_per_pixel
        # RGB col (pixel-centre units) = centre_rgb + (u - centre_hsi) * scale
        cross = np.array([self.rgb_pixels / 2 - self.hsi_pixels / 2 * scale, scale, 0.0, 0.0])
        along = np.array([-self.hsi_scan_line_mm * self.ticks_per_mm, 0.0])
        return cross, along


@dataclass
class SpatialCalibration:
    """The fitted mapping, its residuals, and what it was made for."""
    cross: list[float]              # RGB col = Σ cross[i] · u^i   (u: HSI pixel coordinate, centres at j + 0.5)
    along: list[float]              # RGB ticks − HSI ticks = along[0] + along[1] · u
    rgb_pixels: int
    hsi_pixels: int
    ratio: int
    rgb_serial: str = ""
    hsi_serial: str = ""
    residuals: dict = field(default_factory=dict)
    date: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%S%z"))

    def rgb_col(self, u: np.ndarray) -> np.ndarray:
        return np.polynomial.polynomial.polyval(u, self.cross)

    def along_ticks(self, u: np.ndarray) -> np.ndarray:
        return np.polynomial.polynomial.polyval(u, self.along)

    def hsi_u(self, rgb_col: np.ndarray) -> np.ndarray:
        """The inverse across the belt: HSI coordinate under each RGB column (Newton steps)."""
        u = (np.asarray(rgb_col, dtype=np.float64) - self.cross[0]) / self.cross[1]
        d = np.polynomial.polynomial.polyder(self.cross)
        for _ in range(6):
            u -= (self.rgb_col(u) - rgb_col) / np.polynomial.polynomial.polyval(u, d)
        return u

    # The file: JSON, readable by a technician.

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps({"format": FORMAT, "version": VERSION, **asdict(self)}, indent=2) + "\n")
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path, *, rgb_pixels: int | None = None, hsi_pixels: int | None = None,
             rgb_serial: str | None = None, hsi_serial: str | None = None) -> "SpatialCalibration":
        """Read a calibration; refuse one made for other cameras or resolutions."""
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, ValueError) as exc:
            raise CalibrationError(f"{path}: not a readable spatial calibration ({exc})") from exc
        if not isinstance(data, dict) or data.get("format") != FORMAT or data.get("version") != VERSION:
            raise CalibrationError(f"{path}: not a {FORMAT} version {VERSION} file")
        for key, want in (("rgb_pixels", rgb_pixels), ("hsi_pixels", hsi_pixels)):
            if want is not None and data.get(key) != want:
                raise CalibrationError(f"{path}: made for {key} = {data.get(key)}, this machine has {want}; recalibrate")
        for key, want in (("rgb_serial", rgb_serial), ("hsi_serial", hsi_serial)):
            if want and data.get(key) and data[key] != want:
                raise CalibrationError(f"{path}: made for camera {data[key]!r} ({key}), this is {want!r}; recalibrate")
        try:
            return cls(**{k: v for k, v in data.items() if k not in ("format", "version")})
        except TypeError as exc:
            raise CalibrationError(f"{path}: {exc}") from exc


def match(rgb: Blobs, hsi: Blobs, cross: np.ndarray, along: np.ndarray, geo: Geometry) -> tuple[np.ndarray, np.ndarray]:
    """Pairs (i_rgb, i_hsi) of mutually nearest blobs under a mapping, within MATCH_RADIUS_MM."""
    if len(rgb.col) == 0 or len(hsi.col) == 0:
        return np.zeros(0, int), np.zeros(0, int)
    pred_col = np.polynomial.polynomial.polyval(hsi.col, cross)
    pred_pos = hsi.position + np.polynomial.polynomial.polyval(hsi.col, along)
    dx = (rgb.col[:, None] - pred_col[None, :]) * geo.rgb_mm_per_pixel
    dy = (rgb.position[:, None] - pred_pos[None, :]) / geo.ticks_per_mm
    dist = np.hypot(dx, dy)
    best_h = dist.argmin(1)
    best_r = dist.argmin(0)
    i_r = np.nonzero((best_r[best_h] == np.arange(len(rgb.col))) & (dist.min(1) < MATCH_RADIUS_MM))[0]
    return i_r, best_h[i_r]


def _robust_fit(x: np.ndarray, y: np.ndarray, degree: int, floor: float) -> tuple[np.ndarray, np.ndarray]:
    keep = np.ones(len(x), bool)
    for _ in range(5):
        coef = np.polynomial.polynomial.polyfit(x[keep], y[keep], degree)
        res = y - np.polynomial.polynomial.polyval(x, coef)
        limit = max(3 * res[keep].std(), floor)
        new = np.abs(res) <= limit
        if (new == keep).all():
            break
        keep = new
    return coef, keep


def residuals(rgb: Blobs, hsi: Blobs, i_r: np.ndarray, i_h: np.ndarray, cal: SpatialCalibration,
              geo: Geometry) -> dict:
    """Residuals of matched blobs under a calibration: across (RGB px, mm, HSI px), along (RGB lines, mm)."""
    across_px = rgb.col[i_r] - cal.rgb_col(hsi.col[i_h])
    along_ticks = rgb.position[i_r] - hsi.position[i_h] - cal.along_ticks(hsi.col[i_h])
    scale = cal.cross[1] if len(cal.cross) > 1 else geo.hsi_mm_per_pixel / geo.rgb_mm_per_pixel
    a = np.abs(across_px)
    b = np.abs(along_ticks) / geo.rgb_ticks_per_line
    return {
        "matches": int(len(i_r)),
        "across_rms_rgb_px": float(np.sqrt(np.mean(across_px ** 2))) if len(a) else float("nan"),
        "across_max_rgb_px": float(a.max()) if len(a) else float("nan"),
        "across_max_hsi_px": float(a.max() / scale) if len(a) else float("nan"),
        "across_max_mm": float(a.max() * geo.rgb_mm_per_pixel) if len(a) else float("nan"),
        "along_rms_rgb_lines": float(np.sqrt(np.mean(b ** 2))) if len(b) else float("nan"),
        "along_max_rgb_lines": float(b.max()) if len(b) else float("nan"),
        "along_max_mm": float(np.abs(along_ticks).max() / geo.ticks_per_mm) if len(b) else float("nan"),
        "samples": {"hsi_u": hsi.col[i_h].round(3).tolist(), "across_rgb_px": across_px.round(4).tolist(),
                    "along_rgb_lines": (along_ticks / geo.rgb_ticks_per_line).round(4).tolist()},
    }


def fit(rgb: Blobs, hsi: Blobs, geo: Geometry, *, rgb_serial: str = "", hsi_serial: str = "",
        min_matches: int = 12) -> SpatialCalibration:
    """Fit the mapping to blobs seen by both cameras; raise CalibrationError when it cannot be trusted."""
    cross, along = geo.nominal()
    for _ in range(3):   # match with the best mapping so far, refit
        i_r, i_h = match(rgb, hsi, cross, along, geo)
        if len(i_r) < min_matches:
            raise CalibrationError(
                f"only {len(i_r)} target marks seen by both cameras (need {min_matches}); found {len(rgb.col)} in "
                f"RGB and {len(hsi.col)} in HSI. Is the target in view, and are cameras.hsi.scan_line_mm and "
                f"mm_per_pixel within {MATCH_RADIUS_MM:g} mm of the truth?")
        u = hsi.col[i_h]
        if np.ptp(u) < 0.5 * geo.hsi_pixels:
            raise CalibrationError(f"target marks cover only HSI pixels {u.min():.0f}–{u.max():.0f} of "
                                   f"{geo.hsi_pixels}: use a target across the whole belt")
        cross, keep_c = _robust_fit(u, rgb.col[i_r], 3, floor=1.0)
        along, keep_a = _robust_fit(u, rgb.position[i_r] - hsi.position[i_h], 1, floor=geo.rgb_ticks_per_line)
    keep = keep_c & keep_a
    cal = SpatialCalibration(cross=[float(c) for c in cross], along=[float(a) for a in along],
                             rgb_pixels=geo.rgb_pixels, hsi_pixels=geo.hsi_pixels,
                             ratio=geo.hsi_ticks_per_line // geo.rgb_ticks_per_line,
                             rgb_serial=rgb_serial, hsi_serial=hsi_serial)
    cal.residuals = residuals(rgb, hsi, i_r[keep], i_h[keep], cal, geo)
    cal.residuals["rejected"] = int((~keep).sum())
    return cal


def residual_png(res: dict, geo: Geometry, path: str | Path, title: str = "") -> Path:
    """A plot of residuals across the belt: across (RGB px) above, along (RGB lines) below."""
    w, h, pad = 900, 520, 60
    img = np.full((h, w, 3), 255, np.uint8)
    u = np.asarray(res["samples"]["hsi_u"])
    panels = [("across, RGB px", np.asarray(res["samples"]["across_rgb_px"]), 2.0),
              ("along, RGB lines", np.asarray(res["samples"]["along_rgb_lines"]), 2.0)]
    ph = (h - 3 * pad // 2) // 2
    for k, (name, values, span) in enumerate(panels):
        top = pad // 2 + k * (ph + pad // 2) + 20
        cv2.rectangle(img, (pad, top), (w - 20, top + ph), (0, 0, 0), 1)
        mid = top + ph // 2
        cv2.line(img, (pad, mid), (w - 20, mid), (180, 180, 180), 1)
        for limit in (-1, 1):
            y = int(mid - limit / span * ph / 2)
            cv2.line(img, (pad, y), (w - 20, y), (200, 200, 255), 1)
        cv2.putText(img, f"{name} (+-{span:g})", (pad, top - 6), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 1)
        for x, v in zip(u, values):
            px = int(pad + x / geo.hsi_pixels * (w - 20 - pad))
            py = int(np.clip(mid - v / span * ph / 2, top, top + ph))
            cv2.circle(img, (px, py), 3, (200, 80, 0), -1)
    cv2.putText(img, (title + "  " if title else "") + "x: HSI pixel (across the belt)", (pad, h - 10),
                cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 1)
    cv2.imwrite(str(path), img)
    return Path(path)


def blobs_from_frames(frames: list[tuple[int, np.ndarray]], ticks_per_line: int, mm_per_pixel: float,
                      mm_per_line: float, mark_mm: float = 16.0) -> Blobs:
    """Target marks in one camera's frames: [(position of the first line, lines × pixels × channels)].

    Channels are averaged (RGB) or summed over bands (HSI raw counts: the
    dark level is constant per pixel, so the board's median takes it out).
    """
    if not frames:
        return Blobs(np.zeros(0), np.zeros(0), np.zeros(0))
    image = np.concatenate([f.mean(-1, dtype=np.float32) for _, f in frames])
    positions = np.concatenate([p + (np.arange(len(f)) + 0.5) * ticks_per_line for p, f in frames])
    area = np.pi / 4 * (mark_mm / mm_per_pixel) * (mark_mm / mm_per_line)
    return find_blobs(image, positions, min_area=max(3, int(area * 0.3)), max_area=int(area * 3) + 4)
