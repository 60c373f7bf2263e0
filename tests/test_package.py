"""What gets installed: one import name, layers that hold, and inference without torch."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT, scrape
from sortline.models.backends import open_backend
from sortline.models.contract import StripShape, model_file
from test_infer import Around, strips

pytestmark = pytest.mark.system
BIN = Path(sys.executable).parent


def test_the_layers_hold():
    """The import-linter contract of pyproject.toml: cli > nodes > models > calibration > the runtime."""
    res = subprocess.run([BIN / "lint-imports", "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    assert "1 kept, 0 broken" in res.stdout


def test_no_module_imports_itself_through_others():
    """No circle of imports, direct or through other modules (lazy imports inside functions count)."""
    import grimp

    graph = grimp.build_graph("sortline", cache_dir=None)
    imports = {m: graph.find_modules_directly_imported_by(m) for m in graph.modules}
    circles, index, low, stack, on = [], {}, {}, [], set()

    def visit(v):   # Tarjan's strongly connected components, iteratively
        work = [(v, iter(sorted(imports[v])))]
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is None:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    part = []
                    while True:
                        w = stack.pop()
                        on.discard(w)
                        part.append(w)
                        if w == node:
                            break
                    if len(part) > 1:
                        circles.append(sorted(part))
            elif child not in index:
                index[child] = low[child] = len(index)
                stack.append(child)
                on.add(child)
                work.append((child, iter(sorted(imports[child]))))
            elif child in on:
                low[node] = min(low[node], index[child])

    for module in sorted(imports):
        if module not in index:
            visit(module)
    assert circles == []
    assert len(imports) > 80   # the whole package was read


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """`pip wheel --no-deps .`, on a copy of the checkout (a build writes build/ beside its sources)."""
    out, src = tmp_path_factory.mktemp("wheel"), tmp_path_factory.mktemp("src") / "sortline"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".git", ".venv", "build", "*.egg-info", "__pycache__",
                                                             ".pytest_cache", ".hypothesis"))
    res = subprocess.run([BIN / "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(out), str(src)],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    (path,) = out.glob("sortline-*.whl")
    return path


def test_the_wheel_installs_one_top_level_package_with_its_data(wheel):
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        info = next(n for n in names if n.endswith(".dist-info/top_level.txt"))
        assert z.read(info).decode().split() == ["sortline"]
        assert {n.split("/")[0] for n in names} == {"sortline", info.split("/")[0]}
        entry_points = z.read(info.replace("top_level.txt", "entry_points.txt")).decode()
    for data in ("sortline/configs/demo.toml", "sortline/configs/calibration/demo-spectral.npz",
                 "sortline/configs/keys/demo-valves.valve_key", "sortline/models/weights/belt-fusion-nano.onnx",
                 "sortline/systemd/sortline@.service", "sortline/systemd/sortline-control.service",
                 "sortline/docs/grafana/sortline.json",
                 "sortline/docs/prometheus/sortline-rules.yml"):
        assert data in names, data
    assert not any("/tests/" in n or "/benchmarks/" in n for n in names)
    assert "[sortline.nodes]" in entry_points and "infer = sortline.nodes.infer:Infer" in entry_points


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> tuple[Path, str]:
    """`pip install sortline[infer]` into a fresh venv: (the venv, its python)."""
    venv = tmp_path_factory.mktemp("installed") / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = str(venv / "bin" / "python")
    res = subprocess.run([BIN / "pip", "--python", python, "install", "-q", "--no-compile", f"{wheel}[infer]"],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    return venv, python


def test_the_infer_node_runs_in_a_venv_without_torch(installed, wheel, tmp_path, run_dir):
    """In the fresh venv: no torch there, and the infer node sorts the demo profile's strips with the shipped
    model (found in the installed package, not in this checkout); its endpoint says what it runs."""
    venv, python = installed
    probe = subprocess.run([python, "-c", "import importlib.util as u; print(u.find_spec('torch') is None)"],
                           capture_output=True, text=True, cwd=tmp_path)
    assert probe.stdout.strip() == "True", "torch is installed in the fresh venv"
    h = Around(tmp_path, run_dir, "shipped:belt-fusion-nano.onnx", python=python)
    try:
        settings = h.settings
        direct = open_backend("onnxruntime", model_file("shipped:belt-fusion-nano.onnx"), StripShape.from_machine(settings))
        sent = list(strips(settings, 2))
        for seq, (rgb, hsi) in enumerate(sent):
            h.send(seq, rgb, hsi)
        for seq, (rgb, hsi) in enumerate(sent):
            header, arrays = h.receive()
            assert header.seq == seq and header.meta["model"] == direct.model_hash
            assert np.array_equal(arrays["classes"], direct.run(rgb, hsi)[0])
        build = [k for k, v in scrape(h.port).items() if k.startswith("sortline_build_info{") and v == 1]
    finally:
        rc, err = h.close()
    assert rc == 0, err[-3000:]
    where = subprocess.run([python, "-c", "import sortline; print(sortline.__file__)"], capture_output=True,
                           text=True, cwd=ROOT).stdout
    assert where.startswith(str(venv)), where     # the installed package ran, not this checkout
    version = wheel.name.split("-")[1]
    python_version = subprocess.run([python, "-c", "import platform; print(platform.python_version())"],
                                    capture_output=True, text=True).stdout.strip()
    # ONNX Runtime alone: the .[infer] extra has no torch, and no TensorRT.
    assert build == [f'sortline_build_info{{backends="onnxruntime",node="infer",python="{python_version}",'
                     f'version="{version}"}}'], build


def test_the_installed_command_says_its_version_and_checks_the_shipped_demo_profile(installed, wheel, tmp_path):
    """Without a checkout: --version from the installed metadata, and the demo profile (its calibration files
    and valve key beside it) found in the installed package when --config is not given."""
    venv, python = installed
    res = subprocess.run([venv / "bin" / "sortline", "--version"], capture_output=True, text=True, cwd=tmp_path,
                         timeout=60)
    assert res.returncode == 0 and res.stdout == f"sortline {wheel.name.split('-')[1]}\n", res
    res = subprocess.run([venv / "bin" / "sortline", "check"], capture_output=True, text=True, cwd=tmp_path,
                         timeout=60)
    assert res.returncode == 0, res.stderr
    (line,) = res.stderr.splitlines()
    shipped = line.removeprefix("sortline: no --config given: using the shipped demo profile ")
    assert shipped != line and Path(shipped).is_relative_to(venv) and shipped.endswith("/sortline/configs/demo.toml")
    assert res.stdout.startswith(f"{shipped}: valid (profile demo)\n") and "recipe: ejects PET" in res.stdout


def test_the_shipped_onnx_model_is_the_shipped_checkpoint_exported_for_the_demo_strip():
    """The ONNX file the demo profile runs carries the checkpoint's hash and agrees with it in torch."""
    from sortline.models.training import checkpoint
    from sortline.models.training.export import compare
    from sortline.pipeline.graph import load_config

    shape = StripShape.from_machine(load_config(ROOT / "configs" / "demo.toml"))
    net, meta = checkpoint.load(model_file("shipped:belt-fusion-nano.safetensors"))
    onnx_path = model_file("shipped:belt-fusion-nano.onnx")
    backend = open_backend("onnxruntime", onnx_path, shape)
    assert backend.model_hash == meta["hash"] and backend.classes == tuple(net.config.classes)
    check = compare(net, onnx_path, shape)
    assert check["class_agreement"] > 0.9999 and check["max_abs_diff_confidence"] < 1e-4
