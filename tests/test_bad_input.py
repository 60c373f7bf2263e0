"""Bad input found at start-up: one clear line, exit 78 (which systemd never restarts), no traceback.

Kept together here: a broken config file, calibration that does not fit the
cameras, directories the node cannot use. (Missing calibration, bad values,
an unwritable report or recording directory, CURVE keys, a missing or mismatched
model or engine file: test_register, test_config, test_chain, test_recording,
test_security, test_infer.)
"""

from __future__ import annotations

import os

import pytest

from conftest import DEMO, edge_toml, node_toml, sortline, write_config

REGISTER = (node_toml("belt", "simulate") + node_toml("register", "register")
            + edge_toml("belt.rgb", "register.rgb") + edge_toml("belt.hsi", "register.hsi"))


def one_error(res) -> str:
    assert res.returncode == 78, res.stderr[-2000:]
    assert "Traceback" not in res.stderr
    errors = [line for line in res.stderr.splitlines() if " ERROR " in line or "config error" in line]
    assert len(errors) == 1, res.stderr
    return errors[0]


@pytest.mark.system
def test_a_broken_config_file(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text(DEMO.read_text().replace("[belt]", "[belt", 1))
    line = one_error(sortline("node", "register", "--config", str(cfg), timeout=60))
    assert f"config file {cfg}: not valid TOML" in line


@pytest.mark.system
@pytest.mark.parametrize("camera, pixels, expected", [
    # The demo's spectral reference is for a 160-pixel HSI camera, its spatial file for 640 RGB pixels.
    ("hsi", 320, "160"),
    ("rgb", 1280, "640"),
])
def test_calibration_made_for_another_camera(tmp_path, run_dir, camera, pixels, expected):
    cfg = write_config(tmp_path / "c.toml", REGISTER, run_dir, cameras={camera: {"pixels": pixels}})
    line = one_error(sortline("node", "register", "--config", str(cfg), timeout=60))
    assert "sortline.register ERROR" in line and expected in line


@pytest.mark.system
def test_a_runtime_directory_that_cannot_be_made(tmp_path, run_dir):
    (tmp_path / "file").write_text("")
    cfg = write_config(tmp_path / "c.toml", REGISTER, tmp_path / "file" / "run")
    line = one_error(sortline("node", "register", "--config", str(cfg), timeout=60))
    assert f"runtime directory {tmp_path}/file/run: Not a directory (set graph.runtime_dir)" in line


@pytest.mark.system
def test_a_runtime_directory_of_another_user(tmp_path, run_dir):
    if os.getuid() != 0:
        pytest.skip("only root can hand a directory to another user")
    other = tmp_path / "run"
    other.mkdir(mode=0o700)
    os.chown(other, os.getuid() + 1, -1)
    cfg = write_config(tmp_path / "c.toml", REGISTER, other)
    line = one_error(sortline("node", "register", "--config", str(cfg), timeout=60))
    assert f"runtime directory {other} belongs to uid {os.getuid() + 1}, not to this user" in line
