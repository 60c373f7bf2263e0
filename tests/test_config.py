"""Configuration: bad values stop start-up with one clear line; derived figures."""

from __future__ import annotations

import os
import tomllib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import DEMO, ROOT, machine_toml, sortline, write_config
from sortline.pipeline.config import EX_CONFIG, ConfigError
from sortline.pipeline.graph import load_config

GRAPH = """
[nodes.camera]
kind = "pattern"

[nodes.sink]
kind = "sink"

[[edges]]
from = "camera.out"
to = "sink.in"
"""


def test_shipped_profiles_load_with_their_budgets():
    demo = load_config(DEMO)
    assert demo.budget_ms() == pytest.approx(140.0)
    assert demo.budget_ms(3.0) == pytest.approx(90.0)
    assert demo.line_rate_hz("rgb") == pytest.approx(2133.3, abs=0.1)
    assert demo.hsi_ratio == 4
    prod = load_config(ROOT / "configs" / "production.toml")
    assert prod.budget_ms() == pytest.approx(90.0)
    assert prod.line_rate_hz("rgb") == pytest.approx(6400.0)


def problems(tmp_path, text: str, env: dict | None = None) -> list[str]:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    old = dict(os.environ)
    os.environ.update(env or {})
    try:
        load_config(path)
    except ConfigError as exc:
        return exc.lines
    finally:
        os.environ.clear()
        os.environ.update(old)
    raise AssertionError("the configuration was accepted")


def good() -> str:
    return machine_toml() + GRAPH


@pytest.mark.parametrize(
    "old, new, expected",
    [
        ("speed_m_s = 2.0", "speed_m_s = -2.0", "belt.speed_m_s = -2.0: Input should be greater than or equal to 0.01"),
        ("speed_m_s = 2.0", 'speed_m_s = "fast"', "belt.speed_m_s = 'fast': Input should be a valid number"),
        ("count = 48", "count = 0", "valve_bar.count = 0: Input should be greater than 0"),
        ('driver = "sim"', 'driver = "can"', "ejector.driver = 'can': Input should be 'sim' or 'udp'"),
        ("ticks_per_line = 60", "ticks_per_line = 50", "must be a whole multiple of rgb.ticks_per_line"),
        ("pitch_mm = 12.5", "pitch_mm = 12.5\npitch = 3", "valve_bar.pitch = 3: Extra inputs are not permitted"),
        ("strip_lines = 64", "strip_lines = 64\nstrip_line = 64", "model.strip_line = 64: Extra inputs are not permitted"),
        ("mask_stride = 4", "mask_stride = 3", "model.mask_stride = 3: Input should be 1, 2 or 4"),
        ("width_mm = 600\n", "", "belt.width_mm: missing, this key is required"),
        ("overlap_lines = 16", "overlap_lines = 18", "model.overlap_lines = 18 must be a multiple of the RGB:HSI ratio 4"),
        ("threads = 1", "threads = 1\nbands = 30", "model.bands = 30 must divide cameras.hsi.bands = 224"),
        ("threads = 1", "threads = 1\nbands = 2\nband_ranges = [[0, 50], [40, 90]]", "model.band_ranges must be increasing, non-overlapping"),
        ("threads = 1", "threads = 1\nbands = 3\nband_ranges = [[0, 50], [60, 90]]", "model.band_ranges has 2 ranges; model.bands = 3"),
    ],
)
def test_a_bad_value_names_key_value_and_what_is_allowed(tmp_path, old, new, expected):
    text = good()
    assert old in text
    lines = problems(tmp_path, text.replace(old, new, 1))
    assert len(lines) == 1, lines
    assert expected in lines[0]


