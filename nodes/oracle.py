"""The oracle: the synthetic belt's truth labels published as a perfect class mask.

It stands where the infer node stands, so the decisions, the valve schedule
and the air can be scored with segmentation taken out of the question (the
best the rest of the pipeline can do), and so that ejection can be worked on
without a model. Its masks say so: their model is "oracle", their classes the
belt's. With
model.mask_stride k > 1 its masks are on the same coarser grid as the
model's: the label at the centre of each k x k block.
"""

from __future__ import annotations

import numpy as np

from sortline.nodes.streams import MASK, TRUTH, MaskMeta
from sortline.pipeline.node import Node


class Oracle(Node):
    inputs = {"in": TRUTH}
    outputs = {"out": MASK}

    def setup(self) -> None:
        self.stride = self.machine.model.mask_stride
        self.expect("in", pixels=self.machine.cameras.rgb.pixels)

    def process(self, port, msg):
        labels = msg.arrays["labels"]
        k = self.stride
        if labels.shape[0] % k or labels.shape[1] % k:
            raise ValueError(f"truth of {labels.shape} does not divide into model.mask_stride = {k} cells")
        labels = labels[k // 2::k, k // 2::k]
        out = self.out["out"].new({"classes": (labels.shape, np.uint8), "confidence": (labels.shape, np.uint8)},
                                  like=msg, stream="mask", ticks_per_line=msg.header.ticks_per_line * k,
                                  meta=MaskMeta(msg.meta.classes, "oracle", k, len(labels)))
        if out is None:
            return None
        out.arrays["classes"][...] = labels
        out.arrays["confidence"][...] = 255
        return [("out", out)]
