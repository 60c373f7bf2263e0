"""The valve bar against the belt: which valve blows on which column, and how far downstream."""

from __future__ import annotations

import numpy as np

from sortline.pipeline.config import Machine


class BarGeometry:

    def __init__(self, machine: Machine, stride: int = 1):
        """stride: columns and lines are cells of stride x stride RGB pixels (a coarser class mask)."""
        v, rgb = machine.valve_bar, machine.cameras.rgb
        self.count, self.pitch, self.offset = v.count, v.pitch_mm, v.offset_mm
        self.mm_per_px = rgb.mm_per_pixel * stride
        self.tpl = rgb.ticks_per_line * stride
        self.tpm = machine.belt.ticks_per_mm
        # Encoder ticks from a point passing the RGB scan line to it passing the valve bar.
        self.travel_ticks = int(round((v.distance_mm - rgb.scan_line_mm) * self.tpm))
        # The longest valve window there can be: air is planned for lines seen but not yet at the bar,
        # so no more than the belt between scan line and bar, the air margins and the strip they came in.
        e, m = machine.ejector, machine.model
        self.max_window_ticks = (self.travel_ticks + int((e.margin_before_mm + e.margin_after_mm) * self.tpm)
                                 + (m.strip_lines + 2 * m.overlap_lines) * rgb.ticks_per_line)
        # Valve under each column (-1: no valve there).
        x = (np.arange(rgb.pixels // stride) + 0.5) * self.mm_per_px
        idx = np.floor((x - (self.offset - self.pitch / 2)) / self.pitch).astype(np.int64)
        self.valve_of_col = np.where((idx >= 0) & (idx < self.count), idx, -1)
        # Each valve's lane as mask columns [first, last + 1) ((0, 0): no column under it).
        self.lane_cols = np.zeros((self.count, 2), np.int64)
        cols = np.flatnonzero(self.valve_of_col >= 0)
        lanes = self.valve_of_col[cols]
        self.lane_cols[lanes[::-1], 0] = cols[::-1]
        self.lane_cols[lanes, 1] = cols + 1
