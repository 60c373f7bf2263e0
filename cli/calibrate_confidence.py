"""`sortline calibrate-confidence`: fit the softmax temperature of an existing checkpoint on a validation split."""

from __future__ import annotations

import dataclasses
import sys

from sortline.cli import common
from sortline.cli.train import add_data, open_dataset, scored_overlap


def calibrate_confidence(args) -> int:
    import torch

    from sortline.models.contract import model_file
    from sortline.models.training import checkpoint
    from sortline.models.training.calibrate import calibrate
    from sortline.models.training.evaluate import evaluate

    torch.set_num_threads(args.threads)
    net, meta = checkpoint.load(model_file(args.model))
    val = open_dataset(args, "val")
    if tuple(val.classes) != tuple(net.config.classes) or val.bands != net.config.bands:
        print(f"sortline: {args.model} is for classes {net.config.classes} and {net.config.bands} bands; "
              f"the data has {val.classes} and {val.bands}", file=sys.stderr)
        return 2
    overlap, stride = scored_overlap(args), common.load(args.config).model.mask_stride
    t = calibrate(net, val, overlap, stride)
    net.config = dataclasses.replace(net.config, temperature=t)
    result = evaluate(net, val, overlap, mask_stride=stride)
    extra = {k: v for k, v in meta.items() if k not in ("format", "config", "step", "hash", "optim_groups")}
    out = checkpoint.save(args.out, net, int(meta.get("step", 0)), extra={**extra, "calibrated_from": meta.get("hash", "")})
    print(f"softmax temperature {t:.4f}, fitted on {len(val)} validation samples (mask stride {stride}); their "
          f"expected calibration error {result['ece_raw']:.4f} raw, {result['ece']:.4f} calibrated")
    print(f"wrote {out}: model {checkpoint.read(out)[2]['hash']} (from {meta.get('hash', '')}); export it again for "
          "ONNX Runtime or an engine")
    return 0


def add(sub) -> None:
    p = sub.add_parser("calibrate-confidence", help="fit a checkpoint's softmax temperature on validation data",
                       description="Fit one softmax temperature on the validation split (LBFGS on the negative "
                       "log-likelihood of its pixels) and write the checkpoint with it: the confidence its "
                       "exports give, and the plan thresholds, is then calibrated. The classes do not change. "
                       "Needs the .[train] extra.")
    p.add_argument("model", help="checkpoint (.safetensors, or shipped:NAME)")
    p.add_argument("--out", required=True, help="the calibrated checkpoint")
    add_data(p)
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.set_defaults(func=calibrate_confidence)
