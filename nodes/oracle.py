"""The oracle: the synthetic belt's truth labels published as a perfect class mask.

It stands where the infer node stands, so the decisions, the valve schedule
and the air can be scored with segmentation taken out of the question (the
best the rest of the pipeline can do), and so that ejection can be worked on
without a model. Its masks say so: meta["model"] = "oracle". With
model.mask_stride k > 1 its masks are on the same coarser grid as the
model's: the label at the centre of each k x k block.
"""

from __future__ import annotations

import numpy as np

from pipeline.node import Node


class Oracle(Node):
    inputs = ("in",)
    outputs = ("out",)

    def setup(self) -> None:
        self.stride = self.settings.model.mask_stride

    def process(self, port, msg):
        labels = msg.arrays.get("labels")
        if labels is None or labels.ndim != 2:
            raise ValueError("a truth message needs a 2-D 'labels' array")
        k = self.stride
        if labels.shape[0] % k or labels.shape[1] % k:
            raise ValueError(f"truth of {labels.shape} does not divide into model.mask_stride = {k} cells")
        labels = labels[k // 2::k, k // 2::k]
        out = self.out["out"].new({"classes": (labels.shape, np.uint8), "confidence": (labels.shape, np.uint8)},
                                  like=msg, stream="mask", ticks_per_line=msg.header.ticks_per_line * k,
                                  meta={"classes": msg.header.meta.get("classes", []), "model": "oracle",
                                        "stride": k})
        if out is None:
            return None
        out.arrays["classes"][...] = labels
        out.arrays["confidence"][...] = 255
        return [("out", out)]
