"""Shared transformer blocks: MLP, multi-head attention, shifted-window attention.

Tensors are channel-last (B, H, W, C) so that linear layers apply directly.
Every reshape uses Python integers taken from the input's (static) shape: an
exported graph then carries constants, not Shape/Gather chains, which keeps
ONNX Runtime and TensorRT graphs small. Masks and relative-position indices
are built in numpy for the exact grid and become constants too.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

MASKED = -1.0e4  # additive mask value; finite so it stays finite in FP16


def dims(t: torch.Tensor) -> list[int]:
    """The shape as Python ints: constants in a traced graph."""
    return [int(d) for d in t.shape]


class Mlp(nn.Module):
    def __init__(self, dim: int, ratio: float, out: int | None = None):
        super().__init__()
        hidden = int(dim * ratio)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, out or dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


def split(x, parts: int):
    """Equal parts of the last axis, with constant sizes (chunk() exports a Shape op)."""
    c = int(x.shape[-1]) // parts
    return torch.split(x, [c] * parts, dim=-1)


def attend(q, k, v, heads: int, bias=None):
    """Multi-head attention on (B, Nq, C) queries and (B, Nk, C) keys/values.

    Written out (not scaled_dot_product_attention) so that the export is
    plain MatMul/Softmax, which every runtime has. `bias` is added to the
    scores: (heads, Nq, Nk), or (G, heads, Nq, Nk) for a batch that is
    B groups of G (the windows of one image), broadcast without copies.
    """
    b, nq, c = dims(q)
    nk = int(k.shape[1])
    hd = c // heads
    q = q.reshape(b, nq, heads, hd).transpose(1, 2) * (hd ** -0.5)
    k = k.reshape(b, nk, heads, hd).transpose(1, 2)
    v = v.reshape(b, nk, heads, hd).transpose(1, 2)
    attn = q @ k.transpose(-2, -1)
    if bias is not None and bias.dim() == 4:
        g = int(bias.shape[0])
        attn = (attn.reshape(b // g, g, heads, nq, nk) + bias).reshape(b, heads, nq, nk)
    elif bias is not None:
        attn = attn + bias
    out = attn.softmax(-1) @ v
    return out.transpose(1, 2).reshape(b, nq, c)


class SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, bias=None):
        q, k, v = split(self.qkv(x), 3)
        return self.proj(attend(q, k, v, self.heads, bias))


@functools.lru_cache(maxsize=64)
def _window_tables(h: int, w: int, win: int, shift: bool):
    """Window size, shift, padded grid, the additive mask and the relative-position
    index for a shifted-window layer on an h x w grid.

    A window is win x win, or the whole grid along a side shorter than win
    (then that side is never shifted). The grid is padded up to whole windows;
    padded tokens and, after a cyclic shift, tokens that wrapped around from the
    far side are masked out of each other's attention (a strip never attends
    across its own edges).
    """
    wh, ww = min(win, h), min(win, w)
    sh = wh // 2 if shift and h > win else 0
    sw = ww // 2 if shift and w > win else 0
    hp, wp = -(-h // wh) * wh, -(-w // ww) * ww

    def region(n_pad: int, n: int, size: int, s: int) -> np.ndarray:
        pos = np.arange(n_pad)
        orig = (pos + s) % n_pad  # the unshifted position a shifted slot holds
        reg = np.where(pos < n_pad - size, 0, np.where(pos < n_pad - s, 1, 2)) if s else np.zeros(n_pad, int)
        return np.where(orig >= n, 3, reg)  # 3: padding

    ry, rx = region(hp, h, wh, sh), region(wp, w, ww, sw)
    ids = ry[:, None] * 4 + rx[None, :]
    ids = np.where((ry[:, None] == 3) | (rx[None, :] == 3), -1, ids)
    ids = ids.reshape(hp // wh, wh, wp // ww, ww).transpose(0, 2, 1, 3).reshape(-1, wh * ww)
    need_mask = bool(sh or sw or hp != h or wp != w)
    mask = np.where(ids[:, :, None] == ids[:, None, :], 0.0, MASKED).astype(np.float32) if need_mask else None

    yy, xx = np.meshgrid(np.arange(wh), np.arange(ww), indexing="ij")
    cy, cx = yy.ravel(), xx.ravel()
    index = (cy[:, None] - cy[None, :] + win - 1) * (2 * win - 1) + (cx[:, None] - cx[None, :] + win - 1)
    return wh, ww, sh, sw, hp, wp, mask, index


class WindowBlock(nn.Module):
    """A Swin block: (shifted) window self-attention and an MLP, pre-norm, residual."""

    def __init__(self, dim: int, heads: int, window: int, shift: bool, mlp_ratio: float):
        super().__init__()
        self.heads, self.window, self.shift = heads, window, shift
        self.norm1 = nn.LayerNorm(dim)
        self.attn = SelfAttention(dim, heads)
        self.bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, heads))
        nn.init.trunc_normal_(self.bias_table, std=0.02)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, mlp_ratio)

    def forward(self, x):
        b, h, w, c = dims(x)
        wh, ww, sh, sw, hp, wp, mask, index = _window_tables(h, w, self.window, self.shift)
        y = self.norm1(x)
        if hp != h:
            y = torch.cat([y, torch.zeros((b, hp - h, w, c), dtype=y.dtype, device=y.device)], 1)
        if wp != w:
            y = torch.cat([y, torch.zeros((b, hp, wp - w, c), dtype=y.dtype, device=y.device)], 2)
        if sh or sw:
            y = torch.roll(y, (-sh, -sw), (1, 2))
        nh, nw, n = hp // wh, wp // ww, wh * ww
        y = y.reshape(b, nh, wh, nw, ww, c).permute(0, 1, 3, 2, 4, 5).reshape(b * nh * nw, n, c)
        bias = self.bias_table[torch.from_numpy(index.ravel())].reshape(n, n, self.heads).permute(2, 0, 1)
        if mask is not None:   # per window: (windows, heads, n, n)
            bias = bias.reshape(1, self.heads, n, n) + torch.from_numpy(mask).to(x.dtype).reshape(nh * nw, 1, n, n)
        y = self.attn(y, bias)
        y = y.reshape(b, nh, nw, wh, ww, c).permute(0, 1, 3, 2, 4, 5).reshape(b, hp, wp, c)
        if sh or sw:
            y = torch.roll(y, (sh, sw), (1, 2))
        if hp != h or wp != w:
            y = y[:, :h, :w]
        x = x + y
        return x + self.mlp(self.norm2(x))


class PatchMerge(nn.Module):
    """2x2 neighbouring tokens into one (B, H, W, C) -> (B, H/2, W/2, out)."""

    def __init__(self, dim: int, out: int):
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim)
        self.reduce = nn.Linear(4 * dim, out, bias=False)

    def forward(self, x):
        b, h, w, c = dims(x)
        x = x.reshape(b, h // 2, 2, w // 2, 2, c).permute(0, 1, 3, 2, 4, 5).reshape(b, h // 2, w // 2, 4 * c)
        return self.reduce(self.norm(x))


def stages(dims_, depths, heads, make_block) -> nn.ModuleList:
    """A backbone's stages: make_block(dim, heads, shift) repeated depth times per stage.

    Shifts alternate over the whole backbone, not within each stage, so that a
    stage of depth 1 still has every other stage's windows shifted.
    """
    out, n = nn.ModuleList(), 0
    for dim, depth, head in zip(dims_, depths, heads):
        out.append(nn.Sequential(*[make_block(dim, head, (n + i) % 2 == 1) for i in range(depth)]))
        n += depth
    return out


def init_weights(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
