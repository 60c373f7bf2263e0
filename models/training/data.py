"""Training and evaluation data: co-registered RGB + HSI strips with per-pixel labels.

A dataset is anything with `classes`, `bands`, `ratio`, `__len__` and
`__getitem__(i)` returning a `Sample`: rgb (H, W, 3) uint8, hsi (H/r, W/r,
bands) float32 reflectance on the RGB grid coarsened by r, labels (H, W)
uint8 class indices, classes[0] the background. A data set whose samples
carry `looks` (an index per pixel into its `endmembers`: (material, look)
pairs) gets look-group accuracies from evaluation.

- `SpectralWaste` (here): the public SpectralWaste dataset in its
  preprocessed layout (rgb/<split>/<id>.png, hyper/<split>/<id>.tiff
  band-first 16-bit, labels_rgb/<split>/<id>_semantic.png);
- the synthetic belt (sortline.nodes.simulate.dataset): strips of the
  simulated belt, generated on demand and cached;
- `Folder` (here): a data set folder (`sortline teach`, docs/teach-in.md):
  DIR/dataset.json and DIR/strips/<name>.rgb.png, .hsi.npy, .labels.png.

`Crops` turns any of them into random, aligned training crops with flips and
the spectral and geometric augmentation of `Augment`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from sortline.calibration.spectral import bin_bands


@dataclass
class Sample:
    rgb: np.ndarray     # (H, W, 3) uint8
    hsi: np.ndarray     # (H/r, W/r, bands) float32
    labels: np.ndarray  # (H, W) uint8
    looks: np.ndarray | None = None  # (H, W) index into the data set's `endmembers` (material, look), if it has them

    def check(self, ratio: int, bands: int) -> "Sample":
        h, w = self.labels.shape
        if self.rgb.shape != (h, w, 3) or self.hsi.shape != (h // ratio, w // ratio, bands) or h % ratio or w % ratio:
            raise ValueError(f"sample shapes do not fit ratio {ratio} and {bands} bands: rgb {self.rgb.shape}, "
                             f"hsi {self.hsi.shape}, labels {self.labels.shape}")
        return self


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


DATASET_FILE = "dataset.json"
DATASET_FORMAT = "sortline-dataset-1"
SPLITS = ("train", "val", "all")


def val_split(index: int, every: int) -> str:
    """The split of a source's strip number `index`: every `every`-th strip is held out for validation
    (whole strips, so no pixel of a validation strip is trained on)."""
    return "val" if every and index % every == every - 1 else "train"


def strip_paths(root: str | Path, name: str) -> dict[str, Path]:
    base = Path(root) / "strips"
    return {k: base / f"{name}.{k}.{ext}" for k, ext in (("rgb", "png"), ("hsi", "npy"), ("labels", "png"))}


def write_strip(root: str | Path, name: str, rgb: np.ndarray, hsi: np.ndarray, labels: np.ndarray) -> None:
    """One strip of a data set folder: RGB as PNG, HSI reflectance as float16 .npy, class indices as an
    8-bit single-channel PNG."""
    paths = strip_paths(root, name)
    paths["rgb"].parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(paths["rgb"]), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)):
        raise OSError(f"{paths['rgb']}: could not write")
    np.save(paths["hsi"], hsi.astype(np.float16))
    write_labels(paths["labels"], labels)


def write_labels(path: str | Path, labels: np.ndarray) -> None:
    if not cv2.imwrite(str(path), labels.astype(np.uint8)):
        raise OSError(f"{path}: could not write")


def read_labels(path: str | Path) -> np.ndarray:
    labels = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if labels is None or labels.ndim != 2:
        raise FileNotFoundError(f"{path}: missing, or not a single-channel label image")
    return labels


def read_index(root: str | Path) -> dict:
    """A data set folder's dataset.json (classes, bands, ratio, geometry, sources, strips and their split)."""
    path = Path(root) / DATASET_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{root}: not a data set folder (no {DATASET_FILE}; make one with `sortline teach "
                                "build`)")
    index = json.loads(path.read_text())
    if index.get("format") != DATASET_FORMAT:
        raise ValueError(f"{path}: format {index.get('format')!r}, not {DATASET_FORMAT!r}")
    return index