@pytest.mark.parametrize(
    "graph, expected",
    [
        (GRAPH.replace('kind = "sink"', 'kind = "snik"'), "nodes.sink.kind = 'snik': unknown node kind"),
        (GRAPH.replace('to = "sink.in"', 'to = "sink.input"'), "sink has inputs ['in']"),
        (GRAPH.replace('to = "sink.in"', 'to = "sinc.in"'), "no node named 'sinc'"),
        (GRAPH.replace('kind = "pattern"', 'kind = "pattern"\nparams = { camera = "ir" }'),
         "nodes.camera.params.camera = 'ir': Input should be 'rgb' or 'hsi'"),
        (GRAPH.replace('kind = "pattern"', 'kind = "pattern"\nparams = { count = 5, cuont = 6 }'),
         "nodes.camera.params.cuont = 6: Extra inputs are not permitted"),
        (GRAPH.replace('to = "sink.in"', 'to = "sink.in"\npolicy = "latest"\npattern = "pubsub"\nhwm = 0'),
         "edges.0.hwm = 0: Input should be greater than or equal to 1"),
        (GRAPH.replace('to = "sink.in"', 'to = "sink.in"\npattern = "pubsub"'), "a pubsub edge cannot be lossless"),
        (GRAPH.replace('to = "sink.in"', 'to = "sink.in"\naddress = "udp://x"'), "must start with ipc:// or tcp://"),
        (GRAPH[: GRAPH.index("[[edges]]")], "nodes.sink: input 'in' has no edge"),
    ],
)
def test_graph_mistakes_are_named(tmp_path, graph, expected):
    lines = problems(tmp_path, machine_toml() + graph)
    assert any(expected in line for line in lines), lines


def test_missing_file_and_broken_toml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.toml")
    assert "not valid TOML" in problems(tmp_path, good() + "\n[belt\n")[0]


def test_environment_overrides_merge_into_the_file(tmp_path, monkeypatch):
    path = tmp_path / "ok.toml"
    path.write_text(good())
    monkeypatch.setenv("SORTLINE_BELT__SPEED_M_S", "3")
    monkeypatch.setenv("SORTLINE_VALVE_BAR__OPEN_MS", "4")
    cfg = load_config(path)
    assert cfg.belt.speed_m_s == 3.0 and cfg.belt.width_mm == 600  # only the overridden keys change
    assert cfg.budget_ms() == pytest.approx(300 / 3 - 4 - 5)


def test_a_bad_environment_override_is_named(tmp_path):
    lines = problems(tmp_path, good(), env={"SORTLINE_BELT__SPEED_M_S": "zero"})
    assert lines == [f"{tmp_path / 'bad.toml'}: belt.speed_m_s = 'zero': Input should be a valid number, unable to parse string as a number"]
    lines = problems(tmp_path, good(), env={"SORTLINE_BELT__SPEEDD": "3"})
    assert "belt.speedd = '3': Extra inputs are not permitted" in lines[0]


@pytest.mark.system
def test_commands_refuse_a_bad_config_with_one_line_and_exit_78(tmp_path, run_dir):
    cfg = write_config(tmp_path / "c.toml", GRAPH, run_dir)
    cfg.write_text(cfg.read_text().replace("speed_m_s = 2.0", "speed_m_s = 0"))
    for args in (["run", "--config", str(cfg)], ["node", "sink", "--config", str(cfg)], ["check", "--config", str(cfg)]):
        res = sortline(*args, timeout=60)
        assert res.returncode == EX_CONFIG
        assert res.stderr.strip().splitlines() == [
            f"sortline: config error: {cfg}: belt.speed_m_s = 0: Input should be greater than or equal to 0.01"
        ]


@pytest.mark.system
def test_check_prints_the_budget_derivation():
    res = sortline("check", "--config", str(DEMO), timeout=60)
    assert res.returncode == 0, res.stderr
    assert "300 mm scan line to valve bar / 2 m/s = 150.0 ms - 5 ms valve opening - 5 ms margin = 140.0 ms" in res.stdout


@pytest.mark.system
def test_unknown_node_name_is_refused(tmp_path, run_dir):
    cfg = write_config(tmp_path / "c.toml", GRAPH, run_dir)
    res = sortline("node", "relay", "--config", str(cfg), timeout=60)
    assert res.returncode == EX_CONFIG
    assert "no node named 'relay'" in res.stderr


@pytest.mark.system
def test_help_explains_each_command():
    res = sortline("--help", timeout=60)
    assert res.returncode == 0
    for command in ("run", "node", "check"):
        assert command in res.stdout
        sub = sortline(command, "--help", timeout=60)
        assert sub.returncode == 0 and "--config" in sub.stdout


# Where the demo profile is a sensible default: commands that run on a CPU alone. Those that set up a real
# machine (its units, its calibration files, one of its nodes) need --config.
ON_THE_DEMO = (["run"], ["replay", "x.mcap"], ["simulate", "--seconds", "1", "--record", "x.mcap"], ["score"],
               ["hil"], ["check"], ["status"], ["export", "shipped:belt-fusion-nano.safetensors"])
