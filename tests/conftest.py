"""Helpers for tests that run real graphs: configs, processes, metrics."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import tomllib
import urllib.request
from pathlib import Path

import pytest
import tomli_w
from prometheus_client.parser import text_string_to_metric_families

from sortline.pipeline import metrics
from sortline.pipeline.config import Machine

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "configs" / "demo.toml"


def demo_config() -> dict:
    """The demo profile as data, the files it names (calibration, valve key) by absolute paths."""
    data = tomllib.loads(DEMO.read_text())
    data["calibration"] = {k: str(DEMO.parent / v) for k, v in data["calibration"].items()}
    data["ejector"]["key"] = str(DEMO.parent / data["ejector"]["key"])
    data["opcua"] = {"enabled": False}   # a test that wants the PLC's server asks for it, on a port of its own
    # The live view on a port the system picks: graphs of tests (and of other checkouts) never share one.
    data["nodes"]["live_view"]["params"]["bind"] = "127.0.0.1:0"
    return data


def machine_toml(**sections) -> str:
    """The demo profile's machine sections, without its graph; `sections` update them (ejector={...})."""
    return tomli_w.dumps(merged({k: v for k, v in demo_config().items() if k in Machine.model_fields}, sections))


def merged(data: dict, update: dict) -> dict:
    """data with update's keys set, tables merged key by key."""
    out = dict(data)
    for key, value in update.items():
        out[key] = merged(out.get(key, {}), value) if isinstance(value, dict) else value
    return out


def chain(camera: str = "", sink: str = "", policy: str = "lossless", transport: str = "auto",
          pattern: str = "pushpull", addresses: tuple[str, str] = ("", "")) -> str:
    """camera -> relay -> sink, with the given node params and edge settings (addresses: of the two edges,
    e.g. tcp://127.0.0.1:PORT; empty: ipc in the runtime directory)."""
    def edge(src: str, dst: str, address: str) -> str:
        where = f'address = "{address}"' if address else f'transport = "{transport}"'
        return f'\n[[edges]]\nfrom = "{src}"\nto = "{dst}"\npolicy = "{policy}"\n{where}\npattern = "{pattern}"\n'

    return f"""
[nodes.camera]
kind = "pattern"
params = {{ {camera} }}

[nodes.relay]
kind = "relay"

[nodes.sink]
kind = "sink"
params = {{ {sink} }}
""" + edge("camera.out", "relay.in", addresses[0]) + edge("relay.out", "sink.in", addresses[1])


def demo_toml(udp_port: int, oracle: bool = False, live_view: bool = False, **sections) -> str:
    """The demo profile with its whole graph, the valve bar on `udp_port`, `sections` merged in (see merged);
    with `oracle`, the belt's truth stands in for the model's masks (perfect segmentation). The live view is
    left out unless asked for: it has tests of its own, and a process less starts sooner on a busy machine."""
    data = demo_config()
    if not live_view:
        del data["nodes"]["live_view"]
        data["edges"] = [e for e in data["edges"] if not e["to"].startswith("live_view.")]
    data = merged(data, {"ejector": {"address": f"127.0.0.1:{udp_port}"}, **sections})
    if oracle:
        data["nodes"]["infer"] = {"kind": "oracle"}
        for edge in data["edges"]:
            if edge["to"] == "infer.in":
                edge["from"] = "belt.truth"
    return tomli_w.dumps(data)


def node_toml(name: str, kind: str, params: str = "") -> str:
    return f'\n[nodes.{name}]\nkind = "{kind}"\nparams = {{ {params} }}\n'


def edge_toml(src: str, dst: str) -> str:
    return f'\n[[edges]]\nfrom = "{src}"\nto = "{dst}"\n'


def belt_graph(belt: str, sink: str, streams: tuple[str, ...] = ("rgb", "hsi", "truth")) -> str:
    """The synthetic belt (node "belt") with these params, its streams into a sink."""
    return (node_toml("belt", "simulate", belt) + node_toml("sink", "sink", sink)
            + "".join(edge_toml(f"belt.{s}", "sink.in") for s in streams))


