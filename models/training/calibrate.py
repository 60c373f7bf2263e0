"""Calibrated confidence: a softmax temperature fitted on the validation split, and its calibration error.

The plan thresholds the model's confidence (`recipe.min_confidence`) as if it
were the probability of the class being right. A network trained with
cross-entropy is usually over-confident; dividing its logits by one
temperature T > 1, fitted to minimise the negative log-likelihood of the
validation pixels (temperature scaling, Guo et al. 2017), makes the max
softmax track accuracy without changing any class. T is stored in the
model config and applied in the deployed graph (models.net.Deployed), so
the ONNX file, an engine and the infer node give the calibrated confidence
with nothing new to do.

Expected calibration error (ECE), pixel-level: the pixels are put into 15
equal-width bins of their max-softmax confidence, and ECE is the mean over
pixels of |accuracy of the bin - mean confidence of the bin|. Both the fit
and the ECE take the mask as the infer node gives it: with
`model.mask_stride` k, every RGB pixel gets the class and confidence of its
k x k cell, and is right or wrong by its own label.
"""

from __future__ import annotations

import numpy as np
import torch

BINS = 15


class CalibrationBins:
    """Pixel counts, summed confidence and correct pixels per confidence bin, accumulated strip by strip."""

    def __init__(self, bins: int = BINS):
        self.count = np.zeros(bins, np.int64)
        self.confidence = np.zeros(bins, np.float64)
        self.correct = np.zeros(bins, np.int64)

    def add(self, confidence: np.ndarray, correct: np.ndarray) -> None:
        bins = len(self.count)
        # bin b holds (b / bins, (b + 1) / bins]; a confidence of 1/K or less (K classes) still lands in bin 0
        index = np.clip(np.ceil(confidence.ravel() * bins).astype(np.int64) - 1, 0, bins - 1)
        self.count += np.bincount(index, minlength=bins)
        self.confidence += np.bincount(index, confidence.ravel().astype(np.float64), minlength=bins)
        self.correct += np.bincount(index, correct.ravel(), minlength=bins).astype(np.int64)

    def ece(self) -> float:
        n = self.count.sum()
        if not n:
            return float("nan")
        seen = self.count > 0
        gap = np.abs(self.correct[seen] / self.count[seen] - self.confidence[seen] / self.count[seen])
        return float((gap * self.count[seen]).sum() / n)


def max_softmax(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """The winning class's probability per pixel (logits (B, K, H, W) -> (B, H, W))."""
    return (logits / temperature).softmax(1).max(1).values


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor, iterations: int = 50) -> float:
    """The temperature minimising the NLL of labels (N,) under logits (N, K): LBFGS on log T (T stays positive)."""
    logits, labels = logits.detach().double(), labels.detach().long()
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.5, max_iter=iterations, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(logits / log_t.exp(), labels)
        loss.backward()
        return loss

    opt.step(closure)
    return float(log_t.detach().exp())


def cell_logits(net, sample, overlap: int = 0, stride: int = 1) -> torch.Tensor:
    """The logits (K, core lines / stride, W / stride) the deployed model takes its classes and confidence from:
    on the mask's grid, `stride` RGB pixels a cell (models.net.Deployed), without the overlap lines."""
    device = next(net.parameters()).device
    out = net(torch.from_numpy(sample.rgb[None].astype(np.float32)).to(device),
              torch.from_numpy(sample.hsi[None]).to(device), stride)[0]
    cut = overlap // stride
    return (out[:, cut:out.shape[1] - cut] if cut else out).cpu()


def validation_pixels(net, dataset, overlap: int = 0, stride: int = 1, pixels: int = 1_000_000, seed: int = 0):
    """Logits (N, K) and labels (N,) of up to `pixels` RGB pixels drawn evenly from every sample's core lines,
    each pixel with the logits of its mask cell."""
    per_sample = max(1, pixels // max(len(dataset), 1))
    rng = np.random.default_rng(seed)
    logits, labels = [], []
    net.eval()
    with torch.no_grad():
        for i in range(len(dataset)):
            s = dataset[i]
            cells = cell_logits(net, s, overlap, stride)
            truth = s.labels[overlap:s.labels.shape[0] - overlap]
            take = rng.choice(truth.size, min(per_sample, truth.size), replace=False)
            y, x = np.divmod(take, truth.shape[1])
            logits.append(cells[:, y // stride, x // stride].T)
            labels.append(torch.from_numpy(truth[y, x].astype(np.int64)))
    return torch.cat(logits), torch.cat(labels)


def calibrate(net, dataset, overlap: int = 0, stride: int = 1) -> float:
    """Fit the temperature of net on a (validation) data set, on the mask grid of `stride` the infer node
    gives; returns it (the caller stores it in the config)."""
    return fit_temperature(*validation_pixels(net, dataset, overlap, stride))
