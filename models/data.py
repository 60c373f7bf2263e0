"""Training and evaluation data: co-registered RGB + HSI strips with per-pixel labels.

A dataset is anything with `classes`, `bands`, `ratio`, `__len__` and
`__getitem__(i)` returning a `Sample`: rgb (H, W, 3) uint8, hsi (H/r, W/r,
bands) float32 reflectance on the RGB grid coarsened by r, labels (H, W)
uint8 class indices. Two sources are built in:

- `SyntheticBelt`: strips of the simulated belt (nodes.simulate), generated
  on demand from (seed, index) and cached on disk;
- `SpectralWaste`: the public SpectralWaste dataset in its preprocessed
  layout (rgb/<split>/<id>.png, hyper/<split>/<id>.tiff band-first 16-bit,
  labels_rgb/<split>/<id>_semantic.png).

Recordings made by the record node are a third source to add the same way.
`Crops` turns any of them into random, aligned training crops with flips.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from calibration.spectral import bin_bands

CACHE = Path(os.environ.get("SORTLINE_CACHE", Path(__file__).resolve().parent.parent / ".cache"))


@dataclass
class Sample:
    rgb: np.ndarray     # (H, W, 3) uint8
    hsi: np.ndarray     # (H/r, W/r, bands) float32
    labels: np.ndarray  # (H, W) uint8
    looks: np.ndarray | None = None  # synthetic belt only: (H, W) endmember index (material and look)

    def check(self, ratio: int, bands: int) -> "Sample":
        h, w = self.labels.shape
        if self.rgb.shape != (h, w, 3) or self.hsi.shape != (h // ratio, w // ratio, bands) or h % ratio or w % ratio:
            raise ValueError(f"sample shapes do not fit ratio {ratio} and {bands} bands: rgb {self.rgb.shape}, "
                             f"hsi {self.hsi.shape}, labels {self.labels.shape}")
        return self


class SyntheticBelt:
    """Strips of `lines` RGB lines along the synthetic belt, strip i starting at line i * lines.

    Deterministic per (config, seed, index); a strip is generated once and kept
    in CACHE/belt-<key>/ (delete the folder to regenerate).
    """

    def __init__(self, settings, *, seed: int, count: int, lines: int = 160, bands: int = 32,
                 occupancy: float = 0.4, mix: dict[str, float] | None = None, cache: bool = True):
        from nodes.simulate import Simulation
        from nodes.simulate.materials import CLASSES

        self.classes, self.bands, self.ratio = tuple(CLASSES), bands, settings.hsi_ratio
        self.count, self.lines = count, lines
        self.sim = Simulation(settings, seed=seed, occupancy=occupancy, mix=mix)
        key = json.dumps([settings.cameras.model_dump(), settings.belt.model_dump(), seed, lines, bands,
                          occupancy, mix], sort_keys=True)
        self.dir = CACHE / f"belt-{hashlib.sha1(key.encode()).hexdigest()[:12]}" if cache else None

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i: int) -> Sample:
        if not 0 <= i < self.count:
            raise IndexError(i)
        path = self.dir / f"{i:06d}.npz" if self.dir else None
        if path is not None and path.exists():
            with np.load(path) as z:
                return Sample(z["rgb"], z["hsi"].astype(np.float32), z["labels"], z["looks"])
        strip = self.sim.strip(i * self.lines, self.lines)
        looks = self.sim.scene.rows(i * self.lines, self.lines)["endmember"].astype(np.uint8)
        # float16, as the register node delivers it (and as cached: the same values either way)
        hsi = bin_bands(strip["hsi"], self.bands, dtype=np.float16).astype(np.float32)
        sample = Sample(strip["rgb"], hsi, strip["labels"], looks)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.stem + f".{os.getpid()}.tmp.npz")
            np.savez(tmp, rgb=sample.rgb, hsi=sample.hsi.astype(np.float16), labels=sample.labels, looks=looks)
            tmp.replace(path)
        return sample


SPECTRALWASTE_CLASSES = ("background", "film", "basket", "cardboard", "video_tape", "filament", "bag")


class SpectralWaste:
    """The preprocessed SpectralWaste layout (256 x 256, RGB and HSI on one grid).

    The model wants RGB finer than HSI by an integer ratio; SpectralWaste ships
    both at 256 x 256, so RGB and labels are upsampled by `ratio` (as BCAF's
    "RGB-1024" runs do; it adds tokens, not detail). HSI counts (16-bit) are
    divided by `hsi_scale` (a reflectance-like 0..1 range) and binned to `bands`.
    """

    def __init__(self, root: str | Path, split: str, *, bands: int = 32, ratio: int = 4,
                 hsi_scale: float = 65535.0, labels: str = "labels_rgb"):
        self.root, self.split = Path(root), split
        self.classes, self.bands, self.ratio, self.hsi_scale, self.labels = SPECTRALWASTE_CLASSES, bands, ratio, hsi_scale, labels
        folder = self.root / "rgb" / split
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder}: not a SpectralWaste layout (rgb/<split>/<id>.png)")
        self.ids = sorted(p.stem for p in folder.glob("*.png"))
        if not self.ids:
            raise FileNotFoundError(f"{folder}: no images")

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> Sample:
        name = self.ids[i]
        rgb = cv2.imread(str(self.root / "rgb" / self.split / f"{name}.png"), cv2.IMREAD_COLOR)
        labels = cv2.imread(str(self.root / self.labels / self.split / f"{name}_semantic.png"), cv2.IMREAD_UNCHANGED)
        ok, pages = cv2.imreadmulti(str(self.root / "hyper" / self.split / f"{name}.tiff"), flags=cv2.IMREAD_UNCHANGED)
        if rgb is None or labels is None or not ok:
            raise FileNotFoundError(f"SpectralWaste {self.split}/{name}: missing or unreadable rgb, labels or hyper file")
        cube = np.stack(pages, axis=-1).astype(np.float32) / self.hsi_scale     # band-first pages -> (H, W, bands)
        if labels.ndim == 3:
            labels = labels[..., 0]
        r = self.ratio
        h, w = labels.shape
        rgb = cv2.resize(cv2.cvtColor(rgb, cv2.COLOR_BGR2RGB), (w * r, h * r), interpolation=cv2.INTER_LINEAR)
        labels = cv2.resize(labels.astype(np.uint8), (w * r, h * r), interpolation=cv2.INTER_NEAREST)
        return Sample(rgb, bin_bands(cube, self.bands), labels).check(r, self.bands)


class Crops:
    """Random aligned crops of a dataset's samples with flips: deterministic per (seed, draw).

    Crop offsets are multiples of ratio x `align` so both grids (and the
    model's HSI patches) stay aligned.
    """

    def __init__(self, dataset, lines: int, width: int, seed: int, align: int = 1):
        self.ds, self.lines, self.width, self.seed = dataset, lines, width, seed
        self.step = dataset.ratio * align

    def sample(self, draw: int) -> Sample:
        rng = np.random.default_rng([self.seed, draw])
        s = self.ds[int(rng.integers(len(self.ds)))]
        h, w = s.labels.shape
        r, st = self.ds.ratio, self.step
        y = int(rng.integers((h - self.lines) // st + 1)) * st
        x = int(rng.integers((w - self.width) // st + 1)) * st
        rgb = s.rgb[y:y + self.lines, x:x + self.width]
        hsi = s.hsi[y // r:(y + self.lines) // r, x // r:(x + self.width) // r]
        labels = s.labels[y:y + self.lines, x:x + self.width]
        if rng.random() < 0.5:   # across the belt
            rgb, hsi, labels = rgb[:, ::-1], hsi[:, ::-1], labels[:, ::-1]
        if rng.random() < 0.5:   # along the belt
            rgb, hsi, labels = rgb[::-1], hsi[::-1], labels[::-1]
        return Sample(rgb, hsi, labels)


def batch(samples: list[Sample]):
    """Stack samples into float32 model inputs and int64 targets."""
    rgb = np.stack([s.rgb for s in samples]).astype(np.float32)
    hsi = np.stack([s.hsi for s in samples]).astype(np.float32)
    labels = np.stack([s.labels for s in samples]).astype(np.int64)
    return rgb, hsi, labels


def class_frequencies(dataset, classes: int, limit: int = 64) -> np.ndarray:
    """Pixel share of each class over (up to `limit`) samples spread over the dataset."""
    counts = np.zeros(classes, np.float64)
    for i in np.linspace(0, len(dataset) - 1, min(limit, len(dataset))).astype(int):
        counts += np.bincount(dataset[int(i)].labels.ravel(), minlength=classes)[:classes]
    return counts / max(counts.sum(), 1)
