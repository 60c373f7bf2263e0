"""The register node: strips of both grids over the same belt, gaps never spliced."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from sortline.calibration.spatial import Geometry, fit
from sortline.calibration.spectral import SpectralReference, bin_bands
from sortline.nodes.register import HeldLines, StripCutter
from sortline.nodes.simulate import Simulation
from sortline.nodes.simulate.cameras import Misregistration
from sortline.pipeline.graph import load_config
from tests.conftest import DEMO, edge_toml, load_json, node_toml, sortline, write_config
from tests.test_spatial import target_blobs
from tests.test_spectral import previous_reflectance

MIS = Misregistration()


@pytest.fixture(scope="module")
def settings():
    return load_config(DEMO)


@pytest.fixture(scope="module")
def calibrations(settings):
    spatial = fit(*target_blobs(settings, MIS), Geometry.from_machine(settings),
                  rgb_serial="SIM-RGB-2", hsi_serial="SIM-HSI-2")
    dark = np.concatenate([Simulation(settings, seed=2, scene="dark").hsi(f) for f in range(8)])
    white = np.concatenate([Simulation(settings, seed=2, scene="white").hsi(f) for f in range(8)])
    return SpectralReference.from_frames(dark, white, white_reflectance=0.92, serial="SIM-HSI-2"), spatial


@pytest.fixture(scope="module")
def belt(settings):
    sim = Simulation(settings, seed=2, misregistration=MIS, occupancy=0.4)
    n = 48
    return sim, [sim.rgb(f) for f in range(n)], [sim.hsi(f) for f in range(n)]


def run(settings, calibrations, belt, skip_rgb=(), skip_hsi=(), hsi_until=None, rgb_until=None, previous=False):
    sim, rgb, hsi = belt
    cut = StripCutter(settings, *calibrations, max_wait_lines=256)
    if previous:   # HSI counts to model bands, and onto the RGB grid, as the node did before
        cut.binned = lambda raw, out: np.copyto(out, bin_bands(previous_reflectance(calibrations[0], raw), cut.groups))
        cut._hsi_cells = lambda top, out: np.copyto(out, previous_hsi_cells(cut, top))
    strips, held = [], []
    for f in range(len(rgb)):
        if f not in skip_hsi and (hsi_until is None or f < hsi_until):
            cut.hsi(sim.position("hsi", f), hsi[f], gap=f - 1 in skip_hsi)
        if f not in skip_rgb and (rgb_until is None or f < rgb_until):
            cut.rgb(sim.position("rgb", f), rgb[f], gap=f - 1 in skip_rgb)
        strips += list(cut.strips())
        held.append((len(cut.rgb_chunks), len(cut.hsi_chunks)))
    return cut, strips, held


def previous_hsi_cells(cut, top):
    """The resampling as it was: the whole run of HSI lines concatenated, then remapped."""
    pos_h = top + cut.cell_pos[:, None] - cut.along[None, :]
    run = []
    for p, a in cut.hsi_chunks:
        if run and p != run[-1][0] + len(run[-1][1]) * cut.tpl_h:
            if run[-1][0] + len(run[-1][1]) * cut.tpl_h > pos_h.min():
                break
            run = []
        run.append((p, a))
    map_y = ((pos_h - run[0][0]) / cut.tpl_h - 0.5).astype(np.float32)
    out = cv2.remap(np.concatenate([a for _, a in run]), cut.map_x, map_y, cv2.INTER_LINEAR,
                    borderMode=cv2.BORDER_REPLICATE)
    return out.reshape(*cut.map_x.shape, cut.bands)


def cores(settings, strips):
    """RGB positions covered by the strips' valid core lines."""
    tpl, overlap = settings.cameras.rgb.ticks_per_line, settings.model.overlap_lines
    return np.concatenate([top + (overlap + np.arange(valid)) * tpl for top, _, _, valid, _ in strips])


