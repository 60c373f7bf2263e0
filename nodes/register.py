"""The register node: RGB and HSI lines → co-registered strips for the model.

The cameras run at different line rates, on scan lines a few centimetres
apart, through different lenses. This node keeps a short history of each
stream keyed by encoder position, turns HSI counts into reflectance binned to
the model's bands (spectral calibration), and cuts the belt into strips of
`model.strip_lines` RGB lines plus `model.overlap_lines` of context on both
sides. Each strip carries both grids over the same stretch of belt: RGB at
its own resolution, HSI resampled (spatial calibration) onto the RGB grid
coarsened by the integer ratio r, bilinear in both directions.

A gap (lines lost upstream, flagged by the camera node, or a jump in
positions) ends the current strip early, its missing lines filled by
repeating the last real one and counted in meta["valid_lines"]; the next
strip starts after the gap with gap=True and its upper context repeated from
its first line. Nothing is ever spliced across missing lines.
"""

from __future__ import annotations

from collections import deque

import cv2
import numpy as np
from pydantic import Field

from sortline.calibration.spatial import SpatialCalibration
from sortline.calibration.spectral import BLOCK_BYTES, BinnedReflectance, CalibrationError, SpectralReference
from sortline.nodes.streams import LINES, STRIP, StripMeta
from sortline.pipeline import metrics
from sortline.pipeline.config import ConfigError, Machine, Section
from sortline.pipeline.node import Node, RateLimitedLog


class HeldLines:
    """One camera's lines that strips may still need, in one array, in the order they came.

    `chunks` holds (position, lines) per input, each `lines` a view of the array, consecutive chunks
    on consecutive rows: a run of consecutive chunks is one slice of the array, read without
    concatenating. The StripCutter trims chunks from the left; new lines go after the last, and when
    the array is full the lines still held move to its start, or to an array twice as large when
    they would fill more than half of it (while a camera is late), up to twice `most`, the most
    lines the cutter holds.
    """

    def __init__(self, line_shape: tuple[int, ...], dtype, reserve: int, most: int):
        self.array = self._rows(reserve, line_shape, dtype)
        self.chunks: deque[tuple[int, np.ndarray]] = deque()
        self.end = 0                # the row after the newest line
        self.most = most

    @staticmethod
    def _rows(n: int, line_shape: tuple[int, ...], dtype) -> np.ndarray:
        return np.full((n, *line_shape), 0, dtype)   # written now: no page faults while strips are due

    def add(self, position: int, n: int) -> np.ndarray:
        """The rows for n new lines from `position`, held as a chunk, for the caller to fill."""
        if self.end + n > len(self.array):
            self._make_room(n)
        rows = self.array[self.end:self.end + n]
        self.chunks.append((position, rows))
        self.end += n
        return rows

    def row(self, lines: np.ndarray) -> int:
        """The row of the array where `lines` (a chunk, or a view into one) starts."""
        offset = lines.__array_interface__["data"][0] - self.array.__array_interface__["data"][0]
        return offset // self.array.strides[0]

    def _make_room(self, n: int) -> None:
        first = self.row(self.chunks[0][1]) if self.chunks else self.end
        held = self.end - first
        rows = self.array
        size = max(held + n, min(2 * len(rows), 2 * (self.most + n)))
        if 2 * (held + n) > len(rows) and size > len(rows):
            rows = self._rows(size, rows.shape[1:], rows.dtype)
        starts = [self.row(a) - first for _, a in self.chunks]
        rows[:held] = self.array[first:self.end]      # numpy copies overlapping rows as if through a buffer
        moved = [(p, rows[r:r + len(a)]) for (p, a), r in zip(self.chunks, starts)]
        self.chunks.clear()
        self.chunks.extend(moved)
        self.array, self.end = rows, held


