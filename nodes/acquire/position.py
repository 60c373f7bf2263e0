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
        self._encoder_position = 0  # the position given to the last encoder value
        self._pending_gap = False  # after a restart

    def place(self, frame_id: int | None, encoder: int | None) -> Placement:
        """Position from the encoder where there is one, else from the frame id; frames
        lost from the frame ids where there are some (exact), else from the encoder step
        (which assumes the camera is triggered once per ticks_per_line)."""
        gap, self._pending_gap = self._pending_gap, False
        position, lost = self.next_position, None
        if frame_id is not None and self._last_id is not None:
            if frame_id > self._last_id:
                lost = frame_id - self._last_id - 1
            else:  # the device restarted its count: how much is missing is unknown
                gap = True
        if encoder is not None and self._last_encoder is None:
            position = encoder  # the encoder's own count: cameras on one encoder agree
        elif encoder is not None:
            # A counter of encoder_bits bits wraps; a step back (more than half its range
            # forward) is a reset, after which only the estimate is left.
            step = (encoder - self._last_encoder) % self.modulus
            if step >= self.modulus // 2:
                gap = True
            else:
                position = self._encoder_position + step
                if lost is None:
                    lost = max(0, round(step / self.frame_ticks) - 1)
        elif lost:
            position += lost * self.frame_ticks
        lost = lost or 0
        self._last_id = frame_id
        if encoder is not None:
            self._last_encoder, self._encoder_position = encoder, position
        self.next_position = position + self.frame_ticks
        return Placement(position, lost, gap or lost > 0)

    def restart(self, missed_frames: int) -> None:
        """The device was lost and is back: its frame ids start again. The belt moved on
        meanwhile by an estimated `missed_frames` frames (the caller counts those); the
        next frame is placed after them, or by the encoder if its count carried on, and
        is flagged."""
        self._last_id = None
        self.next_position += missed_frames * self.frame_ticks
        self._pending_gap = True