def test_strips_carry_both_grids_over_the_same_belt(settings, calibrations, belt):
    sim, rgb_frames, _ = belt
    cut, strips, _ = run(settings, calibrations, belt)
    tpl, overlap, core = settings.cameras.rgb.ticks_per_line, settings.model.overlap_lines, settings.model.strip_lines
    assert len(strips) >= 8
    all_rgb = np.concatenate(rgb_frames)
    for i, (top, rgb, hsi, valid, gap) in enumerate(strips):
        assert rgb.shape == (core + 2 * overlap, 640, 3) and hsi.shape == ((core + 2 * overlap) // 4, 160, 32)
        assert valid == core and gap == (i == 0)
        row0 = top // tpl
        real = slice(overlap if gap else 0, None)     # the first strip's upper context is repeated
        assert np.array_equal(rgb[real], all_rgb[row0:row0 + len(rgb)][real])
        # HSI on the RGB grid: what perfect registration gives, within noise and edge blur.
        ideal = bin_bands(sim.strip(row0, len(rgb))["hsi"], 32)
        err = np.abs(hsi.astype(np.float32) - ideal)[overlap // 4:]
        assert np.median(err) < 0.005 and np.percentile(err, 90) < 0.04, (np.median(err), np.percentile(err, 90))
    # Consecutive cores, no line twice, none missing after the first registrable one.
    covered = cores(settings, strips)
    assert np.array_equal(np.diff(covered), np.full(len(covered) - 1, tpl))
    # The lines before the HSI camera had seen that belt (it looks 51.7 mm upstream) are the lead-in:
    # counted, and not as lost (both cameras started at once).
    assert cut.lead_in_lines == covered[0] // tpl and cut.dropped_lines == 0


def test_rgb_lines_before_the_hsi_camera_started_are_lost_and_the_lead_in_is_not(settings, calibrations, belt):
    sim, _, _ = belt
    on_time, _, _ = run(settings, calibrations, belt)
    late, strips, _ = run(settings, calibrations, belt, skip_hsi={0, 1, 2})   # HSI from its fourth frame on
    assert late.lead_in_lines == on_time.lead_in_lines > 50
    # Every RGB line before the HSI camera's first is given up and counted as lost, and no more.
    assert late.dropped_lines == sim.position("hsi", 3) // settings.cameras.rgb.ticks_per_line > 0
    assert cores(settings, strips)[0] == cores(settings, run(settings, calibrations, belt)[1])[0] + sim.position("hsi", 3)


def test_an_rgb_gap_ends_a_strip_early_and_the_next_starts_after_it(settings, calibrations, belt):
    sim, _, _ = belt
    _, strips, _ = run(settings, calibrations, belt, skip_rgb={20})
    lost = set(range(sim.position("rgb", 20), sim.position("rgb", 21), settings.cameras.rgb.ticks_per_line))
    covered = cores(settings, strips)
    assert not lost & set(covered.tolist())
    short = [s for s in strips if s[3] < settings.model.strip_lines]
    assert len(short) == 1
    after = strips[strips.index(short[0]) + 1]
    assert after[4] is True                                            # flagged: no context across the gap
    assert after[0] + settings.model.overlap_lines * 15 == sim.position("rgb", 21)
    # Everything else is covered once.
    expected = np.arange(covered[0], sim.position("rgb", 47), 15)
    assert set(covered.tolist()) == set(expected.tolist()) - lost - {p for p in expected if p >= covered[-1] + 15}


def test_an_hsi_gap_is_never_interpolated_across(settings, calibrations, belt):
    sim, _, _ = belt
    cut, strips, _ = run(settings, calibrations, belt, skip_hsi={20})
    along = cut.along
    lo = sim.position("hsi", 20) + along.min() - 60
    hi = sim.position("hsi", 21) + along.max()
    covered = cores(settings, strips)
    assert not ((covered >= lo) & (covered < hi)).any()
    assert cut.dropped_lines >= (hi - lo) // 15 - 1 and cut.lead_in_lines == covered[0] // 15   # lost, counted


def test_hsi_that_stops_coming_costs_bounded_memory_and_counts(settings, calibrations, belt):
    cut, strips, held = run(settings, calibrations, belt, hsi_until=20)
    assert max(rgb for rgb, _ in held) <= 256 // 32 + 8   # max_wait_lines of RGB, in frames, plus a strip
    assert cut.dropped_lines > 256


def test_rgb_that_stops_coming_costs_bounded_memory_and_counts(settings, calibrations, belt):
    """The HSI camera goes on alone: what it sends beyond max_wait_lines (and a strip) of belt is given up,
    counted, and the memory it holds stays bounded however long that lasts."""
    cut, strips, held = run(settings, calibrations, belt, rgb_until=10)
    # 256 + 96 RGB lines of belt are 88 HSI lines: 11 HSI frames of 8 lines, and the one coming in.
    assert max(hsi for _, hsi in held) <= (256 + 96) // 4 // 8 + 2
    lines = sum(len(a) for a in belt[2]) - sum(len(a) for a in belt[2][:10])
    assert cut.dropped_hsi_lines > lines // 2 and held[-1][1] == held[-5][1]   # flat, not growing


def run_register_graph(tmp_path, run_dir, calibrations, graph: str) -> None:
    """Run the graph (TOML text) to its end on the demo machine with these calibrations saved as its files;
    the supervisor's report is run.json in tmp_path."""
    spectral, spatial = calibrations
    spectral.save(tmp_path / "spectral.npz")
    spatial.save(tmp_path / "spatial.json")
    cfg = write_config(tmp_path / "reg.toml", graph, run_dir, calibration={
        "spectral": str(tmp_path / "spectral.npz"), "spatial": str(tmp_path / "spatial.json")})
    result = sortline("run", "--config", str(cfg), "--seconds", "60", "--report", str(tmp_path / "run.json"),
                      timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.system
def test_node_over_sockets(tmp_path, run_dir, settings, calibrations):
    """simulate -> register -> sink as processes, with the calibration files from the config."""
    graph = (node_toml("belt", "simulate", "seed = 2, paced = false, seconds = 1.0, drop_rate = 0.05")
             + node_toml("register", "register")
             + node_toml("sink", "sink", f'verify = false, report = "{tmp_path / "sink.json"}"')
             + edge_toml("belt.rgb", "register.rgb") + edge_toml("belt.hsi", "register.hsi")
             + edge_toml("register.out", "sink.in"))
    run_register_graph(tmp_path, run_dir, calibrations, graph)
    sink = load_json(tmp_path / "sink.json")
    # 1 s at 2 m/s is 2 m of belt: about 2133 RGB lines, 33 strips of 64 (fewer after drops and the start).
    full = 2133 / settings.model.strip_lines
    assert 0.6 * full <= sink["received"] <= full + 2 and sink["lost"] == 0
    assert sink["gap_flags"] >= 2        # the first strip, and those after lost frames
    status = load_json(tmp_path / "run.json")["nodes"]["register"]["status"]
    assert status["strips"] == sink["received"]


@pytest.mark.system
def test_missing_calibration_is_a_config_error(tmp_path, run_dir):
    graph = (node_toml("belt", "simulate") + node_toml("register", "register")
             + edge_toml("belt.rgb", "register.rgb") + edge_toml("belt.hsi", "register.hsi"))
    cfg = write_config(tmp_path / "nocal.toml", graph, run_dir,
                       calibration={"spatial": "nowhere.json", "spectral": "nowhere.npz"})
    result = sortline("node", "register", "--config", str(cfg), timeout=60)
    assert result.returncode == 78
    assert "nowhere.npz" in result.stderr and "not a readable spectral calibration" in result.stderr


def test_band_ranges_pick_the_model_bands(settings, calibrations, belt):
    """model.band_ranges: each model band is the mean of a chosen range of camera bands."""
    ranges = [(10, 20), (100, 140), (200, 224)]
    custom = settings.model_copy(update={"model": settings.model.model_copy(update={"bands": 3, "band_ranges": ranges})})
    sim, _, _ = belt
    _, strips, _ = run(custom, calibrations, belt)
    top, _, hsi, _, _ = strips[2]
    assert hsi.shape[-1] == 3
    ideal = bin_bands(sim.strip(top // 15, len(strips[2][1]))["hsi"], ranges)
    assert np.median(np.abs(hsi.astype(np.float32) - ideal)) < 0.005


@pytest.mark.parametrize("skip_hsi", [(), (20,)], ids=["belt", "hsi_gap"])
def test_strips_are_the_previous_definitions_within_float16_rounding(settings, calibrations, belt, skip_hsi):
    """The same strips, positions, gaps and meta as with the per-band reflectance binned by numpy (the
    definition before BinnedReflectance); HSI values equal in float16, what the node sends, but for a rare
    one on a rounding boundary, one step off."""
    _, now, _ = run(settings, calibrations, belt, skip_hsi=skip_hsi)
    _, before, _ = run(settings, calibrations, belt, skip_hsi=skip_hsi, previous=True)
    assert len(now) == len(before) >= 8
    for (top, rgb, hsi, valid, gap), (top0, rgb0, hsi0, valid0, gap0) in zip(now, before):
        assert (top, valid, gap) == (top0, valid0, gap0) and np.array_equal(rgb, rgb0)
        np.testing.assert_allclose(hsi, hsi0, rtol=1e-6, atol=1e-7)
        steps = np.abs(hsi.astype(np.float16).view(np.int16).astype(int) - hsi0.astype(np.float16).view(np.int16))
        assert steps.max() <= 1 and (steps > 0).mean() < 1e-3


@pytest.mark.system
def test_a_camera_far_ahead_waits_on_lossless_edges_instead_of_losing_lines(tmp_path, run_dir, settings,
                                                                             calibrations):
    """One belt as two nodes, each as fast as it can go: on lossless edges the register node stops reading
    the camera that is ahead (its sender waits) long before it would give lines up; every strip comes,
    whole. (Without that, the two processes drift apart by more than max_wait_lines and lines are lost.)"""
    graph = (node_toml("belt", "simulate", 'seed = 2, paced = false, seconds = 1.5, cameras = ["rgb"]')
             + node_toml("belt-hsi", "simulate", 'seed = 2, paced = false, seconds = 1.5, cameras = ["hsi"]')
             + node_toml("register", "register", "max_wait_lines = 256")
             + node_toml("sink", "sink", f'verify = false, report = "{tmp_path / "sink.json"}"')
             + edge_toml("belt.rgb", "register.rgb") + edge_toml("belt-hsi.hsi", "register.hsi")
             + edge_toml("register.out", "sink.in"))
    run_register_graph(tmp_path, run_dir, calibrations, graph)
    run = load_json(tmp_path / "run.json")["nodes"]
    status = run["register"]["status"]
    # The first RGB lines lie before the HSI camera's first line once the cameras' offset is applied: none of
    # them can be registered, live or not (58 on these calibrations): the lead-in, not a loss. Nothing else
    # is given up.
    assert 50 < status["lead_in_lines"] <= 64, status
    assert status["hsi_missing_lines"] == 0 and status["rgb_missing_lines"] == 0, status
    sink = load_json(tmp_path / "sink.json")
    # 1.5 s at 2 m/s: 3200 RGB lines, 50 strips of 64 (the last may wait for context that never comes).
    assert sink["received"] >= 3200 // settings.model.strip_lines - 2 and sink["lost"] == 0, sink
    assert sink["gap_flags"] == 1        # the first strip only: nothing was given up on the way
    # Nor was anything dropped on an edge.
    drops = {k: v for n in run.values() for k, v in n["totals"].items() if k.startswith("sortline_edge_drops_total")}
    assert sum(drops.values()) == 0, drops
def test_strips_written_into_the_nodes_float16_buffers_are_the_float32_ones_rounded(settings, calibrations, belt):
    """What the node does: each strip written into its message's arrays (rgb uint8, hsi float16)."""
    _, wide, _ = run(settings, calibrations, belt)
    sim, rgb, hsi = belt
    cut = StripCutter(settings, *calibrations, max_wait_lines=256)
    buffers = [(np.zeros(cut.rgb_shape, np.uint8), np.zeros(cut.hsi_shape, np.float16)) for _ in wide]
    made = []
    for f in range(len(rgb)):
        cut.hsi(sim.position("hsi", f), hsi[f], False)
        cut.rgb(sim.position("rgb", f), rgb[f], False)
        made += list(cut.strips(lambda top, valid, gap: buffers[cut.seq]))
    assert len(made) == len(wide) >= 8
    for (top, rgb16, hsi16, valid, gap), (top0, rgb0, hsi0, valid0, gap0), (b_rgb, b_hsi) in zip(made, wide, buffers):
        assert (top, valid, gap) == (top0, valid0, gap0) and rgb16 is b_rgb and hsi16 is b_hsi
        assert np.array_equal(rgb16, rgb0)
        assert np.array_equal(hsi16.view(np.uint16), hsi0.astype(np.float16).view(np.uint16))


def test_a_strip_with_nowhere_to_go_is_given_up_and_the_next_made_later(settings, calibrations, belt):
    sim, rgb, hsi = belt
    cut = StripCutter(settings, *calibrations, max_wait_lines=256)
    made, refused = [], []

    def into(top, valid, gap):
        if cut.seq == 3:
            refused.append(top)
            return None
        return np.empty(cut.rgb_shape, np.uint8), np.empty(cut.hsi_shape, np.float32)

    for f in range(len(rgb)):
        cut.hsi(sim.position("hsi", f), hsi[f], False)
        cut.rgb(sim.position("rgb", f), rgb[f], False)
        made += [s[0] for s in cut.strips(into)]
    _, every, _ = run(settings, calibrations, belt)
    assert len(refused) == 1 and made == [s[0] for s in every if s[0] != refused[0]]


def test_held_lines_are_one_slice_per_run_through_moves_and_growth():
    """Lines added in chunks and trimmed from the left, as the cutter does: through the moves to the
    array's start and growth (a chunk larger than half of it), each chunk holds its own lines and what
    is held is one slice of the array, in order."""
    held = HeldLines((2,), np.int64, reserve=12, most=30)
    position, sizes = 0, [3, 4, 2, 5, 1, 6, 3, 3, 7, 2, 4, 20, 3, 5, 2, 6, 4]
    for n in sizes:
        held.add(position, n)[...] = np.arange(position, position + n)[:, None]
        position += n
        while sum(len(a) for _, a in held.chunks) - len(held.chunks[0][1]) >= 8:
            held.chunks.popleft()                         # keep the last 8 lines or so
        for p, a in held.chunks:
            assert np.array_equal(a[:, 0], np.arange(p, p + len(a)))
        first_position, first = held.chunks[0]
        run = held.array[held.row(first):held.end]
        assert np.array_equal(run[:, 1], np.arange(first_position, position))
    assert 12 < len(held.array) <= 2 * (30 + 20)             # grew, for the 20 lines, to twice the most at most
