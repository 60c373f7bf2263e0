"""A test-pattern camera: frames of the configured camera's geometry at its line rate.

It stands in for a camera where only the transport is under test (the
runtime's own tests and benchmarks, `make demo` before a belt simulation
exists). Each frame's content is a fixed pattern shifted by its sequence
number, so a sink can check that every byte arrived intact.
"""

from __future__ import annotations

import time
from functools import lru_cache
from typing import Literal

import numpy as np
from pydantic import Field

from sortline.nodes.streams import LINES
from sortline.pipeline.config import Section
from sortline.pipeline.node import Node


@lru_cache(maxsize=8)
def base_pattern(shape: tuple[int, ...], dtype: str) -> np.ndarray:
    n = int(np.prod(shape))
    base = (np.arange(n, dtype=np.uint64) * 2654435761 >> 7) % 251
    return base.astype(dtype).reshape(shape)


def pattern(shape: tuple[int, ...], dtype: str, seq: int, out: np.ndarray | None = None) -> np.ndarray:
    """The content of frame `seq`: the base pattern plus seq, wrapping."""
    dt = np.dtype(dtype)
    shift = dt.type(seq % (int(np.iinfo(dt).max) + 1))
    return np.add(base_pattern(tuple(shape), dt.name), shift, out=out)


class PatternSource(Node):
    outputs = {"out": LINES}

    class Params(Section):
        camera: Literal["rgb", "hsi"] = "rgb"
        stream: str = ""
        dtype: Literal["uint8", "uint16"] = "uint8"
        lines: int = Field(0, ge=0, description="lines per frame; 0: the camera's lines_per_frame")
        pixels: int = Field(0, ge=0, description="0: the camera's pixels")
        bands: int = Field(0, ge=0, description="0: the camera's bands")
        count: int = Field(0, ge=0, description="frames to send, then end the stream; 0: no end")
        paced: bool = Field(True, description="false: as fast as the graph accepts them")
        speed_m_s: float = Field(0.0, ge=0, description="0: the belt's nominal speed")

    def setup(self) -> None:
        p, cam = self.params, getattr(self.machine.cameras, self.params.camera)
        self.stream = p.stream or p.camera
        self.shape = (p.lines or cam.lines_per_frame, p.pixels or cam.pixels, p.bands or cam.bands)
        self.ticks_per_line = cam.ticks_per_line
        rate = self.machine.line_rate_hz(p.camera, p.speed_m_s or None)
        self.frame_ns = int(self.shape[0] / rate * 1e9)
        self.seq = 0
        self.t0 = 0  # set by the first step: the belt starts when the graph does
        self.log.info("%s frames %s %s at %.0f lines/s (%.1f frames/s)", self.stream, self.shape,
                      p.dtype, rate, 1e9 / self.frame_ns)

    def step(self):
        p = self.params
        self.t0 = self.t0 or time.monotonic_ns()
        if p.count and self.seq >= p.count:
            self.finish()
            return None
        first_line_ns = self.t0 + self.seq * self.frame_ns
        complete_ns = first_line_ns + self.frame_ns
        if p.paced and not self.sleep_until(complete_ns):
            return None
        msg = self.out["out"].new(
            {"lines": (self.shape, p.dtype)},
            stream=self.stream, seq=self.seq, position=self.seq * self.shape[0] * self.ticks_per_line,
            ticks_per_line=self.ticks_per_line, device_ts_ns=first_line_ns, host_ts=True,
        )
        if msg is None:
            if not self.stopping:
                self.seq += 1   # dropped (and counted) for a full bounded consumer: that frame is gone
            return None
        pattern(self.shape, p.dtype, self.seq, out=msg.arrays["lines"])
        msg.t_in_ns = complete_ns if p.paced else time.monotonic_ns()
        self.seq += 1
        return [("out", msg)]

    def status(self) -> dict:
        return {"frames": self.seq}
