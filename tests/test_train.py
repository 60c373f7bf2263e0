"""Datasets, `sortline train` (seeded, resumable, loss falls) and `sortline evaluate`."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys

import cv2
import numpy as np
import pytest

import torch

from conftest import DEMO, ROOT, sortline, start, wait_for
from sortline.calibration.spectral import bin_bands
from sortline.models.training.checkpoint import read
from sortline.models.training.calibrate import CalibrationBins, fit_temperature
from sortline.models.training.data import Augment, Crops, Sample, SpectralWaste
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


class Blocks:
    """One sample of 8 x 8-pixel blocks of label values, its RGB and every HSI band the label (x 40, x 1)."""

    classes, bands, ratio = ("a", "b"), 8, 4

    def __init__(self):
        blocks = np.random.default_rng(0).integers(0, 5, (16, 48)).astype(np.uint8)
        self.labels = np.kron(blocks, np.ones((8, 8), np.uint8))
        self.rgb = np.repeat(self.labels[..., None] * 40, 3, -1).astype(np.uint8)
        self.hsi = np.repeat(np.kron(blocks, np.ones((2, 2)))[..., None], 8, -1).astype(np.float32)

    def __len__(self):
        return 1

    def __getitem__(self, i):
        return Sample(self.rgb, self.hsi, self.labels)


def test_augmented_crops_keep_rgb_hsi_and_labels_aligned():
    ds = Blocks()
    geometric = Crops(ds, 64, 128, seed=0, augment=Augment(illumination=(1, 1), band_gain=0, band_offset=0,
                                                           object_gain=(1, 1), geometric=1.0))
    plain = Crops(ds, 64, 128, seed=0, augment=None)
    for draw in range(6):
        c = geometric.sample(draw)
        assert c.rgb.shape == (64, 128, 3) and c.hsi.shape == (16, 32, 8) and c.labels.shape == (64, 128)
        assert all(np.array_equal(getattr(geometric.sample(draw), k), getattr(c, k)) for k in ("rgb", "hsi", "labels"))
        assert not np.array_equal(c.labels, plain.sample(draw).labels)          # scaled and turned
        assert np.mean(np.rint(c.rgb[..., 0] / 40) == c.labels) > 0.85           # RGB and labels together
        # Each HSI pixel is its 4 x 4 RGB pixels' mean label (bilinear, so about): aligned, not a pixel off.
        block = c.labels.reshape(16, 4, 32, 4).mean((1, 3))
        error = np.abs(c.hsi[..., 0] - block)[1:-1, 1:-1].mean()
        shifted = np.abs(np.roll(c.hsi[..., 0], 1, axis=1) - block)[1:-1, 1:-1].mean()
        assert error < 0.15 and shifted > 3 * error, (error, shifted)
    # Spectral: the same crops (the same draws come first), one illumination on both, a gain and offset per band.
    light = Crops(ds, 64, 128, seed=0, augment=Augment(illumination=(1.1, 1.1), band_gain=0.03, band_offset=0.005,
                                                       object_gain=(1, 1), geometric=0.0))
    for draw in range(3):
        a, b = plain.sample(draw), light.sample(draw)
        assert np.array_equal(a.labels, b.labels)
        assert np.array_equal(np.clip(np.rint(a.rgb * 1.1), 0, 255), b.rgb)
        ratio = b.hsi[a.hsi > 1] / a.hsi[a.hsi > 1]
        assert 1.1 * 0.96 < ratio.min() and ratio.max() < 1.1 * 1.04 and ratio.std() > 0.005


def test_each_object_gets_its_own_brightness_on_both_grids_and_the_belt_none():
    ds = Blocks()
    blocks = np.zeros((16, 48), np.uint8)
    blocks[1::3, 1::3] = np.arange(1, 5)[np.arange(blocks[1::3, 1::3].size) % 4].reshape(blocks[1::3, 1::3].shape)
    ds.labels = np.kron(blocks, np.ones((8, 8), np.uint8))                        # squares apart on the belt
    ds.rgb = np.repeat(30 + ds.labels[..., None] * 40, 3, -1).astype(np.uint8)
    ds.hsi = np.repeat(0.1 + np.kron(blocks, np.ones((2, 2)))[..., None], 8, -1).astype(np.float32)
    plain = Crops(ds, 64, 128, seed=0, augment=None)
    objects = Crops(ds, 64, 128, seed=0, augment=Augment(illumination=(1, 1), band_gain=0, band_offset=0,
                                                         object_gain=(0.8, 1.2), geometric=0.0))
    for draw in range(3):
        a, b = plain.sample(draw), objects.sample(draw)
        assert np.array_equal(a.labels, b.labels)
        belt = a.labels == 0
        assert np.array_equal(a.rgb[belt], b.rgb[belt])
        n, group = cv2.connectedComponents((a.labels > 0).view(np.uint8), connectivity=8)
        factors = []
        for k in range(1, n):
            ratio = b.rgb[group == k][:, 0] / a.rgb[group == k][:, 0]
            assert 0.79 < ratio.min() and ratio.max() < 1.21 and ratio.max() - ratio.min() < 0.03   # one factor
            factors.append(ratio.mean())
            # HSI cells wholly inside the object: the same factor
            inside = (group == k).reshape(16, 4, 32, 4).all(axis=(1, 3))
            if inside.any():
                assert np.allclose(b.hsi[inside] / a.hsi[inside], ratio.mean(), atol=0.02)
        assert np.std(factors) > 0.03                                            # and each object its own


def test_a_temperature_fitted_on_overconfident_logits_calibrates_them():
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 2.0, (100_000, 10))
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    labels = (p.cumsum(1) < rng.random((len(p), 1))).sum(1)                  # drawn from the softmax: calibrated
    sharp = torch.tensor(logits * 3.0)                                          # over-confident by T = 3
    t = fit_temperature(sharp, torch.tensor(labels))
    assert 2.85 < t < 3.15, t

    def ece(z):
        prob = z.softmax(1)
        bins = CalibrationBins()
        bins.add(prob.max(1).values.numpy(), (prob.argmax(1).numpy() == labels))
        return bins.ece()

    before, after = ece(sharp), ece(sharp / t)
    assert before > 0.15 and after < 0.01, (before, after)
    bins = CalibrationBins()                                   # 90 % sure, 80 % right: ECE 0.1
    bins.add(np.full(10, 0.9), np.arange(10) < 8)
    assert bins.ece() == pytest.approx(0.1)


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
              "--warmup", "5", "--lr", "4e-3", "--log-every", "5", "--save-every", "10", "--steps", "40",
              "--val-strips", "2", "--val-every", "10"]
    straight = sortline(*common, "--out", str(tmp_path / "a"), env=env, timeout=300)
    assert straight.returncode == 0, straight.stderr
    trace = losses(straight.stderr)
    assert len(trace) == 8 and trace[-1] < 0.85 * trace[0], trace
    # The validation split scored every 10 steps; the best of them is kept, and is the model, calibrated.
    scored = [(int(s), float(m)) for s, m in re.findall(r"step (\d+): val mIoU ([0-9.]+)", straight.stderr)]
    assert [s for s, _ in scored] == [10, 20, 30, 40], straight.stderr
    best_step, best = max(scored, key=lambda sm: (sm[1], -sm[0]))
    a, kept = read(tmp_path / "a" / "model.safetensors"), read(tmp_path / "a" / "best.safetensors")
    assert int(a[2]["step"]) == int(kept[2]["step"]) == best_step
    assert float(kept[2]["val_miou"]) == pytest.approx(best, abs=1e-4)
    assert all(torch.equal(a[1][k], kept[1][k]) for k in kept[1])             # the best weights
    assert a[0].temperature != 1.0 and kept[0].temperature == 1.0
    assert [h[0] for h in json.loads(a[2]["val"])["history"]] == [10, 20, 30, 40]
    # The same run killed (no clean exit) once it has written a checkpoint, then resumed.
    proc = start(*common, "--out", str(tmp_path / "b"), env=env)
    wait_for(lambda: (tmp_path / "b" / "last.safetensors").exists() or proc.poll() is not None, timeout=120, every=0.01)
    proc.kill()
    proc.communicate()
    assert not (tmp_path / "b" / "model.safetensors").exists(), "the run finished before it could be interrupted"
    resumed = sortline(*common, "--out", str(tmp_path / "b"), "--resume", env=env, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert re.search(r"resuming at step (10|20|30) ", resumed.stderr), resumed.stderr
    b = read(tmp_path / "b" / "model.safetensors")
    assert a[2]["hash"] == b[2]["hash"]                                      # the same weights, bit for bit
    assert a[2]["val"] == b[2]["val"] and a[0].temperature == b[0].temperature
    assert read(tmp_path / "a" / "last.safetensors")[2]["step"] == "40" and a[0].variant == "rgb"
    # Resuming with other settings would not be the same run: refused, saying which.
    (tmp_path / "b" / "model.safetensors").unlink()
    other = sortline(*common, "--out", str(tmp_path / "b"), "--resume", "--lr", "1e-3", env=env, timeout=300)
    assert other.returncode != 0 and "'lr': (0.004, 0.001)" in other.stderr
    # Scored every 5 steps, this run's val mIoU falls back after step 5; with --patience 3 it stops 3
    # evaluations later, and the model is that of step 5.
    early = sortline(*common, "--val-every", "5", "--patience", "3", "--out", str(tmp_path / "c"), env=env, timeout=300)
    assert early.returncode == 0, early.stderr
    scored = [(int(s), float(m)) for s, m in re.findall(r"step (\d+): val mIoU ([0-9.]+)", early.stderr)]
    best, since, stop = -1.0, 0, None
    for s, m in scored:
        best, since = (m, 0) if m > best else (best, since + 1)
        if since == 3:
            stop = s
            break
    assert stop is not None and stop < 40 and scored[-1][0] == stop, scored
    assert f"stopped early at step {stop}: 3 evaluations without a better val mIoU" in early.stderr
    assert read(tmp_path / "c" / "model.safetensors")[2]["step"] == str(stop - 15)


@pytest.mark.system
def test_two_processes_under_torchrun_take_the_steps_of_one(tmp_path, env):
    """torchrun, two CPU processes on gloo, each drawing half of every step's batch, against one process with
    the whole batch: the same training to rounding. (The biases just before a batch norm get no gradient but
    rounding, which Adam scales up to steps of their own: so the weights are compared as a whole, and the
    outputs.)"""
    from sortline.models.net import SortNet

    common = ["train", "--size", "nano", "--strips", "4", "--val-strips", "2", "--batch", "4", "--crop-lines", "64",
              "--crop-width", "128", "--steps", "6", "--warmup", "2", "--val-every", "3", "--log-every", "3"]
    one = sortline(*common, "--out", str(tmp_path / "one"), env=env, timeout=300)
    assert one.returncode == 0, one.stderr
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "-m", "sortline", *common, "--out", str(tmp_path / "two")], capture_output=True, text=True,
                         cwd=ROOT, env=env, timeout=300)
    assert two.returncode == 0, two.stderr
    assert two.stderr.count("step 6: val mIoU") == 1 and two.stderr.count("wrote ") == 1   # rank 0 alone logs
    assert losses(two.stderr) == pytest.approx(losses(one.stderr), abs=2e-3)
    (config, a, _), (_, b, _) = read(tmp_path / "one" / "last.safetensors"), read(tmp_path / "two" / "last.safetensors")
    torch.manual_seed(0)
    start_weights = SortNet(config).state_dict()
    names = [k for k in start_weights if start_weights[k].is_floating_point() and "running" not in k]
    apart = sum(float(((a[k] - b[k]) ** 2).sum()) for k in names) ** 0.5
    moved = sum(float(((a[k] - start_weights[k]) ** 2).sum()) for k in names) ** 0.5
    assert apart < 0.03 * moved, (apart, moved)
    nets = [checkpoint_net(tmp_path / d / "last.safetensors") for d in ("one", "two")]
    x = torch.rand(1, 64, 128, 3) * 255, torch.rand(1, 16, 32, 32)
    with torch.no_grad():
        la, lb = (net(*x) for net in nets)
    # The same probabilities, to rounding. (Not the argmax: after six steps on noise every pixel's likeliest
    # classes are all but tied, and rounding alone picks one.)
    assert (la.softmax(1) - lb.softmax(1)).abs().max() < 2e-3


@pytest.mark.system
def test_fine_tuning_starts_from_the_given_weights_and_refuses_other_classes(tmp_path, env):
    """--init: the shipped demo model, two steps at learning rate 0 on the synthetic belt: every weight as it
    was (the batch norms' running statistics aside), and its first validation already scores like a trained
    model, not like a fresh one. Data of other classes (SpectralWaste's) is refused, saying so."""
    shipped = ROOT / "models" / "weights" / "belt-fusion-nano.safetensors"
    common = ["train", "--strips", "4", "--val-strips", "4", "--batch", "2", "--crop-lines", "64", "--crop-width",
              "128", "--steps", "2", "--val-every", "1", "--log-every", "1"]
    tuned = sortline(*common, "--init", str(shipped), "--lr", "0", "--out", str(tmp_path / "t"), env=env, timeout=300)
    assert tuned.returncode == 0, tuned.stderr
    assert f"(nano fusion, model hash {read(shipped)[2]['hash']})" in tuned.stderr
    fresh = sortline(*common, "--size", "nano", "--out", str(tmp_path / "f"), env=env, timeout=300)
    assert fresh.returncode == 0, fresh.stderr
    first = [float(re.search(r"step 1: val mIoU ([0-9.]+)", r.stderr).group(1)) for r in (tuned, fresh)]
    assert first[0] > 0.6 and first[1] < 0.3, first
    (config, weights, meta), (shipped_config, original, _) = read(tmp_path / "t" / "last.safetensors"), read(shipped)
    assert config.size == "nano" and config.hsi_band_mean == shipped_config.hsi_band_mean
    assert json.loads(meta["train"])["init"] == str(shipped)
    learned = [k for k in original if "running" not in k and "num_batches" not in k]
    assert learned and all(torch.equal(weights[k], original[k]) for k in learned)
    make_spectralwaste(tmp_path / "sw", "train", ["a"])
    make_spectralwaste(tmp_path / "sw", "val", ["v"], seed=2)
    other = sortline("train", "--data", "spectralwaste", "--root", str(tmp_path / "sw"), "--init", str(shipped),
                     "--out", str(tmp_path / "o"), "--steps", "1", "--batch", "1", "--crop-lines", "128",
                     "--crop-width", "128", env=env, timeout=300)
    assert other.returncode != 0 and "--init" in other.stderr and "the model has classes ('belt', 'PET'" in other.stderr


def checkpoint_net(path):
    from sortline.models.training import checkpoint

    return checkpoint.load(path)[0]


@pytest.mark.system
def test_a_spectralwaste_model_trains_and_evaluates(tmp_path, env):
    make_spectralwaste(tmp_path / "sw", "train", ["a", "b"])
    make_spectralwaste(tmp_path / "sw", "test", ["c"], seed=1)
    make_spectralwaste(tmp_path / "sw", "val", ["v"], seed=2)
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
    assert "val mIoU" in run.stderr and read(tmp_path / "m" / "best.safetensors")[2]["step"] == "2"
    # Without a val split the run says what to do instead.
    (tmp_path / "sw" / "rgb" / "val" / "v.png").unlink()
    none = sortline("train", "--data", "spectralwaste", "--root", str(tmp_path / "sw"), "--out", str(tmp_path / "n"),
                    "--steps", "2", "--batch", "1", "--crop-lines", "128", "--crop-width", "128", env=env, timeout=300)
    assert none.returncode == 2 and "--val-every 0" in none.stderr, none.stderr


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
    # The shipped nano carries a fitted temperature (its confidence calibrated), the tiny none.
    temperature = read(weights)[0].temperature
    assert result["temperature"] == pytest.approx(temperature) and 0 < result["ece"] < 0.05
    if temperature == 1.0:
        assert result["ece"] == result["ece_raw"]
    else:
        assert result["ece"] < result["ece_raw"] and temperature == pytest.approx(1.3373, abs=1e-3)
    assert "expected calibration error (15 bins, per pixel, max softmax, mask stride 4)" in ev.stdout
    assert result["mask_stride"] == 4
    img = cv2.imread(str(png))
    assert img is not None and img.shape[0] > 400


@pytest.mark.system
def test_a_shipped_model_gets_a_temperature_fitted_on_validation_strips(tmp_path, env):
    out = tmp_path / "calibrated.safetensors"
    run = sortline("calibrate-confidence", "shipped:belt-fusion-nano.safetensors", "--val-strips", "3", "--out",
                   str(out), env=env, timeout=300)
    assert run.returncode == 0, run.stderr
    (config, tensors, meta), (shipped, weights, shipped_meta) = read(out), read(SHIPPED[0])
    assert 0.5 < config.temperature < 2 and config.temperature != 1.0
    assert config == dataclasses.replace(shipped, temperature=config.temperature)
    assert all(torch.equal(tensors[k], weights[k]) for k in weights)           # the weights as they were
    assert meta["hash"] != shipped_meta["hash"] and meta["calibrated_from"] == shipped_meta["hash"]
    ece = re.search(r"expected calibration error ([0-9.]+) raw, ([0-9.]+) calibrated", run.stdout)
    assert ece and float(ece[1]) > 0 and float(ece[2]) > 0, run.stdout
    ev = sortline("evaluate", str(out), "--eval-strips", "2", "--json", str(tmp_path / "e.json"), env=env, timeout=300)
    result = json.loads((tmp_path / "e.json").read_text())
    assert ev.returncode == 0 and result["temperature"] == config.temperature and result["ece"] != result["ece_raw"]
