"""Shared transformer blocks: MLP, multi-head attention, shifted-window attention.

Tensors are channel-last (B, H, W, C) so that linear layers apply directly.
Every reshape uses Python integers taken from the input's (static) shape: an
exported graph then carries constants, not Shape/Gather chains, which keeps
ONNX Runtime and TensorRT graphs small. Masks and relative-position indices
are built in numpy for the exact grid and become constants too, kept
factorised: the relative-position bias is gathered in the graph from each
layer's learned table ((2 win - 1)^2, heads) by an int index (n, n), one for
all the layers of a window size, and the shifted-window mask is one small table
per window row and one per window column, each added to the scores by
broadcasting. Summed into one tensor they would be (windows, heads, 64, 64)
per layer, which constant folding writes into an exported file: most of its
size at a production strip.
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


def attend(q, k, v, heads: int, bias=None, mask=None):
    """Multi-head attention on (B, Nq, C) queries and (B, Nk, C) keys/values.

    Written out (not scaled_dot_product_attention) so that the export is
    plain MatMul/Softmax, which every runtime has. `bias` (heads, Nq, Nk) is
    added to the scores, then `mask` (a WindowMask) where the batch is windows.
    """
    b, nq, c = dims(q)
    nk = int(k.shape[1])
    hd = c // heads
    q = q.reshape(b, nq, heads, hd).transpose(1, 2) * (hd ** -0.5)
    k = k.reshape(b, nk, heads, hd).transpose(1, 2)
    v = v.reshape(b, nk, heads, hd).transpose(1, 2)
    attn = q @ k.transpose(-2, -1)
    if bias is not None:
        attn = attn + bias
    if mask is not None:
        attn = mask.apply(attn)
    out = attn.softmax(-1) @ v
    return out.transpose(1, 2).reshape(b, nq, c)


class SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, bias=None, mask=None):
        q, k, v = split(self.qkv(x), 3)
        return self.proj(attend(q, k, v, self.heads, bias, mask))


class WindowMask:
    """The additive mask of a shifted-window layer, factorised by window row and window column.

    Two tokens of a window may attend to each other when they come from the same
    region along the strip (rows) and the same region across it (columns):
    neither wrapped around by the cyclic shift from the far side, nor padding.
    `rows` (nh, wh, wh) holds, for each row of windows, MASKED between token rows of
    different regions and 0 elsewhere; `cols` (nw, ww, ww) the same across; either
    is None where that axis is neither shifted nor padded. A pair in different
    regions along both gets 2 x MASKED, still finite in FP16 and 0 after softmax.
    A padding token may attend to other padding only partly: its output is
    cropped, and no real token ever attends to it.
    """

    def __init__(self, nh: int, nw: int, wh: int, ww: int, rows: np.ndarray | None, cols: np.ndarray | None):
        self.nh, self.nw, self.wh, self.ww = nh, nw, wh, ww
        self.rows = None if rows is None else torch.from_numpy(rows)
        self.cols = None if cols is None else torch.from_numpy(cols)

    def apply(self, attn):
        """Scores (b x nh x nw windows, heads, n, n) with the mask added; reshapes of constant sizes, at most 7-D."""
        bw, heads, n, _ = dims(attn)
        nh, nw, wh, ww = self.nh, self.nw, self.wh, self.ww
        b = bw // (nh * nw)
        if self.rows is not None:   # query row i, key row j of window row r: (b, r, (c, head), i, ., j, .)
            rows = self.rows.to(attn.dtype).reshape(nh, 1, wh, 1, wh, 1)
            attn = attn.reshape(b, nh, nw * heads, wh, ww, wh, ww) + rows
        if self.cols is not None:   # query column i, key column j of window column c: ((b, r), c, (head, .), i, ., j)
            cols = self.cols.to(attn.dtype).reshape(nw, 1, ww, 1, ww)
            attn = attn.reshape(b * nh, nw, heads * wh, ww, wh, ww) + cols
        return attn.reshape(bw, heads, n, n)


def _regions(n_pad: int, n: int, size: int, s: int) -> np.ndarray:
    """Region of each slot along one axis after a cyclic shift by s: 0 the windows that hold no
    wrapped tokens, 1 and 2 the two parts of the last window, 3 padding."""
    pos = np.arange(n_pad)
    orig = (pos + s) % n_pad  # the unshifted position a shifted slot holds
    reg = np.where(pos < n_pad - size, 0, np.where(pos < n_pad - s, 1, 2)) if s else np.zeros(n_pad, int)
    return np.where(orig >= n, 3, reg)


def _axis_mask(n_pad: int, n: int, size: int, s: int) -> np.ndarray | None:
    """(windows along the axis, size, size): 0 between slots of one region, MASKED between others."""
    if not s and n_pad == n:
        return None
    reg = _regions(n_pad, n, size, s).reshape(n_pad // size, size)
    return np.where(reg[:, :, None] == reg[:, None, :], 0.0, MASKED).astype(np.float32)


@functools.lru_cache(maxsize=64)
def _window_tables(h: int, w: int, win: int, shift: bool):
    """Window size, shift, padded grid, the mask (a WindowMask, or None) and the
    relative-position index for a shifted-window layer on an h x w grid.

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
    rows, cols = _axis_mask(hp, h, wh, sh), _axis_mask(wp, w, ww, sw)
    mask = None if rows is None and cols is None else WindowMask(hp // wh, wp // ww, wh, ww, rows, cols)

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
        if hp != h or wp != w:   # a Pad op: zeros concatenated would be constants of the grid's size in the export
            y = F.pad(y, (0, 0, 0, wp - w, 0, hp - h))
        if sh or sw:
            y = torch.roll(y, (-sh, -sw), (1, 2))
        nh, nw, n = hp // wh, wp // ww, wh * ww
        y = y.reshape(b, nh, wh, nw, ww, c).permute(0, 1, 3, 2, 4, 5).reshape(b * nh * nw, n, c)
        # A 2-D index keeps this Gather in the exported graph: the exporter's constant folding folds a Gather
        # only with a 1-D index, and folded this would be an expanded (heads, n, n) constant in every layer.
        bias = self.bias_table[torch.from_numpy(index)].permute(2, 0, 1)
        y = self.attn(y, bias, mask)
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
