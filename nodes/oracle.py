"""The oracle: the synthetic belt's truth labels published as a perfect class mask.

It stands where the infer node stands, so the decisions, the valve schedule
and the air can be scored with segmentation taken out of the question (the
best the rest of the pipeline can do), and so that ejection can be worked on
without a model. Its masks say so: meta["model"] = "oracle".
"""

from __future__ import annotations

import numpy as np

from pipeline.node import Node


class Oracle(Node):
    inputs = ("in",)
    outputs = ("out",)

    def process(self, port, msg):
        labels = msg.arrays.get("labels")
        if labels is None or labels.ndim != 2:
            raise ValueError("a truth message needs a 2-D 'labels' array")
        out = self.out["out"].new({"classes": (labels.shape, np.uint8), "confidence": (labels.shape, np.uint8)},
                                  like=msg, stream="mask",
                                  meta={"classes": msg.header.meta.get("classes", []), "model": "oracle"})
        if out is None:
            return None
        out.arrays["classes"][...] = labels
        out.arrays["confidence"][...] = 255
        return [("out", out)]
