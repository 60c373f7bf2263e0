"""The checkpoint in torch eager mode: the reference the exports are checked against."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from sortline.models.backends.base import Backend
from sortline.models.contract import ModelFileError, StripShape, metadata
from sortline.models.net import Deployed
from sortline.models.training import checkpoint


class TorchBackend(Backend):
    name = "torch"

    def __init__(self, path: str | Path, shape: StripShape, threads: int = 1):
        torch.set_num_threads(threads)
        net, meta = checkpoint.load(path)
        try:
            net.config.check_strip(shape.lines, shape.width)
        except ValueError as exc:
            raise ModelFileError(f"{path}: {exc}") from None
        if net.config.ratio != shape.ratio or net.config.bands != shape.bands:
            raise ModelFileError(f"{path}: the model is for ratio {net.config.ratio} and {net.config.bands} bands, "
                                 f"the strips have ratio {shape.ratio} and {shape.bands} bands")
        self.model = Deployed(net, shape.overlap, shape.stride).eval()
        super().__init__(metadata(net.config.to_dict(), meta.get("hash", ""), shape),
                         {"rgb": np.uint8, "hsi": np.float16})   # as the exported model: Deployed converts

    def infer(self, rgb, hsi):
        with torch.no_grad():
            classes, conf = self.model(torch.from_numpy(rgb), torch.from_numpy(hsi))
        return classes.numpy(), conf.numpy()
