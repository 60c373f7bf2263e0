"""The belt as a map: objects laid out along it, rendered on a fixed grid.

The scene grid is the RGB camera's grid (one row per RGB line of belt travel,
one column per RGB pixel across), so the RGB camera reads rows straight off it
and the HSI camera samples it through its own geometry. Rows are belt
coordinates: row r passes the RGB scan line when the encoder reads
r × rgb.ticks_per_line.

The belt is cut into tiles of TILE_ROWS rows. Each tile's objects depend only
on (seed, tile index), and a tile is drawn with its neighbours' objects too
(an object may straddle a border), so any stretch of belt comes out the same
whatever order or process asks for it: the same seed gives the same bytes.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from sortline.nodes.simulate.materials import (CLASS_ID, CLASSES, DEFAULT_MIX, ENDMEMBER, LOOKS, SHAPES,
                                      VARIANTS)

TILE_ROWS = 256           # small, so drawing one never stalls a camera for long
REACH = 2                 # tiles either side whose objects can reach into a tile (up to ~330 mm)
SUBPIXEL_BITS = 4          # cv2.fillPoly fixed-point vertices: 1/16 px
MAX_OBJECTS_PER_TILE = 4096

# Overlay codes drawn on top of an object (what its surface carries).
LABEL_PAPER, LABEL_FILM, DIRT = 1, 2, 3
OVERLAY_ENDMEMBER = np.array([0, ENDMEMBER[("paper", "label")], ENDMEMBER[("PP", "label")],
                              ENDMEMBER[("dirt", "dirt")]], dtype=np.uint8)

OBJECT_DTYPE = np.dtype([("id", "<u4"), ("cls", "u1"), ("x0_mm", "<f4"), ("x1_mm", "<f4"),
                         ("p0", "<i8"), ("p1", "<i8"), ("endmember", "u1")])


@dataclass
class Obj:
    id: int
    cls: int
    polygon: np.ndarray          # (n, 2) float: (x_mm, y_mm) on the belt
    rgb: np.ndarray              # (3,) float 0..1
    alpha: float
    gloss: float
    endmember: int
    gain: float                  # overall brightness (thickness, tilt)
    crumple: float               # amplitude of the shading field on it
    label: np.ndarray | None     # polygon of a printed label, same frame
    label_kind: int
    label_rgb: np.ndarray
    dirt: list[tuple[float, float, float]]   # (x_mm, y_mm, radius_mm) spots


def _pick(rng, choices: list[tuple[str, float]]) -> str:
    names, weights = zip(*choices)
    w = np.asarray(weights, dtype=np.float64)
    return names[rng.choice(len(names), p=w / w.sum())]


def _ring(rng, n: int, roughness: float) -> np.ndarray:
    """Radius multipliers for n directions: 1 ± roughness, smooth around the ring."""
    k = np.arange(1, 4)
    phases = rng.uniform(0, 2 * np.pi, 3)
    amps = rng.normal(0, roughness, 3) / k
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    return 1 + (amps[:, None] * np.cos(k[:, None] * t + phases[:, None])).sum(0) + rng.normal(0, roughness / 3, n)


def _rounded_rect(length: float, width: float, radius: float, n_corner: int = 6) -> np.ndarray:
    pts = []
    hx, hy = length / 2 - radius, width / 2 - radius
    for cx, cy, a0 in ((hx, hy, 0), (-hx, hy, 90), (-hx, -hy, 180), (hx, -hy, 270)):
        a = np.deg2rad(a0 + np.linspace(0, 90, n_corner))
        pts.append(np.stack([cx + radius * np.cos(a), cy + radius * np.sin(a)], 1))
    return np.concatenate(pts)


def _outline(rng, shape: str) -> tuple[np.ndarray, float]:
    """An outline in mm around (0, 0), long axis along x, and how crumpled it is."""
    if shape == "bottle":
        length = rng.uniform(150, 300)
        width = length * rng.uniform(0.28, 0.40)
        body = _rounded_rect(length, width, width * 0.45, 8)
        # The neck: pull the points of one end in towards the axis.
        end = body[:, 0] > length * 0.30
        body[end, 1] *= np.clip(1 - (body[end, 0] - length * 0.30) / (length * 0.2), 0.35, 1)
        crumple = rng.choice([0.05, 0.35], p=[0.6, 0.4])
        return body * _ring(rng, len(body), crumple * 0.08)[:, None], crumple
    if shape == "tray":
        length, width = rng.uniform(100, 250), rng.uniform(80, 180)
        return _rounded_rect(length, min(width, length), rng.uniform(5, 20)), 0.08
    if shape == "flake":
        n, r = rng.integers(5, 10), rng.uniform(5, 20)
        t = np.sort(rng.uniform(0, 2 * np.pi, n))
        rr = r * rng.uniform(0.55, 1.0, n)
        return np.stack([rr * np.cos(t), rr * np.sin(t)], 1), 0.1
    if shape == "film":
        n, r = rng.integers(14, 22), rng.uniform(50, 150)
        t = np.linspace(0, 2 * np.pi, n, endpoint=False)
        rr = r * np.clip(_ring(rng, n, 0.35) * rng.uniform(0.7, 1.0, n), 0.3, 1.6)
        return np.stack([rr * np.cos(t) * 1.3, rr * np.sin(t) * 0.8], 1), 0.6
    if shape == "can":
        length, width = rng.uniform(115, 170), rng.uniform(53, 68)
        if rng.random() < 0.3:   # crushed
            out = _rounded_rect(length * 0.8, width * 1.3, 10)
            return out * _ring(rng, len(out), 0.12)[:, None], 0.5
        return _rounded_rect(length, width, 4), 0.15
    if shape == "cardboard":
        length, width = rng.uniform(80, 300), rng.uniform(60, 250)
        out = np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], float) * [length / 2, min(width, length) / 2]
        return out + rng.normal(0, 4, out.shape), 0.12
    # blob: wood, rubber, textile, stones: anything else.
    n, r = rng.integers(8, 14), rng.uniform(15, 75)
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    rr = r * np.clip(_ring(rng, n, 0.25), 0.4, 1.5)
    return np.stack([rr * np.cos(t), rr * np.sin(t)], 1), 0.2


def _rotate(points: np.ndarray, angle: float) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    return points @ np.array([[c, s], [-s, c]])


class Scene:
    """Objects on the belt, per tile; render(r0, n) gives the maps for rows r0..r0+n."""

    def __init__(self, seed: int, width_mm: float, row_mm: float, col_mm: float, cols: int,
                 mode: str = "belt", occupancy: float = 0.3, mix: dict[str, float] | None = None,
                 cluster: float = 0.3, draw_rgb: bool = True):
        self.draw_rgb = draw_rgb     # False: no "rgb" map (for a node that plays only the HSI camera)
        self.seed, self.width_mm, self.row_mm, self.col_mm, self.cols = seed, width_mm, row_mm, col_mm, cols
        self.mode, self.occupancy, self.cluster = mode, occupancy, cluster
        mix = mix or DEFAULT_MIX
        unknown = set(mix) - set(CLASSES[1:])
        if unknown:
            raise ValueError(f"unknown classes in mix: {sorted(unknown)}; known: {', '.join(CLASSES[1:])}")
        self.mix = [(name, w) for name, w in mix.items() if w > 0]
        self._objects: dict[int, list[Obj]] = {}
        self._tiles: dict[int, dict[str, np.ndarray]] = {}

    # Layout.

    def _rng(self, tile: int, stream: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, tile + 2**40, stream])

    def objects(self, tile: int) -> list[Obj]:
        """The objects whose reference point lies in this tile (cached, deterministic)."""
        if tile not in self._objects:
            if len(self._objects) > 32:
                self._objects.pop(max(self._objects, key=lambda t: abs(t - tile)))
            self._objects[tile] = (self._layout_target(tile) if self.mode == "target"
                                   else self._layout(tile) if self.mode == "belt" else [])
        return self._objects[tile]

    def _layout(self, tile: int) -> list[Obj]:
        rng = self._rng(tile, 0)
        tile_mm = TILE_ROWS * self.row_mm
        y_start = tile * tile_mm
        budget = self.occupancy * tile_mm * self.width_mm
        covered, objs = 0.0, []
        prev = None
        while covered < budget and len(objs) < MAX_OBJECTS_PER_TILE:
            cls_name = _pick(rng, self.mix)
            outline, crumple = _outline(rng, _pick(rng, SHAPES[cls_name]))
            outline = _rotate(outline, rng.uniform(0, np.pi))
            half = (outline.max(0) - outline.min(0)) / 2
            if prev is not None and rng.random() < self.cluster:
                # Touching or overlapping its predecessor, as items on a real belt do.
                direction = rng.normal(size=2)
                direction /= np.linalg.norm(direction) + 1e-9
                centre = prev + direction * (half.mean() + rng.uniform(0, 30))
            else:
                centre = np.array([rng.uniform(0, self.width_mm), y_start + rng.uniform(0, tile_mm)])
            centre[0] = np.clip(centre[0], half[0] * 0.5, self.width_mm - half[0] * 0.5)
            centre[1] = np.clip(centre[1], y_start, y_start + tile_mm - 1e-6)
            prev = centre
            objs.append(self._dress(rng, tile, len(objs), cls_name, outline + centre, outline, centre, crumple))
            x, y = outline.T
            covered += 0.5 * abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1)))   # shoelace
        return objs

    def _dress(self, rng, tile, k, cls_name, polygon, outline, centre, crumple) -> Obj:
        variant = VARIANTS[_pick(rng, LOOKS[cls_name])]
        if variant.name == "coloured":
            rgb = rng.uniform(0.1, 0.9, 3) * np.array([1, 1, 1]) ** rng.uniform(0.5, 2)
        else:
            rgb = np.asarray(variant.rgb) / 255 * rng.uniform(0.93, 1.05)
        label, label_kind, dirt = None, 0, []
        extent = outline.max(0) - outline.min(0)
        if cls_name in ("PET", "HDPE", "PP", "PVC") and extent.max() > 100 and rng.random() < 0.7:
            # A printed wrap-around label over the middle of the item.
            lo, hi = outline.min(0), outline.max(0)
            span = (hi - lo) * rng.uniform(0.25, 0.45)
            mid = (lo + hi) / 2
            box = np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]]) * [span[0] / 2, (hi[1] - lo[1]) * 0.6]
            label = box + mid + centre
            label_kind = LABEL_PAPER if rng.random() < 0.6 else LABEL_FILM
        if rng.random() < 0.35:
            for _ in range(rng.integers(1, 5)):
                p = centre + rng.normal(0, 0.25, 2) * extent
                dirt.append((p[0], p[1], rng.uniform(2, 9)))
        endmember = ENDMEMBER[(cls_name, variant.name)]
        return Obj(id=(tile % (1 << 20)) * MAX_OBJECTS_PER_TILE + k + 1, cls=CLASS_ID[cls_name], polygon=polygon,
                   rgb=np.clip(rgb, 0, 1), alpha=variant.alpha, gloss=variant.gloss, endmember=endmember,
                   gain=float(rng.uniform(0.85, 1.1)), crumple=crumple, label=label, label_kind=label_kind,
                   label_rgb=rng.uniform(0.05, 0.95, (2, 3)), dirt=dirt)

    def _layout_target(self, tile: int) -> list[Obj]:
        """A calibration board once per tile: three rows of white discs across the belt.

        Disc pitch 40 mm, rows 50 mm apart; the middle row is shifted by half a
        pitch so that a rotation or an along-belt offset shows, and every
        fifth disc of the first row is missing as an index mark.
        """
        objs = []
        tile_mm = TILE_ROWS * self.row_mm
        y0 = tile * tile_mm + tile_mm * 0.3
        circle = np.stack([np.cos(t := np.linspace(0, 2 * np.pi, 32, endpoint=False)), np.sin(t)], 1) * 8.0
        for row in range(3):
            shift = 20.0 if row == 1 else 0.0
            xs = np.arange(20.0 + shift, self.width_mm - 10, 40.0)
            for i, x in enumerate(xs):
                if row == 0 and i % 5 == 4:
                    continue
                centre = np.array([x, y0 + row * 50.0])
                objs.append(Obj(id=(tile % (1 << 20)) * MAX_OBJECTS_PER_TILE + len(objs) + 1,
                                cls=CLASS_ID["other"], polygon=circle + centre, rgb=np.array([0.95, 0.95, 0.95]),
                                alpha=1.0, gloss=0.0, endmember=ENDMEMBER[("target", "white")], gain=1.0,
                                crumple=0.0, label=None, label_kind=0, label_rgb=np.zeros((2, 3)), dirt=[]))
        return objs

    # Rendering.

    def _px(self, poly_mm: np.ndarray, row0: int) -> np.ndarray:
        """mm on the belt → fixed-point (col, row) vertices relative to row0."""
        cols = poly_mm[:, 0] / self.col_mm - 0.5
        rows = poly_mm[:, 1] / self.row_mm - row0 - 0.5
        return np.round(np.stack([cols, rows], 1) * (1 << SUBPIXEL_BITS)).astype(np.int32)

    def tile(self, tile: int) -> dict[str, np.ndarray]:
        """Every map of one tile: labels, instances, endmember, gain, rgb (cached)."""
        if tile in self._tiles:
            return self._tiles[tile]
        rows, cols = TILE_ROWS, self.cols
        row0 = tile * TILE_ROWS
        objs = [o for t in range(tile - REACH, tile + REACH + 1) for o in self.objects(t)]
        local = np.zeros((rows, cols), np.int32)       # index into objs, +1; 0: belt
        overlay = np.zeros((rows, cols), np.uint8)
        for i, o in enumerate(objs, start=1):
            pts = self._px(o.polygon, row0)
            if pts[:, 1].max() < 0 or pts[:, 1].min() >= rows << SUBPIXEL_BITS:
                continue
            cv2.fillPoly(local, [pts], i, lineType=cv2.LINE_8, shift=SUBPIXEL_BITS)
            cv2.fillPoly(overlay, [pts], 0, shift=SUBPIXEL_BITS)
            if o.label is not None:
                # Only on this object where it is visible: clip to its own pixels, in its bounding box.
                lp = self._px(o.label, row0)
                c0, r0_ = np.maximum(lp.min(0) >> SUBPIXEL_BITS, 0)
                c1, r1_ = np.minimum((lp.max(0) >> SUBPIXEL_BITS) + 2, [cols, rows])
                if c1 > c0 and r1_ > r0_:
                    mask = np.zeros((r1_ - r0_, c1 - c0), np.uint8)
                    cv2.fillPoly(mask, [lp - [c0 << SUBPIXEL_BITS, r0_ << SUBPIXEL_BITS]], 1, shift=SUBPIXEL_BITS)
                    win = overlay[r0_:r1_, c0:c1]
                    win[(mask == 1) & (local[r0_:r1_, c0:c1] == i)] = o.label_kind
            for x, y, r in o.dirt:
                c = self._px(np.array([[x, y]]), row0)[0]
                cv2.circle(overlay, (int(c[0]), int(c[1])), int(r / self.col_mm * (1 << SUBPIXEL_BITS)),
                           DIRT, -1, shift=SUBPIXEL_BITS)
        overlay[local == 0] = 0

        def table(values, belt, dtype):
            return np.asarray([belt] + list(values), dtype=dtype)

        # Every per-pixel property is a per-object table looked up by `local` (take: several times faster
        # than fancy indexing). Where a pixel's value is an expression, it is evaluated in the same order
        # on the same float32 values as ever, in place: the same seed still gives the same bytes.
        rng = self._rng(tile, 1)
        cls = table([o.cls for o in objs], 0, np.uint8)
        ids = table([o.id for o in objs], 0, np.uint32)
        endm = table([o.endmember for o in objs], ENDMEMBER[("belt", "grey")], np.uint8)
        base_gain = table([o.gain for o in objs], 1.0, np.float32)
        crumple = table([o.crumple for o in objs], 0.03, np.float32)

        # Shading: smooth noise at two scales (unit variance), stronger on crumpled items.
        def smooth(sigma):
            f = cv2.GaussianBlur(rng.standard_normal((rows, cols), dtype=np.float32), (0, 0), sigma)
            f *= 1.0 / (f.std() + 1e-6)
            return f
        field = smooth(6)
        field *= 0.8
        field += 0.6 * smooth(2)                        # 0.8 * smooth(6) + 0.6 * smooth(2)
        shade = (crumple * 0.35).take(local)
        shade *= field                                  # crumple * 0.35 * field
        gain = shade + 1
        gain *= base_gain.take(local)
        np.clip(gain, 0.2, 1.6, out=gain)               # base_gain * (1 + shade), clipped

        endmember = endm.take(local)
        on_top = overlay > 0
        endmember[on_top] = OVERLAY_ENDMEMBER[overlay[on_top]]
        maps = {"labels": cls.take(local), "instances": ids.take(local), "endmember": endmember, "gain": gain}
        if self.draw_rgb:
            maps["rgb"] = self._rgb(objs, local, overlay, on_top, field, shade, rng)
        if self.mode == "white":
            # A white reference tile under the whole scan line.
            maps["endmember"][:] = ENDMEMBER[("target", "white")]
            maps["gain"][:] = 1.0
            if "rgb" in maps:
                maps["rgb"][:] = 0.92
        if len(self._tiles) >= 8:
            self._tiles.pop(max(self._tiles, key=lambda t: abs(t - tile)))
        self._tiles[tile] = maps
        return maps

    def _rgb(self, objs, local, overlay, on_top, field, shade, rng) -> np.ndarray:
        """The RGB map (rows, cols, 3) float32 0..1 of a tile: belt grain, the item's colour over the belt by
        its opacity, print, dirt, shading, highlights. Drawn last from the tile's generator: skipping it
        (a node that plays only the HSI camera) changes nothing else."""
        alpha = np.asarray([1.0] + [o.alpha for o in objs], np.float32)
        gloss = np.asarray([0.0] + [o.gloss for o in objs], np.float32)
        colour = np.asarray([[0.13, 0.13, 0.14]] + [o.rgb for o in objs], np.float32)
        belt = cv2.GaussianBlur(rng.standard_normal(local.shape, dtype=np.float32), (0, 0), 1.2)
        belt *= 0.02
        belt += 0.13
        # colour[local], one 12-byte record per pixel (a take on records: fancy indexing of rows is slow).
        rgb = colour.view(np.dtype((np.void, colour.itemsize * 3))).ravel().take(local)
        rgb = rgb.view(np.float32).reshape(*local.shape, 3)
        seen = rgb - belt[..., None]
        seen *= (1 - alpha).take(local)[..., None]
        rgb -= seen                                     # rgb - (1 - alpha) * (rgb - belt)
        rr, cc = np.nonzero(on_top)
        if len(rr):
            # Print: two-tone stripes on labels (paper: light, film: red), plain brown dirt.
            kind = overlay[rr, cc]
            stripes = (np.sin(cc / 3.0) + np.sin(rr / 5.0) > 0)
            tone = np.where(stripes, 0.9, 0.25).astype(np.float32)[:, None]
            ink = np.array([[0, 0, 0], [1.0, 0.95, 0.85], [0.8, 0.3, 0.2], [0, 0, 0]], np.float32)[kind] * tone
            ink[kind == DIRT] = [0.28, 0.22, 0.15]
            rgb[rr, cc] = ink
        lit = shade * 0.6
        lit += 1
        rgb *= lit[..., None]                           # (1 + 0.6 * shade)
        glare = field - 1.2
        np.maximum(glare, 0, out=glare)
        glare *= gloss.take(local)
        glare *= 0.5
        rgb += glare[..., None]                         # gloss * max(field - 1.2, 0) * 0.5
        return np.clip(rgb, 0, 1, out=rgb)

    def rows(self, r0: int, n: int, keys: tuple[str, ...] = ()) -> dict[str, np.ndarray]:
        """The maps (those named in keys; none named: all) for scene rows r0 .. r0+n (views inside one tile)."""
        t0, t1 = r0 // TILE_ROWS, (r0 + n - 1) // TILE_ROWS
        if t0 == t1:
            off = r0 - t0 * TILE_ROWS
            maps = self.tile(t0)
            return {k: maps[k][off:off + n] for k in keys or maps}
        parts = [self.rows(r, min(n - (r - r0), (r // TILE_ROWS + 1) * TILE_ROWS - r), keys)
                 for r in [r0] + list(range((t0 + 1) * TILE_ROWS, r0 + n, TILE_ROWS))]
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    def object_table(self, r0: int, n: int, ticks_per_row: float) -> np.ndarray:
        """Objects whose first row lies in rows r0..r0+n, as OBJECT_DTYPE records (encoder ticks)."""
        out = []
        for t in range(r0 // TILE_ROWS - REACH, (r0 + n - 1) // TILE_ROWS + REACH + 1):
            for o in self.objects(t):
                first_row = int(np.floor(o.polygon[:, 1].min() / self.row_mm))
                if r0 <= first_row < r0 + n:
                    out.append((o.id, o.cls, max(0.0, o.polygon[:, 0].min()),
                                min(self.width_mm, o.polygon[:, 0].max()),
                                int(round(o.polygon[:, 1].min() / self.row_mm * ticks_per_row)),
                                int(round(o.polygon[:, 1].max() / self.row_mm * ticks_per_row)), o.endmember))
        out.sort()
        return np.array(out, dtype=OBJECT_DTYPE)
