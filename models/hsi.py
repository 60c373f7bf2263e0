"""The HSI backbone: spectral slices kept as tokens through every stage.

The bands are cut into S contiguous slices; one patch embedding, shared by all
slices, turns a spatial patch x a slice of bands into a token, so each grid
cell holds S spectral tokens (plus a learned embedding saying which slice it
is). A block is spatial window attention within each slice (shared weights:
the slices ride in the batch) followed by self-attention across the S tokens
of each cell. Merges are 2x2 per slice; S is never reduced inside the
backbone: the fusion decides how to weigh the slices.

`SliceCollapse` turns a cell's S tokens into one, with weights computed from
that cell's own tokens only (see docs/model.md: why it is strip-local).
"""

from __future__ import annotations

import torch
from torch import nn

from sortline.models.blocks import Mlp, PatchMerge, SelfAttention, WindowBlock, dims, stages


class SpectralBlock(nn.Module):
    def __init__(self, dim: int, heads: int, window: int, shift: bool, mlp_ratio: float):
        super().__init__()
        self.spatial = WindowBlock(dim, heads, window, shift, mlp_ratio)
        self.norm = nn.LayerNorm(dim)
        self.spectral = SelfAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, mlp_ratio)

    def forward(self, x):
        """x: (B, S, H, W, C)."""
        b, s, h, w, c = dims(x)
        x = self.spatial(x.reshape(b * s, h, w, c))
        x = x.reshape(b, s, h * w, c).transpose(1, 2).reshape(b * h * w, s, c)
        x = x + self.spectral(self.norm(x))
        x = x + self.mlp(self.norm2(x))
        return x.reshape(b, h * w, s, c).transpose(1, 2).reshape(b, s, h, w, c)


class HSIBackbone(nn.Module):
    def __init__(self, bands: int, slices: int, patch: int, dims_, depths, heads, merge, window: int,
                 mlp_ratio: float):
        super().__init__()
        self.slices, self.group = slices, bands // slices
        self.embed = nn.Conv2d(self.group, dims_[0], kernel_size=patch, stride=patch)
        self.slice_embed = nn.Parameter(torch.zeros(slices, dims_[0]))
        nn.init.trunc_normal_(self.slice_embed, std=0.02)
        self.embed_norm = nn.LayerNorm(dims_[0])
        self.merges = nn.ModuleList()
        for s in range(1, len(dims_)):
            self.merges.append(PatchMerge(dims_[s - 1], dims_[s]) if merge[s - 1]
                               else nn.Linear(dims_[s - 1], dims_[s]))
        self.stages = stages(dims_, depths, heads, lambda d, h, shift: SpectralBlock(d, h, window, shift, mlp_ratio))

    def forward(self, x):
        """x: (B, h, w, bands), normalised. Returns per stage (B, S, H_s, W_s, C_s)."""
        b, h, w, _ = dims(x)
        s, g = self.slices, self.group
        x = x.reshape(b, h, w, s, g).permute(0, 3, 4, 1, 2).reshape(b * s, g, h, w)
        x = self.embed(x)                                   # (B*S, C, H, W): one kernel for every slice
        _, c, gh, gw = dims(x)
        x = x.reshape(b, s, c, gh, gw).permute(0, 1, 3, 4, 2) + self.slice_embed.reshape(1, s, 1, 1, c)
        x = self.embed_norm(x)
        maps = []
        for i, stage in enumerate(self.stages):
            if i:
                b_, s_, hh, ww, cc = dims(x)
                merged = self.merges[i - 1](x.reshape(b_ * s_, hh, ww, cc))
                x = merged.reshape(b_, s_, *dims(merged)[1:])
            x = stage(x)
            maps.append(x)
        return maps


class SliceCollapse(nn.Module):
    """(B, S, H, W, C) -> (B, H, W, C): a softmax over S of scores from each token itself.

    Strip-local (indeed cell-local): no pooling over the frame or the strip, so a
    pixel's result never depends on what lies beyond its receptive field, and
    overlapping strips agree where they overlap.
    """

    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.score = Mlp(dim, 0.25, out=1)

    def forward(self, x):
        weights = self.score(self.norm(x)).softmax(dim=1)     # (B, S, H, W, 1)
        return (x * weights).sum(dim=1)
