"""Node kinds come from entry points: a machine builder's own package adds one without touching sortline."""

from __future__ import annotations

import os

import pytest

from conftest import edge_toml, load_json, node_toml, sortline, write_config

NODE = '''
import numpy as np

from sortline.nodes.streams import LINES
from sortline.pipeline.node import Node


class Invert(Node):
    """A plant's own stage: camera lines in, the same lines inverted out."""

    inputs = {"in": LINES}
    outputs = {"out": LINES}

    def process(self, port, msg):
        out = self.out["out"].new({"lines": (msg.arrays["lines"].shape, msg.arrays["lines"].dtype)}, like=msg)
        if out is None:
            return None
        np.subtract(255, msg.arrays["lines"], out=out.arrays["lines"])
        return [("out", out)]
'''


def plant_package(root, entry_points: str):
    """An installed distribution as importlib.metadata finds one: a module and its dist-info."""
    (root / "acme_nodes.py").write_text(NODE)
    info = root / "acme_nodes-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: acme-nodes\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(entry_points)
    return {**os.environ, "PYTHONPATH": str(root)}


GRAPH = (node_toml("camera", "pattern", "lines = 4, pixels = 64, bands = 3, count = 40, paced = false")
         + node_toml("invert", "acme_invert") + node_toml("sink", "sink", "verify = false, report = 'REPORT'")
         + edge_toml("camera.out", "invert.in") + edge_toml("invert.out", "sink.in"))


@pytest.mark.system
def test_a_node_kind_from_another_package_runs_in_the_graph(tmp_path, run_dir):
    env = plant_package(tmp_path, "[sortline.nodes]\nacme_invert = acme_nodes:Invert\n")
    cfg = write_config(tmp_path / "c.toml", GRAPH.replace("REPORT", str(tmp_path / "sink.json")), run_dir)
    res = sortline("check", "--config", str(cfg), env=env, timeout=60)
    assert res.returncode == 0, res.stderr
    res = sortline("run", "--config", str(cfg), "--seconds", "30", env=env, timeout=90)
    assert res.returncode == 0, res.stderr[-3000:]
    sink = load_json(tmp_path / "sink.json")
    assert sink["received"] == 40 and sink["lost"] == 0
    # Without the package the kind is unknown, and the check says which kinds there are.
    res = sortline("check", "--config", str(cfg), timeout=60)
    assert res.returncode == 78 and "nodes.invert.kind = 'acme_invert': unknown node kind, one of" in res.stderr


@pytest.mark.system
def test_a_kind_registered_twice_is_refused(tmp_path, run_dir):
    env = plant_package(tmp_path, "[sortline.nodes]\nrelay = acme_nodes:Invert\n")
    cfg = write_config(tmp_path / "c.toml", GRAPH.replace("acme_invert", "relay").replace("REPORT", "x"), run_dir)
    res = sortline("check", "--config", str(cfg), env=env, timeout=60)
    assert res.returncode == 78
    (line,) = [line for line in res.stderr.splitlines() if "registered twice" in line]
    assert "node kind 'relay'" in line and "sortline.nodes.relay:Relay" in line and "acme_nodes:Invert" in line
