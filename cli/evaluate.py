"""`sortline evaluate`: mIoU, per-class IoU and the confusion matrix of a checkpoint on held-out data."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from sortline.cli import common
from sortline.cli.train import add_data, open_dataset, scored_overlap


def evaluate(args) -> int:
    import numpy as np
    import torch

    from sortline.models.contract import model_file
    from sortline.models.training import checkpoint
    from sortline.models.training.evaluate import confusion_png, evaluate as run, table

    torch.set_num_threads(args.threads)
    net, meta = checkpoint.load(model_file(args.model))
    data = open_dataset(args, args.split if args.data == "spectralwaste" else "held-out")
    if tuple(data.classes) != tuple(net.config.classes) or data.bands != net.config.bands:
        print(f"sortline: {args.model} is for classes {net.config.classes} and {net.config.bands} bands; "
              f"the data has {data.classes} and {data.bands}", file=sys.stderr)
        return 2
    result = run(net, data, scored_overlap(args), mask_stride=common.load(args.config).model.mask_stride)
    result.update(model=meta.get("hash", ""), variant=net.config.variant, size=net.config.size, samples=len(data))
    classes = tuple(net.config.classes)
    print(table(np.array(result["confusion"]), classes, result))
    for name, acc in result["look_accuracy"].items():
        print(f"pixel accuracy, {name}: {acc:.4f}")
    if result["temperature"] != 1.0:
        print(f"expected calibration error (15 bins, per pixel, max softmax, mask stride {result['mask_stride']}): "
              f"{result['ece_raw']:.4f} raw, {result['ece']:.4f} at the model's temperature {result['temperature']:.3f}")
    else:
        print(f"expected calibration error (15 bins, per pixel, max softmax, mask stride {result['mask_stride']}): "
              f"{result['ece']:.4f} (raw softmax: no fitted temperature)")
    if args.png:
        confusion_png(args.png, np.array(result["confusion"]), classes)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return 0


def add(sub) -> None:
    p = sub.add_parser("evaluate", help="mIoU, per-class IoU and confusion matrix of a model on held-out data",
                       description="Evaluate a checkpoint on held-out data: mIoU, per-class IoU, a confusion matrix "
                       "as a table and a PNG; --json PATH for the figures. Needs the .[train] extra.")
    p.add_argument("model", help="checkpoint (.safetensors, or shipped:NAME)")
    add_data(p)
    p.add_argument("--split", default="test", help="SpectralWaste: the split to evaluate")
    p.add_argument("--png", default="", help="write the confusion matrix here as a PNG")
    p.add_argument("--json", default="", metavar="PATH", help="write miou and per-class IoU here")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.set_defaults(func=evaluate)
