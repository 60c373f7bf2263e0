"""What every backend is: a model opened for one strip shape, run one strip at a time (see the package)."""

from __future__ import annotations

import json

import numpy as np

from sortline.models.contract import ModelFileError, StripShape


class Backend:
    name = "?"

    def __init__(self, meta: dict[str, str]):
        try:
            self.classes = tuple(json.loads(meta["classes"]))
            self.rgb_shape = tuple(json.loads(meta["rgb_shape"]))
            self.hsi_shape = tuple(json.loads(meta["hsi_shape"]))
            self.overlap = int(meta["overlap"])
            self.stride = int(meta.get("mask_stride", "1"))   # models exported before strides: per pixel
        except (KeyError, ValueError, TypeError) as exc:
            raise ModelFileError(f"model metadata incomplete or unreadable ({exc}): not made by `sortline export`?") from None
        self.model_hash = meta.get("model_hash", "")
        self.meta = meta

    def expect(self, shape: StripShape) -> None:
        """Refuse a model made for other strips or mask strides (a ModelFileError saying which)."""
        problems = []
        if tuple(shape.rgb) != self.rgb_shape:
            problems.append(f"RGB input {self.rgb_shape}, the strips are {tuple(shape.rgb)}")
        if tuple(shape.hsi) != self.hsi_shape:
            problems.append(f"HSI input {self.hsi_shape}, the strips are {tuple(shape.hsi)}")
        if shape.stride != self.stride:
            problems.append(f"mask stride {self.stride}, model.mask_stride is {shape.stride}")
        if problems:
            raise ModelFileError(f"{self.name} model {self.model_hash} does not fit: " + "; ".join(problems)
                                 + " (export or build it again for this machine config)")

    def run(self, rgb: np.ndarray, hsi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if rgb.shape != self.rgb_shape[1:] or hsi.shape != self.hsi_shape[1:]:
            raise ValueError(f"strip rgb {rgb.shape} / hsi {hsi.shape}; the model takes {self.rgb_shape[1:]} / "
                             f"{self.hsi_shape[1:]}")
        classes, conf = self.run_float(rgb[None].astype(np.float32), hsi[None].astype(np.float32))
        return classes[0].astype(np.uint8), np.rint(conf[0] * 255.0).astype(np.uint8)

    def run_float(self, rgb: np.ndarray, hsi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(1, H, W, 3) and (1, h, w, bands) float32 -> classes (1, core, W) int32, confidence float32."""
        raise NotImplementedError

    def close(self) -> None:
        pass
