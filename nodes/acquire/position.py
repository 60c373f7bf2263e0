"""Belt position of each camera frame, and the gaps between frames.

A frame's position is the encoder count at its first line. The best source is
the encoder value the camera latched into the frame's chunk data; without it,
the frame id (a counter the device increments per frame) times the ticks one
frame spans. Either way a jump larger than one frame means lines are missing:
the caller counts it and flags the next message, so that nothing downstream
splices two pieces of belt together as if they were adjacent.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Placement:
    position: int  # belt position of the frame's first line, encoder ticks
    lost: int  # frames the device's counters say are missing just before this one
    gap: bool  # lines are missing before this frame


class BeltTracker:
    def __init__(self, frame_lines: int, ticks_per_line: int, encoder_bits: int = 32):
        self.frame_ticks = frame_lines * ticks_per_line
        self.modulus = 1 << encoder_bits
        self.next_position = 0  # where the next frame starts if nothing is missing
        self._last_id: int | None = None
        self._last_encoder: int | None = None
        self._pending_gap = False  # after a restart

    def place(self, frame_id: int | None, encoder: int | None) -> Placement:
        lost, gap = 0, self._pending_gap
        self._pending_gap = False
        position = self.next_position
        if encoder is not None and self._last_encoder is not None:
            # A counter of encoder_bits bits wraps; a step of more than half its range is a reset.
            step = (encoder - self._last_encoder) % self.modulus
            if step >= self.modulus // 2:
                gap = True
            else:
                position = self.next_position - self.frame_ticks + step
                missing = round(step / self.frame_ticks) - 1
                if missing > 0:
                    lost, gap = lost + missing, True
        elif frame_id is not None and self._last_id is not None:
            if frame_id > self._last_id:
                missing = frame_id - self._last_id - 1
                position += missing * self.frame_ticks
                if missing:
                    lost, gap = lost + missing, True
            else:  # the device restarted its count: how much is missing is unknown
                gap = True
        self._last_id, self._last_encoder = frame_id, encoder
        self.next_position = position + self.frame_ticks
        return Placement(position, lost, gap)

    def restart(self, missed_frames: int) -> None:
        """The device was lost and is back: its counters start again. The
        belt moved on meanwhile by an estimated `missed_frames` frames (the
        caller counts those); the next frame is placed after them, flagged."""
        self._last_id = self._last_encoder = None
        self.next_position += missed_frames * self.frame_ticks
        self._pending_gap = True
