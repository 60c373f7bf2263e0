"""`sortline train`: train a segmentation model on the synthetic belt, SpectralWaste or a data set folder
(`sortline teach`) (docs/model.md, docs/teach-in.md)."""

from __future__ import annotations

import sys

from sortline.cli import common


DATA_KINDS = ("synthetic", "spectralwaste")


def open_dataset(args, split: str):
    """The data set the command line names; split is 'train', 'val' or 'held-out' (SpectralWaste: its split
    name; synthetic: belt seeds --seed-data, + 2000 and + 1000; a data set folder: 'train', or its 'val' split
    for 'val' and 'held-out')."""
    if args.data not in DATA_KINDS:
        from sortline.models.training.data import Folder, Pasted

        try:
            folder = Folder(args.data, "train" if split == "train" else "val")
        except ValueError as exc:
            raise SystemExit(f"sortline: --data {args.data}: {exc}") from None
        paste = getattr(args, "paste", 0)
        keep = getattr(args, "paste_keep", 1.0)
        if not 0 <= keep <= 1:
            raise SystemExit(f"sortline: --paste-keep {keep}: a share, 0 to 1")
        return Pasted(folder, args.seed, paste, keep=keep) if split == "train" and (paste or keep < 1) else folder
    if args.data == "synthetic":
        from sortline.nodes.simulate.dataset import SyntheticBelt

        settings = common.load(args.config)
        seed = args.seed_data + {"train": 0, "val": 2000}.get(split, 1000)
        count = {"train": args.strips, "val": args.val_strips}.get(split, args.eval_strips)
        # Strips as the infer node gets them, or longer where training crops are longer.
        lines = settings.model.strip_lines + 2 * settings.model.overlap_lines
        if split == "train":
            lines = max(lines, getattr(args, "crop_lines", 0))
        return SyntheticBelt(settings, seed=seed, count=count, lines=lines, bands=settings.model.bands)
    from sortline.models.training.data import SpectralWaste

    if not args.root:
        raise SystemExit("sortline: --data spectralwaste needs --root (the dataset's folder)")
    return SpectralWaste(args.root, split, bands=args.bands)


def add_data(p) -> None:
    p.add_argument("--data", default="synthetic", metavar="{synthetic,spectralwaste,DIR}",
                   help="the synthetic belt, SpectralWaste (--root), or a data set folder (`sortline teach build`)")
    p.add_argument("--config", default=common.shipped_config("demo"),
                   help="machine config (synthetic data: geometry, bands; default: the shipped demo profile)")
    p.add_argument("--root", default="", help="SpectralWaste: the dataset folder")
    p.add_argument("--bands", type=int, default=32, help="SpectralWaste: bands fed to the model")
    p.add_argument("--strips", type=int, default=600, help="synthetic: training strips (kept in the cache directory)")
    p.add_argument("--eval-strips", type=int, default=200, help="synthetic: held-out strips")
    p.add_argument("--val-strips", type=int, default=50, help="synthetic: validation strips (belt seed + 2000)")
    p.add_argument("--paste", type=int, default=3, help="a data set folder: objects of this many strips of other "
                   "recordings pasted onto each training strip's empty belt (0: none; docs/teach-in.md)")
    p.add_argument("--paste-keep", type=float, default=0.5, help="a data set folder: the share of each training "
                   "strip's own objects kept; the others are replaced by the data set's empty belt (1: all kept)")
    p.add_argument("--seed-data", type=int, default=100, help="synthetic: belt seed of the training strips "
                   "(held-out strips use this + 1000)")


def train(args) -> int:
    from sortline.models.training.train import train as run

    try:
        val = open_dataset(args, "val") if args.val_every else None
    except FileNotFoundError as exc:
        print(f"sortline: no validation split ({exc}); add one, or train without (--val-every 0: the last "
              "weights, no temperature)", file=sys.stderr)
        return 2
    run(open_dataset(args, "train"), args, val, scored_overlap(args), common.load(args.config).model.mask_stride)
    return 0


def scored_overlap(args) -> int:
    """Lines at each end of a synthetic strip that are context, not scored (as the infer node crops them)."""
    return common.load(args.config).model.overlap_lines if args.data == "synthetic" else 0


def add(sub) -> None:
    p = sub.add_parser("train", help="train a segmentation model (synthetic belt, SpectralWaste, a data set folder)",
                       description="Train a model; seeded, resumable (--resume), safetensors checkpoints; the best "
                       "by validation mIoU, with a fitted softmax temperature, is OUT/model.safetensors. The model's "
                       "classes are the data set's. Data-parallel under torchrun (docs/model.md). Needs the .[train] "
                       "extra.")
    p.add_argument("--out", required=True, help="folder for last.safetensors (resumable) and model.safetensors")
    p.add_argument("--variant", choices=("fusion", "rgb", "hsi"), default="fusion")
    p.add_argument("--size", default="tiny", help="model size from models.config.SIZES (nano, tiny, base)")
    add_data(p)
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--crop-lines", type=int, default=160)
    p.add_argument("--crop-width", type=int, default=256)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--save-every", type=int, default=250)
    p.add_argument("--log-every", type=int, default=25)
    p.add_argument("--resume", action="store_true", help="continue from OUT/last.safetensors")
    p.add_argument("--init", default="", metavar="WEIGHTS", help="start from these weights (fine-tuning, e.g. the "
                   "shipped model on your own recordings): their size, variant and normalisation; the data must "
                   "have their classes and bands")
    p.add_argument("--val-every", type=int, default=250, help="score the validation split every N steps, keep "
                   "the best model (OUT/best.safetensors) and fit its temperature; 0: no validation, the last weights")
    p.add_argument("--patience", type=int, default=6, help="stop after N evaluations without a better val mIoU "
                   "(0: never)")
    p.add_argument("--no-augment", action="store_true", help="flips only: no spectral or geometric augmentation")
    p.set_defaults(func=train)