def write_index(root: str | Path, index: dict) -> None:
    path = Path(root) / DATASET_FILE
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"format": DATASET_FORMAT, **index}, indent=1) + "\n")
    tmp.replace(path)


class Folder:
    """A data set folder (`sortline teach build`): its strips of one split ("train", "val" or "all"),
    in the order dataset.json lists them."""

    def __init__(self, root: str | Path, split: str = "train"):
        if split not in SPLITS:
            raise ValueError(f"split {split!r}: one of {', '.join(SPLITS)}")
        self.root, self.split = Path(root), split
        index = read_index(root)
        self.index = index
        self.classes, self.bands, self.ratio = tuple(index["classes"]), int(index["bands"]), int(index["ratio"])
        self.names = [s["name"] for s in index["strips"] if split == "all" or s["split"] == split]
        if not self.names:
            raise FileNotFoundError(f"{root}: no {split} strips")

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, i: int) -> Sample:
        paths = strip_paths(self.root, self.names[i])
        rgb = cv2.imread(str(paths["rgb"]), cv2.IMREAD_COLOR)
        if rgb is None:
            raise FileNotFoundError(f"{paths['rgb']}: missing or unreadable")
        hsi = np.load(paths["hsi"]).astype(np.float32)
        return Sample(cv2.cvtColor(rgb, cv2.COLOR_BGR2RGB), hsi, read_labels(paths["labels"])).check(
            self.ratio, self.bands)


