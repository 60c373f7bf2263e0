"""Datasets, `sortline train` (seeded, resumable, loss falls) and `sortline evaluate`."""

from __future__ import annotations

import json
import os
import re

import cv2
import numpy as np
import pytest

from conftest import DEMO, ROOT, sortline, start, wait_for
from sortline.calibration.spectral import bin_bands
from sortline.models.training.checkpoint import read
from sortline.models.training.data import Crops, SpectralWaste
from sortline.models.training.evaluate import scores
from sortline.nodes.simulate.dataset import SyntheticBelt
from sortline.pipeline.graph import load_config

SHIPPED = [ROOT / "models" / "weights" / f"belt-fusion-{size}.safetensors" for size in ("nano", "tiny")]


@pytest.fixture
def env(tmp_path):
    """The commands' cache of generated strips in a private folder."""
    return {**os.environ, "SORTLINE_CACHE": str(tmp_path / "cache")}


def test_synthetic_strips_are_deterministic_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("SORTLINE_CACHE", str(tmp_path))
    settings = load_config(DEMO)
    ds = SyntheticBelt(settings, seed=3, count=3, lines=160)
    first = ds[2]
    assert list(tmp_path.glob("belt-*/000002.npz"))
    again = SyntheticBelt(settings, seed=3, count=3, lines=160)[2]        # read back from the cache
    fresh = SyntheticBelt(settings, seed=3, count=3, lines=160, cache=False)[2]
    for s in (again, fresh):
        assert all(np.array_equal(getattr(s, k), getattr(first, k)) for k in ("rgb", "hsi", "labels", "looks"))
    assert first.rgb.shape == (160, 640, 3) and first.hsi.shape == (40, 160, 32) and first.labels.shape == (160, 640)
    assert not np.array_equal(SyntheticBelt(settings, seed=4, count=3, lines=160, cache=False)[2].rgb, first.rgb)
    with pytest.raises(IndexError):
        ds[3]
    # Crops keep both grids aligned: a crop's HSI is the same region's HSI.
    crops = Crops(ds, 64, 128, seed=0, align=2)
    for draw in range(6):
        c = crops.sample(draw)
        assert c.rgb.shape == (64, 128, 3) and c.hsi.shape == (16, 32, 32) and c.labels.shape == (64, 128)
        assert np.array_equal(crops.sample(draw).rgb, c.rgb)                # deterministic per draw


def make_spectralwaste(root, split: str, ids: list[str], size: int = 64, seed: int = 0):
    """A tiny sample in SpectralWaste's preprocessed layout: PNG RGB, 224-page 16-bit TIFF, label PNG."""
    rng = np.random.default_rng(seed)
    cubes = {}
    for name in ids:
        for sub in ("rgb", "hyper", "labels_rgb"):
            (root / sub / split).mkdir(parents=True, exist_ok=True)
        labels = np.zeros((size, size), np.uint8)
        labels[8:30, 10:40] = 1 + int(rng.integers(6))
        labels[40:60, 20:50] = 1 + int(rng.integers(6))
        yy, xx = np.mgrid[0:size, 0:size]
        rgb = np.stack([yy * 3, xx * 3, np.full_like(yy, int(rng.integers(256)))], -1).astype(np.uint8)
        cube = rng.integers(5000, 20000, (224, size, size), dtype=np.uint16)      # band-first
        cube[:, labels > 0] += 20000
        cv2.imwrite(str(root / "rgb" / split / f"{name}.png"), rgb[..., ::-1])
        assert cv2.imwritemulti(str(root / "hyper" / split / f"{name}.tiff"), list(cube))
        cv2.imwrite(str(root / "labels_rgb" / split / f"{name}_semantic.png"), labels)
        cubes[name] = (rgb, cube, labels)
    return cubes


def test_spectralwaste_layout_is_read_as_written(tmp_path):
    cubes = make_spectralwaste(tmp_path, "train", ["20220928_01_101010", "20220928_02_111111"])
    ds = SpectralWaste(tmp_path, "train", bands=32)
    assert ds.ids == sorted(cubes) and ds.classes[0] == "background" and len(ds.classes) == 7
    s = ds[0]
    rgb, cube, labels = cubes[ds.ids[0]]
    assert s.rgb.shape == (256, 256, 3) and s.hsi.shape == (64, 64, 32) and s.labels.shape == (256, 256)
    assert np.array_equal(s.labels[::4, ::4], labels)                       # labels upsampled x4, nearest
    blocks = s.rgb.reshape(64, 4, 64, 4, 3).mean((1, 3))                     # RGB upsampled x4, bilinear
    assert np.abs(blocks - rgb)[1:-1, 1:-1].max() < 1.0
    expected = bin_bands(cube.transpose(1, 2, 0).astype(np.float32) / 65535, 32)
    assert np.allclose(s.hsi, expected, atol=1e-6)
    with pytest.raises(FileNotFoundError, match="not a SpectralWaste layout"):
        SpectralWaste(tmp_path, "val")


