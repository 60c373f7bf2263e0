"""The synthetic belt as a data set for training and evaluation (models.training.data's interface)."""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np

from sortline.calibration.spectral import bin_bands
from sortline.models.training.data import Sample
from sortline.nodes.simulate import Simulation
from sortline.nodes.simulate.materials import CLASSES, ENDMEMBERS
from sortline.pipeline.config import Machine, cache_dir


class SyntheticBelt:
    """Strips of `lines` RGB lines along the synthetic belt, strip i starting at line i * lines.

    Deterministic per (config, seed, index); a strip is generated once and kept
    in belt-<key>/ of the cache directory (delete the folder to regenerate).
    """

    endmembers = tuple(ENDMEMBERS)   # what `looks` indexes: (material, look)

    def __init__(self, machine: Machine, *, seed: int, count: int, lines: int = 160, bands: int = 32,
                 occupancy: float = 0.4, mix: dict[str, float] | None = None, cache: bool = True):
        self.classes, self.bands, self.ratio = tuple(CLASSES), bands, machine.hsi_ratio
        self.count, self.lines = count, lines
        self.sim = Simulation(machine, seed=seed, occupancy=occupancy, mix=mix)
        key = json.dumps([machine.cameras.model_dump(), machine.belt.model_dump(), seed, lines, bands,
                          occupancy, mix], sort_keys=True)
        self.dir = cache_dir() / f"belt-{hashlib.sha1(key.encode()).hexdigest()[:12]}" if cache else None

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i: int) -> Sample:
        if not 0 <= i < self.count:
            raise IndexError(i)
        path = self.dir / f"{i:06d}.npz" if self.dir else None
        if path is not None and path.exists():
            with np.load(path) as z:
                return Sample(z["rgb"], z["hsi"].astype(np.float32), z["labels"], z["looks"])
        strip = self.sim.strip(i * self.lines, self.lines)
        looks = self.sim.scene.rows(i * self.lines, self.lines)["endmember"].astype(np.uint8)
        # float16, as the register node delivers it (and as cached: the same values either way)
        hsi = bin_bands(strip["hsi"], self.bands, dtype=np.float16).astype(np.float32)
        sample = Sample(strip["rgb"], hsi, strip["labels"], looks)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.stem + f".{os.getpid()}.tmp.npz")
            np.savez(tmp, rgb=sample.rgb, hsi=sample.hsi.astype(np.float16), labels=sample.labels, looks=looks)
            tmp.replace(path)
        return sample