NEED_CONFIG = (["install-service"], ["node", "belt"], ["calibrate", "spectral", "--dark", "d", "--white", "w", "--out", "o"],
               ["calibrate", "spatial", "rec.mcap", "--out", "o"], ["calibrate", "check", "rec.mcap"], ["record", "x.mcap"])


def test_which_commands_take_the_demo_profile_without_config():
    from sortline.cli import build_parser

    for args in ON_THE_DEMO:
        parsed = build_parser().parse_args(args)
        assert parsed.config is None and parsed.demo_config, args
    for args in NEED_CONFIG:
        with pytest.raises(SystemExit) as exc:
            build_parser().parse_args(args)
        assert exc.value.code == 2, args
    cameras = build_parser().parse_args(["cameras"])   # lists the producers' devices without a config
    assert cameras.config is None and not getattr(cameras, "demo_config", False)


@pytest.mark.system
def test_check_without_config_checks_the_shipped_demo_profile_and_says_so():
    from importlib.resources import files

    shipped = str(files("sortline") / "configs" / "demo.toml")
    res = sortline("check", timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stderr.splitlines() == [f"sortline: no --config given: using the shipped demo profile {shipped}"]
    assert res.stdout.startswith(f"{shipped}: valid (profile demo)\n")
    given = sortline("check", "--config", str(DEMO), timeout=60)
    assert given.returncode == 0 and given.stderr == "" and given.stdout.startswith(f"{DEMO}: valid")
    res = sortline("install-service", timeout=60)
    assert res.returncode == 2 and "the following arguments are required: --config" in res.stderr


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(key=st.sampled_from([("belt", "speed_m_s"), ("belt", "ticks_per_mm"), ("valve_bar", "distance_mm"),
                            ("valve_bar", "count"), ("valve_bar", "min_pulse_ms"), ("valve_bar", "pitch_mm"),
                            ("belt", "width_mm"), ("ejector", "address"), ("ejector", "driver_latency_ms"),
                            ("model", "strip_lines"), ("budget", "margin_ms")]),
       value=st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-2**70, 2**70),
                       st.text(max_size=30), st.sampled_from(["127.0.0.1:0", "x:65536", "host:", ":80", "a:1"])))
def test_fuzzed_config_values_are_a_config_error_or_a_valid_machine(tmp_path, key, value):
    """Whatever a value is, the configuration loads into finite, usable figures, or ConfigError says which key
    is wrong, one line each: never another exception, and never an inf or nan that the checks let through."""
    import math

    import tomli_w

    from conftest import merged

    data = merged(tomllib.loads(machine_toml()), {key[0]: {key[1]: value}})
    path = tmp_path / "fuzz.toml"
    path.write_text(tomli_w.dumps(data) + GRAPH)
    try:
        cfg = load_config(path)
    except ConfigError as exc:
        assert exc.lines and all(line.startswith(str(path)) for line in exc.lines)
        return
    figures = (cfg.budget_ms(), cfg.line_rate_hz("rgb"), cfg.travel_mm(), getattr(cfg, key[0]).model_dump()[key[1]])
    assert all(math.isfinite(v) for v in figures if isinstance(v, float))


@pytest.mark.parametrize("args, says", [
    (["score", "--speed", "1e-300"], "argument --speed: '1e-300' is no belt speed"),
    (["score", "--speeds", "2,inf"], "argument --speeds: 'inf' is no belt speed"),
    (["hil", "--speed", "-3"], "argument --speed: '-3' is no belt speed"),
    (["replay", "belt.mcap", "--speed", "nan"], "argument --speed: 'nan': give a factor of 0 or more"),
    (["run", "--seconds", "inf"], "argument --seconds: 'inf': give a time in seconds"),
    (["simulate", "--record", "x.mcap", "--seconds", "0"], "argument --seconds: '0': give a time in seconds"),
])
def test_command_line_figures_outside_the_machine_ranges_are_usage_errors(args, says):
    """A speed or a duration typed on the command line meets the same bounds as one in the configuration: a usage
    error (exit 2) that names the option, before any node starts."""
    res = sortline(*args, "--config", str(DEMO))
    assert res.returncode == 2, res.stderr
    assert says in res.stderr


