"""Training a model on a data set (`sortline train`: the synthetic belt or SpectralWaste).

Seeded and resumable: the crops of step k depend only on (seed, k), and the
training checkpoint (OUT/last.safetensors, every --save-every steps and at
the end) holds the weights, the optimiser state and the step, so a stopped
run continued with --resume ends with the same weights as an uninterrupted
one. The final weights alone go to OUT/model.safetensors.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from sortline.models.training import checkpoint
from sortline.models.config import make_config
from sortline.models.training.data import Crops, batch, class_frequencies
from sortline.models.net import SortNet


def loss_fn(logits, target, weights):
    """Class-weighted cross-entropy plus soft Dice (rare classes still count)."""
    ce = F.cross_entropy(logits, target, weight=weights)
    prob = logits.softmax(1)
    onehot = F.one_hot(target, logits.shape[1]).permute(0, 3, 1, 2).to(prob.dtype)
    inter = (prob * onehot).sum((0, 2, 3))
    union = prob.sum((0, 2, 3)) + onehot.sum((0, 2, 3))
    dice = 1 - ((2 * inter + 1) / (union + 1)).mean()
    return ce + 0.5 * dice


def lr_at(step: int, steps: int, base: float, warmup: int) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return base * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * t)))


class Progress:
    """One line per report: step, mean loss since the last report, speed, time left
    (a bar when on a terminal)."""

    def __init__(self, total: int, start: int, every: int):
        self.total, self.start, self.every = total, start, every
        self.t0 = time.monotonic()
        self.tty = sys.stderr.isatty()
        self.losses: list[float] = []

    def __call__(self, step: int, loss: float) -> None:
        done = step + 1
        self.losses.append(loss)
        if done % self.every and done != self.total:
            return
        loss, self.losses = sum(self.losses) / len(self.losses), []
        rate = (done - self.start) / max(time.monotonic() - self.t0, 1e-9)
        left = (self.total - done) / rate if rate else 0
        bar = "#" * int(30 * done / self.total)
        line = (f"[{bar:<30}] step {done}/{self.total}  loss {loss:.3f}  {rate:.2f} steps/s  "
                f"{int(left) // 60}:{int(left) % 60:02d} left")
        print("\r" + line if self.tty else line, end="" if self.tty and done != self.total else "\n",
              file=sys.stderr, flush=True)


def train(data, args) -> Path:
    """Train on a data set (models.training.data's interface) with the `sortline train` options in args;
    the model's classes are the data set's."""
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    out = Path(args.out)
    config = make_config(args.size, args.variant, classes=tuple(data.classes), bands=data.bands, ratio=data.ratio)
    config.check_strip(args.crop_lines, args.crop_width)
    net = SortNet(config)
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    run_info = {"variant": args.variant, "size": args.size, "seed": args.seed, "steps": args.steps,
                "batch": args.batch, "crop": f"{args.crop_lines}x{args.crop_width}", "data": args.data,
                "lr": args.lr, "warmup": args.warmup}
    start = 0
    last = out / "last.safetensors"
    if args.resume:
        if not last.exists():
            raise SystemExit(f"sortline: --resume: no {last} to resume from")
        stopped, meta = checkpoint.load(last)
        before = json.loads(meta.get("train", "{}"))
        changed = {k: (before.get(k), v) for k, v in run_info.items() if before.get(k) != v}
        if stopped.config != config or changed:
            raise SystemExit(f"sortline: --resume: {last} was started with other settings "
                             f"{changed or 'for another model or dataset'}; resume with the same ones")
        net.load_state_dict(stopped.state_dict())
        checkpoint.restore_optimizer(opt, last)
        start = int(meta["step"])
        print(f"resuming at step {start} from {last}", file=sys.stderr)
    freq = class_frequencies(data, len(config.classes))
    # Soft inverse-frequency weights (power 0.5), mean 1 over the classes present.
    weights = np.where(freq > 0, 1.0 / np.sqrt(np.maximum(freq, 1e-6)), 0.0)
    weights = torch.tensor(weights / weights[freq > 0].mean(), dtype=torch.float32)
    crops = Crops(data, args.crop_lines, args.crop_width, args.seed, align=config.hsi_patch)
    progress = Progress(args.steps, start, args.log_every)
    t0 = time.monotonic()
    net.train()
    for step in range(start, args.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.steps, args.lr, args.warmup)
        rgb, hsi, labels = batch([crops.sample(step * args.batch + i) for i in range(args.batch)])
        logits = net(torch.from_numpy(rgb), torch.from_numpy(hsi))
        loss = loss_fn(logits, torch.from_numpy(labels), weights)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        progress(step, float(loss.detach()))
        if (step + 1) % args.save_every == 0 or step + 1 == args.steps:
            checkpoint.save(last, net, step + 1, opt, extra={"train": json.dumps(run_info)})
    net.eval()
    run_info["train_seconds"] = round(time.monotonic() - t0, 1)
    final = checkpoint.save(out / "model.safetensors", net, args.steps, extra={"train": json.dumps(run_info)})
    print(f"wrote {final} ({final.stat().st_size / 1e6:.1f} MB, {sum(p.numel() for p in net.parameters()):,} "
          f"parameters) after {run_info['train_seconds']:.0f} s", file=sys.stderr)
    return final
