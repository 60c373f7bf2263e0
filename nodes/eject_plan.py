"""The eject-plan node: class masks → objects → decisions → valve windows.

Objects are connected pixels of one class (OpenCV, 8-connected; specks
under min_area_mm2 are dropped as noise), found across mask messages as the
belt goes by: a component that touches the bottom of what has arrived so far
stays open and is looked at again with the next message's lines, so an
object cut by a strip border is one object. A gap (missing lines) closes
every open object. Objects that touch one another form a cluster. Touching
objects of one class are one component; once complete, a component with a
neck (narrower than half its widest point) is split there by a watershed on
its distance transform, so that each part is judged on its own.

The policy decides for each target object: eject when the model is sure
enough (mean confidence) and, if it touches objects of other classes, by the
`touching` rule: eject anyway, skip, or eject when targets make up at least
`min_target_share` of the cluster. An ejected object's pixels give, per
valve, the first and last line it covers: the valve windows, in encoder
ticks at the valve bar; a valve whose air would carry off a non-target
beside it is left out where the target loses little (the recipe's
priority, spare_lanes). Long objects are decided and blown while still
being seen (their front reaches the bar before their end has passed the
camera).

Class names come with the masks (MaskMeta.classes: the model's own list) and
the targets from the machine's recipe; a target the masks' classes do not
have stops the node (78). An object's id is the belt position and column of
its first pixel: the same while it grows across strips, unique within a run,
and after a restart of this node too. The recipe can change at run time: an
object is judged, whole, by the recipe in force at its first line
(pipeline.recipes).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Literal

import cv2
import msgspec
import numpy as np
from prometheus_client import Counter
from pydantic import Field

from sortline.nodes.belt.bar import BarGeometry
from sortline.nodes.belt.encoder import EncoderTrack
from sortline.nodes.streams import EJECT, LINES, MASK, EjectMeta, ObjectReport, Window, object_position
from sortline.pipeline.config import ConfigError, Section
from sortline.pipeline.node import Node

MAX_CARRY_LINES = 4096   # an "object" longer than this (a jam) is cut

SPARED = Counter("sortline_plan_spared_lanes", "Valve lanes of ejected objects left out to spare a neighbour",
                 ["node"])
OBJECTS = Counter("sortline_objects", "Objects found, by majority class and decision", ["node", "cls", "decision"])


@dataclass
class Obj:
    id: int                   # first pixel in raster order: absolute line x mask width + column
    rows: np.ndarray          # absolute RGB line numbers of its pixels (seen so far)
    cols: np.ndarray
    hist: np.ndarray          # pixels per class
    conf_sum: np.ndarray      # confidence (0..255) summed per class
    fresh: np.ndarray         # pixels no valve window has been made for yet
    planned: bool             # windows were made for some of it already (it is being ejected)
    complete: bool            # no more lines can join it
    cluster: np.ndarray       # pixels per class of everything it touches, itself included
    scene: Scene | None = None   # the mask lines it was found in, its neighbours' too
    judge_id: int = -1        # the id whose first line's recipe judges it: its own, or as ObjectFinder says

    @property
    def area(self) -> int:
        return len(self.rows)

    @property
    def cls(self) -> int:
        return int(np.argmax(self.hist[1:]) + 1)


class Scene:
    """The mask lines an object was found in (the finder's buffer): what lies around it, for the air."""

    def __init__(self, line0: int, classes: np.ndarray, confidence: np.ndarray):
        self.line0, self.classes, self.confidence = line0, classes, confidence
        self._others: dict[tuple, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}

    def others(self, target_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The objects not of a target class: a label per pixel (0 for none), each label's area in pixels
        and the model's mean confidence over it (0..1). Specks count: a sliver of an object lying under
        another is all the camera sees of it, and the air carries it off just the same. Made once for the
        buffer and targets (objects of one buffer may start under two recipes), one labelling per class
        present."""
        key = tuple(target_ids.tolist())
        if key not in self._others:
            labels = np.zeros(self.classes.shape, np.int32)
            areas, n = [np.zeros(1, np.int64)], 1
            present = np.flatnonzero(np.bincount(self.classes.ravel(), minlength=1))
            for c in present[(present != 0) & ~np.isin(present, target_ids)]:
                k, lab, stats, _ = cv2.connectedComponentsWithStats((self.classes == c).view(np.uint8),
                                                                    connectivity=8)
                on = lab > 0
                labels[on] = lab[on] + (n - 1)
                areas.append(stats[1:, cv2.CC_STAT_AREA].astype(np.int64))
                n += k - 1
            area = np.concatenate(areas)
            conf = np.bincount(labels.ravel(), weights=self.confidence.ravel(), minlength=n)
            self._others[key] = labels, area, conf / np.maximum(area, 1) / 255.0
        return self._others[key]


class ObjectFinder:
    """Connected components over a stream of mask chunks (see the module's docstring).

    An object's front reaches the valve bar long before its end has passed the
    scan line when it is longer than the distance between them, so objects are
    offered to `plan(obj)` while still open, with each new stretch of lines;
    `plan` returns True when it made valve windows for the object's fresh
    pixels, which are then not offered again. Complete objects are returned.

    An object's id is its first pixel, so it can change under it: an open object
    grows into one found earlier (their ids, the smaller), a complete one is
    split where objects touch (each piece its own). One that was being ejected
    stays judged as it was when its air began: each planned pixel keeps the id
    it was planned under, and the object takes the first of them (`judge_id`), so
    the recipe in force there judges it and its windows name it (the ejector
    checks them by it) and no object is blown half under one recipe.
    """

    def __init__(self, min_area_px: int, classes: int = 256, split_necks: bool = False):
        self.min_area = min_area_px
        self.classes = classes
        self.split_necks = split_necks
        # Lines of open objects kept for the next chunk: (first line, classes, confidence, planned), planned
        # holding per pixel 1 + the id it was planned under (0: not planned).
        self.carry: tuple[int, np.ndarray, np.ndarray, np.ndarray] | None = None
        self.next_line: int | None = None

    def feed(self, line0: int, classes: np.ndarray, confidence: np.ndarray, plan, gap: bool = False) -> list[Obj]:
        done = []
        if self.next_line is not None and (gap or line0 != self.next_line):
            done += self.flush(plan)
        planned = np.zeros(classes.shape, np.int64)
        if self.carry is not None:
            c0, cc, cf, cp = self.carry
            buf = (c0, np.concatenate([cc, classes]), np.concatenate([cf, confidence]), np.concatenate([cp, planned]))
            old = len(cc)
        else:
            buf, old = (line0, classes, confidence, planned), 0
        self.next_line = line0 + len(classes)
        done += self._components(*buf, old, plan, final=False)
        return done

    def flush(self, plan) -> list[Obj]:
        """Close every open object (a gap, or the end of the stream)."""
        if self.carry is None:
            return []
        carry, self.carry = self.carry, None
        return self._components(*carry, len(carry[1]), plan, final=True)

    def _components(self, line0, cls, conf, planned, old, plan, final) -> list[Obj]:
        # Clusters: everything that touches (any classes); objects: connected pixels of one class. An
        # object lies in one cluster, and a cluster of one class is one object: so one labelling of the
        # whole buffer, and a labelling per class only inside the clusters where classes touch.
        fg = (cls != 0).astype(np.uint8)
        n, clusters, cstats, _ = cv2.connectedComponentsWithStats(fg, connectivity=8)
        rows_total = len(cls)
        last = cstats[:, cv2.CC_STAT_TOP] + cstats[:, cv2.CC_STAT_HEIGHT] - 1
        can_open = not final and rows_total < MAX_CARRY_LINES
        # Clusters that matter: not ended before the lines already seen (then their objects were done),
        # and either big enough to hold an object or open (a speck's top can start the carry).
        wanted = (last >= old - 1) & ((cstats[:, cv2.CC_STAT_AREA] >= self.min_area)
                                      | (can_open & (last == rows_total - 1)))
        found, open_tops = [], []
        for cl in np.flatnonzero(wanted[1:]) + 1:
            x, y, w, h = cstats[cl, :4]
            in_cluster = clusters[y:y + h, x:x + w] == cl
            touched = np.bincount(cls[y:y + h, x:x + w][in_cluster], minlength=self.classes)
            present = np.flatnonzero(touched[1:]) + 1
            if len(present) == 1:
                parts = [(present[0], in_cluster, (0, 0, w, h, cstats[cl, 4]), x, y, True)]   # the cluster itself
            else:
                parts = []
                open_cluster = can_open and last[cl] == rows_total - 1
                for c in present:
                    if touched[c] < self.min_area and not open_cluster:
                        continue                # only specks of this class here, none of them open
                    mask = ((cls[y:y + h, x:x + w] == c) & in_cluster).view(np.uint8)
                    bx, by, bw, bh = cv2.boundingRect(mask)      # label only where this class is
                    m, labels, stats, _ = cv2.connectedComponentsWithStats(mask[by:by + bh, bx:bx + bw],
                                                                           connectivity=8)
                    parts += [(c, labels, stats[k], x + bx, y + by, k) for k in range(1, m)]
            for c, labels, (px, py, pw, ph, area), ox, oy, k in parts:
                top, bottom = oy + py, oy + py + ph - 1
                if bottom < old - 1:
                    continue                   # ended before the lines already seen: done then
                is_open = can_open and bottom == rows_total - 1
                if is_open:
                    open_tops.append(top)
                if area < self.min_area:
                    continue                   # a speck (noise, a fragment of a misread object), or not yet an object
                here = labels[py:py + ph, px:px + pw] == k
                # An open object may still grow into its neighbour: only a complete one is split.
                pieces = split_at_necks(here, self.min_area) if self.split_necks and not is_open else [here]
                for piece in pieces:
                    rr, cc = np.nonzero(piece)
                    first = top + int(rr[0])
                    rr, cc = rr + top, cc + ox + px
                    # The order the objects are offered in: by class, then by the first 2 x 2 block of the
                    # mask (in raster order) that each covers, the order a labelling per class numbers them.
                    # That block is in the object's first pair of block rows: the pixels up to its end.
                    pair_end = np.searchsorted(rr, (first | 1) + 1)
                    first_block = (first >> 1) * cls.shape[1] + (cc[:pair_end] >> 1).min()
                    found.append((c, first_block, rr, cc, touched, is_open))
        out = []
        scene = Scene(line0, cls, conf)
        for c, _, rr, cc, touched, is_open in sorted(found, key=lambda f: f[:2]):
            under = planned[rr, cc]
            done_px = under > 0
            hist = np.zeros(max(self.classes, c + 1), np.int64)    # all its pixels are of class c
            conf_sum = np.zeros(len(hist))
            hist[c], conf_sum[c] = len(rr), conf[rr, cc].sum(dtype=np.float64)
            oid = int(rr[0] + line0) * cls.shape[1] + int(cc[0])
            obj = Obj(oid, rr + line0, cc, hist, conf_sum, ~done_px, bool(done_px.any()), not is_open, touched,
                      scene, int(under[done_px].min()) - 1 if done_px.any() else oid)
            if obj.fresh.any() and plan(obj):
                planned[rr, cc] = obj.judge_id + 1
            if not is_open:
                out.append(obj)
        if open_tops and not final:
            start = min(open_tops)
            self.carry = (line0 + start, cls[start:].copy(), conf[start:].copy(), planned[start:].copy())
        else:
            self.carry = None
        return out


def split_at_necks(mask: np.ndarray, min_area: int, neck: float = 0.5, levels: int = 12,
                   size: int = 48) -> list[np.ndarray]:
    """One object's pixels (a bool mask) as the objects that touch in it: [mask] when it is one.

    Cores are where the distance to the edge is at least `neck` times its largest value; two cores
    joined only through pixels narrower than that are two objects touching. A watershed on the distance
    transform (flooding by falling distance in `levels` steps, each core growing over what it reaches)
    gives each core the pixels on its side of the neck. It runs on the mask scaled to at most `size`
    pixels across, which bounds its cost; the full mask's pixels take the label at their place. A part
    under min_area, a speck's worth of a bulge, is no object of its own: then the mask stays whole."""
    if mask.sum() < 2 * min_area:
        return [mask]
    h, w = mask.shape
    f = max(1, -(-max(h, w) // size))
    small = mask if f == 1 else cv2.resize(mask.view(np.uint8), (-(-w // f), -(-h // f)),
                                           interpolation=cv2.INTER_AREA) > 0
    m = np.pad(small, 1).view(np.uint8)        # a border, so the distance is to the object's edge
    dist = cv2.distanceTransform(m, cv2.DIST_L2, 5)
    top = float(dist.max())
    n, markers = cv2.connectedComponents((dist >= neck * top).view(np.uint8), connectivity=8)
    if n <= 2:
        return [mask]
    kernel = np.ones((3, 3), np.uint8)
    for level in np.linspace(neck * top, 0, levels)[1:]:
        below = (dist >= level) if level > 0 else m.astype(bool)
        for _ in range(2 * size):              # grow each core over the ground this level uncovers
            grown = cv2.dilate(markers.astype(np.float32), kernel).astype(np.int32)
            take = below & (markers == 0) & (grown > 0)
            if not take.any():
                break
            markers[take] = grown[take]
    markers = markers[1:-1, 1:-1]
    if f > 1:
        markers = cv2.resize(markers.astype(np.float32), (w, h), interpolation=cv2.INTER_NEAREST).astype(np.int32)
        markers[~mask] = 0
        for _ in range(2 * f):                 # edge pixels the scaled mask left out
            lost = mask & (markers == 0)
            if not lost.any():
                break
            grown = cv2.dilate(markers.astype(np.float32), kernel).astype(np.int32)
            markers[lost] = grown[lost]
    pieces = [mask & (markers == i) for i in range(1, n)]
    if any(p.sum() < min_area for p in pieces) or sum(p.sum() for p in pieces) != mask.sum():
        return [mask]
    return pieces


class Policy(Section):
    min_area_mm2: float = Field(60.0, ge=0, description="smaller objects are noise")
    min_confidence: float = Field(0.6, ge=0, le=1, description="mean confidence over the target pixels")
    mixed_share: float = Field(0.2, ge=0, le=1, description="an object with more than this share of "
                               "non-target pixels is a target touching a non-target")
    touching: Literal["eject", "skip", "by_share"] = Field(
        "eject", description="a target touching a non-target: eject it anyway (recovery), skip it "
        "(purity), or eject when its target share is at least min_target_share")
    min_target_share: float = Field(0.5, ge=0, le=1, description="the purity/recovery knob for by_share")
    split_touching: bool = Field(True, description="split a complete object of one class where it narrows to "
                                 "under half its widest (objects touching), so each is judged on its own")


def decide(obj: Obj, policy: Policy, target_ids: np.ndarray, min_area_px: float) -> str:
    """'eject', or why not. An object already being ejected stays ejected (its front has been blown)."""
    if obj.planned:
        return "eject"
    if obj.cls not in target_ids:
        return "not_target"
    if obj.area < min_area_px:
        return "small"
    if confidence(obj) < policy.min_confidence:
        return "unsure"
    # Touching others: the air aimed at it hits them too.
    share = obj.cluster[target_ids].sum() / obj.cluster[1:].sum()
    if share >= 1 - policy.mixed_share or policy.touching == "eject":
        return "eject"
    if policy.touching == "by_share" and share >= policy.min_target_share:
        return "eject"
    return "touching"


def confidence(obj: Obj) -> float:
    """The model's mean confidence (0..1) over the object's pixels."""
    return float(obj.conf_sum[obj.cls] / obj.area / 255.0)


@dataclass(frozen=True)
class Sparing:
    """How much of a target's air may be left out to spare its neighbours: the recipe's priority."""
    keep: float    # the target keeps at least this share of its (confidence-weighted) fresh pixels under air
    spare: float   # a non-target with at least this share of its area under the air is to be spared


# recovery: every lane of a target is blown, whatever it carries off with it.
PRIORITIES = {"purity": Sparing(keep=0.6, spare=0.25), "balanced": Sparing(keep=0.8, spare=0.35), "recovery": None}


def lane_spans(obj: Obj, bar: BarGeometry) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per valve lane under the object's fresh pixels: the valve, the first and last line of those pixels,
    and their summed confidence (0..1 each; 1 each without a scene)."""
    valves = bar.valve_of_col[obj.cols[obj.fresh]]
    keep = valves >= 0
    v, rows, cols = valves[keep], obj.rows[obj.fresh][keep], obj.cols[obj.fresh][keep]
    if len(v) == 0:
        return (np.zeros(0, np.int64),) * 3 + (np.zeros(0),)
    sc = obj.scene
    conf = np.ones(len(v)) if sc is None else sc.confidence[rows - sc.line0, cols] / 255.0
    order = np.lexsort((rows, v))
    v, rows, conf = v[order], rows[order], conf[order]
    starts = np.flatnonzero(np.r_[True, v[1:] != v[:-1]])
    return v[starts], rows[starts], np.maximum.reduceat(rows, starts), np.add.reduceat(conf, starts)


def spare_lanes(obj: Obj, spans, bar: BarGeometry, before_lines: int, after_lines: int, target_ids: np.ndarray,
                sparing: Sparing | None, min_confidence: float = 0.0, budget: float | None = None) -> np.ndarray:
    """Which of the object's lanes to blow (a bool per lane of `spans`).

    A lane's air covers its valve's columns from its first line (less the margin before) to its last (plus
    the margin after). A non-target object with at least `sparing.spare` of its area under the air of all
    the lanes would be carried off: the lanes over it are left out, those that blow most of it for the
    least of the target first, as long as the target keeps `sparing.keep` of its confidence-weighted
    pixels under air. A neighbour that cannot be spared within that costs the target nothing, nor one the
    model is unsure of (mean confidence under `min_confidence`: as likely a misread part of the target).
    `budget`: the confidence-weighted pixels that may be left out, if not `1 - sparing.keep` of the lanes'
    (an object planned in stretches as it arrives has its whole length's budget, less what was spent)."""
    v, first, last, weight = spans
    keep = np.ones(len(v), bool)
    sc = obj.scene
    if sparing is None or sc is None or len(v) < 2:
        return keep
    labels, areas, sure = sc.others(target_ids)
    h = len(labels)
    r0 = np.clip(first - before_lines - sc.line0, 0, h)
    r1 = np.clip(last + 1 + after_lines - sc.line0, 0, h)
    under = []                                   # per lane: (neighbour labels, their pixels under it)
    for lane, a, b in zip(v, r0, r1):
        c0, c1 = bar.lane_cols[lane]
        ids, px = np.unique(labels[a:b, c0:c1], return_counts=True)
        under.append((ids[ids > 0], px[ids > 0]))
    ids = np.unique(np.concatenate([u[0] for u in under]))
    if len(ids) == 0:
        return keep
    px = np.zeros((len(v), len(ids)))            # lanes x neighbours
    for i, (n, k) in enumerate(under):
        px[i, np.searchsorted(ids, n)] = k
    area = areas[ids].astype(float)
    if budget is None:
        budget = (1 - sparing.keep) * weight.sum()
    for n in np.argsort(-px.sum(0) / area):
        covered = px[keep, n].sum()
        if covered < sparing.spare * area[n] or sure[ids[n]] < min_confidence:
            continue
        drop, cost = [], 0.0
        for lane in sorted(np.flatnonzero(keep & (px[:, n] > 0)), key=lambda i: -px[i, n] / weight[i]):
            drop.append(lane)
            cost += weight[lane]
            covered -= px[lane, n]
            if covered < sparing.spare * area[n]:
                break
        if covered < sparing.spare * area[n] and cost <= budget:
            keep[drop] = False
            budget -= cost
    return keep


def valve_windows(obj: Obj, bar: BarGeometry, before_ticks: int, after_ticks: int, spans=None) -> list[list[int]]:
    """[[valve, open_pos, close_pos], ...]: per valve, the ticks at the bar from the first to the last line of
    the object's fresh pixels (or of the lanes in `spans`, from lane_spans)."""
    v, first, last, _ = lane_spans(obj, bar) if spans is None else spans
    open_pos = first * bar.tpl - before_ticks + bar.travel_ticks
    close_pos = (last + 1) * bar.tpl + after_ticks + bar.travel_ticks
    return [[int(a), int(b), int(c)] for a, b, c in zip(v, open_pos, close_pos)]


class EjectPlan(Node):
    inputs = {"in": MASK, "encoder": LINES}
    outputs = {"out": EJECT}

    class Params(Policy):
        command_lead_ms: float = Field(25.0, ge=0, description="time the ejector needs before a command's "
                                       "deadline (its send-ahead and its own latency): windows that would "
                                       "start sooner are clipped")
        timing: bool = Field(True, description="false: never clip (scoring decisions on a belt that waits for "
                             "the pipeline)")
        despeckle: bool = Field(True, description="a 3x3 median over the class mask before finding objects "
                                  "(masks per RGB pixel; a coarser mask is smooth at its own scale)")

    def setup(self) -> None:
        m, p = self.machine, self.params
        # Masks come on the grid of model.mask_stride: a cell of k x k RGB pixels is a mask pixel.
        self.stride = m.model.mask_stride
        self.bar = BarGeometry(m, self.stride)
        self.expect("in", width=len(self.bar.valve_of_col), ticks_per_line=self.bar.tpl)
        px_mm2 = self.bar.mm_per_px * self.bar.tpl / m.belt.ticks_per_mm
        self.min_area_px = p.min_area_mm2 / px_mm2
        self.finder = ObjectFinder(max(1, int(self.min_area_px)), split_necks=p.split_touching)
        self.classes: list[str] | None = None   # the masks' classes (the model's), from the first mask
        self.rules: dict[int, tuple[np.ndarray, Sparing | None]] = {}   # per recipe change: target ids, sparing
        self.before = int(round(m.ejector.margin_before_mm * m.belt.ticks_per_mm))
        self.after = int(round(m.ejector.margin_after_mm * m.belt.ticks_per_mm))
        # The air margins in whole mask lines: how far past a lane's pixels its air reaches.
        self.margin_lines = (-(-self.before // self.bar.tpl), -(-self.after // self.bar.tpl))
        self.spared = 0
        self.spent: dict[int, float] = {}     # object id -> confidence-weighted pixels left out of its air so far
        self.counts: dict[str, int] = {}
        self.windows: list[Window] = []
        self.clipped = 0
        self.last_seq = -1
        # Time a command needs before the air must arrive (valve opening, driver, the ejector's lead).
        self.command_ns = (m.valve_bar.open_ms + m.ejector.driver_latency_ms + p.command_lead_ms) * 1e6
        self.track = EncoderTrack(m.belt.ticks_per_mm, m.belt.speed_m_s)
        self.log.info("ejecting %s; %d valves at %.1f mm pitch, %.0f mm downstream",
                      ", ".join(m.recipe.targets), self.bar.count, self.bar.pitch, self.bar.travel_ticks / self.bar.tpm)

    def _learn_classes(self, classes: list[str]) -> None:
        """The masks' class list: fixed for the run (metric labels come from it, so it stays bounded)."""
        if classes == self.classes:
            return
        if self.classes is not None:
            raise ValueError(f"mask classes {classes}, the masks so far had {self.classes}: a model with other "
                             "classes needs this node restarted")
        missing = [t for t in self.recipes.targets_ever() if t not in classes[1:]]
        if missing:
            raise ConfigError([f"recipe.targets: {', '.join(missing)} not among the model's classes "
                               f"({', '.join(classes[1:])}); the masks cannot be sorted for it"])
        self.classes = list(classes)
        self.rules = {}
        self.finder.classes = len(classes)

    def recipe_classes(self):
        return None if self.classes is None else self.classes[1:]

    def on_recipe(self, recipe, at_tick):
        missing = [t for t in recipe.targets if self.classes is not None and t not in self.classes[1:]]
        if missing:   # the supervisor checks a change against the classes this node reports: a bug if seen
            self.log.error("recipe targets %s not among the masks' classes: objects of them are not ejected",
                           ", ".join(missing))

    def _rules(self, obj: Obj) -> tuple[np.ndarray, Sparing | None]:
        """The target ids and the sparing of the recipe in force at the object's first line."""
        entry = self.recipes.at(object_position(obj.judge_id, len(self.bar.valve_of_col), self.bar.tpl))
        if entry.n not in self.rules:
            ids = [self.classes.index(t) for t in entry.recipe.targets if t in self.classes]
            self.rules[entry.n] = (np.array(ids, np.int64), PRIORITIES[entry.recipe.priority])
        return self.rules[entry.n]

    def process(self, port, msg):
        if port == "encoder":
            self.track.follow(msg)
            return None
        h, meta = msg.header, msg.meta
        self._learn_classes(meta.classes)
        classes, conf = msg.arrays["classes"], msg.arrays["confidence"]
        valid = min(meta.valid_lines, len(classes))
        line0 = h.position // self.bar.tpl
        if self.params.despeckle and self.stride == 1:
            # Single misread pixels would each be an object of their own: a 3x3 median takes them out.
            # (A coarser mask is the model's own grid, already smooth at that scale.)
            classes = cv2.medianBlur(np.ascontiguousarray(classes), 3)
        self.windows = []
        objs = self.finder.feed(line0, classes[:valid], conf[:valid], self._plan, gap=h.gap)
        if valid < len(classes):
            objs += self.finder.flush(self._plan)   # the lines after these are missing: nothing continues
        return self._publish(objs, msg)

    def end_of_stream(self):
        self.windows = []
        return self._publish(self.finder.flush(self._plan), None)

    def _plan(self, obj: Obj) -> bool:
        """Valve windows for an object's fresh pixels if it is to be ejected (open objects too)."""
        target_ids, sparing = self._rules(obj)
        if decide(obj, self.params, target_ids, self.min_area_px) != "eject":
            return False
        cls, conf = self.classes[obj.cls], round(confidence(obj), 3)
        spans = lane_spans(obj, self.bar)
        budget = None
        if sparing is not None:
            # The target keeps `keep` of all its pixels under air, not of each stretch planned as it arrives:
            # a short last stretch beside a neighbour may spend what the earlier ones did not.
            seen = obj.conf_sum[obj.cls] / 255.0
            budget = (1 - sparing.keep) * seen - self.spent.get(obj.judge_id, 0.0)
        keep = spare_lanes(obj, spans, self.bar, *self.margin_lines, target_ids, sparing,
                           self.params.min_confidence, budget)
        if not keep.all():
            self.spent[obj.judge_id] = self.spent.get(obj.judge_id, 0.0) + float(spans[3][~keep].sum())
            self.spared += int((~keep).sum())
            SPARED.labels(self.name).inc(int((~keep).sum()))
            spans = tuple(x[keep] for x in spans)
        for v, a, b in valve_windows(obj, self.bar, self.before, self.after, spans):
            self.windows.append(Window(v, v, int(a), int(b), obj.judge_id, cls, conf))
        return True

    def _clipped(self, windows: list[Window]) -> list[Window]:
        """Air cannot arrive at the bar before the belt there has moved on by the time a command needs (valve
        opening, driver, sending ahead): the front of an object decided late is not blown, the rest is. Such
        windows start later (counted as clipped); none is sent doomed to be late. Reckoned as they leave, once
        the whole mask is planned: the first masks of a run took tens of ms to plan, and windows checked
        before that reached the ejector past their deadlines."""
        if not (self.params.timing and self.track.known and windows):
            return windows
        earliest = self.track.position_at(time.monotonic_ns() + self.command_ns)
        kept = []
        for w in windows:
            if w.open_pos < earliest:
                self.clipped += 1
                if w.close_pos <= earliest:
                    continue
                w = msgspec.structs.replace(w, open_pos=int(earliest))
            kept.append(w)
        return kept

    def _publish(self, objs: list[Obj], like):
        self.windows = self._clipped(self.windows)
        if not objs and not self.windows:
            return None
        described = []
        for o in objs:
            self.spent.pop(o.judge_id, None)    # complete: no more of it to plan
            decision = decide(o, self.params, self._rules(o)[0], self.min_area_px)
            cls = self.classes[o.cls]
            OBJECTS.labels(self.name, cls, decision).inc()
            self.counts[decision] = self.counts.get(decision, 0) + 1
            x = (o.cols + 0.5) * self.bar.mm_per_px
            described.append(ObjectReport(o.id, cls, decision, o.area, round(float(x.min()), 1),
                                          round(float(x.max()), 1), int(o.rows.min() * self.bar.tpl),
                                          int((o.rows.max() + 1) * self.bar.tpl)))
        fields = {"stream": "eject", "meta": EjectMeta(self.windows, described)}
        if like is None:   # the flush at the end of the stream
            fields.update(seq=self.last_seq + 1, position=(self.finder.next_line or 0) * self.bar.tpl,
                          ticks_per_line=self.bar.tpl)
        else:
            self.last_seq = like.header.seq
        out = self.out["out"].new({}, like=like, **fields)
        return None if out is None else [("out", out)]

    def status(self) -> dict:
        return {**dict(sorted(self.counts.items())), "clipped_windows": self.clipped, "spared_lanes": self.spared}