def losses(text: str) -> list[float]:
    return [float(x) for x in re.findall(r"loss ([0-9.]+)", text)]


@pytest.mark.system
def test_training_is_seeded_resumable_and_the_loss_falls(tmp_path, env):
    common = ["train", "--variant", "rgb", "--strips", "4", "--batch", "2", "--crop-lines", "64", "--crop-width", "128",
              "--warmup", "5", "--lr", "4e-3", "--log-every", "5", "--save-every", "10", "--steps", "40"]
    straight = sortline(*common, "--out", str(tmp_path / "a"), env=env, timeout=300)
    assert straight.returncode == 0, straight.stderr
    trace = losses(straight.stderr)
    assert len(trace) == 8 and trace[-1] < 0.85 * trace[0], trace
    # The same run killed (no clean exit) once it has written a checkpoint, then resumed.
    proc = start(*common, "--out", str(tmp_path / "b"), env=env)
    wait_for(lambda: (tmp_path / "b" / "last.safetensors").exists() or proc.poll() is not None, timeout=120, every=0.01)
    proc.kill()
    proc.communicate()
    assert not (tmp_path / "b" / "model.safetensors").exists(), "the run finished before it could be interrupted"
    resumed = sortline(*common, "--out", str(tmp_path / "b"), "--resume", env=env, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert re.search(r"resuming at step (10|20|30) ", resumed.stderr), resumed.stderr
    a, b = read(tmp_path / "a" / "model.safetensors"), read(tmp_path / "b" / "model.safetensors")
    assert a[2]["hash"] == b[2]["hash"]                                      # the same weights, bit for bit
    assert a[2]["step"] == "40" and a[0].variant == "rgb"
    # Resuming with other settings would not be the same run: refused, saying which.
    (tmp_path / "b" / "model.safetensors").unlink()
    other = sortline(*common, "--out", str(tmp_path / "b"), "--resume", "--lr", "1e-3", env=env, timeout=300)
    assert other.returncode != 0 and "'lr': (0.004, 0.001)" in other.stderr


@pytest.mark.system
def test_a_spectralwaste_model_trains_and_evaluates(tmp_path, env):
    make_spectralwaste(tmp_path / "sw", "train", ["a", "b"])
    make_spectralwaste(tmp_path / "sw", "test", ["c"], seed=1)
    run = sortline("train", "--data", "spectralwaste", "--root", str(tmp_path / "sw"), "--out", str(tmp_path / "m"),
                   "--steps", "2", "--batch", "1", "--crop-lines", "128", "--crop-width", "128", env=env, timeout=300)
    assert run.returncode == 0, run.stderr
    out = tmp_path / "e.json"
    ev = sortline("evaluate", str(tmp_path / "m" / "model.safetensors"), "--data", "spectralwaste", "--root",
                  str(tmp_path / "sw"), "--json", str(out), env=env, timeout=300)
    assert ev.returncode == 0, ev.stderr
    result = json.loads(out.read_text())
    assert result["classes"][1] == "film" and result["samples"] == 1
    assert np.array(result["confusion"]).sum() == 256 * 256


def test_iou_from_a_confusion_matrix():
    # rows: truth, columns: prediction
    cm = np.array([[50, 5, 0], [5, 20, 5], [0, 0, 0]])
    r = scores(cm, ("belt", "a", "b"))
    assert r["per_class_iou"]["a"] == round(20 / (20 + 5 + 10), 4)
    assert r["per_class_iou"]["b"] is None                 # absent from the set: not counted
    assert r["miou"] == pytest.approx(20 / 35)              # belt excluded, b absent
    assert r["pixel_accuracy"] == pytest.approx(70 / 85)


@pytest.mark.system
@pytest.mark.parametrize("weights", SHIPPED, ids=["nano", "tiny"])
def test_the_shipped_models_on_held_out_strips(tmp_path, env, weights):
    out, png = tmp_path / "e.json", tmp_path / "cm.png"
    ev = sortline("evaluate", str(weights), "--eval-strips", "12", "--json", str(out), "--png", str(png), env=env,
                  timeout=300)
    assert ev.returncode == 0, ev.stderr
    result = json.loads(out.read_text())
    assert result["variant"] == "fusion" and result["samples"] == 12
    assert set(result["per_class_iou"]) == set(read(weights)[0].classes)
    assert result["miou"] > 0.6 and result["per_class_iou"]["belt"] > 0.95
    assert "mIoU" in ev.stdout and "PET" in ev.stdout
    img = cv2.imread(str(png))
    assert img is not None and img.shape[0] > 400
