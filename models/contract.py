"""What a model file promises, readable without torch: its strip shape, classes and metadata.

Every model file sortline makes says what it was made for. A checkpoint
carries its ModelConfig (classes among it); an ONNX export and a TensorRT
engine carry the metadata below (`metadata`), so a backend can refuse a
model made for other strips or a recipe it cannot sort before running it:

    sortline      "model"
    model_hash    the hash of the weights and config it came from
    classes       JSON list of class names; classes[0] is the background
    variant, size the network's family
    rgb_shape     JSON (1, lines, width, 3): the strip with its overlap
    hsi_shape     JSON (1, lines/r, width/r, bands)
    overlap       RGB lines of context cropped from each side
    mask_stride   RGB pixels per mask cell

Models that come with sortline are package data, named `shipped:NAME` in a
configuration (`model_file`).
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path

from sortline.pipeline.config import Machine

SHIPPED = "shipped:"


class ModelFileError(Exception):
    """A model file that cannot be used here: not a sortline model, corrupt, or for other shapes."""


@dataclass(frozen=True)
class StripShape:
    lines: int      # RGB lines including both overlaps
    width: int      # RGB pixels
    overlap: int    # RGB lines of context on each side (cropped from the output)
    ratio: int
    bands: int
    stride: int = 1  # the mask's grid: RGB pixels per mask cell, along and across

    @property
    def rgb(self) -> tuple[int, ...]:
        return (1, self.lines, self.width, 3)

    @property
    def hsi(self) -> tuple[int, ...]:
        return (1, self.lines // self.ratio, self.width // self.ratio, self.bands)

    @property
    def core(self) -> tuple[int, int]:
        return ((self.lines - 2 * self.overlap) // self.stride, self.width // self.stride)

    @classmethod
    def from_machine(cls, machine: Machine) -> StripShape:
        m = machine.model
        return cls(m.strip_lines + 2 * m.overlap_lines, machine.cameras.rgb.pixels, m.overlap_lines,
                   machine.hsi_ratio, m.bands, m.mask_stride)


def metadata(config: dict, model_hash: str, shape: StripShape) -> dict[str, str]:
    """What an exported model or engine carries (config: the ModelConfig as a dict)."""
    return {"sortline": "model", "model_hash": model_hash, "classes": json.dumps(list(config["classes"])),
            "variant": config["variant"], "size": config["size"], "rgb_shape": json.dumps(shape.rgb),
            "hsi_shape": json.dumps(shape.hsi), "overlap": str(shape.overlap), "mask_stride": str(shape.stride)}


def shipped_models() -> list[str]:
    return sorted(p.name for p in files(__package__).joinpath("weights").iterdir() if not p.name.startswith("."))


def model_file(path: str) -> Path:
    """A configuration's model.path as a file: `shipped:NAME` is a model that comes with sortline."""
    if not path.startswith(SHIPPED):
        return Path(path)
    name = path[len(SHIPPED):]
    if name not in shipped_models():
        raise ModelFileError(f"{path}: sortline ships no model of that name; it ships {', '.join(shipped_models())}")
    return Path(str(files(__package__).joinpath("weights", name)))


# A TensorRT engine file (sortline build-engine): the plan behind a small header that says what it is for.
#     b"SLENGINE" | uint32 header length | header (JSON: the ONNX metadata, TensorRT version, GPU) | plan
ENGINE_MAGIC = b"SLENGINE"


def write_engine(path: str | Path, header: dict, plan: bytes) -> Path:
    path = Path(path)
    blob = json.dumps(header, sort_keys=True).encode()
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        fh.write(ENGINE_MAGIC + struct.pack("<I", len(blob)) + blob)
        fh.write(plan)
    tmp.replace(path)
    return path


def read_engine_header(path: str | Path) -> tuple[dict, int]:
    """An engine's header and the offset of its plan."""
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            head = fh.read(12)
            if len(head) < 12 or head[:8] != ENGINE_MAGIC:
                raise ModelFileError(f"{path}: not a sortline engine (build one with `sortline build-engine`)")
            (n,) = struct.unpack("<I", head[8:])
            header = json.loads(fh.read(n))
    except (OSError, ValueError) as exc:
        raise ModelFileError(f"{path}: unreadable engine header ({exc})") from None
    return header, 12 + n
