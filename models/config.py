"""Model sizes and variants: every shape the network has comes from here.

A config is plain data (saved beside the weights in every checkpoint), so a
checkpoint, an ONNX file or an engine can always say what it was built for.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

VARIANTS = ("fusion", "rgb", "hsi")


@dataclass(frozen=True)
class ModelConfig:
    variant: str = "fusion"            # fusion, rgb (RGB-only baseline) or hsi (HSI-only baseline)
    size: str = "tiny"
    classes: tuple[str, ...] = ()      # the data set's classes; classes[0] is the background (the empty belt)
    bands: int = 32                    # HSI bands fed to the model (binned from the camera's)
    slices: int = 4                    # the bands cut into this many contiguous groups: S spectral tokens per cell
    ratio: int = 4                     # RGB pixels per HSI pixel, along and across the belt
    rgb_dims: tuple[int, ...] = (24, 48, 96, 192)
    rgb_depths: tuple[int, ...] = (1, 1, 2, 1)
    rgb_heads: tuple[int, ...] = (1, 2, 4, 8)
    hsi_patch: int = 2                 # HSI pixels per token side at stage 0
    hsi_dims: tuple[int, ...] = (16, 32, 64, 64)
    hsi_depths: tuple[int, ...] = (1, 1, 1, 1)
    hsi_heads: tuple[int, ...] = (1, 2, 4, 4)
    # Whether the HSI grid halves before each of stages 1..3. Keeping the last
    # one lets a 160-line strip (128 + 2 x 16 overlap) fit both grids exactly.
    hsi_merge: tuple[bool, ...] = (True, True, False)
    window: int = 8
    mlp_ratio: float = 2.0
    decoder_dim: int = 32
    # Input scaling, folded into the graph: RGB 0..255, HSI reflectance 0..~1, or its absorbance
    # -ln(R): a brightness (thickness, tilt, pigment) becomes an offset and a band a dip of
    # the same size at any brightness, so dark items keep their spectral shape (NIR practice).
    rgb_mean: float = 110.0
    rgb_std: float = 60.0
    hsi_input: str = "reflectance"      # or "absorbance"
    hsi_mean: float = 0.35
    hsi_std: float = 0.25
    # Per-band shift and scale of the HSI input (after the absorbance, if any), measured on the
    # training data by `sortline train`; empty: the single hsi_mean / hsi_std above (models trained
    # before per-band normalisation, such as the shipped ones, keep exactly their outputs).
    hsi_band_mean: tuple[float, ...] = ()
    hsi_band_std: tuple[float, ...] = ()
    # Softmax temperature of the confidence the deployed model gives (fitted on the validation
    # split, models.training.calibrate); 1.0: the raw softmax. The classes do not depend on it.
    temperature: float = 1.0

    @property
    def uses_rgb(self) -> bool:
        return self.variant in ("fusion", "rgb")

    @property
    def uses_hsi(self) -> bool:
        return self.variant in ("fusion", "hsi")

    @property
    def stride(self) -> int:
        """RGB lines (and pixels) a strip must be a multiple of."""
        rgb = 4 * 2 ** (len(self.rgb_dims) - 1)
        hsi = self.ratio * self.hsi_patch * 2 ** sum(self.hsi_merge)
        return max(rgb, hsi) if max(rgb, hsi) % min(rgb, hsi) == 0 else rgb * hsi

    def grids(self, lines: int, width: int) -> list[tuple[tuple[int, int], tuple[int, int]]]:
        """(RGB grid, HSI grid) per stage for an RGB strip of lines x width."""
        out = []
        rh, rw = lines // 4, width // 4
        hh, hw = lines // self.ratio // self.hsi_patch, width // self.ratio // self.hsi_patch
        for s in range(len(self.rgb_dims)):
            if s:
                rh, rw = rh // 2, rw // 2
                if self.hsi_merge[s - 1]:
                    hh, hw = hh // 2, hw // 2
            out.append(((rh, rw), (hh, hw)))
        return out

    def check_strip(self, lines: int, width: int) -> None:
        """Raise ValueError unless an RGB strip of this size fits every stage of both grids."""
        if lines % self.stride or width % self.stride:
            raise ValueError(f"strip {lines} x {width}: lines and width must be multiples of {self.stride} "
                             f"for this model (RGB patch 4 and 3 merges, HSI patch {self.hsi_patch} at ratio {self.ratio})")
        if self.uses_hsi and self.uses_rgb:
            for s, ((rh, rw), (hh, hw)) in enumerate(self.grids(lines, width)):
                if rh % hh or rw % hw or rh // hh != rw // hw:
                    raise ValueError(f"stage {s}: RGB grid {rh}x{rw} is not an integer multiple of HSI grid {hh}x{hw}")

    def validate(self) -> "ModelConfig":
        n = len(self.rgb_dims)
        if len(self.classes) < 2 or len(set(self.classes)) != len(self.classes):
            raise ValueError(f"classes {list(self.classes)}: the background and at least one class, no name twice")
        if self.hsi_input not in ("reflectance", "absorbance"):
            raise ValueError(f"hsi_input {self.hsi_input!r}: reflectance or absorbance")
        if self.variant not in VARIANTS:
            raise ValueError(f"variant {self.variant!r}: one of {', '.join(VARIANTS)}")
        if not (len(self.rgb_depths) == len(self.rgb_heads) == len(self.hsi_dims) == len(self.hsi_depths)
                == len(self.hsi_heads) == n == len(self.hsi_merge) + 1):
            raise ValueError("every per-stage tuple needs one entry per stage (hsi_merge one fewer)")
        if any(len(t) not in (0, self.bands) for t in (self.hsi_band_mean, self.hsi_band_std)):
            raise ValueError(f"hsi_band_mean / hsi_band_std: one value per band ({self.bands}) or none")
        if any(v <= 0 for v in self.hsi_band_std) or not self.temperature > 0:
            raise ValueError("hsi_band_std and temperature must be positive")
        if self.bands % self.slices:
            raise ValueError(f"bands ({self.bands}) must split into {self.slices} equal slices")
        for dims, heads in ((self.rgb_dims, self.rgb_heads), (self.hsi_dims, self.hsi_heads)):
            if any(d % h for d, h in zip(dims, heads)):
                raise ValueError(f"dims {dims} must be multiples of heads {heads}")
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown model config keys {sorted(unknown)} (a checkpoint from a newer version?)")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}).validate()


SIZES: dict[str, dict] = {
    # CPU and small Jetsons: ~30 ms for a demo strip on one ONNX Runtime thread.
    "tiny": {},
    # CPU at line rate (the demo profile at 3 m/s: 50 strips of 64 + 2 x 16 lines a second): about
    # 11 ms a strip on one ONNX Runtime thread. Narrower stages, and HSI tokens of 4 x 4 HSI pixels
    # in 2 spectral slices, so the HSI grid is coarser than the RGB grid by 4 at stage 0.
    "nano": dict(rgb_dims=(16, 32, 64, 128), rgb_depths=(1, 1, 1, 1), rgb_heads=(1, 2, 4, 8),
                 hsi_patch=4, hsi_merge=(True, False, False), hsi_dims=(32, 32, 32, 32),
                 hsi_depths=(1, 1, 1, 1), hsi_heads=(2, 2, 2, 2), slices=2, decoder_dim=24,
                 hsi_input="absorbance", hsi_mean=2.0, hsi_std=1.0),
    # Big GPUs: about 8x the compute, same structure.
    "base": dict(rgb_dims=(48, 96, 192, 384), rgb_depths=(2, 2, 6, 2), rgb_heads=(2, 4, 8, 16),
                 hsi_dims=(32, 64, 128, 128), hsi_depths=(1, 1, 3, 1), hsi_heads=(1, 2, 4, 4),
                 mlp_ratio=4.0, decoder_dim=64),
}


def make_config(size: str = "tiny", variant: str = "fusion", *, classes: tuple[str, ...], **overrides) -> ModelConfig:
    """A model of a named size for these classes (the data set's: classes[0] is the background)."""
    if size not in SIZES:
        raise ValueError(f"size {size!r}: one of {', '.join(SIZES)}")
    return ModelConfig(size=size, variant=variant, classes=tuple(classes), **{**SIZES[size], **overrides}).validate()
