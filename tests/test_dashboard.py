"""The Grafana dashboard asks only for metrics the nodes export."""

from __future__ import annotations

import json
import re
from importlib.resources import files

from prometheus_client import REGISTRY

import sortline.nodes.acquire.acquisition  # noqa: F401  (registers the camera metrics)
import sortline.nodes.eject_plan  # noqa: F401  (the plan's)
import sortline.nodes.ejector  # noqa: F401  (and the ejector's)
import sortline.pipeline.metrics  # noqa: F401

EJECTOR = {"sortline_ejector_late_total", "sortline_ejections_total", "sortline_valve_open_seconds_total"}
SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum"), "gauge": ("",)}


def exported() -> set[str]:
    names = set()
    for family in REGISTRY.collect():
        names.update(family.name + s for s in SUFFIXES.get(family.type, ()))
    return names


def test_every_panel_queries_an_exported_metric_and_the_issue_list_is_covered():
    dash = json.loads((files("sortline") / "docs" / "grafana" / "sortline.json").read_text())   # package data
    assert dash["__inputs"][0]["pluginId"] == "prometheus"  # importable: Grafana asks for the data source
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    used = {name for e in exprs for name in re.findall(r"\bsortline_[a-z_]+", e)}
    assert used - exported() == set()
    for name in ("sortline_lines_total", "sortline_edge_drops_total", "sortline_malformed_messages_total",
                 "sortline_camera_connected", "sortline_camera_lost_frames_total", "sortline_latency_seconds_bucket",
                 "sortline_stage_seconds_bucket", "sortline_auth_refused_total", "sortline_plan_spared_lanes_total",
                 "sortline_ejector_decision_seconds_bucket", *EJECTOR):
        assert name in used, name
    assert len({p["id"] for p in dash["panels"]}) == len(dash["panels"])
    assert all(p["datasource"]["uid"] == "${DS_PROMETHEUS}" for p in dash["panels"])
