"""Where the belt is now: encoder positions against the host clock.

Every camera message says at which encoder position its lines were taken
and (in its trace) when, on this host's monotonic clock. A node that must act
at a belt position (the ejector, the valve-bar simulator) listens to a camera
stream and keeps the last few of those pairs: the speed is the slope over the
last WINDOW_S, and a position's time is extrapolated from the newest pair at
that speed, so a belt that speeds up or slows down between detection and
firing is followed within a frame.
"""

from __future__ import annotations

from collections import deque

WINDOW_S = 0.25


class EncoderTrack:
    def __init__(self, ticks_per_mm: float, nominal_speed_m_s: float):
        self.ticks_per_mm = ticks_per_mm
        self.nominal = nominal_speed_m_s * 1000.0 * ticks_per_mm / 1e9   # ticks per ns
        self.pairs: deque[tuple[int, int]] = deque()                     # (position, t_ns)

    def update(self, position: int, t_ns: int) -> None:
        """The encoder read `position` at `t_ns` (host monotonic). Older or stale pairs are ignored."""
        if self.pairs and (position <= self.pairs[-1][0] or t_ns <= self.pairs[-1][1]):
            if position < self.pairs[-1][0] - 1_000_000:     # far behind: the belt was reset (a new run)
                self.pairs.clear()
            else:
                return
        self.pairs.append((position, t_ns))
        while len(self.pairs) > 2 and t_ns - self.pairs[0][1] > WINDOW_S * 1e9:
            self.pairs.popleft()

    def follow(self, msg) -> tuple[int, int] | None:
        """Update from a camera message (see encoder_pair); returns the pair, or None if it had none."""
        pair = encoder_pair(msg)
        if pair is not None:
            self.update(*pair)
        return pair

    @property
    def known(self) -> bool:
        return bool(self.pairs)

    def speed(self) -> float:
        """Ticks per ns over the window (the nominal speed until two pairs are known)."""
        if len(self.pairs) < 2:
            return self.nominal
        (p0, t0), (p1, t1) = self.pairs[0], self.pairs[-1]
        return max((p1 - p0) / (t1 - t0), 1e-12)

    def speed_m_s(self) -> float:
        return self.speed() * 1e9 / self.ticks_per_mm / 1000.0

    def time_at(self, position: float) -> float:
        """Host monotonic ns at which the encoder reads (or read) `position`."""
        p, t = self.pairs[-1]
        return t + (position - p) / self.speed()

    def position_at(self, t_ns: float) -> float:
        p, t = self.pairs[-1]
        return p + (t_ns - t) * self.speed()


def encoder_pair(msg) -> tuple[int, int] | None:
    """(position, host time) of the end of a camera message: its last line was taken when its source stamped it."""
    h = msg.header
    lines = msg.arrays["lines"].shape[0] if "lines" in msg.arrays else 0
    if not h.trace or not h.ticks_per_line:
        return None
    return h.position + lines * h.ticks_per_line, h.trace[0].t_in_ns
