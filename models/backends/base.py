"""What every backend is: a model opened for one strip shape, run one strip at a time (see the package)."""

from __future__ import annotations

import json

import numpy as np

from sortline.models.contract import ModelFileError, StripShape


class Backend:
    name = "?"

    def __init__(self, meta: dict[str, str], inputs: dict[str, np.dtype]):
        """meta: the model file's (models.contract); inputs: the dtype the model takes rgb and hsi in."""
        self.inputs = {k: np.dtype(v) for k, v in inputs.items()}
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
        """One strip, rgb uint8 and hsi float16 as the register node makes them, passed on as they are
        (the model converts them on its device); other dtypes are converted to the model's first (a
        model exported before the conversion moved into the graph takes float32)."""
        if rgb.shape != self.rgb_shape[1:] or hsi.shape != self.hsi_shape[1:]:
            raise ValueError(f"strip rgb {rgb.shape} / hsi {hsi.shape}; the model takes {self.rgb_shape[1:]} / "
                             f"{self.hsi_shape[1:]}")
        classes, conf = self.infer(np.asarray(rgb[None], self.inputs["rgb"]), np.asarray(hsi[None], self.inputs["hsi"]))
        return classes[0].astype(np.uint8), np.rint(conf[0] * 255.0).astype(np.uint8)

    def infer(self, rgb: np.ndarray, hsi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(1, H, W, 3) and (1, h, w, bands) in the model's input dtypes (self.inputs) -> classes
        (1, core, W) int32, confidence float32."""
        raise NotImplementedError

    def close(self) -> None:
        pass
