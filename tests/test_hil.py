"""`sortline hil`: the figures from the ejector's samples, every kind of deadline miss, and the
command on the whole demo pipeline (real processes, the valve-bar simulator on UDP)."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest

from sortline.cli import hil
from tests.conftest import demo_toml, free_port, sortline

MS = 1_000_000


def samples(path, rows, stages=("belt", "infer")):
    """An ejector samples file: commands (exposure, sent, deadline, refused, object id) in ns, one trace per
    decision."""
    commands = np.array(rows, dtype=np.int64).reshape(-1, 5)
    traces = np.array([[100 * MS, 0, 1 * MS, 2 * MS, 30 * MS]], dtype=np.int64)   # arrival, then in/out per stage
    np.savez(path, commands=commands, traces=traces, stages=np.array(stages), late=0, sent=len(commands))
    return str(path)


def test_figures_and_every_kind_of_deadline_miss(tmp_path):
    # 1000 commands 40..59.98 ms after exposure, each leaving 20 ms before its deadline, for 250 objects.
    rows = [(0, (40 + i * 0.02) * MS, (60 + i * 0.02) * MS, 0, 7000 + i // 4) for i in range(1000)]
    figures, arrays = hil.analyse(samples(tmp_path / "ok.npz", rows), budget_ms=90, seconds=10)
    assert figures["samples"] == 1000 and figures["deadline_misses"] == 0 and figures["within_budget"]
    assert figures["ejected_objects"] == 250
    assert figures["e2e_p50_ms"] == pytest.approx(50, abs=0.05) and figures["e2e_max_ms"] == pytest.approx(59.98)
    assert figures["lead_min_ms"] == pytest.approx(20) and figures["commands_per_s"] == 100
    assert figures["stage_infer_p50_ms"] == pytest.approx(28) and figures["decision_p50_ms"] == pytest.approx(100)
    assert len(arrays["e2e"]) == 1000

    # One refused, one that left 0.5 ms after its deadline, and two the valve bar saw arrive late.
    bad = rows + [(0, 70 * MS, 60 * MS, 1, 1), (0, 61 * MS, 60.5 * MS, 0, 2)]
    figures, _ = hil.analyse(samples(tmp_path / "bad.npz", bad), budget_ms=90, seconds=10, late_at_valves=2)
    assert (figures["refused_late"], figures["sent_after_deadline"], figures["late_at_valves"]) == (1, 1, 2)
    assert figures["deadline_misses"] == 4 and not figures["within_budget"]
    assert figures["ejected_objects"] == 251      # a refused command ejects nothing
    assert figures["lead_min_ms"] == pytest.approx(-0.5)
    text = hil.markdown(figures, "sortline hil ...")
    assert "OUT OF BUDGET" in text and "4 deadline misses (1 refused, 1 sent after their deadline, 2 late" in text

    # Over budget at p99.9 with no miss: still out of budget.
    slow = [(0, (40 + i * 0.06) * MS, 200 * MS, 0, i) for i in range(1000)]
    figures, _ = hil.analyse(samples(tmp_path / "slow.npz", slow), budget_ms=90, seconds=10)
    assert figures["deadline_misses"] == 0 and figures["e2e_p999_ms"] > 90 and not figures["within_budget"]
    # No commands at all proves nothing: out of budget too.
    figures, _ = hil.analyse(samples(tmp_path / "none.npz", []), budget_ms=90, seconds=10)
    assert figures["samples"] == 0 and not figures["within_budget"]


@pytest.mark.system
def test_hil_on_the_demo_pipeline(tmp_path):
    """A short run of the whole demo graph: the report's files, its keys, its budget, and an exit status that
    says what the report says (this shared machine may be too busy for the budget; it must then say so)."""
    cfg = tmp_path / "demo.toml"
    cfg.write_text(demo_toml(free_port()))
    out = tmp_path / "report"
    res = sortline("hil", "--config", str(cfg), "--seconds", "5", "--out", str(out), "--json",
                   str(tmp_path / "hil.json"), timeout=300)
    figures = json.loads((tmp_path / "hil.json").read_text())
    assert res.returncode == (0 if figures["within_budget"] else 1), res.stderr[-3000:]
    for key in ("e2e_p50_ms", "e2e_p99_ms", "e2e_p999_ms", "e2e_max_ms", "budget_ms", "deadline_misses", "samples",
                "lead_min_ms", "late_at_valves", "stage_infer_p50_ms"):
        assert key in figures, key
    assert figures["budget_ms"] == 140.0 and figures["samples"] > 50 and figures["speed_m_s"] == 2.0
    assert "150.0 ms - 5 ms valve opening - 5 ms margin = 140.0 ms" in figures["budget_derivation"]
    assert figures["e2e_p50_ms"] <= figures["e2e_p99_ms"] <= figures["e2e_max_ms"]
    assert json.loads((out / "hil.json").read_text()) == figures
    assert "# Latency report" in (out / "hil.md").read_text()
    # Every command names its object: ejections are counted per object, and the ejector's metric agrees
    # with the distinct ids its commands carried.
    run = json.loads((out / "run.json").read_text())
    total = sum(v for n in run["nodes"].values() for k, v in n["metrics"].items()
                if k.startswith("sortline_ejections_total"))
    assert figures["ejected_objects"] > 1 and figures["ejected_objects"] == total == figures["ejections_total"]
    img = cv2.imread(str(out / "hil.png"))
    assert img is not None and img.shape[0] > 300
