"""Checkpoints: safetensors files that carry their model config and a hash.

A checkpoint holds the network's weights and, in its metadata, the model
config (JSON), the training step and the model hash. A training checkpoint
also holds the optimiser state (tensors under "optim/"), so a run resumes
exactly where it stopped. The hash names the weights and config, not the file:
the same model gives the same hash in a checkpoint, an ONNX file and an engine.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from sortline.models.config import ModelConfig
from sortline.models.contract import ModelFileError

FORMAT = "sortline-model"


def model_hash(config: ModelConfig, state: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256(json.dumps(config.to_dict(), sort_keys=True).encode())
    for name in sorted(state):
        h.update(name.encode())
        h.update(state[name].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def save(path: str | Path, net, step: int = 0, optimizer: torch.optim.Optimizer | None = None,
         extra: dict | None = None) -> Path:
    path = Path(path)
    state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    meta = {"format": FORMAT, "config": json.dumps(net.config.to_dict()), "step": str(step),
            "hash": model_hash(net.config, state), **{k: str(v) for k, v in (extra or {}).items()}}
    tensors = dict(state)
    if optimizer is not None:
        opt = optimizer.state_dict()
        for i, st in opt["state"].items():
            for key, value in st.items():
                tensors[f"optim/{i}/{key}"] = torch.as_tensor(value).detach().cpu().contiguous()
        meta["optim_groups"] = json.dumps(opt["param_groups"])
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    tmp.replace(path)
    return path


def read(path: str | Path) -> tuple[ModelConfig, dict[str, torch.Tensor], dict[str, str]]:
    """(config, all tensors, metadata) of a checkpoint, or ModelFileError."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"{path}: no such model file")
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelFileError(f"{path}: not a readable safetensors file ({exc})") from None
    if meta.get("format") != FORMAT:
        raise ModelFileError(f"{path}: not a sortline model checkpoint (format {meta.get('format')!r})")
    try:
        config = ModelConfig.from_dict(json.loads(meta["config"]))
    except (KeyError, ValueError, TypeError) as exc:
        raise ModelFileError(f"{path}: bad model config in the checkpoint: {exc}") from None
    return config, tensors, meta


def load(path: str | Path):
    """The network (eval mode) and the checkpoint's metadata."""
    from sortline.models.net import SortNet

    config, tensors, meta = read(path)
    net = SortNet(config)
    weights = {k: v for k, v in tensors.items() if not k.startswith("optim/")}
    try:
        net.load_state_dict(weights)
    except RuntimeError as exc:
        raise ModelFileError(f"{path}: weights do not fit the config they came with: {exc}") from None
    return net.eval(), meta


def restore_optimizer(optimizer: torch.optim.Optimizer, path: str | Path) -> None:
    _, tensors, meta = read(path)
    if "optim_groups" not in meta:
        raise ModelFileError(f"{path}: a weights-only checkpoint, no optimiser state to resume from")
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith("optim/"):
            _, i, name = key.split("/", 2)
            state.setdefault(int(i), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": json.loads(meta["optim_groups"])})
