"""A hostile or clumsy environment against live nodes and the whole demo graph: fuzzed valve windows and
valve datagrams, broken configurations, a camera that stops, a full disk under a recorder, a forged end
of stream. Each is a counted refusal and a log line; nothing crashes or restarts for what it was sent, and
the line goes on sorting. (Fuzzed messages in general: test_fuzz_node.)"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import (demo_config, demo_toml, edge_toml, free_port, load_json, metric, node_toml, pid_of, scrape,
                      sortline, start, stop, wait_for, write_config)
from sortline.nodes.belt.datagram import Command, DatagramError, SequenceWindow, decode, encode, next_seq, read_key
from sortline.nodes.streams import EjectMeta, Window
from sortline.pipeline.graph import load_config, outputs_of
from sortline.pipeline.transport import Output

pytestmark = pytest.mark.system
KEY = read_key(demo_config()["ejector"]["key"])
SCORED_S = 5    # belt seconds of each scored run: some 30 targets


def counted(port: int, name: str, **labels) -> float:
    return metric(scrape(port), name, **labels)


class LiveEjector:
    """An ejector process fed by this test (as its plan), its datagrams caught here (as the valve bar)."""

    def __init__(self, tmp_path, run_dir):
        self.valves = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.valves.bind(("127.0.0.1", 0))
        self.valves.settimeout(0.05)
        self.port = free_port()
        graph = (node_toml("camera", "pattern") + node_toml("plan", "relay")
                 + node_toml("ejector", "ejector", "timing = false") + edge_toml("camera.out", "plan.in")
                 + edge_toml("plan.out", "ejector.in") + edge_toml("camera.out", "ejector.encoder"))
        cfg = write_config(tmp_path / "c.toml", graph, run_dir,
                           ejector={"address": f"127.0.0.1:{self.valves.getsockname()[1]}"})
        s = load_config(cfg)
        self.ctx = zmq.Context()
        self.out = Output(self.ctx, "plan", "out", outputs_of(s, "plan")["out"], run_dir, lambda: False)
        self.node = start("node", "ejector", "--config", str(cfg), "--metrics-port", str(self.port))
        wait_for(lambda: counted(self.port, "sortline_node_up") == 1, timeout=30)
        assert self.out.wait_for_consumers(10)
        self.seq = 0

    def send(self, windows: list) -> None:
        msg = self.out.new({}, stream="eject", seq=self.seq, meta={"windows": windows, "objects": []})
        self.seq += 1
        self.out.send(msg, time.monotonic_ns(), "plan")

    def datagrams(self) -> list[Command]:
        got = []
        while True:
            try:
                got.append(decode(self.valves.recv(128), KEY, 48, 200_000))
            except (TimeoutError, socket.timeout):
                return got

    def close(self):
        rc, _, err = stop(self.node)
        self.out.close()
        self.ctx.destroy(0)
        self.valves.close()
        return rc, err


def live(cls, tmp_path_factory):
    """A node under test for a whole module; it must stop cleanly at the end, whatever it was sent."""
    import shutil
    import tempfile

    run_dir = Path(tempfile.mkdtemp(prefix="sl-", dir="/dev/shm"))
    node = cls(tmp_path_factory.mktemp(cls.__name__), run_dir)
    yield node
    rc, err = node.close()
    shutil.rmtree(run_dir, ignore_errors=True)
    assert rc == 0 and "Traceback" not in err, err[-3000:]


@pytest.fixture(scope="module")
def ejector(tmp_path_factory):
    yield from live(LiveEjector, tmp_path_factory)


valve = st.one_of(st.integers(0, 47), st.sampled_from([48, 1023, 65535, 70000, -1]))
position = st.one_of(st.integers(0, 100_000), st.sampled_from([-1, 3_000_000, 2**62, 2**63 - 1]))
windows = st.lists(st.tuples(valve, valve, position, position, st.integers(0, 2**40),
                             st.sampled_from(["PET", "PET", "paper"]), st.sampled_from([0.9, 1.0, 1.5, -1.0])),
                   max_size=4)


def fits(w) -> bool:
    """What the ejector's port takes (the demo bar: 48 valves; windows no longer than it can carry)."""
    lo, hi, a, b, _, _, conf = w
    return 0 <= lo <= hi < 48 and 0 <= conf <= 1 and a < b <= a + 4800 + 96 + 96 * 15 and -2**62 <= a and b <= 2**62


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(batch=st.lists(windows, min_size=1, max_size=6))
def test_fuzzed_windows_never_stop_the_ejector(ejector, batch):
    """A window off the bar, absurdly long or of no target class is refused (counted); the rest are sent,
    and the sender thread never dies (once, a valve number over 65535 killed it and all ejection with it)."""
    refused = counted(ejector.port, "sortline_malformed_messages_total", node="ejector", kind="payload")
    not_target = counted(ejector.port, "sortline_malformed_messages_total", node="ejector", kind="window_class")
    expected_bad = expected_class = expected_datagrams = 0
    for ws in batch:
        ejector.send([list(w) for w in ws])
        if all(fits(w) for w in ws):
            expected_class += sum(w[5] != "PET" for w in ws)
            expected_datagrams += sum(w[1] - w[0] + 1 for w in ws if w[5] == "PET")
        else:
            expected_bad += 1
    ejector.send([[1, 1, 100, 200, 5, "PET", 0.9]])                       # and a good one after all that
    got = []
    wait_for(lambda: got.extend(ejector.datagrams()) or len(got) >= expected_datagrams + 1, timeout=10)
    assert ejector.node.poll() is None, "the ejector died"
    assert len(got) == expected_datagrams + 1 and got[-1].object_id == 5
    wait_for(lambda: counted(ejector.port, "sortline_malformed_messages_total", node="ejector", kind="payload")
             == refused + expected_bad, timeout=5)
    assert counted(ejector.port, "sortline_malformed_messages_total", node="ejector",
                   kind="window_class") == not_target + expected_class
    assert counted(ejector.port, "sortline_thread_errors_total") == 0


