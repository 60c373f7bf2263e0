"""The simulator's faster code against its previous definition: the same bytes for the same seed.

The model is trained on these strips and every recording is replayed against them, so the rewrite
(in place, `take` lookups, the HSI exposure a few lines at a time, an HSI-only scene) must not change
one value. The previous definitions are kept here verbatim (from commit 19b1100) and run on the same
machine as the new ones: equality does not depend on this machine's BLAS or SIMD.
And the twin's split: two nodes, one camera each, publish what one node publishes, frame by frame.
"""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from sortline.nodes.simulate import Simulation
from sortline.nodes.simulate.materials import ENDMEMBER
from sortline.nodes.simulate.scene import DIRT, OVERLAY_ENDMEMBER, REACH, SUBPIXEL_BITS, TILE_ROWS, Scene
from sortline.pipeline.graph import load_config
from tests.conftest import DEMO, ROOT, node_toml, sortline, write_config
from tests.test_simulate_commands import messages

PRODUCTION = ROOT / "configs" / "production.toml"


# The previous definitions, verbatim (methods as functions of their object, `self`; no tile cache).

def previous_tile(self: Scene, tile: int) -> dict[str, np.ndarray]:
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

    rng = self._rng(tile, 1)
    cls = table([o.cls for o in objs], 0, np.uint8)
    ids = table([o.id for o in objs], 0, np.uint32)
    endm = table([o.endmember for o in objs], ENDMEMBER[("belt", "grey")], np.uint8)
    base_gain = table([o.gain for o in objs], 1.0, np.float32)
    crumple = table([o.crumple for o in objs], 0.03, np.float32)
    alpha = table([o.alpha for o in objs], 1.0, np.float32)
    gloss = table([o.gloss for o in objs], 0.0, np.float32)
    colour = np.concatenate([[[0.13, 0.13, 0.14]], [o.rgb for o in objs]]).astype(np.float32) \
        if objs else np.array([[0.13, 0.13, 0.14]], np.float32)

    # Shading: smooth noise at two scales (unit variance), stronger on crumpled items.
    def smooth(sigma):
        f = cv2.GaussianBlur(rng.standard_normal((rows, cols), dtype=np.float32), (0, 0), sigma)
        return f * (1.0 / (f.std() + 1e-6))
    field = 0.8 * smooth(6) + 0.6 * smooth(2)
    shade = crumple[local] * 0.35 * field
    gain = np.clip(base_gain[local] * (1 + shade), 0.2, 1.6)

    endmember = endm[local]
    on_top = overlay > 0
    endmember[on_top] = OVERLAY_ENDMEMBER[overlay[on_top]]

    # RGB: belt grain, the item's colour over the belt by its opacity, print, dirt, highlights.
    belt = 0.13 + 0.02 * cv2.GaussianBlur(rng.standard_normal((rows, cols), dtype=np.float32), (0, 0), 1.2)
    a = alpha[local][..., None]
    rgb = colour[local]
    rgb -= (1 - a) * (rgb - belt[..., None])
    rr, cc = np.nonzero(on_top)
    if len(rr):
        # Print: two-tone stripes on labels (paper: light, film: red), plain brown dirt.
        kind = overlay[rr, cc]
        stripes = (np.sin(cc / 3.0) + np.sin(rr / 5.0) > 0)
        tone = np.where(stripes, 0.9, 0.25).astype(np.float32)[:, None]
        ink = np.array([[0, 0, 0], [1.0, 0.95, 0.85], [0.8, 0.3, 0.2], [0, 0, 0]], np.float32)[kind] * tone
        ink[kind == DIRT] = [0.28, 0.22, 0.15]
        rgb[rr, cc] = ink
    rgb *= (1 + 0.6 * shade)[..., None]
    rgb += (gloss[local] * np.maximum(field - 1.2, 0) * 0.5)[..., None]
    maps = {
        "labels": cls[local],
        "instances": ids[local],
        "endmember": endmember,
        "gain": gain.astype(np.float32),
        "rgb": np.clip(rgb, 0, 1, out=rgb),
    }
    if self.mode == "white":
        # A white reference tile under the whole scan line.
        maps["endmember"][:] = ENDMEMBER[("target", "white")]
        maps["gain"][:] = 1.0
        maps["rgb"][:] = 0.92
    return maps


def previous_rgb_read(cam, rgb, rng, lamp=1.0):
    counts = rgb * (cam.response * lamp)
    counts += cam.noise.take(rng, counts.shape) * cam.read_noise
    return np.clip(counts + 0.5, 0, 255, out=counts).astype(np.uint8)


def previous_hsi_read(self, scene, position, lines, rng, lamp=1.0):
    rows = np.floor(self.belt_rows(position, lines)).astype(np.intp)      # (L, S, P·S)
    r0 = int(rows.min())
    maps = scene.rows(r0, int(rows.max()) - r0 + 1)
    rows -= r0
    cols = np.broadcast_to(self.cols, rows.shape)
    order = lambda a: a.reshape(lines, self.ss, self.pixels, self.ss).transpose(0, 2, 1, 3)  # noqa: E731
    endm, gain = order(maps["endmember"][rows, cols]), order(maps["gain"][rows, cols])
    refl = self._mix(endm, gain, lines * self.pixels).reshape(lines, self.pixels, self.bands)
    signal = refl * (self.white * lamp)
    sigma = np.sqrt(signal * 0.45 + 16.0)
    counts = signal + self.dark
    counts += self.noise.take(rng, counts.shape) * sigma
    flat = counts.reshape(lines, -1)
    flat[:, self.dead] = 0
    flat[:, self.hot] = 4095
    return np.clip(counts + 0.5, 0, 4095, out=counts).astype(np.uint16)


