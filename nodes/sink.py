"""A measuring sink: counts what arrives, checks it, and reports latency.

For every message it checks sequence continuity per stream (gaps, reordering)
and, for test-pattern frames, the content; it measures the end-to-end latency
from the first trace entry's t_in (the source's acquisition time) to arrival,
and each stage's share. `report` writes all of it as JSON when the node stops.
"""

from __future__ import annotations

import json
import os
import time

import numpy as np
from pydantic import Field

from sortline.nodes.pattern import base_pattern
from sortline.pipeline import metrics
from sortline.pipeline.config import ConfigError, Section
from sortline.pipeline.node import Node
from sortline.pipeline.ports import ANY

SAMPLE_STRIDE = 97  # bytes checked per frame: every 97th, enough to catch a wrong or torn frame


def _percentiles(values) -> dict:
    if len(values) == 0:
        return {}
    a = np.asarray(values, dtype=np.float64) / 1e6
    p50, p99, p999 = np.percentile(a, [50, 99, 99.9])
    return {"p50_ms": float(p50), "p99_ms": float(p99), "p999_ms": float(p999), "max_ms": float(a.max())}


class Sink(Node):
    inputs = {"in": ANY}

    class Params(Section):
        verify: bool = Field(True, description="check test-pattern content")
        delay_ms: float = Field(0.0, ge=0, description="pretend each message takes this long (a slow consumer)")
        report: str = Field("", description="write a JSON report here when the node stops")
        window: int = Field(100_000, gt=0, description="latency samples kept")

    def setup(self) -> None:
        report_dir = os.path.dirname(os.path.abspath(self.params.report)) if self.params.report else None
        if report_dir and not os.access(report_dir, os.W_OK):
            # A restart will not make the directory appear: say so once, do not crash-loop.
            raise ConfigError([f"nodes.{self.name}.params.report = {self.params.report!r}: "
                               f"directory {report_dir} does not exist or is not writable"])
        n = self.params.window
        self.e2e_ns = np.zeros(n, dtype=np.int64)
        self.stage_ns: dict[str, np.ndarray] = {}
        self.received = 0
        self.last_seq: dict[str, int] = {}
        self.gaps = self.lost = self.reordered = self.corrupt = self.gap_flags = 0
        self.first_ns = self.last_ns = 0
        self._e2e = metrics.E2E_SECONDS.labels(self.name)
        # Across hosts the trace is only as good as the hosts' clock agreement (pipeline/clock.py).
        self.e2e_refused = ""
        if self.context.unsynchronised_edges:
            self.e2e_refused = "clocks not synchronised"
            self.log.warning("end-to-end latency not reported: its path crosses tcp edges (%s) and "
                             "clock.ptp_synchronised is false", ", ".join(self.context.unsynchronised_edges))

    def process(self, port, msg):
        now = time.monotonic_ns()
        h = msg.header
        last = self.last_seq.get(h.stream)
        if last is not None:
            if h.seq <= last:
                self.reordered += 1
            elif h.seq != last + 1:
                self.gaps += 1
                self.lost += h.seq - last - 1
        self.last_seq[h.stream] = h.seq if last is None else max(h.seq, last)
        self.gap_flags += h.gap
        if self.params.verify and "lines" in msg.arrays:
            self.corrupt += not self._intact(msg.arrays["lines"], h.seq)
        i = self.received % self.params.window
        if h.trace:
            if not self.e2e_refused:
                self.e2e_ns[i] = now - h.trace[0].t_in_ns
                self._e2e.observe(self.e2e_ns[i] / 1e9)
            for entry in h.trace:
                stage = self.stage_ns.get(entry.stage)
                if stage is None:
                    stage = self.stage_ns[entry.stage] = np.zeros(self.params.window, dtype=np.int64)
                stage[i] = entry.t_out_ns - entry.t_in_ns
        self.received += 1
        self.first_ns = self.first_ns or now
        self.last_ns = now
        if self.params.delay_ms:
            time.sleep(self.params.delay_ms / 1000)
        return None

    def _intact(self, array: np.ndarray, seq: int) -> bool:
        if array.dtype.kind != "u":
            return True
        base = base_pattern(tuple(array.shape), array.dtype.name).reshape(-1)[::SAMPLE_STRIDE]
        shift = array.dtype.type(seq % (int(np.iinfo(array.dtype).max) + 1))
        return bool(np.array_equal(array.reshape(-1)[::SAMPLE_STRIDE], base + shift))

    def summary(self) -> dict:
        n = min(self.received, self.params.window)
        seconds = (self.last_ns - self.first_ns) / 1e9
        return {
            "received": self.received,
            "lost": self.lost,
            "gaps": self.gaps,
            "gap_flags": self.gap_flags,
            "reordered": self.reordered,
            "corrupt": self.corrupt,
            "rate_per_s": (self.received - 1) / seconds if seconds > 0 else 0.0,
            "e2e": {"not_reported": self.e2e_refused} if self.e2e_refused else _percentiles(self.e2e_ns[:n]),
            "stages": {k: _percentiles(v[:n]) for k, v in self.stage_ns.items()},
        }

    def status(self) -> dict:
        n = min(self.received, self.params.window)
        figures = {"received": self.received, "lost": self.lost, "corrupt": self.corrupt}
        if self.e2e_refused:
            return {**figures, "e2e": f"not reported ({self.e2e_refused})"}
        e2e = _percentiles(self.e2e_ns[:n])
        return {**figures, **{f"e2e_{k}": round(float(v), 2) for k, v in e2e.items()}}

    def teardown(self) -> None:
        if self.params.report and hasattr(self, "e2e_ns"):
            tmp = f"{self.params.report}.tmp"
            with open(tmp, "w") as fh:
                json.dump(self.summary(), fh, indent=2)
            os.replace(tmp, self.params.report)  # never a half-written report