class LiveValveBar:
    """The valve-bar simulator as a process, listening where a controller would."""

    def __init__(self, tmp_path, run_dir):
        self.udp, self.port = free_port(), free_port()
        graph = (node_toml("belt", "simulate") + node_toml("valve_sim", "valve_sim")
                 + edge_toml("belt.truth", "valve_sim.truth") + edge_toml("belt.rgb", "valve_sim.encoder"))
        cfg = write_config(tmp_path / "v.toml", graph, run_dir, ejector={"address": f"127.0.0.1:{self.udp}"})
        self.node = start("node", "valve_sim", "--config", str(cfg), "--metrics-port", str(self.port))
        wait_for(lambda: counted(self.port, "sortline_node_up") == 1, timeout=30)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.window = SequenceWindow()          # what the simulator should conclude, kept here too

    def expect(self, data: bytes) -> str:
        """The kind the simulator must count this datagram as ("ok" for one it takes)."""
        try:
            c = decode(data, KEY, 48, 200_000)
        except DatagramError as exc:
            return exc.kind
        return self.window.check(c.seq) or "ok"

    def close(self):
        rc, _, err = stop(self.node)
        self.sock.close()
        return rc, err


@pytest.fixture(scope="module")
def valve_bar(tmp_path_factory):
    yield from live(LiveValveBar, tmp_path_factory)


def datagram(kind: str, lo: int, hi: int, duration: int, back: int) -> bytes:
    c = Command(next_seq(0) - back, lo, hi, 1000, 0, duration, 7)
    if kind == "foreign key":
        return encode(c, bytes(32))
    if kind == "truncated":
        return encode(c, KEY)[:-1]
    return encode(c, KEY)


