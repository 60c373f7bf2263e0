"""mIoU, per-class IoU and the confusion matrix of a model on held-out data (`sortline evaluate`).

One confusion matrix is accumulated over the whole held-out set (pixels, not
images, are counted). IoU = TP / (TP + FP + FN) per class; mIoU is the mean
over the classes present in the set, the background class (index 0: the
belt) excluded, as the SpectralWaste and BCAF evaluations do.

On the synthetic belt each held-out strip is run whole (strip + overlap, as
the infer node does) and scored on its core lines only. A data set that
knows each pixel's look (the synthetic belt does) gets, for the groups that
RGB alone cannot tell apart (clear PET/PS/PP, white HDPE/PP, black items),
their own pixel accuracy. The confidence is scored too: its expected
calibration error (models.training.calibrate), pixel-level, of the raw
softmax and, for a model with a fitted temperature, of its calibrated one.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import torch

from sortline.models.training.calibrate import CalibrationBins, cell_logits, max_softmax

# Groups of (materials, look) whose RGB appearance is the same: where HSI must help.
LOOK_GROUPS = {
    "clear_PET_PS_PP": (("PET", "PS", "PP"), ("clear",)),
    "white_HDPE_PP": (("HDPE", "PP"), ("white",)),
    "black_all": (None, ("black",)),
}


def look_masks(looks: np.ndarray, endmembers: tuple[tuple[str, str], ...]) -> dict[str, np.ndarray]:
    """Per look group, the pixels showing it (looks: indexes into the data set's (material, look) table)."""
    out = {}
    for name, (materials, variants) in LOOK_GROUPS.items():
        ids = [i for i, (m, v) in enumerate(endmembers)
               if v in variants and (materials is None or m in materials) and m not in ("belt", "target")]
        out[name] = np.isin(looks, ids)
    return out


def scores(confusion: np.ndarray, classes: tuple[str, ...]) -> dict:
    tp = np.diag(confusion).astype(np.float64)
    fp = confusion.sum(0) - tp
    fn = confusion.sum(1) - tp
    present = confusion.sum(1) > 0
    iou = np.where(tp + fp + fn > 0, tp / np.maximum(tp + fp + fn, 1), np.nan)
    counted = present.copy()
    counted[0] = False
    return {"miou": float(np.nanmean(iou[counted])) if counted.any() else float("nan"),
            "per_class_iou": {c: (None if np.isnan(v) or not p else round(float(v), 4))
                              for c, v, p in zip(classes, iou, present)},
            "pixel_accuracy": float(tp.sum() / max(confusion.sum(), 1))}


def table(confusion: np.ndarray, classes: tuple[str, ...], result: dict) -> str:
    """The confusion matrix (rows: truth, columns: prediction, % of the row) with IoU per class."""
    width = max(6, max(len(c) for c in classes) + 1)
    head = " " * width + "".join(f"{c[:6]:>7}" for c in classes) + "    IoU"
    lines = [head]
    rows = confusion / np.maximum(confusion.sum(1, keepdims=True), 1) * 100
    for c, row in zip(classes, rows):
        iou = result["per_class_iou"][c]
        lines.append(f"{c:<{width}}" + "".join(f"{v:7.1f}" for v in row) + (f"  {iou:5.3f}" if iou is not None else "      -"))
    lines.append(f"mIoU (classes present, {classes[0]} excluded): {result['miou']:.4f}; "
                 f"pixel accuracy {result['pixel_accuracy']:.4f}")
    return "\n".join(lines)


def confusion_png(path: str | Path, confusion: np.ndarray, classes: tuple[str, ...]) -> None:
    """A row-normalised confusion matrix as an image (rows: truth, columns: prediction)."""
    k, cell, margin = len(classes), 48, 110
    rows = confusion / np.maximum(confusion.sum(1, keepdims=True), 1)
    img = np.full((margin + k * cell + 10, margin + k * cell + 10, 3), 255, np.uint8)
    for i in range(k):
        for j in range(k):
            v = rows[i, j]
            colour = tuple(int(255 - v * 200) for _ in range(2)) + (255,)   # white -> blue
            y, x = margin + i * cell, margin + j * cell
            cv2.rectangle(img, (x, y), (x + cell - 1, y + cell - 1), colour[::-1], -1)
            cv2.putText(img, f"{v * 100:.0f}", (x + 8, y + 30), cv2.FONT_HERSHEY_SIMPLEX, 0.5,
                        (255, 255, 255) if v > 0.5 else (0, 0, 0), 1, cv2.LINE_AA)
        cv2.putText(img, classes[i][:10], (4, margin + i * cell + 30), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1)
        label = np.full((cell, margin - 4, 3), 255, np.uint8)
        cv2.putText(label, classes[i][:10], (4, 30), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1)
        img[4:margin, margin + i * cell:margin + (i + 1) * cell] = np.rot90(label)[:margin - 4]
    cv2.putText(img, "truth \\ predicted, % of row", (4, 16), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 0), 1)
    cv2.imwrite(str(path), img)


def evaluate(net, dataset, overlap: int = 0, indices=None, mask_stride: int = 1) -> dict:
    """Run the model on every sample (or those of `indices`); the confusion matrix, scores, look-group
    accuracies (per RGB pixel) and the expected calibration error of its confidence (raw softmax and at
    the model's temperature) on the mask grid of `mask_stride` the infer node gives, per RGB pixel."""
    classes = tuple(net.config.classes)
    k = len(classes)
    temperature = net.config.temperature
    confusion = np.zeros((k, k), np.int64)
    looks = {name: [0, 0] for name in LOOK_GROUPS}
    raw, calibrated = CalibrationBins(), CalibrationBins()
    device = next(net.parameters()).device
    with torch.no_grad():
        for i in range(len(dataset)) if indices is None else indices:
            s = dataset[i]
            logits = net(torch.from_numpy(s.rgb[None].astype(np.float32)).to(device),
                         torch.from_numpy(s.hsi[None]).to(device))
            if overlap:
                logits = logits[:, :, overlap:-overlap]
            pred = logits[0].argmax(0).cpu().numpy()
            truth = s.labels[overlap:-overlap] if overlap else s.labels
            cells = logits[0].cpu() if mask_stride == 1 else cell_logits(net, s, overlap, mask_stride)

            def pixels(cell_values):   # every RGB pixel with its cell's class or confidence
                return np.repeat(np.repeat(cell_values, mask_stride, 0), mask_stride, 1)

            correct = pixels(cells.argmax(0).numpy()) == truth
            raw.add(pixels(max_softmax(cells[None])[0].numpy()), correct)
            if temperature != 1.0:
                calibrated.add(pixels(max_softmax(cells[None], temperature)[0].numpy()), correct)
            confusion += np.bincount(truth.astype(np.int64).ravel() * k + pred.ravel(),
                                     minlength=k * k).reshape(k, k)
            if s.looks is not None:
                lk = s.looks[overlap:-overlap] if overlap else s.looks
                for name, mask in look_masks(lk, dataset.endmembers).items():
                    looks[name][0] += int((pred[mask] == truth[mask]).sum())
                    looks[name][1] += int(mask.sum())
    result = scores(confusion, classes)
    result["look_accuracy"] = {n: round(c / t, 4) for n, (c, t) in looks.items() if t}
    result["ece_raw"] = raw.ece()
    result["ece"] = calibrated.ece() if temperature != 1.0 else result["ece_raw"]
    result["temperature"] = temperature
    result["mask_stride"] = mask_stride
    result["confusion"] = confusion.tolist()
    result["classes"] = list(classes)
    return result
