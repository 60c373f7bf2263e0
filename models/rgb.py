"""The RGB backbone: a small Swin-style hierarchical transformer.

Patch 4 (a 4x4 RGB patch per token), four stages, window attention whose
windows shift every second block, a 2x2 patch merge between stages. Returns
the four stage maps (strides 4, 8, 16, 32), channel-last.
"""

from __future__ import annotations

from torch import nn

from sortline.models.blocks import PatchMerge, WindowBlock, stages


class RGBBackbone(nn.Module):
    def __init__(self, dims, depths, heads, window: int, mlp_ratio: float):
        super().__init__()
        self.embed = nn.Conv2d(3, dims[0], kernel_size=4, stride=4)
        self.embed_norm = nn.LayerNorm(dims[0])
        self.merges = nn.ModuleList([PatchMerge(dims[s - 1], dims[s]) for s in range(1, len(dims))])
        self.stages = stages(dims, depths, heads, lambda d, h, shift: WindowBlock(d, h, window, shift, mlp_ratio))

    def forward(self, x):
        """x: (B, 3, H, W), normalised. Returns [(B, H/4, W/4, C0), ..., (B, H/32, W/32, C3)]."""
        x = self.embed_norm(self.embed(x).permute(0, 2, 3, 1))
        maps = []
        for s, stage in enumerate(self.stages):
            if s:
                x = self.merges[s - 1](x)
            x = stage(x)
            maps.append(x)
        return maps