datagrams = st.lists(st.one_of(
    st.binary(max_size=80),
    st.builds(datagram, st.sampled_from(["good", "good", "foreign key", "truncated"]), st.integers(0, 60),
              st.integers(0, 60), st.sampled_from([1, 1000, 200_000, 200_001, 0xFFFFFFFF]),
              st.sampled_from([0, 0, 10**6 * 4096])),   # now, or a second old: outside the replay window
), min_size=1, max_size=20)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(batch=datagrams, repeat=st.booleans())
def test_fuzzed_datagrams_are_refused_by_kind(valve_bar, batch, repeat):
    """Wrong MACs, replays, duplicates, valves off the bar and pulses longer than the valves give: each
    refused and counted by kind, as a controller must; the good ones taken."""
    kinds = ("size", "mac", "magic", "version", "duplicate", "replay", "valves", "duration")
    before = {k: counted(valve_bar.port, "sortline_valve_sim_bad_datagrams_total", kind=k) for k in kinds}
    sent = batch + batch[:1] * repeat          # the first once more: a duplicate if it was taken
    expected = [valve_bar.expect(d) for d in sent]
    for d in sent:
        valve_bar.sock.sendto(d, ("127.0.0.1", valve_bar.udp))
    wanted = {k: before[k] + expected.count(k) for k in kinds}
    wait_for(lambda: {k: counted(valve_bar.port, "sortline_valve_sim_bad_datagrams_total", kind=k)
                      for k in kinds} == wanted, timeout=10)
    assert valve_bar.node.poll() is None


@pytest.mark.parametrize("sections, expected", [
    ({"belt": {"ticks_per_mm": float("inf")}}, "belt.ticks_per_mm = inf: Input should be a finite number"),
    ({"valve_bar": {"distance_mm": float("inf")}}, "valve_bar.distance_mm = inf: Input should be a finite number"),
    ({"ejector": {"address": "127.0.0.1:99999"}}, "expected HOST:PORT with a port from 1 to 65535"),
    ({"valve_bar": {"min_pulse_ms": 50.0, "max_pulse_ms": 20.0}}, "valve_bar.min_pulse_ms (50) is above max_pulse_ms"),
    ({"metrics": {"port_base": "BUSY"}}, "Address already in use"),
])
def test_a_broken_config_is_one_line_from_check_and_78_from_run(tmp_path, run_dir, sections, expected):
    busy = socket.socket()    # a port something else already serves
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    sections = dict(sections)
    graph = (node_toml("camera", "pattern", "count = 5") + node_toml("sink", "sink") + edge_toml("camera.out", "sink.in"))
    metrics = sections.pop("metrics", None)
    extra = f"\n[metrics]\nport_base = {busy.getsockname()[1]}\n" if metrics else ""
    cfg = write_config(tmp_path / "c.toml", graph, run_dir, extra=extra, **sections)
    try:
        for command in (["check"], ["run", "--seconds", "5"]):
            res = sortline(*command, "--config", str(cfg), timeout=60)
            assert res.returncode == 78, (command, res.stdout, res.stderr[-2000:])
            lines = [line for line in res.stderr.splitlines() if "config error" in line or " ERROR " in line]
            assert len(lines) == 1 and expected in lines[0], (command, res.stderr[-2000:])
            assert "Traceback" not in res.stderr
    finally:
        busy.close()


@pytest.mark.parametrize("model, expected", [
    ("shipped:demo", "sortline ships no model of that name; it ships belt-fusion-nano.onnx"),
    ("TRUNCATED", "truncated.safetensors"),
])
def test_a_model_that_cannot_be_used_is_one_line_and_exit_2_from_the_model_commands(tmp_path, model, expected):
    if model == "TRUNCATED":   # a copy cut short, as by a full disk or an interrupted transfer
        shipped = Path(__file__).parents[1] / "models" / "weights" / "belt-fusion-nano.safetensors"
        model = str(tmp_path / "truncated.safetensors")
        Path(model).write_bytes(shipped.read_bytes()[:5000])
    for command in (["evaluate", model, "--eval-strips", "1"], ["export", model, "--out", str(tmp_path / "m.onnx")]):
        res = sortline(*command, "--config", "configs/demo.toml", timeout=120)
        assert res.returncode == 2, (command, res.stdout, res.stderr[-2000:])
        assert "Traceback" not in res.stderr and expected in res.stderr.strip().splitlines()[-1], res.stderr[-2000:]
    assert not (tmp_path / "m.onnx").exists()