def test_the_production_twin_is_the_production_machine_with_a_simulated_belt_and_valve_bar():
    """The twin says only what differs: the machine's figures and the graph from register to ejector are the
    production file's, the cameras are the synthetic belt, the controller is the valve-bar simulator, and the
    files each names are found beside the file that names them."""
    prod, twin = load_config(ROOT / "configs/production.toml"), load_config(ROOT / "configs/production-twin.toml")
    for section in ("belt", "cameras", "valve_bar", "model", "budget", "recipe"):
        assert getattr(twin, section) == getattr(prod, section), section
    assert {n: c.kind for n, c in prod.nodes.items()} == {
        "acquire-rgb": "acquire", "acquire-hsi": "acquire", "register": "register", "infer": "infer",
        "plan": "eject_plan", "ejector": "ejector", "live_view": "live_view"}
    assert {n: c.kind for n, c in twin.nodes.items()} == {
        "register": "register", "infer": "infer", "plan": "eject_plan", "ejector": "ejector",
        "live_view": "live_view", "belt": "simulate", "belt-hsi": "simulate", "valve_sim": "valve_sim"}
    kept = {(e.src, e.dst) for e in prod.edges if not e.src.startswith("acquire")}
    assert kept <= {(e.src, e.dst) for e in twin.edges}
    assert {e.dst for e in twin.edges if e.src.startswith("belt")} == {
        "register.rgb", "register.hsi", "plan.encoder", "ejector.encoder", "valve_sim.truth", "valve_sim.encoder"}
    assert twin.nodes["belt"].params["seed"] == twin.nodes["belt-hsi"].params["seed"]   # one belt
    assert (prod.ejector.driver, twin.ejector.driver) == ("udp", "sim")
    assert twin.calibration.spectral == str(ROOT / "configs/calibration/production-twin-spectral.npz")
    assert all(os.path.isfile(p) for p in (twin.calibration.spectral, twin.calibration.spatial, twin.ejector.key))


def test_an_extending_file_follows_its_base_and_names_files_beside_the_file_that_states_them(tmp_path):
    base_dir, twin_dir = tmp_path / "machine", tmp_path / "twins"
    base_dir.mkdir(), twin_dir.mkdir()
    (base_dir / "m.toml").write_text(machine_toml(belt={"speed_m_s": 2.5}, calibration={"spatial": "cal/s.json"})
                                     + GRAPH)
    (twin_dir / "t.toml").write_text('extends = "../machine/m.toml"\ndrop_nodes = ["sink"]\n'
                                     '[calibration]\nspectral = "mine.npz"\n'
                                     '[nodes.other]\nkind = "sink"\n[[edges]]\nfrom = "camera.out"\nto = "other.in"\n')
    cfg = load_config(twin_dir / "t.toml")
    assert cfg.belt.speed_m_s == 2.5
    assert cfg.calibration.spatial == str(base_dir / "cal/s.json")
    assert cfg.calibration.spectral == str(twin_dir / "mine.npz")
    assert set(cfg.nodes) == {"camera", "other"} and [(e.src, e.dst) for e in cfg.edges] == [("camera.out", "other.in")]
    (base_dir / "m.toml").write_text(machine_toml(belt={"speed_m_s": 3.5}) + GRAPH)
    assert load_config(twin_dir / "t.toml").belt.speed_m_s == 3.5


@pytest.mark.parametrize("twin, says", [
    ('extends = "m.toml"\ndrop_nodes = ["nope"]\n', "drop_nodes: nope: no such node in"),
    ('extends = "t.toml"\n', "extends t.toml, which extends it back"),
    ('extends = "missing.toml"\n', "missing.toml: not found"),
    ('drop_nodes = ["sink"]\n' + GRAPH, "only a file that extends another can drop its nodes"),
    ('extends = 3\n', "extends is a file name"),
])
def test_a_broken_extends_is_one_config_error_line(tmp_path, twin, says):
    (tmp_path / "m.toml").write_text(machine_toml() + GRAPH)
    (tmp_path / "t.toml").write_text(twin)
    with pytest.raises(ConfigError) as exc:
        load_config(tmp_path / "t.toml")
    assert len(exc.value.lines) == 1 and says in exc.value.lines[0], exc.value.lines