def write_config(path: Path, graph: str, run_dir: Path, extra: str = "", **sections) -> Path:
    """The demo machine (`sections` updating it, see machine_toml), `extra` TOML, a test graph name and
    runtime directory, quick supervisor beats, and the graph (TOML text)."""
    path.write_text(
        machine_toml(**sections)
        + extra
        + f'\n[graph]\nname = "test"\nruntime_dir = "{run_dir}"\n\n'
        + "[supervisor]\nstatus_every_s = 1\nheartbeat_s = 0.2\n\n"
        + graph
    )
    return path


def pytest_collection_modifyitems(items):
    """Tests marked `system` start real processes; every other test is a `unit` test (`pytest -m unit` runs
    those alone, in seconds; `make test` runs both)."""
    for item in items:
        if item.get_closest_marker("system") is None:
            item.add_marker(pytest.mark.unit)


@pytest.fixture
def run_dir():
    # Short, private and on tmpfs: ipc socket paths must stay under 108 bytes.
    base = "/dev/shm" if os.path.isdir("/dev/shm") else None
    path = Path(tempfile.mkdtemp(prefix="sl-", dir=base))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def sortline(*args, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sortline", *args], capture_output=True, text=True,
                          cwd=ROOT, **kwargs)


def start(*args, python: str = sys.executable, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([python, "-m", "sortline", *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kwargs)


def stop(proc: subprocess.Popen, timeout: float = 10) -> tuple[int, str, str]:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def scrape(port: int) -> dict[str, float]:
    """A node's Prometheus endpoint, as {'name{labels}': value} (labels sorted, as metrics.key writes them)."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read().decode()
    return {metrics.key(s.name, s.labels): s.value for family in text_string_to_metric_families(text)
            for s in family.samples}


def metric(samples: dict[str, float], name: str, **labels) -> float:
    """Sum of the samples of `name` whose labels include `labels`."""
    total = 0.0
    for key, value in samples.items():
        sample, _, rest = key.partition("{")
        if sample != name:
            continue
        have = dict(re.findall(r'(\w+)="([^"]*)"', rest))
        if all(have.get(k) == str(v) for k, v in labels.items()):
            total += value
    return total


def wait_for(predicate, timeout: float = 10.0, every: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = predicate()
        except OSError:  # an endpoint not up yet
            value = None
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"condition not met within {timeout} s")


_HANDED_OUT: set[int] = set()
PORT_SPAN = 16   # a graph's metrics use port_base + node index: a port is handed out with the ones after it


def free_port() -> int:
    """A port free for TCP and UDP, with the PORT_SPAN - 1 after it free for TCP, below the kernel's
    ephemeral range (so no connection made meanwhile takes one of them), and not within PORT_SPAN of any
    port handed out before in this process (two graphs of one test never share a port)."""
    import random
    import socket

    for _ in range(500):
        base = random.randrange(20000, 32000 - PORT_SPAN)
        if any(abs(base - b) < PORT_SPAN for b in _HANDED_OUT):
            continue
        socks = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM)] + [socket.socket() for _ in range(PORT_SPAN)]
        try:
            socks[0].bind(("127.0.0.1", base))
            for i, s in enumerate(socks[1:]):
                s.bind(("127.0.0.1", base + i))
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
        _HANDED_OUT.add(base)
        return base
    raise RuntimeError("no free block of ports below 32000")


def pid_of(*words: str) -> int:
    """The pid of the process whose command line holds all these words."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                # (a spare node process that became a node has that node's command line as one string)
                argv = (entry / "cmdline").read_bytes().decode(errors="replace").replace("\0", " ").split()
            except OSError:
                continue
            if all(w in argv for w in words):
                return int(entry.name)
    raise LookupError(f"no process running {words}")


def load_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())