def test_check_opens_the_model_as_the_infer_node_does(tmp_path):
    onnx = tmp_path / "cut.onnx"   # the shipped model cut short
    onnx.write_bytes((Path(__file__).parents[1] / "models" / "weights" / "belt-fusion-nano.onnx").read_bytes()[:20000])
    for override, expected in ((f"SORTLINE_MODEL__PATH={onnx}", "model.path: " + str(onnx) + ": not a usable ONNX"),
                               ('SORTLINE_RECIPE__TARGETS=["GOLD"]', "recipe.targets: GOLD not among the classes")):
        key, value = override.split("=", 1)
        res = sortline("check", "--config", "configs/demo.toml", env={**os.environ, key: value}, timeout=60)
        assert res.returncode == 78 and "Traceback" not in res.stderr, res.stderr[-2000:]
        assert expected in res.stderr.strip().splitlines()[-1], res.stderr[-2000:]
    res = sortline("check", "--config", "configs/demo.toml", timeout=60)
    assert res.returncode == 0 and "model: shipped:belt-fusion-nano.onnx (" in res.stdout, res.stdout
    assert "classes PET, PP, HDPE, LDPE, PS, PVC, paper, aluminium, other" in res.stdout


def test_check_warns_of_a_tcp_edge_open_to_every_interface(tmp_path, run_dir):
    port = free_port()
    graph = (node_toml("camera", "pattern", "count = 5") + node_toml("sink", "sink")
             + f'\n[[edges]]\nfrom = "camera.out"\nto = "sink.in"\naddress = "tcp://127.0.0.1:{port}"\n'
               f'bind = "tcp://0.0.0.0:{port}"\n')
    res = sortline("check", "--config", str(write_config(tmp_path / "c.toml", graph, run_dir)), timeout=60)
    assert res.returncode == 0
    assert "WARNING: edge camera.out->sink.in is bound to tcp://0.0.0.0" in res.stdout and "security.curve" in res.stdout


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def demo_run(tmp_path, run_dir, name: str, seconds: float, record: str | None = None, unpaced: bool = False,
             **belt):
    """`sortline run` of the demo graph for `seconds`, its metrics on their own ports, the score written:
    (the supervisor, its config, the first metrics port: node i in data-flow order serves port + i).
    unpaced: the belt waits for the pipeline and the air is placed by position (as `sortline score
    --unpaced`): the same decisions run after run, whatever else the machine is doing."""
    port = free_port()
    cfg = tmp_path / f"{name}.toml"
    nodes = {"belt": {"params": {"seed": 1, **belt}},
             "valve_sim": {"params": {"report": str(tmp_path / f"{name}-score.json")}}}
    sections = {}
    if unpaced:
        nodes["belt"]["params"].update(paced=False, seconds=seconds)
        nodes["valve_sim"]["params"]["by_position"] = True
        nodes.update(infer={"params": {"timing": False}}, plan={"params": {"timing": False}},
                     ejector={"params": {"timing": False}})
        edges = [e for e in demo_config()["edges"] if not e["to"].startswith("live_view.")]   # as demo_toml's
        sections["edges"] = [{**e, "policy": "lossless", "pattern": "pushpull"} for e in edges]
    cfg.write_text(demo_toml(free_port(), graph={"name": name, "runtime_dir": str(run_dir)}, metrics={"port_base": port},
                             nodes=nodes, **sections))
    args = ["run", "--config", str(cfg), "--seconds", str(seconds + 60 if unpaced else seconds), "--report",
            str(tmp_path / f"{name}-run.json")]
    return start(*args, *(["--record", record] if record else [])), cfg, port


