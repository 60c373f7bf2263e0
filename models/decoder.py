"""A light FPN-style decoder: per-pixel class logits at full RGB resolution.

Each stage map is projected to one width, added top-down (coarse maps
resized to the next finer one), refined once at the finest grid with a
depthwise 3x3 and a pointwise conv, classified, and resized to the strip.
The logits come at `size`: the strip's own (per RGB pixel), or a coarser
grid down to the finest map's (stride 4), where no resize is needed.
Resizes are by constant scale factors (integers: grids differ by powers of
two, and the strip by 4 or 8 from the finest map), so the exported graph has
plain Resize nodes and no shape arithmetic.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from sortline.models.blocks import dims


class Decoder(nn.Module):
    def __init__(self, in_dims, dim: int, classes: int):
        super().__init__()
        self.lateral = nn.ModuleList([nn.Linear(c, dim) for c in in_dims])
        self.refine = nn.Sequential(
            nn.Conv2d(dim, dim, 3, padding=1, groups=dim), nn.BatchNorm2d(dim), nn.GELU(),
            nn.Conv2d(dim, dim, 1), nn.BatchNorm2d(dim), nn.GELU())
        self.classify = nn.Conv2d(dim, classes, 1)

    def forward(self, maps, size: tuple[int, int]):
        """maps: channel-last stage maps, finest first. Returns logits (B, K, *size)."""
        y = None
        for lateral, m in reversed(list(zip(self.lateral, maps))):
            lat = lateral(m).permute(0, 3, 1, 2)
            if y is None:
                y = lat
                continue
            if dims(y)[2:] != dims(lat)[2:]:
                y = F.interpolate(y, scale_factor=float(dims(lat)[2] // dims(y)[2]), mode="nearest")
            y = y + lat
        logits = self.classify(self.refine(y))
        if tuple(size) == tuple(dims(logits)[2:]):
            return logits
        # A constant scale (not a size): the exported Resize then needs no Shape ops.
        scale = (size[0] / dims(logits)[2], size[1] / dims(logits)[3])
        return F.interpolate(logits, scale_factor=scale, mode="bilinear", align_corners=False)
