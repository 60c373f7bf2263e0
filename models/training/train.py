"""Training a model on a data set (`sortline train`: the synthetic belt, SpectralWaste, a folder).

Seeded and resumable: the crops of step k depend only on (seed, k), and the
training checkpoint (OUT/last.safetensors, every --save-every steps and at
the end) holds the weights, the optimiser state, the step and the validation
record, so a stopped run continued with --resume ends with the same weights
as an uninterrupted one.

Every --val-every steps the model is scored on the validation split (mIoU);
the best so far is OUT/best.safetensors, and after --patience evaluations
without a better one the run stops early. OUT/model.safetensors is the best
model with its softmax temperature fitted on the validation split
(models.training.calibrate). The HSI is normalised per band with statistics
of the training data, kept in the model config.

Under torchrun (WORLD_SIZE > 1) the run is data-parallel
(DistributedDataParallel: gloo on CPUs, nccl on GPUs): rank k of n draws
crops k * batch / n ... (k + 1) * batch / n - 1 of each step's batch, and the
loss is that of the whole batch (its sums are added across the processes),
so n processes take the steps one process would. Only rank 0 writes files
and logs.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from sortline.models.training import checkpoint
from sortline.models.config import make_config
from sortline.models.training.calibrate import calibrate
from sortline.models.training.data import Augment, Crops, batch, class_frequencies
from sortline.models.training.evaluate import evaluate, scores
from sortline.models.net import SortNet


class Ranks:
    """The processes of a run: one, or those torchrun started (RANK, WORLD_SIZE, LOCAL_RANK in the environment)."""

    def __init__(self):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.device = torch.device("cpu")
        if torch.cuda.is_available():
            self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(self.device)
        if self.world > 1:
            torch.distributed.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
            # The sums inside the forward and backward passes (loss, batch norm) on a group of their own,
            # never interleaved with DistributedDataParallel's gradient buckets.
            self.group = torch.distributed.new_group()

    @property
    def main(self) -> bool:
        return self.rank == 0

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        """t summed over the processes, differentiably (the gradient reaches each process's share)."""
        if self.world == 1:
            return t
        from torch.distributed.nn.functional import all_reduce

        return all_reduce(t, group=self.group)

    def total(self, array: np.ndarray) -> np.ndarray:
        if self.world == 1:
            return array
        t = torch.from_numpy(np.ascontiguousarray(array)).to(self.device)
        torch.distributed.all_reduce(t)
        return t.cpu().numpy()

    def close(self) -> None:
        if self.world > 1:
            torch.distributed.destroy_process_group()


class GlobalBatchNorm(torch.nn.BatchNorm2d):
    """Batch norm whose training statistics are those of the whole global batch, summed over the processes
    (torch's SyncBatchNorm runs on GPUs only); the same parameters and buffers as the BatchNorm2d it replaces."""

    total = None

    @classmethod
    def convert(cls, module: torch.nn.Module, total) -> None:
        for name, child in module.named_children():
            if type(child) is torch.nn.BatchNorm2d:
                child.__class__, child.total = cls, total
            else:
                cls.convert(child, total)

    def forward(self, x):
        if not self.training:
            return super().forward(x)
        n = self.total(torch.tensor(float(x.numel() // x.shape[1]), device=x.device))
        mean = self.total(x.sum((0, 2, 3))) / n
        var = self.total(((x - mean[None, :, None, None]) ** 2).sum((0, 2, 3))) / n
        with torch.no_grad():
            m = self.momentum
            self.running_mean.mul_(1 - m).add_(m * mean)
            self.running_var.mul_(1 - m).add_(m * var * n / (n - 1))
            self.num_batches_tracked += 1
        scale = self.weight / torch.sqrt(var + self.eps)
        return (x - mean[None, :, None, None]) * scale[None, :, None, None] + self.bias[None, :, None, None]


def loss_fn(logits, target, weights, total=lambda t: t):
    """Class-weighted cross-entropy plus soft Dice (rare classes still count), over the batch: `total` sums
    each part over the processes of a distributed run, so that every process has the loss of the whole batch."""
    ce = total(F.cross_entropy(logits, target, weight=weights, reduction="sum")) / total(weights[target].sum())
    prob = logits.softmax(1)
    onehot = F.one_hot(target, logits.shape[1]).permute(0, 3, 1, 2).to(prob.dtype)
    inter = total((prob * onehot).sum((0, 2, 3)))
    union = total(prob.sum((0, 2, 3)) + onehot.sum((0, 2, 3)))
    dice = 1 - ((2 * inter + 1) / (union + 1)).mean()
    return ce + 0.5 * dice


def band_statistics(data, config, limit: int = 64) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-band mean and standard deviation of the HSI as the network takes it (absorbance where the config
    says so), over (up to `limit`) samples spread over the data set."""
    total = np.zeros(config.bands)
    squares = np.zeros(config.bands)
    n = 0
    for i in np.linspace(0, len(data) - 1, min(limit, len(data))).astype(int):
        hsi = data[int(i)].hsi.reshape(-1, config.bands).astype(np.float64)
        if config.hsi_input == "absorbance":
            hsi = -np.log(np.maximum(hsi, 1e-3))
        total += hsi.sum(0)
        squares += (hsi * hsi).sum(0)
        n += len(hsi)
    mean = total / n
    std = np.maximum(np.sqrt(np.maximum(squares / n - mean * mean, 0)), 1e-3)
    return tuple(round(float(v), 6) for v in mean), tuple(round(float(v), 6) for v in std)


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


def train(data, args, val=None, overlap: int = 0, mask_stride: int = 1) -> Path:
    """Train on a data set (models.training.data's interface) with the `sortline train` options in args;
    the model's classes are the data set's. val: the validation split (scored on all but `overlap`
    lines at each end), or None to keep the last weights and fit no temperature; the temperature is
    fitted on the mask grid the infer node will give (mask_stride)."""
    ranks = Ranks()
    try:
        return _train(data, args, val, overlap, mask_stride, ranks)
    finally:
        ranks.close()


def _train(data, args, val, overlap: int, mask_stride: int, ranks: Ranks) -> Path:
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    say = (lambda *a: print(*a, file=sys.stderr, flush=True)) if ranks.main else (lambda *a: None)
    if args.batch % ranks.world:
        raise SystemExit(f"sortline: --batch {args.batch} does not split over {ranks.world} processes")
    out = Path(args.out)
    config = make_config(args.size, args.variant, classes=tuple(data.classes), bands=data.bands, ratio=data.ratio)
    start_from = None
    if args.init:
        # Fine-tuning: the given model's size, variant and HSI normalisation (its weights were trained with
        # them, whatever --size and --variant say), for data of its classes and bands; the temperature is
        # fitted anew.
        start_from, init_meta = checkpoint.load(args.init)
        mine = dataclasses.replace(start_from.config, temperature=1.0)
        differs = [f"{k} {getattr(mine, k)!r}, the data {getattr(config, k)!r}"
                   for k in ("classes", "bands", "ratio") if getattr(mine, k) != getattr(config, k)]
        if differs:
            raise SystemExit(f"sortline: --init {args.init}: the model has " + "; ".join(differs))
        config = mine
        args.size, args.variant = config.size, config.variant
    elif config.uses_hsi:
        mean, std = band_statistics(data, config)
        config = dataclasses.replace(config, hsi_band_mean=mean, hsi_band_std=std).validate()
    config.check_strip(args.crop_lines, args.crop_width)
    net = SortNet(config).to(ranks.device)
    if start_from is not None:
        net.load_state_dict(start_from.state_dict())
        say(f"starting from {args.init} ({config.size} {config.variant}, model hash {init_meta['hash']})")
    model = net
    if ranks.world > 1:
        GlobalBatchNorm.convert(net, ranks.sum)
        model = torch.nn.parallel.DistributedDataParallel(net, device_ids=[ranks.device.index] if
                                                          ranks.device.type == "cuda" else None)
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    val_every = args.val_every if val is not None else 0
    run_info = {"variant": args.variant, "size": args.size, "seed": args.seed, "steps": args.steps,
                "batch": args.batch, "crop": f"{args.crop_lines}x{args.crop_width}", "data": args.data,
                "lr": args.lr, "warmup": args.warmup, "augment": not args.no_augment, "val_every": val_every,
                "patience": args.patience, "init": args.init}
    # The validation record: best mIoU and its step, evaluations since, and every evaluation.
    record = {"best": None, "best_step": 0, "since": 0, "history": []}
    start = 0
    last, best = out / "last.safetensors", out / "best.safetensors"
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
        record = json.loads(meta.get("val", json.dumps(record)))
        say(f"resuming at step {start} from {last}")
    freq = class_frequencies(data, len(config.classes))
    # Soft inverse-frequency weights (power 0.5), mean 1 over the classes present.
    weights = np.where(freq > 0, 1.0 / np.sqrt(np.maximum(freq, 1e-6)), 0.0)
    weights = torch.tensor(weights / weights[freq > 0].mean(), dtype=torch.float32, device=ranks.device)
    crops = Crops(data, args.crop_lines, args.crop_width, args.seed, align=config.hsi_patch,
                  augment=None if args.no_augment else Augment())
    share = args.batch // ranks.world
    progress = Progress(args.steps, start, args.log_every) if ranks.main else (lambda step, loss: None)
    t0 = time.monotonic()
    net.train()
    step = start
    while step < args.steps and not (args.patience and record["since"] >= args.patience):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.steps, args.lr, args.warmup)
        first = step * args.batch + ranks.rank * share
        rgb, hsi, labels = batch([crops.sample(first + i) for i in range(share)])
        logits = model(torch.from_numpy(rgb).to(ranks.device), torch.from_numpy(hsi).to(ranks.device))
        loss = loss_fn(logits, torch.from_numpy(labels).to(ranks.device), weights, ranks.sum)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        step += 1
        progress(step - 1, float(loss.detach()))
        if val_every and (step % val_every == 0 or step == args.steps):
            miou = validate(net, val, overlap, ranks)
            record["history"].append([step, round(miou, 4)])
            if record["best"] is None or miou > record["best"]:
                record.update(best=miou, best_step=step, since=0)
                if ranks.main:
                    checkpoint.save(best, net, step, extra={"train": json.dumps(run_info), "val_miou": miou})
            else:
                record["since"] += 1
            say(f"step {step}: val mIoU {miou:.4f} (best {record['best']:.4f} at step {record['best_step']})")
        stopping = args.patience and record["since"] >= args.patience
        if ranks.main and (step % args.save_every == 0 or step == args.steps or stopping):
            checkpoint.save(last, net, step, opt, extra={"train": json.dumps(run_info), "val": json.dumps(record)})
    if not ranks.main:
        return out / "model.safetensors"
    run_info["train_seconds"] = round(time.monotonic() - t0, 1)
    if step < args.steps:
        say(f"stopped early at step {step}: {args.patience} evaluations without a better val mIoU")
    extra = {"train": json.dumps(run_info), "val": json.dumps(record)}
    if val_every:
        net, _ = checkpoint.load(best)
        t = calibrate(net, val, overlap, mask_stride)
        net.config = dataclasses.replace(net.config, temperature=t)
        say(f"best: step {record['best_step']}, val mIoU {record['best']:.4f}; softmax temperature {t:.3f} "
            "(fitted on the validation split)")
        final = checkpoint.save(out / "model.safetensors", net, record["best_step"], extra=extra)
    else:
        net.eval()
        final = checkpoint.save(out / "model.safetensors", net, step, extra=extra)
    say(f"wrote {final} ({final.stat().st_size / 1e6:.1f} MB, {sum(p.numel() for p in net.parameters()):,} "
        f"parameters) after {run_info['train_seconds']:.0f} s")
    return final


def validate(net, val, overlap: int, ranks: Ranks) -> float:
    """mIoU on the validation split, each process scoring its share of the samples."""
    net.eval()
    part = evaluate(net, val, overlap, indices=range(ranks.rank, len(val), ranks.world))
    net.train()
    confusion = ranks.total(np.array(part["confusion"], np.int64))
    return scores(confusion, tuple(net.config.classes))["miou"]