def test_a_camera_that_stops_costs_bounded_memory_and_is_counted(tmp_path, run_dir):
    """The RGB camera stops at 1 s of belt while the HSI camera goes on: the register node holds a bounded
    stretch of HSI, gives the rest up (counted), says so at most once per 10 s, and is never restarted."""
    sup, cfg, port = demo_run(tmp_path, run_dir, "rgbstop", 12, camera_stops={"rgb": 1.0})
    try:
        register = port + 1                       # data-flow order: belt, register, ...
        wait_for(lambda: metric(scrape(register), "sortline_edge_drops_total", reason="rgb_missing") > 0, timeout=30)
        pid = pid_of("node", "register", str(cfg))
        time.sleep(1)                             # the held stretch fills as the first drops come: measure after
        first = rss_mb(pid)
        time.sleep(2)                             # at 2 m/s, 10.7 MB/s of HSI once piled up here
        grown = rss_mb(pid) - first
        dropped = metric(scrape(register), "sortline_edge_drops_total", reason="rgb_missing")
    finally:
        rc, _, err = stop(sup, timeout=60)
    assert rc == 0, err[-3000:]
    assert grown < 10, grown
    assert dropped > 1300                          # HSI lines given up (533 a second), counted
    assert 1 <= err.count("no RGB lines for") <= 2, err[-3000:]
    assert load_json(tmp_path / "rgbstop-run.json")["nodes"]["register"]["restarts"] == 0


