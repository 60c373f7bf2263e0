"""Belt motion: when each encoder position passes, with slow drift and jitter.

Cameras are triggered by the encoder, so what they see depends only on
position; speed only decides when. Speed is a function of position (blocks
of BLOCK_MM, each with its own jitter; a slow sinusoidal drift on top) so the
time of any position is fixed by the seed, whichever camera asks first.
"""

from __future__ import annotations

import numpy as np

BLOCK_MM = 20.0


class BeltMotion:
    def __init__(self, seed: int, speed_m_s: float, ticks_per_mm: float, drift: float = 0.02,
                 drift_period_s: float = 20.0, jitter: float = 0.005):
        self.ticks_per_mm = ticks_per_mm
        self.block_ticks = BLOCK_MM * ticks_per_mm
        self.speed_mm_s = speed_m_s * 1000.0
        self.drift, self.jitter = drift, jitter
        self.drift_period_mm = drift_period_s * self.speed_mm_s
        self.rng = np.random.default_rng([seed, 3])
        self.start_s = np.zeros(1)   # time at which block b starts, for the blocks seen so far

    def _extend(self, blocks: int) -> None:
        have = len(self.start_s) - 1
        if blocks <= have:
            return
        b = np.arange(have, blocks)
        speed = self.speed_mm_s * (1 + self.drift * np.sin(2 * np.pi * b * BLOCK_MM / self.drift_period_mm)) \
            * (1 + self.jitter * self.rng.standard_normal(len(b)))
        self.start_s = np.concatenate([self.start_s, self.start_s[-1] + np.cumsum(BLOCK_MM / speed)])

    def time_s(self, position: int) -> float:
        """Seconds since the belt's position 0 until the encoder reads `position` (≥ 0)."""
        b, rest = divmod(position, self.block_ticks)
        b = int(b)
        self._extend(b + 2)
        block_s = self.start_s[b + 1] - self.start_s[b]
        return float(self.start_s[b] + rest / self.block_ticks * block_s)

    def speed_m_s(self, position: int) -> float:
        b = int(position // self.block_ticks)
        self._extend(b + 2)
        return BLOCK_MM / (self.start_s[b + 1] - self.start_s[b]) / 1000.0
