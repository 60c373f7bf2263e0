"""Command-line arguments of the model commands, kept free of torch imports:
`sortline` builds its parser on every start, nodes included."""

from __future__ import annotations


def add_train(p) -> None:
    p.add_argument("--out", required=True, help="folder for last.safetensors (resumable) and model.safetensors")
    p.add_argument("--variant", choices=("fusion", "rgb", "hsi"), default="fusion")
    p.add_argument("--size", default="tiny", help="model size from models.config.SIZES (tiny, base)")
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


def add_data(p) -> None:
    p.add_argument("--data", choices=("synthetic", "spectralwaste"), default="synthetic")
    p.add_argument("--config", default="configs/demo.toml", help="machine config (synthetic data: geometry, bands)")
    p.add_argument("--root", default="", help="SpectralWaste: the dataset folder")
    p.add_argument("--bands", type=int, default=32, help="SpectralWaste: bands fed to the model")
    p.add_argument("--strips", type=int, default=600, help="synthetic: training strips (cached under .cache/)")
    p.add_argument("--eval-strips", type=int, default=200, help="synthetic: held-out strips")
    p.add_argument("--seed-data", type=int, default=100, help="synthetic: belt seed of the training strips "
                   "(held-out strips use this + 1000)")


def add_evaluate(p) -> None:
    p.add_argument("model", help="checkpoint (.safetensors)")
    add_data(p)
    p.add_argument("--split", default="test", help="SpectralWaste: the split to evaluate")
    p.add_argument("--png", default="", help="write the confusion matrix here as a PNG")
    p.add_argument("--json", default="", metavar="PATH", help="write miou and per-class IoU here")
    p.add_argument("--threads", type=int, default=1, help="torch threads")


def add_export(p) -> None:
    p.add_argument("model", help="checkpoint (.safetensors)")
    p.add_argument("--out", default="", help="ONNX file (default: beside the checkpoint, .onnx)")
    p.add_argument("--config", default="configs/demo.toml", help="machine config: strip size, overlap, width")
    p.add_argument("--opset", type=int, default=17)


def add_build_engine(p) -> None:
    p.add_argument("onnx", help="ONNX model from `sortline export`")
    p.add_argument("--out", default="", help="engine file (default: beside the ONNX file, .engine)")
    p.add_argument("--int8", action="store_true", help="INT8 (with FP16 fallback), calibrated on --calib strips")
    p.add_argument("--calib", default="", help="INT8: a .npz of calibration strips (arrays rgb, hsi "
                   "at the model's input shapes); benchmarks/tensorrt.py writes one from held-out synthetic strips")
    p.add_argument("--fp32", action="store_true", help="no reduced precision (for checking)")
    p.add_argument("--timing-cache", default="", help="timing cache file (default: beside the engine)")
    p.add_argument("--workspace-mb", type=int, default=1024)