def small_disk(tmp_path) -> tuple[Path, object]:
    """A 4 MB tmpfs (a disk the recording fills in a tenth of a second), or /dev/full where mounting is
    not allowed (every write fails at once)."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)], capture_output=True).returncode:
        return Path("/dev/full"), lambda: None
    return mnt / "belt.mcap", lambda: subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_a_full_disk_under_the_recorder_does_not_stop_the_sorting(tmp_path, run_dir):
    """The recorder's disk fills a tenth of a second into the run: the recording stops, and the sorting
    does not. (Both runs unpaced, so that they are compared on their decisions: on a full disk a recorder
    once held its camera until the supervisor killed it as hung, and the line sent a few commands. Being
    unpaced, the two can run side by side, each in its own runtime directory.)"""
    path, unmount = small_disk(tmp_path)
    runs = {}
    try:
        for name, record in (("plain", None), ("fulldisk", str(path))):
            runs[name] = demo_run(tmp_path, run_dir / name, name, SCORED_S, unpaced=True, record=record)[0]
        with ThreadPoolExecutor() as pool:   # both outputs read at once: neither run blocks on a full pipe
            outputs = dict(zip(runs, pool.map(lambda proc: proc.communicate(timeout=120), runs.values())))
    finally:
        for proc in runs.values():
            if proc.poll() is None:
                proc.kill()
        unmount()
    for name, proc in runs.items():
        assert proc.returncode == 0, (name, outputs[name][1][-3000:])
    err = outputs["fulldisk"][1]
    plain, full = (load_json(tmp_path / f"{n}-score.json") for n in ("plain", "fulldisk"))
    assert plain["targets"] > 20 and abs(full["recovery"] - plain["recovery"]) <= 0.05, (plain, full)
    run = load_json(tmp_path / "fulldisk-run.json")
    record = run["nodes"]["record"]
    assert "No space left on device" in record["status"]["failed"] and record["status"]["lost"] > 0
    assert metric(record["metrics"], "sortline_record_failed") == 1
    assert all(n["restarts"] == 0 for n in run["nodes"].values()), {k: n["restarts"] for k, n in run["nodes"].items()}
    assert err.count("recording stopped") == 1


def test_a_forged_end_of_stream_does_not_end_an_input(tmp_path, run_dir):
    """While the belt is down, someone takes its socket and sends the register node an end of stream on its
    RGB input: refused, counted, logged; once the belt is back the register node cuts strips again."""
    sup, cfg, port = demo_run(tmp_path, run_dir, "forged", 40)
    register = port + 1
    try:
        wait_for(lambda: metric(scrape(register), "sortline_messages_total", node="register", direction="out") > 8,
                 timeout=40)
        supervisor, belt = sup.pid, pid_of("node", "belt", str(cfg))
        os.kill(supervisor, signal.SIGSTOP)       # it must not restart the belt before the forgery is done
        try:
            os.kill(belt, signal.SIGKILL)
            ctx = zmq.Context()
            forger = ctx.socket(zmq.PUSH)
            forger.bind(f"ipc://{run_dir}/belt.rgb-register.rgb.sock")
            from sortline.pipeline.messages import Header, encode_header

            forger.send(encode_header(Header(stream="rgb", seq=0, eos=True)))
            wait_for(lambda: metric(scrape(register), "sortline_malformed_messages_total", node="register",
                                    kind="eos") == 1, timeout=10)
            forger.close(linger=0)
            ctx.destroy(0)
        finally:
            os.kill(supervisor, signal.SIGCONT)
        made = metric(scrape(register), "sortline_messages_total", node="register", direction="out")
        wait_for(lambda: metric(scrape(register), "sortline_messages_total", node="register", direction="out")
                 > made + 8, timeout=30)          # the belt is back, and the register node has its RGB again
    finally:
        rc, _, err = stop(sup, timeout=60)
    assert rc == 0, err[-3000:]
    assert "refused an end of stream on belt.rgb->register.rgb: belt has not finished" in err
    run = load_json(tmp_path / "forged-run.json")
    assert run["nodes"]["register"]["restarts"] == 0 and run["nodes"]["register"]["state"] != "finished"


def test_the_kernel_drops_at_the_valve_port_are_counted(valve_bar):
    """Datagrams the kernel threw away because the port's buffer was full are counted (SO_RXQ_OVFL):
    while the simulator is held up, a burst of 3,000 arrives, more than its socket holds."""
    before = counted(valve_bar.port, "sortline_valve_sim_kernel_drops_total")
    os.kill(valve_bar.node.pid, signal.SIGSTOP)
    try:
        seq = 0
        for _ in range(3000):
            seq = next_seq(seq)
            valve_bar.sock.sendto(encode(Command(seq, 1, 1, 1000, 0, 1000, 9), KEY), ("127.0.0.1", valve_bar.udp))
    finally:
        os.kill(valve_bar.node.pid, signal.SIGCONT)

    def another():   # the count comes with the next datagram the socket queues after the drops
        valve_bar.sock.sendto(encode(Command(next_seq(seq), 1, 1, 1000, 0, 1000, 9), KEY), ("127.0.0.1", valve_bar.udp))
        return counted(valve_bar.port, "sortline_valve_sim_kernel_drops_total") > before

    wait_for(another, timeout=10, every=0.2)
    assert 0 < counted(valve_bar.port, "sortline_valve_sim_kernel_drops_total") - before < 3000
    assert valve_bar.node.poll() is None


def test_simulate_onto_a_full_disk_ends_and_says_so(tmp_path):
    """It once never ended, and left an empty file behind at every restart of the recorder."""
    path, unmount = small_disk(tmp_path)
    try:
        res = sortline("simulate", "--config", demo_config_path(tmp_path), "--seconds", "2", "--record", str(path),
                       timeout=120)
    finally:
        unmount()
    assert res.returncode == 1, res.stderr[-3000:]
    assert "the recording failed" in res.stderr and "No space left on device" in res.stderr
    assert res.stderr.count("recording stopped") == 1 and "restart" not in res.stderr


def demo_config_path(tmp_path) -> str:
    cfg = tmp_path / "demo.toml"
    cfg.write_text(demo_toml(free_port()))
    return str(cfg)


def test_a_valve_key_is_made_once_and_only_readable_by_the_service(tmp_path):
    res = sortline("keys", "valves", "--valve", "--out", str(tmp_path), timeout=60)
    assert res.returncode == 0, res.stderr
    key = tmp_path / "valves.valve_key"
    assert key.stat().st_mode & 0o777 == 0o640 and len(read_key(str(key))) == 32
    again = sortline("keys", "valves", "--valve", "--out", str(tmp_path), timeout=60)
    assert again.returncode == 1 and "exists" in again.stderr