@pytest.fixture(scope="module", params=["demo", "production"])
def machine(request):
    return load_config(DEMO if request.param == "demo" else PRODUCTION)


@pytest.mark.parametrize("scene, seed", [("belt", 1), ("belt", 4), ("target", 2), ("white", 3)])
def test_tiles_are_the_previous_definitions_bytes(machine, scene, seed):
    sim = Simulation(machine, seed=seed, scene=scene)
    hsi_only = Simulation(machine, seed=seed, scene=scene, cameras=("hsi",))
    for tile in (0, 3):
        old, new, partial = previous_tile(sim.scene, tile), sim.scene.tile(tile), hsi_only.scene.tile(tile)
        assert set(new) == set(old) and set(partial) == set(old) - {"rgb"}
        for key in old:
            assert new[key].dtype == old[key].dtype and np.array_equal(new[key], old[key]), key
            assert key == "rgb" or np.array_equal(partial[key], old[key]), key


def test_camera_reads_are_the_previous_definitions_bytes(machine):
    sim = Simulation(machine, seed=6, occupancy=0.5)
    hsi_only = Simulation(machine, seed=6, occupancy=0.5, cameras=("hsi",))
    rgb, hsi = machine.cameras.rgb, machine.cameras.hsi
    for frame in (0, 5, 23):                 # 23: an HSI frame across two tiles
        position = frame * hsi.lines_per_frame * hsi.ticks_per_line
        old = previous_hsi_read(sim.hsi_cam, sim.scene, position, hsi.lines_per_frame, sim._rng("hsi", frame))
        assert np.array_equal(sim.hsi(frame), old) and np.array_equal(hsi_only.hsi(frame), old)
        row0 = frame * rgb.lines_per_frame
        old = previous_rgb_read(sim.rgb_cam, sim.scene.rows(row0, rgb.lines_per_frame)["rgb"], sim._rng("rgb", frame))
        assert np.array_equal(sim.rgb(frame), old)
    with pytest.raises(ValueError, match="plays only hsi"):
        hsi_only.rgb(0)


def _split_graph(params: str) -> str:
    return (node_toml("belt-rgb", "simulate", f'cameras = ["rgb"], {params}')
            + node_toml("belt-hsi", "simulate", f'cameras = ["hsi"], {params}'))


@pytest.mark.system
def test_two_nodes_one_camera_each_publish_what_one_node_does(tmp_path, run_dir):
    """The twin's split over real processes: two simulate nodes with the same seed, recorded together,
    against one node with both cameras, recorded alone: every message the same, header and bytes.
    (`sortline simulate` on the split config plays both cameras in one node, from its first node's params.)"""
    params = "seed = 8, paced = false, seconds = 0.3, drop_rate = 0.1"
    cfg = write_config(tmp_path / "split.toml", _split_graph(params), run_dir)
    res = sortline("run", "--config", str(cfg), "--record", str(tmp_path / "split.mcap"), "--seconds", "60",
                   timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    res = sortline("simulate", "--config", str(cfg), "--record", str(tmp_path / "one.mcap"), "--seconds", "0.3",
                   timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    split, one = messages(tmp_path / "split.mcap"), messages(tmp_path / "one.mcap")
    assert set(split) == set(one) == {"rgb", "hsi", "truth"} and len(one["hsi"]) >= 8
    for stream in one:
        assert len(split[stream]) == len(one[stream]), stream
        for (ha, aa), (hb, ab) in zip(split[stream], one[stream]):
            assert (ha.seq, ha.position, ha.gap, ha.meta) == (hb.seq, hb.position, hb.gap, hb.meta)
            assert aa.keys() == ab.keys() and all(np.array_equal(aa[k], ab[k]) for k in aa)
    assert any(h.gap for s in one for h, _ in one[s])     # lost frames are lost in both


def test_cameras_are_named_once(tmp_path, run_dir):
    cfg = write_config(tmp_path / "bad.toml", node_toml("belt", "simulate", 'cameras = ["hsi", "hsi"]')
                       + node_toml("sink", "sink") + '\n[[edges]]\nfrom = "belt.hsi"\nto = "sink.in"\n', run_dir)
    result = sortline("check", "--config", str(cfg))
    assert result.returncode == 78 and "nodes.belt.params.cameras" in result.stderr, result.stderr


def test_score_sets_one_belt_on_every_simulate_node(tmp_path):
    """A twin split by camera is scored on one belt: seed, length, speed and occupancy go to both nodes."""
    from argparse import Namespace

    from sortline.cli.score import belt_kinds, belt_run
    from sortline.pipeline.config import NodeConfig

    twin = load_config(ROOT / "configs" / "production-twin.toml")
    hsi = NodeConfig(kind="simulate", params={"seed": 1, "cameras": ["hsi"]})
    twin = twin.model_copy(update={"nodes": {**twin.nodes, "belt-hsi": hsi}})
    run = belt_run(belt_kinds(twin, "twin"), Namespace(seed=9, seconds=2.0, unpaced=True), 2.5, 0.4,
                   tmp_path / "score.json")(twin)
    for name in ("belt", "belt-hsi"):
        p = run.nodes[name].params
        assert (p["seed"], p["seconds"], p["paced"], p["speed_m_s"], p["occupancy"]) == (9, 2.0, False, 2.5, 0.4)
    assert run.nodes["belt-hsi"].params["cameras"] == ["hsi"]