class Pasted:
    """A data set folder's strips with some of their own objects taken off and objects of other
    recordings pasted on.

    Teach-in records one material at a time, so every object in a strip is of one class: a model can
    learn the strip instead of the object, and never sees two materials side by side. Each strip here
    keeps each of its own objects with probability `keep` (the others are replaced by the same cells of
    an empty-belt strip) and gets the objects of `donors` strips of other recordings, pasted cell by cell
    (RGB, HSI and labels alike, so both grids stay aligned) over its belt and its own objects. The
    donors and choices are fixed per strip (seeded), so training stays reproducible. Pieces of objects
    are added only while at most `occupancy` of the strip's HSI cells hold objects.

    Nothing may tell a pasted object from one the camera saw there, or the model learns to read the
    pasted ones by their spectrum and the rest by the strip: a piece moves only along the belt (across
    it, the RGB lens's vignetting and the belt's lighting change its brightness against the belt around
    it), and it comes with a ring of one HSI cell of its own belt, where its edge blurred into the belt."""

    def __init__(self, folder: Folder, seed: int = 0, donors: int = 3, occupancy: float = 0.55, keep: float = 0.5):
        self.ds, self.seed, self.donors, self.occupancy, self.keep = folder, seed, donors, occupancy, keep
        self.classes, self.bands, self.ratio = folder.classes, folder.bands, folder.ratio
        source = {s["name"]: s["source"] for s in folder.index["strips"]}
        self.source = np.array([source[n] for n in folder.names])
        empty = [s["name"] for s in folder.index["sources"] if s.get("material") is None]
        self.empty = np.isin(self.source, empty)
        self.empties = np.flatnonzero(self.empty)

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> Sample:
        s = self.ds[i]
        rng = np.random.default_rng([self.seed, 7, i])
        others = np.flatnonzero(self.source != self.source[i])
        if len(others) == 0:
            return s
        rgb, hsi, labels = s.rgb.copy(), s.hsi.copy(), s.labels.copy()
        r = self.ratio
        h, w = labels.shape
        ring = np.ones((3, 3), np.uint8)

        def cells(lab):   # HSI cells holding any object pixel
            return lab.reshape(h // r, r, w // r, r).max(axis=(1, 3)) > 0

        def pieces(objects):  # object cells and the ring of cells around them, one piece per touching group
            return cv2.connectedComponents(cv2.dilate(objects.view(np.uint8), ring), connectivity=8)

        def put(d, take):
            fine = np.repeat(np.repeat(take, r, 0), r, 1)
            rgb[fine], labels[fine], hsi[take] = d.rgb[fine], d.labels[fine], d.hsi[take]

        if self.keep < 1 and len(self.empties) and not self.empty[i]:
            n, own = pieces(cells(labels))
            off = np.isin(own, np.flatnonzero(rng.random(n) >= self.keep)) & (own > 0)
            put(self.ds[int(rng.choice(self.empties))], off)
        for j in rng.choice(others, size=min(self.donors, len(others)), replace=False):
            d = self.ds[int(j)]
            if d.labels.shape != labels.shape:
                continue
            dy = int(rng.integers(h // r))
            d = Sample(np.roll(d.rgb, dy * r, 0), np.roll(d.hsi, dy, 0), np.roll(d.labels, dy * r, 0))
            # Whole pieces of the donor's objects, in a random order, while the belt stays as full as a
            # belt is (`occupancy`); a piece may lie over the strip's own objects, as objects lie on each
            # other on a belt.
            objects = cells(d.labels)
            n, donor = pieces(objects)
            take, full = np.zeros((h // r, w // r), bool), cells(labels)
            for k in rng.permutation(np.arange(1, n)):
                piece = donor == k
                after = (full & ~piece) | (piece & objects)
                if after.sum() <= self.occupancy * full.size:
                    take |= piece
                    full = after
            put(d, take)
        return Sample(rgb, hsi, labels).check(r, self.bands)


@dataclass(frozen=True)
class Augment:
    """What training crops vary besides flips, and by how much (each drawn uniformly, per crop).

    Spectral, on every crop: one illumination factor on RGB and HSI alike (a lamp
    ageing, a belt at another height), per HSI band a gain and an offset (a
    white reference a little off, a drifting sensor), and per object a brightness
    (thickness, tilt, dirt: items of one polymer differ in level, not in the shape of
    their spectrum, and a teach-in run holds only so many items: the model is to learn
    the polymer, not the items). Geometric, on a share of the
    crops (the rest keep the cameras' own pixels): a scale (objects larger or
    smaller, log-uniform) and a small rotation about the crop's centre, one
    transform for both grids (RGB and HSI bilinear, labels nearest), so that an
    HSI pixel still covers the same ratio x ratio RGB pixels.
    """

    illumination: tuple[float, float] = (0.85, 1.15)
    band_gain: float = 0.03          # +- this factor per band
    band_offset: float = 0.005       # +- this reflectance per band
    object_gain: tuple[float, float] = (0.85, 1.15)   # per object (a touching group of object pixels)
    geometric: float = 0.5           # share of crops scaled and rotated
    scale: tuple[float, float] = (0.8, 1.25)
    rotation_deg: float = 10.0       # +- degrees


class Crops:
    """Random aligned crops of a dataset's samples with flips and (unless augment is None) the
    augmentation of `Augment`: deterministic per (seed, draw).

    Crop offsets are multiples of ratio x `align` so both grids (and the
    model's HSI patches) stay aligned. Crops without augmentation are those
    drawn before there was any (the same draws come first).
    """

    def __init__(self, dataset, lines: int, width: int, seed: int, align: int = 1, augment: Augment | None = Augment()):
        self.ds, self.lines, self.width, self.seed = dataset, lines, width, seed
        self.step = dataset.ratio * align
        self.augment = augment

    def sample(self, draw: int) -> Sample:
        rng = np.random.default_rng([self.seed, draw])
        s = self.ds[int(rng.integers(len(self.ds)))]
        h, w = s.labels.shape
        r, st = self.ds.ratio, self.step
        y = int(rng.integers((h - self.lines) // st + 1)) * st
        x = int(rng.integers((w - self.width) // st + 1)) * st
        across, along = rng.random() < 0.5, rng.random() < 0.5
        a = self.augment
        if a is not None and rng.random() < a.geometric:
            zoom = float(np.exp(rng.uniform(*np.log(a.scale))))
            angle = float(np.deg2rad(rng.uniform(-a.rotation_deg, a.rotation_deg)))
            rgb, hsi, labels = self._warped(s, y, x, zoom, angle, across, along)
        else:
            rgb = s.rgb[y:y + self.lines, x:x + self.width]
            hsi = s.hsi[y // r:(y + self.lines) // r, x // r:(x + self.width) // r]
            labels = s.labels[y:y + self.lines, x:x + self.width]
            if across:   # across the belt
                rgb, hsi, labels = rgb[:, ::-1], hsi[:, ::-1], labels[:, ::-1]
            if along:    # along the belt
                rgb, hsi, labels = rgb[::-1], hsi[::-1], labels[::-1]
        if a is not None:
            rgb, hsi = self._objects_scaled(rgb, hsi, labels, rng, a.object_gain)
            light = rng.uniform(*a.illumination)
            gain = 1 + rng.uniform(-a.band_gain, a.band_gain, hsi.shape[-1])
            offset = rng.uniform(-a.band_offset, a.band_offset, hsi.shape[-1])
            rgb = np.clip(np.rint(rgb * light), 0, 255).astype(np.uint8)
            hsi = np.maximum(hsi * (light * gain).astype(np.float32) + offset.astype(np.float32), 0)
        return Sample(rgb, hsi, labels)

    def _objects_scaled(self, rgb, hsi, labels, rng, gains):
        """Each object's pixels times its own factor drawn from `gains`, on both grids; an HSI cell
        by the mean factor of its RGB pixels (the cell mixes the object and the belt)."""
        n, objects = cv2.connectedComponents((labels > 0).view(np.uint8), connectivity=8)
        factor = rng.uniform(*gains, n).astype(np.float32)
        factor[0] = 1.0
        fine = factor[objects]
        r = self.ds.ratio
        h, w = labels.shape
        coarse = fine.reshape(h // r, r, w // r, r).mean(axis=(1, 3))
        return (np.clip(np.rint(rgb * fine[..., None]), 0, 255).astype(np.uint8), hsi * coarse[..., None])

    def _warped(self, s: Sample, y: int, x: int, zoom: float, angle: float, across: bool, along: bool):
        """The crop at (y, x) resampled from the whole sample: objects `zoom` times larger, turned by
        `angle` about the crop's centre, flipped as asked; the sample mirrored where the crop leaves it."""
        r = self.ds.ratio
        flip = np.diag([-1.0 if across else 1.0, -1.0 if along else 1.0])
        rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
        lin = rot @ flip / zoom    # crop pixel -> sample pixel, about the centres (x, y order, as OpenCV)
        centre_out = np.array([(self.width - 1) / 2, (self.lines - 1) / 2])
        shift = np.array([x, y]) + centre_out - lin @ centre_out
        # The same transform on the HSI grid: RGB pixel centre u = r * u_hsi + (r - 1) / 2 on both sides.
        half = np.full(2, (r - 1) / 2)
        shift_hsi = (lin @ half + shift - half) / r
        border = cv2.BORDER_REFLECT_101

        def warp(img, offset, size, interpolation):
            m = np.hstack([lin, offset[:, None]])
            flags = interpolation | cv2.WARP_INVERSE_MAP
            if img.ndim == 2 or img.shape[2] <= 4:
                return cv2.warpAffine(img, m, size, flags=flags, borderMode=border).reshape(size[::-1] + img.shape[2:])
            # OpenCV interpolates images of more than 4 channels on a coarse fixed-point grid: 4 at a time
            return np.concatenate([cv2.warpAffine(np.ascontiguousarray(img[..., i:i + 4]), m, size, flags=flags,
                                                  borderMode=border).reshape(size[::-1] + (-1,))
                                   for i in range(0, img.shape[2], 4)], axis=-1)

        size, size_hsi = (self.width, self.lines), (self.width // r, self.lines // r)
        return (warp(s.rgb, shift, size, cv2.INTER_LINEAR), warp(s.hsi, shift_hsi, size_hsi, cv2.INTER_LINEAR),
                warp(s.labels, shift, size, cv2.INTER_NEAREST))


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
