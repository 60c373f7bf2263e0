"""The two simulated cameras: what a line-scan RGB and an HSI pushbroom would read.

Both output raw sensor counts, not reflectance: the RGB camera 8-bit with
vignetting; the HSI camera 12-bit in uint16 with a per-pixel dark level, an
illumination × sensor response that varies over wavelength and across the
line (what a white reference records), shot and read noise, and a few dead
and hot pixels. Spectral calibration has to undo all of that.

The HSI camera sees the belt through its own geometry, which does not match
the RGB camera's: a cross-belt offset, a scale, a small rotation of its scan
line and barrel distortion, and its scan line sits upstream of the RGB one
(by a distance a little off the nominal one in the config). Each HSI pixel
integrates a footprint of the scene (sub-sampled ratio × ratio), so its
spectrum mixes every material in it, as at the edges of real objects.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sortline.nodes.simulate.materials import endmember_spectra

NOISE_BANK = 1 << 22   # pre-drawn unit normals; each frame reads a random window
EXPOSE_CHUNK = 1 << 19  # HSI counts computed per pass (float32: 2 MiB, about a core's L2 cache)


@dataclass(frozen=True)
class Misregistration:
    """How the HSI camera's view differs from the RGB camera's (what calibration recovers)."""
    offset_mm: float = 6.0          # cross-belt shift of the HSI line's centre
    scale: float = 1.015            # HSI footprint width over nominal
    rotation_deg: float = 0.35      # scan line tilt against the RGB one
    distortion: float = -0.004      # radial: x' = x (1 + k d²), d = -1..1 across the line
    scan_line_error_mm: float = 1.7  # true HSI scan line minus the configured one


class Noise:
    """Unit normal noise, drawn once per seed; frames take windows at random offsets."""

    def __init__(self, seed: int):
        self.bank = np.random.default_rng([seed, 7]).standard_normal(NOISE_BANK, dtype=np.float32)

    def take(self, rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
        n = int(np.prod(shape))
        if n > NOISE_BANK:
            return rng.standard_normal(shape, dtype=np.float32)
        start = int(rng.integers(0, NOISE_BANK - n + 1))
        return self.bank[start:start + n].reshape(shape)


class RGBCamera:
    """The reference grid: pixel i sees the scene column i; 8-bit counts."""

    def __init__(self, pixels: int, noise: Noise, full_scale: float = 250.0, read_noise: float = 1.8):
        d = (np.arange(pixels, dtype=np.float32) + 0.5) / pixels * 2 - 1
        self.response = (full_scale * (1 - 0.28 * d * d))[None, :, None]   # lens vignetting
        self.noise, self.read_noise = noise, read_noise

    def read(self, rgb: np.ndarray, rng: np.random.Generator, lamp: float = 1.0) -> np.ndarray:
        counts = rgb * (self.response * lamp)
        counts += self.noise.take(rng, counts.shape) * self.read_noise
        counts += 0.5
        return np.clip(counts, 0, 255, out=counts).astype(np.uint8)


class HSICamera:
    """A pushbroom camera: a line of `pixels` spatial pixels × `bands` bands, 12-bit."""

    def __init__(self, *, pixels: int, bands: int, wavelength_nm: tuple[float, float], mm_per_pixel: float,
                 ticks_per_line: int, ticks_per_mm: float, scan_line_mm: float, belt_width_mm: float,
                 row_mm: float, col_mm: float, scene_cols: int, misregistration: Misregistration,
                 seed: int, noise: Noise, subsample: int = 4):
        self.pixels, self.bands, self.ticks_per_line, self.ticks_per_mm = pixels, bands, ticks_per_line, ticks_per_mm
        self.row_mm, self.scene_cols, self.noise, self.ss = row_mm, scene_cols, noise, subsample
        self.wavelengths = np.linspace(*wavelength_nm, bands)
        self.spectra = endmember_spectra(self.wavelengths)
        m = misregistration
        self.scan_line_mm = scan_line_mm + m.scan_line_error_mm

        # Where each sub-sample of each pixel lands across the belt (static).
        u = (np.arange(pixels)[:, None] + (np.arange(subsample) + 0.5) / subsample).ravel()   # pixel units
        d = (u - pixels / 2) / (pixels / 2)
        x_mm = belt_width_mm / 2 + m.offset_mm + m.scale * (u - pixels / 2) * mm_per_pixel * (1 + m.distortion * d * d)
        self.cols = np.clip(np.floor(x_mm / col_mm), 0, scene_cols - 1).astype(np.intp)            # (P·S,)
        self.row_tilt = np.tan(np.deg2rad(m.rotation_deg)) * (x_mm - belt_width_mm / 2) / row_mm   # rows

        # Sensor: dark level with fixed pattern, illumination × response (the white reference).
        rng = np.random.default_rng([seed, 11])
        wl = (self.wavelengths - 900) / 800
        lamp_qe = np.clip(0.55 + 1.2 * wl - 1.1 * wl * wl, 0.15, None) * (1 - 0.5 * np.exp(-((self.wavelengths - 1390) / 25) ** 2))
        across = 1 - 0.22 * (((np.arange(pixels) + 0.5) / pixels * 2 - 1) ** 2)
        self.white = (3700 * across[:, None] * lamp_qe[None, :] / lamp_qe.max()).astype(np.float32)  # counts at R=1
        self.dark = (160 + 30 * wl[None, :] + rng.normal(0, 6, (pixels, bands))).astype(np.float32)
        self.dead = rng.choice(pixels * bands, max(1, pixels * bands // 4000), replace=False)
        self.hot = rng.choice(pixels * bands, max(1, pixels * bands // 20000), replace=False)

    def belt_rows(self, position: int, lines: int) -> np.ndarray:
        """Scene rows (float) each sub-sample of `lines` lines from encoder `position` looks at: (L, S, P·S)."""
        starts = position + np.arange(lines) * self.ticks_per_line
        sub = (np.arange(self.ss) + 0.5) / self.ss * self.ticks_per_line
        y_mm = (starts[:, None] + sub[None, :]) / self.ticks_per_mm - self.scan_line_mm
        return y_mm[:, :, None] / self.row_mm + self.row_tilt[None, None, :]

    def _mix(self, endm: np.ndarray, gain: np.ndarray, n_pixels: int) -> np.ndarray:
        """Reflectance (n_pixels, bands) from each pixel's sub-samples (n_pixels, ...) of endmember and gain."""
        n_end = len(self.spectra)
        per_pixel = endm.size // n_pixels
        pix = np.arange(n_pixels).repeat(per_pixel)
        frac = np.bincount(pix * n_end + endm.ravel(), weights=gain.ravel(),
                           minlength=n_pixels * n_end).reshape(n_pixels, n_end)
        frac *= 1.0 / per_pixel
        return frac.astype(np.float32) @ self.spectra

    def _expose(self, refl: np.ndarray, rng: np.random.Generator, lamp: float) -> np.ndarray:
        """Reflectance (lines, pixels, bands), overwritten → uint16 counts: dark level, noise, bad pixels.

        In place, a few lines at a time (they stay in the CPU's cache), each count computed in the same
        float32 operations in the same order as `signal = refl * white; counts = signal + dark +
        noise * sqrt(signal * 0.45 + 16)`, rounded and clipped to 12 bits.
        """
        lines = len(refl)
        white = self.white * lamp
        noise = self.noise.take(rng, refl.shape)
        out = np.empty(refl.shape, np.uint16)
        step = max(1, EXPOSE_CHUNK // (self.pixels * self.bands))
        sigma = np.empty((min(step, lines), self.pixels, self.bands), np.float32)
        for i in range(0, lines, step):
            counts, s = refl[i:i + step], sigma[:min(step, lines - i)]
            counts *= white                                   # the signal
            # Shot noise grows with the signal; read noise does not (variance in counts²).
            np.multiply(counts, 0.45, out=s)
            s += 16.0
            np.sqrt(s, out=s)
            s *= noise[i:i + step]
            counts += self.dark
            counts += s
            flat = counts.reshape(len(counts), -1)
            flat[:, self.dead] = 0
            flat[:, self.hot] = 4095
            counts += 0.5
            np.clip(counts, 0, 4095, out=counts)
            out[i:i + step] = counts
        return out

    def read(self, scene, position: int, lines: int, rng: np.random.Generator, lamp: float = 1.0) -> np.ndarray:
        rows = np.floor(self.belt_rows(position, lines)).astype(np.intp)      # (L, S, P·S)
        r0 = int(rows.min())
        maps = scene.rows(r0, int(rows.max()) - r0 + 1, ("endmember", "gain"))
        rows -= r0
        # Flat index into the maps, each pixel's sub-samples together: (L, S, P, S) → (L, P, S, S).
        at = rows * self.scene_cols
        at += self.cols
        at = at.reshape(lines, self.ss, self.pixels, self.ss).transpose(0, 2, 1, 3)
        endm, gain = maps["endmember"].ravel().take(at), maps["gain"].ravel().take(at)
        refl = self._mix(endm, gain, lines * self.pixels).reshape(lines, self.pixels, self.bands)
        return self._expose(refl, rng, lamp)

    def read_registered(self, scene, row0: int, rgb_lines: int, rng: np.random.Generator) -> np.ndarray:
        """What perfect co-registration and spectral calibration would give: reflectance (float32) on the
        RGB grid coarsened by the ratio (rgb_lines/ss lines × scene_cols/ss pixels), with the camera's noise.

        Training data and the reference for register tests: each cell is the exact ss × ss block of RGB
        pixels under it, noise as this camera adds it, no bad pixels.
        """
        ss = self.ss
        lines, cells = rgb_lines // ss, self.scene_cols // ss
        maps = scene.rows(row0, lines * ss)
        block = lambda a: a[:, :cells * ss].reshape(lines, ss, cells, ss).transpose(0, 2, 1, 3)  # noqa: E731
        refl = self._mix(block(maps["endmember"]), block(maps["gain"]), lines * cells).reshape(lines, cells, -1)
        # Noise as the camera pixel nearest each cell would add it (the dark level cancels out).
        white = self.white[np.linspace(0, self.pixels - 1, cells).round().astype(int)]
        signal = refl * white
        signal += self.noise.take(rng, signal.shape) * np.sqrt(signal * 0.45 + 16.0)
        return np.clip(signal / white, 0.0, 1.5, out=signal)
