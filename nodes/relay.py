"""A pass-through stage: copies every message to its output unchanged.

Used to measure what one hop of the runtime costs, and as the middle of the
runtime's own chain tests.
"""

from __future__ import annotations

import numpy as np

from sortline.pipeline.node import Node
from sortline.pipeline.ports import ANY


class Relay(Node):
    inputs = {"in": ANY}
    outputs = {"out": ANY}

    def process(self, port, msg):
        out = self.out["out"].new({k: (a.shape, a.dtype) for k, a in msg.arrays.items()}, like=msg)
        if out is None:
            return None
        for name, array in msg.arrays.items():
            np.copyto(out.arrays[name], array)
        return [("out", out)]
