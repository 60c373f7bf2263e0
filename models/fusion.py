"""Bidirectional, cell-local cross-attention between the RGB and HSI grids.

At one stage, each HSI cell covers r x r RGB tokens (r = RGB grid / HSI grid,
an integer). Both grids stay at their native resolution: the r*r RGB tokens
under a cell attend to that cell's S spectral tokens, and the S spectral
tokens attend back to their r*r RGB children. Attention is confined to the
cell, so its cost grows with the strip's area, not its square, and nothing
crosses the strip's edges. Each stream then has its own MLP; the HSI stream is
collapsed over its slices (strip-local, see hsi.SliceCollapse), projected to
the RGB width, repeated over the cell's r x r children and added to the RGB
stream through a learned per-channel gate.
"""

from __future__ import annotations

import torch
from torch import nn

from sortline.models.blocks import Mlp, attend, dims, split
from sortline.models.hsi import SliceCollapse


class CrossFusion(nn.Module):
    def __init__(self, rgb_dim: int, hsi_dim: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.heads = heads
        d = rgb_dim
        self.norm_rgb, self.norm_hsi = nn.LayerNorm(rgb_dim), nn.LayerNorm(hsi_dim)
        # RGB <- HSI: RGB children ask, the cell's spectral tokens answer.
        self.q_rgb, self.kv_hsi, self.out_rgb = nn.Linear(rgb_dim, d), nn.Linear(hsi_dim, 2 * d), nn.Linear(d, rgb_dim)
        # HSI <- RGB: spectral tokens ask, the cell's RGB children answer.
        self.q_hsi, self.kv_rgb, self.out_hsi = nn.Linear(hsi_dim, d), nn.Linear(rgb_dim, 2 * d), nn.Linear(d, hsi_dim)
        self.mlp_rgb = nn.Sequential(nn.LayerNorm(rgb_dim), Mlp(rgb_dim, mlp_ratio))
        self.mlp_hsi = nn.Sequential(nn.LayerNorm(hsi_dim), Mlp(hsi_dim, mlp_ratio))
        self.collapse = SliceCollapse(hsi_dim)
        self.to_rgb = nn.Sequential(nn.Linear(hsi_dim, rgb_dim), nn.LayerNorm(rgb_dim))
        self.gate = nn.Parameter(torch.zeros(rgb_dim))  # sigmoid(0) = 0.5 at the start
        self.norm_out = nn.LayerNorm(rgb_dim)

    def forward(self, rgb, hsi):
        """rgb: (B, H, W, Cr); hsi: (B, S, h, w, Ch) with H = r*h, W = r*w. Returns (B, H, W, Cr)."""
        b, big_h, big_w, cr = dims(rgb)
        _, s, h, w, ch = dims(hsi)
        r = big_h // h
        n = r * r
        # Gather: the r*r RGB children of each cell, the S spectral tokens of each cell.
        kids = rgb.reshape(b, h, r, w, r, cr).permute(0, 1, 3, 2, 4, 5).reshape(b * h * w, n, cr)
        spec = hsi.permute(0, 2, 3, 1, 4).reshape(b * h * w, s, ch)
        kn, sn = self.norm_rgb(kids), self.norm_hsi(spec)

        k, v = split(self.kv_hsi(sn), 2)
        kids = kids + self.out_rgb(attend(self.q_rgb(kn), k, v, self.heads))
        k, v = split(self.kv_rgb(kn), 2)
        spec = spec + self.out_hsi(attend(self.q_hsi(sn), k, v, self.heads))
        kids = kids + self.mlp_rgb(kids)
        spec = spec + self.mlp_hsi(spec)

        # Collapse the slices of each cell, then hand the cell's vector to each of its children.
        cell = self.to_rgb(self.collapse(spec.reshape(b * h * w, s, 1, 1, ch)).reshape(b * h * w, 1, ch))
        kids = kids + torch.sigmoid(self.gate) * cell
        out = kids.reshape(b, h, w, r, r, cr).permute(0, 1, 3, 2, 4, 5).reshape(b, big_h, big_w, cr)
        return self.norm_out(out)
