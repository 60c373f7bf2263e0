"""The shipped Prometheus alert rules: valid, firing on what they are for, asking only for exported metrics."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from importlib.resources import files
from pathlib import Path

from prometheus_client import REGISTRY

from sortline.pipeline import registry

RULES = files("sortline") / "docs" / "prometheus" / "sortline-rules.yml"   # package data
RULE_TESTS = Path(__file__).parent / "prometheus" / "sortline-rules.test.yml"
PROMETHEUS_OWN = {"up"}   # what Prometheus records for every target it scrapes
SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum"), "gauge": ("",)}


def promtool(*args: str) -> subprocess.CompletedProcess:
    # On PATH, or taken out of Debian's package into the venv by `make test` (the Makefile's prometheus-tools).
    tool = shutil.which("promtool") or shutil.which("promtool", path=str(Path(sys.executable).parent))
    assert tool, "promtool is missing: `make test` puts it into .venv/bin"
    return subprocess.run([tool, *args], capture_output=True, text=True, timeout=60, cwd=RULE_TESTS.parent)


def alerts(text: str) -> list[str]:
    return re.findall(r"^\s*- alert: (\w+)$", text, re.M)


def expressions(text: str) -> list[str]:
    """Each rule's expr, on one line or folded over the more indented lines after `expr: >`."""
    out, lines = [], text.splitlines()
    for i, line in enumerate(lines):
        m = re.match(r"^(\s*)expr: (.*)$", line)
        if not m:
            continue
        indent, value = len(m.group(1)), m.group(2).strip()
        if value in (">", "|"):
            block = []
            for more in lines[i + 1:]:
                if more.strip() and len(more) - len(more.lstrip()) <= indent:
                    break
                block.append(more.strip())
            value = " ".join(block)
        out.append(value)
    return out


def metric_names(expr: str) -> set[str]:
    """The metrics a PromQL expression selects: names not called as functions, outside label matchers, ranges
    and by/on label lists."""
    e = re.sub(r'"[^"]*"', "", expr)
    e = re.sub(r"\{[^}]*\}|\[[^\]]*\]", " ", e)
    e = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", e)
    words = set(re.findall(r"\b([a-zA-Z_:][a-zA-Z0-9_:]*)\b(?!\s*\()", e))
    return words - {"or", "and", "unless", "bool", "offset"}


def exported() -> set[str]:
    """Every metric a sortline node process can serve: the runtime's and those of every node kind (each kind's
    module imported through the registry, as a node process imports it), and prometheus_client's process
    metrics."""
    for kind in registry.kinds():
        registry.node_class(kind)
    names = set()
    for family in REGISTRY.collect():
        names.update(family.name + s for s in SUFFIXES.get(family.type, ()))
    return names


def test_promtool_checks_the_shipped_rules():
    text = RULES.read_text()
    res = promtool("check", "rules", str(RULES))
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"SUCCESS: {len(alerts(text))} rules found" in res.stdout
    assert {"SortlineNodeDown", "SortlineNodeRestarts", "SortlineCameraLost", "SortlineLateCommands",
            "SortlineEdgeDrops", "SortlineValveCommandsStopped"} <= set(alerts(text))


def test_each_alert_fires_on_its_series_and_not_on_the_normal_ones():
    """`promtool test rules`: series in, alerts (labels and annotations) out, at given times."""
    res = promtool("test", "rules", RULE_TESTS.name)
    assert res.returncode == 0, res.stdout + res.stderr
    tested = set(re.findall(r"alertname: (\w+)", RULE_TESTS.read_text()))
    assert tested == set(alerts(RULES.read_text()))   # every shipped alert has its test


def test_the_rules_ask_only_for_metrics_sortline_exports():
    exprs = expressions(RULES.read_text())
    assert len(exprs) == len(alerts(RULES.read_text()))
    used = set().union(*(metric_names(e) for e in exprs))
    assert "sortline_ejector_late_total" in used and "sortline_camera_connected" in used   # the parsing works
    assert used - exported() - PROMETHEUS_OWN == set()
