"""The segmentation network: RGB backbone, HSI backbone, per-stage fusion, decoder.

One class builds all three variants from a ModelConfig:
- fusion: both backbones (independent: they could run concurrently), a
  CrossFusion at every stage, the decoder on the fused maps (RGB grids);
- rgb: the RGB backbone and the decoder;
- hsi: the HSI backbone, each stage collapsed over its slices, the decoder
  (on the HSI grids, resized to the RGB strip at the end).

SortNet takes float32, channel-last: rgb (B, H, W, 3) 0..255, hsi (B, H/r,
W/r, bands) reflectance; scaling (per band, where the config has band
statistics) is part of the graph. Deployed takes what a
strip carries (uint8 RGB, float16 HSI) and converts it in the graph, on the
device that runs it.
"""

from __future__ import annotations

import torch
from torch import nn

from sortline.models.blocks import dims, init_weights
from sortline.models.config import ModelConfig
from sortline.models.decoder import Decoder
from sortline.models.fusion import CrossFusion
from sortline.models.hsi import HSIBackbone, SliceCollapse
from sortline.models.rgb import RGBBackbone


class SortNet(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = c = config.validate()
        self.rgb = self.hsi = self.fusion = self.collapse = None
        if c.uses_rgb:
            self.rgb = RGBBackbone(c.rgb_dims, c.rgb_depths, c.rgb_heads, c.window, c.mlp_ratio)
        if c.uses_hsi:
            self.hsi = HSIBackbone(c.bands, c.slices, c.hsi_patch, c.hsi_dims, c.hsi_depths, c.hsi_heads,
                                   c.hsi_merge, c.window, c.mlp_ratio)
        if c.variant == "fusion":
            self.fusion = nn.ModuleList([CrossFusion(cr, chs, h, c.mlp_ratio)
                                         for cr, chs, h in zip(c.rgb_dims, c.hsi_dims, c.rgb_heads)])
        elif c.variant == "hsi":
            self.collapse = nn.ModuleList([SliceCollapse(d) for d in c.hsi_dims])
        self.decoder = Decoder(c.hsi_dims if c.variant == "hsi" else c.rgb_dims, c.decoder_dim, len(c.classes))
        init_weights(self)
        # Per-band normalisation: constants of the config (not weights, so not in the state dict).
        band = c.hsi_band_mean and c.hsi_band_std
        self.register_buffer("hsi_shift", torch.tensor(c.hsi_band_mean) if band else None, persistent=False)
        self.register_buffer("hsi_scale", torch.tensor(c.hsi_band_std) if band else None, persistent=False)

    def forward(self, rgb, hsi, stride: int = 1):
        """Logits (B, K, H/stride, W/stride): per RGB pixel, or on a grid `stride` (1, 2 or 4) coarser."""
        c = self.config
        size = tuple(d // stride for d in dims(rgb)[1:3])
        if c.uses_rgb:
            rgb_maps = self.rgb(((rgb - c.rgb_mean) / c.rgb_std).permute(0, 3, 1, 2))
        if c.uses_hsi:
            if c.hsi_input == "absorbance":
                hsi = -torch.log(torch.clamp(hsi, min=1e-3))
            if self.hsi_shift is None:
                hsi_maps = self.hsi((hsi - c.hsi_mean) / c.hsi_std)
            else:
                hsi_maps = self.hsi((hsi - self.hsi_shift) / self.hsi_scale)
        if c.variant == "fusion":
            maps = [f(r, h) for f, r, h in zip(self.fusion, rgb_maps, hsi_maps)]
        elif c.variant == "rgb":
            maps = rgb_maps
        else:
            maps = [col(h) for col, h in zip(self.collapse, hsi_maps)]
        return self.decoder(maps, size)


class Deployed(nn.Module):
    """What is exported: the input conversion, the network, the overlap cropped, the class and its confidence.

    Inputs rgb (B, H, W, 3) uint8 and hsi (B, H/r, W/r, bands) float16, as the
    register node makes them (any dtype is taken): turned into float32 here,
    inside the graph, so that a host copies 5 bytes a pixel to a GPU, not 16.
    Outputs classes (B, core lines / stride, W / stride) int32 and confidence
    (same shape) float32 (the winning class's softmax probability, at the
    model's fitted temperature where it has one: calibrated). With
    stride 4 the mask is the decoder's own grid: no upsampling, and 16 times
    fewer pixels to take the argmax of and to turn into objects.
    """

    def __init__(self, net: SortNet, overlap: int, stride: int = 1):
        super().__init__()
        if overlap % stride:
            raise ValueError(f"overlap {overlap} must be a multiple of the mask stride {stride}")
        self.net, self.overlap, self.stride = net, overlap // stride, stride

    def forward(self, rgb, hsi):
        logits = self.net(rgb.to(torch.float32), hsi.to(torch.float32), self.stride)
        h = int(logits.shape[2])
        if self.overlap:
            logits = logits[:, :, self.overlap:h - self.overlap]
        if self.net.config.temperature != 1.0:   # uncalibrated models keep the graph they always had
            logits = logits / self.net.config.temperature
        # max softmax = 1 / sum(exp(logit - max)): no full softmax over the classes
        top = logits.max(dim=1, keepdim=True).values
        conf = 1.0 / (logits - top).exp().sum(dim=1)
        return logits.argmax(dim=1).to(torch.int32), conf


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
