"""The production machine, end to end on its simulated twin: the shipped production model on ONNX Runtime."""

from __future__ import annotations

import json

import pytest

from conftest import ROOT, free_port, sortline


@pytest.mark.system
def test_the_production_twin_sorts_end_to_end(tmp_path, run_dir):
    """One second of the production belt (3 m of it, 2560 px RGB, 640 px x 224-band HSI, 96 valves), unpaced:
    the cameras' twin, register, the production model (the config asks for TensorRT; on this CPU it runs on
    ONNX Runtime and says so), the eject plan, the ejector, and the valve bar scoring the air."""
    cfg = tmp_path / "twin.toml"
    cfg.write_text(f'extends = "{ROOT / "configs/production-twin.toml"}"\n'
                   f'[graph]\nname = "ptwin"\nruntime_dir = "{run_dir}"\n'
                   f'[ejector]\naddress = "127.0.0.1:{free_port()}"\n'
                   '[nodes.live_view.params]\nbind = "127.0.0.1:0"\n')
    res = sortline("score", "--config", str(cfg), "--unpaced", "--seconds", "1", "--json", str(tmp_path / "s.json"),
                   timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    score = json.loads((tmp_path / "s.json").read_text())
    assert score["speed_m_s"] == 3.0 and score["targets"] >= 5, score
    assert score["recovery"] >= 0.6 and score["purity"] >= 0.6, score
    assert score["late"] == 0 and score["bad_datagrams"] == 0, score
    assert "onnxruntime" in res.stderr.lower()