class StripCutter:
    """The node's logic without sockets: feed rgb()/hsi() chunks, collect strips()."""

    def __init__(self, machine: Machine, spectral: SpectralReference, spatial: SpatialCalibration,
                 max_wait_lines: int = 2048):
        rgb, hsi, m = machine.cameras.rgb, machine.cameras.hsi, machine.model
        self.r = machine.hsi_ratio
        self.tpl_r, self.tpl_h = rgb.ticks_per_line, hsi.ticks_per_line
        self.width, self.hsi_pixels, self.bands = rgb.pixels, hsi.pixels, m.bands
        self.groups = [tuple(r) for r in m.band_ranges] or m.bands    # explicit ranges, or N equal groups
        self.core, self.overlap = m.strip_lines, m.overlap_lines
        self.total = self.core + 2 * self.overlap
        self.spectral, self.spatial = spectral, spatial
        self.binned = BinnedReflectance(spectral, self.groups)   # counts → reflectance in the model's bands
        self.max_wait_lines = max_wait_lines
        # Static half of the resampling: which HSI coordinate lies under each coarse cell's centre.
        cells = self.width // self.r
        u = spatial.hsi_u((np.arange(cells) + 0.5) * self.r)
        self.map_x = np.broadcast_to((u - 0.5).astype(np.float32), (self.total // self.r, cells)).copy()
        self.along = spatial.along_ticks(u)                    # RGB ticks − HSI ticks, per cell column
        self.cell_pos = (np.arange(self.total // self.r) + 0.5) * self.r * self.tpl_r   # from the strip's top
        self.rgb_shape = (self.total, self.width, 3)
        self.hsi_shape = (*self.map_x.shape, self.bands)
        # The resampling's output before the strip's dtype: rows of cells, about BLOCK_BYTES of them.
        block_rows = max(1, min(self.hsi_shape[0], BLOCK_BYTES // (4 * cells * self.bands)))
        self._cells = np.full((block_rows, cells, self.bands), 0.0, np.float32)
        # Room for three times the lines a strip and a frame span (HSI: with the cameras' distance apart);
        # more only while a camera is late.
        lpf_r, lpf_h = machine.cameras.rgb.lines_per_frame, machine.cameras.hsi.lines_per_frame
        span_h = ((self.total + lpf_r) * self.tpl_r + np.abs(self.along).max()) / self.tpl_h
        # The most held while the other camera is late: max_wait_lines of belt, a strip and a frame.
        most_r = max_wait_lines + self.total + 2 * lpf_r
        most_h = int((most_r * self.tpl_r + np.ptp(self.along)) / self.tpl_h) + 3 + 2 * lpf_h
        self.rgb_held = HeldLines((self.width, 3), np.uint8, 3 * (self.total + lpf_r), most_r)
        self.hsi_held = HeldLines((self.hsi_pixels, self.bands), np.float32, 3 * (int(span_h) + 3 + lpf_h), most_h)
        self.rgb_chunks, self.hsi_chunks = self.rgb_held.chunks, self.hsi_held.chunks
        self.next_core: int | None = None       # position of the next strip's first core line
        self.after_gap = True                   # no real context above the next strip
        self.rgb_end = self.hsi_end = None      # position just past the last line received
        # RGB positions where real data stops (RGB gaps), and stretches of RGB
        # positions no HSI line covers (before the first one, HSI gaps): [lo, hi).
        self.breaks: list[int] = []
        self.no_hsi: list[tuple[float, float]] = []
        self.seq = 0
        self.dropped_lines = 0                  # RGB lines without HSI, given up
        # The RGB lines from the first HSI line's position to the first the HSI can cover: no HSI camera
        # saw them, however the two started, since their scan lines lie `along` apart. Not lost data: the
        # belt there was never seen by both. Counted apart from the drops.
        self.lead_in: tuple[float, float] | None = None
        self.lead_in_lines = 0
        self.dropped_hsi_lines = 0              # HSI lines without RGB (the RGB camera late or stopped), given up

    # Input.

    def rgb(self, position: int, lines: np.ndarray, gap: bool) -> None:
        if self.rgb_end is not None and (gap or position != self.rgb_end):
            self.breaks.append(self.rgb_end)
        if self.next_core is None:
            self.next_core = position
        self.rgb_held.add(position, len(lines))[...] = lines   # the input is a view of a slot: copy what is kept
        self.rgb_end = position + len(lines) * self.tpl_r

    def hsi(self, position: int, raw: np.ndarray, gap: bool) -> None:
        if self.lead_in is None:
            self.lead_in = (position, position + self.along.max() + self.tpl_h)
        if self.hsi_end is None or gap or position != self.hsi_end:
            # RGB lines whose HSI (with the line after, to interpolate) is missing cannot be registered.
            lo = -np.inf if self.hsi_end is None else int(np.floor(self.hsi_end + self.along.min() - self.tpl_h))
            self.no_hsi.append((lo, position + self.along.max() + self.tpl_h))
            if self.hsi_end is not None:
                self.breaks.append(lo)
        self.spectral.check(raw)
        self.binned(raw, out=self.hsi_held.add(position, len(raw)))
        self.hsi_end = position + len(raw) * self.tpl_h
        # RGB more than max_wait_lines behind (or stopped): the HSI before that is given up, counted, and
        # the RGB lines it saw, should they still come, are skipped as HSI-less (bounded memory either way).
        limit = self.hsi_end - (self.max_wait_lines + self.total) * self.tpl_r
        dropped = 0
        while len(self.hsi_chunks) > 1 and self.hsi_chunks[0][0] + len(self.hsi_chunks[0][1]) * self.tpl_h <= limit:
            dropped += len(self.hsi_chunks.popleft()[1])
        if dropped:
            self.dropped_hsi_lines += dropped
            first = self.hsi_chunks[0][0]
            self.no_hsi = [(lo, hi) for lo, hi in self.no_hsi if lo != -np.inf] + [
                (-np.inf, first + self.along.max() + self.tpl_h)]

    # Output.

    def strips(self, into=None):
        """Every strip that can be made now: (position, rgb, hsi, valid_lines, gap).

        into(position, valid_lines, gap) gives the arrays to write the strip into (the node's message
        buffers: rgb uint8, hsi float16 or float32), or None where there is nowhere to put it: that strip
        is given up and no more are made now. Without it, new arrays (hsi float32).
        """
        into = into or self._new_arrays
        while self.next_core is not None:
            made = self._one(into)
            if made is None or made[1] is None:
                return
            yield made

    def _new_arrays(self, position: int, valid: int, gap: bool) -> tuple[np.ndarray, np.ndarray]:
        return np.empty(self.rgb_shape, np.uint8), np.empty(self.hsi_shape, np.float32)

    def _one(self, into):
        if self.hsi_end is None:
            return self._wait_or_skip(self.next_core)
        for lo, hi in self.no_hsi:
            if lo <= self.next_core < hi:
                # Move past RGB lines that no HSI line saw, on the RGB line grid.
                skip = int(np.ceil((hi - self.next_core) / self.tpl_r))
                if self.rgb_end < self.next_core + skip * self.tpl_r:
                    return None
                a, b = self.lead_in
                lead = max(0, int(np.ceil((min(b, self.next_core + skip * self.tpl_r) - max(a, self.next_core))
                                          / self.tpl_r)))
                self.lead_in_lines += lead
                self.dropped_lines += skip - lead
                self._resume_at(self.next_core + skip * self.tpl_r)
                return self._one(into) if self.next_core is not None else None
        top = self.next_core - self.overlap * self.tpl_r
        core_end = self.next_core + self.core * self.tpl_r
        bottom = core_end + self.overlap * self.tpl_r
        cut = min((b for b in self.breaks if b > self.next_core), default=None)
        end = bottom if cut is None else min(bottom, cut)
        if self.rgb_end < end:
            return None      # not all RGB lines yet
        if self.hsi_end < end - self.along.min() + self.tpl_h:
            return self._wait_or_skip(end)
        valid = int((min(end, core_end) - self.next_core) // self.tpl_r)
        gap = self.after_gap
        rgb, hsi = into(top, valid, gap) or (None, None)
        if rgb is not None:
            if not hsi.flags.c_contiguous:    # OpenCV writes float16 only into a view of contiguous rows
                raise ValueError("strips(into): the hsi array must be C-contiguous")
            self._rgb_lines(top, end, rgb)
            self._hsi_cells(top, hsi)
        if end <= core_end:
            self._resume_at(end)                     # a gap inside the core: start again after it
        else:
            self._continue_at(core_end)
        self.seq += 1
        return top, rgb, hsi, valid, gap

    def _wait_or_skip(self, end: int):
        """HSI is late. Within max_wait_lines, wait; beyond, HSI has stopped: give lines up, counted."""
        excess = self.rgb_end - self.max_wait_lines * self.tpl_r
        if excess < end:
            return None
        drop_to = self.next_core + (excess - self.next_core) // self.tpl_r * self.tpl_r
        self.dropped_lines += (drop_to - self.next_core) // self.tpl_r
        self.breaks.append(drop_to)
        self._resume_at(drop_to)
        return None

    def _resume_at(self, position: int) -> None:
        """The next strip starts at the first RGB line at or after `position`, with no context above."""
        chunk = next((p for p, a in self.rgb_chunks if p + len(a) * self.tpl_r > position), None)
        # On the RGB line grid: the first whole line at or after `position`.
        self.next_core = None if chunk is None else chunk + max(0, -(-(position - chunk) // self.tpl_r)) * self.tpl_r
        self.after_gap = True
        self.breaks = [b for b in self.breaks if self.next_core is None or b > self.next_core]
        self._trim(self.next_core if self.next_core is not None else self.rgb_end)
        if self.next_core is None:   # nothing after it yet: the next RGB chunk starts the next strip
            self.rgb_end = None

    def _continue_at(self, position: int) -> None:
        self.next_core = position
        self.after_gap = False
        self._trim(position - self.overlap * self.tpl_r)

    def _trim(self, keep_from: int) -> None:
        while self.rgb_chunks and self.rgb_chunks[0][0] + len(self.rgb_chunks[0][1]) * self.tpl_r <= keep_from:
            self.rgb_chunks.popleft()
        keep_h = keep_from - self.along.max() - 2 * self.tpl_h
        while self.hsi_chunks and self.hsi_chunks[0][0] + len(self.hsi_chunks[0][1]) * self.tpl_h <= keep_h:
            self.hsi_chunks.popleft()
        self.no_hsi = [(lo, hi) for lo, hi in self.no_hsi if hi > keep_from]

    def _rgb_lines(self, top: int, end: int, out: np.ndarray) -> None:
        """RGB lines from `top` to `end` into out, rows outside real data repeated from the nearest real one."""
        first = self.next_core if self.after_gap else top
        p, a = next((p, a) for p, a in self.rgb_chunks if p + len(a) * self.tpl_r > first)
        start = self.rgb_held.row(a) + (first - p) // self.tpl_r
        lines = self.rgb_held.array[start:min(start + (end - first) // self.tpl_r, self.rgb_held.end)]
        above = (first - top) // self.tpl_r
        out[above:above + len(lines)] = lines
        out[:above] = lines[0]
        out[above + len(lines):] = lines[-1]

    def _hsi_cells(self, top: int, out: np.ndarray) -> None:
        """HSI reflectance resampled onto the strip's coarse grid (total/r × width/r × bands), into out."""
        pos_h = top + self.cell_pos[:, None] - self.along[None, :]     # HSI ticks that saw each cell's centre
        # The run of contiguous HSI lines that holds them (strips never span an HSI gap): consecutive rows.
        want = pos_h.min()
        run: list[tuple[int, np.ndarray]] = []
        for p, a in self.hsi_chunks:
            if run and p != run[-1][0] + len(run[-1][1]) * self.tpl_h:
                if run[-1][0] + len(run[-1][1]) * self.tpl_h > want:
                    break
                run = []
            run.append((p, a))
        map_y = ((pos_h - run[0][0]) / self.tpl_h - 0.5).astype(np.float32)
        # Only the run's lines the cells read: OpenCV rounds a coordinate to 1/32 of a line, up to the next
        # line at most, and reads the line after it (at weight 0 on a whole line), hence + 3. Moving the
        # coordinates by whole lines is exact in float32, and so is the result.
        lo = max(0, int(np.floor(map_y.min())))
        hi = min(int(np.floor(map_y.max())) + 3, sum(len(a) for _, a in run))
        first = self.hsi_held.row(run[0][1])
        map_y -= lo
        lines = self.hsi_held.array[first + lo:first + hi]
        # In blocks of rows that stay in cache between the resampling and the conversion to the strip's dtype.
        for top_row in range(0, len(out), len(self._cells)):
            rows = slice(top_row, min(len(out), top_row + len(self._cells)))
            n = rows.stop - rows.start
            cells = cv2.remap(lines, self.map_x[rows], map_y[rows], cv2.INTER_LINEAR, dst=self._cells[:n],
                              borderMode=cv2.BORDER_REPLICATE)
            if out.dtype == np.float16:   # OpenCV's conversion: numpy's rounding (checked bit for bit), 7x faster
                cv2.add(cells.reshape(n, -1), 0.0, dst=out[rows].reshape(n, -1), dtype=cv2.CV_16F)
            else:
                out[rows] = cells.reshape(n, *self.hsi_shape[1:])


def cutter_for(machine: Machine, max_wait_lines: int = 2048) -> StripCutter:
    """The strip cutter of a machine, with its calibration files (`calibration.*`) loaded: what the register
    node runs, and what `sortline teach build` replays recordings through. Any problem is a ConfigError."""
    cams, files = machine.cameras, machine.calibration
    for key in ("spectral", "spatial"):
        if not getattr(files, key):
            raise ConfigError([f"calibration.{key}: not set; the register node needs it "
                               f"(make one with `sortline calibrate {key}`)"])
    try:
        spectral = SpectralReference.load(files.spectral, pixels=cams.hsi.pixels, bands=cams.hsi.bands)
        spatial = SpatialCalibration.load(files.spatial, rgb_pixels=cams.rgb.pixels, hsi_pixels=cams.hsi.pixels)
    except CalibrationError as exc:
        raise ConfigError([str(exc)]) from None
    try:
        return StripCutter(machine, spectral, spatial, max_wait_lines)
    except ValueError as exc:   # model bands the camera's cannot be binned into
        raise ConfigError([f"model.bands / model.band_ranges: {exc}"]) from None


class Register(Node):
    inputs = {"rgb": LINES, "hsi": LINES}
    outputs = {"out": STRIP}

    class Params(Section):
        max_wait_lines: int = Field(2048, gt=0, description="RGB lines of belt one camera's lines are held for while "
                                    "the other's are late, before they are given up (counted)")

    def setup(self) -> None:
        m = self.machine
        cams = m.cameras
        self.cutter = cutter_for(m, self.params.max_wait_lines)
        self.expect("rgb", pixels=cams.rgb.pixels, channels=3, ticks_per_line=cams.rgb.ticks_per_line)
        self.expect("hsi", pixels=cams.hsi.pixels, channels=cams.hsi.bands, ticks_per_line=cams.hsi.ticks_per_line)
        self.last_rgb = None
        self.given_up = metrics.DROPS.labels(f"{self.name}.hsi", "hsi_missing")
        self.rgb_missing = metrics.DROPS.labels(f"{self.name}.rgb", "rgb_missing")
        self._warn = RateLimitedLog(self.log)
        self.log.info("strips of %d+2x%d RGB lines, HSI binned to %d bands; calibrations %s, %s",
                      self.cutter.core, self.cutter.overlap, self.cutter.bands, m.calibration.spectral,
                      m.calibration.spatial)

    def holds(self, port: str) -> bool:
        """A camera far ahead of the other waits, on lossless edges (a replay, an unpaced run): there the
        other is only slower, not gone, and nothing need be given up. RGB is held two frames before
        max_wait_lines are buffered (but never before a strip could be cut), HSI once it is a quarter of
        max_wait_lines ahead of the RGB: both before the cutter would give lines up."""
        c = self.cutter
        if port == "rgb":
            lpf = self.machine.cameras.rgb.lines_per_frame
            lines = max(self.params.max_wait_lines - 2 * lpf, c.core + c.overlap + lpf)
            return c.rgb_end is not None and c.rgb_end - c.next_core > lines * c.tpl_r
        if c.hsi_end is None or not c.hsi_chunks:
            return False
        lead = c.hsi_end - (c.rgb_end if c.rgb_end is not None else c.hsi_chunks[0][0])
        return lead > self.params.max_wait_lines // 4 * c.tpl_r

    def process(self, port, msg):
        h, lines = msg.header, msg.arrays["lines"]
        before, before_hsi, lead_in = self.cutter.dropped_lines, self.cutter.dropped_hsi_lines, self.cutter.lead_in_lines
        if port == "rgb":
            self.cutter.rgb(h.position, lines, h.gap)
            self.last_rgb = msg
        else:
            self.cutter.hsi(h.position, lines, h.gap)
        outs = []
        cut = self.cutter

        def into(top, valid, gap):   # each strip is written straight into its message
            out = self.out["out"].new({"rgb": (cut.rgb_shape, np.uint8), "hsi": (cut.hsi_shape, np.float16)},
                                      like=self.last_rgb, stream="strip", seq=cut.seq, position=top,
                                      ticks_per_line=cut.tpl_r, gap=gap, meta=StripMeta(cut.overlap, cut.r, valid))
            if out is None:
                return None
            outs.append(("out", out))
            return out.arrays["rgb"], out.arrays["hsi"]

        for _ in cut.strips(into):
            pass
        if self.cutter.lead_in_lines > lead_in:
            self.log.info("the first %d RGB lines have no HSI: the cameras' scan lines lie %.0f mm apart, so no HSI "
                          "line saw that belt (not sorted; not a drop)", self.cutter.lead_in_lines - lead_in,
                          cut.along.mean() / self.machine.belt.ticks_per_mm)
        if self.cutter.dropped_lines > before:
            self.given_up.inc(self.cutter.dropped_lines - before)
            self._warn("hsi_missing", f"no HSI lines for {self.cutter.dropped_lines - before} RGB lines: gave them "
                       "up (is the HSI camera running?)")
        if self.cutter.dropped_hsi_lines > before_hsi:
            self.rgb_missing.inc(self.cutter.dropped_hsi_lines - before_hsi)
            self._warn("rgb_missing", f"no RGB lines for {self.cutter.dropped_hsi_lines - before_hsi} HSI lines: "
                       "gave them up (is the RGB camera running?)")
        return outs

    def status(self) -> dict:
        return {"strips": self.cutter.seq, "hsi_missing_lines": self.cutter.dropped_lines,
                "rgb_missing_lines": self.cutter.dropped_hsi_lines, "lead_in_lines": self.cutter.lead_in_lines}
