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
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "configs" / "demo.toml"


def machine_toml() -> str:
    """The demo profile's machine sections, without its graph (calibration paths made absolute)."""
    text = DEMO.read_text()
    return text[: text.index("[graph]")].replace('"calibration/', f'"{DEMO.parent}/calibration/')


def chain(camera: str = "", sink: str = "", policy: str = "lossless", transport: str = "auto",
          pattern: str = "pushpull") -> str:
    """camera -> relay -> sink, with the given node params and edge settings."""
    return f"""
[nodes.camera]
kind = "pattern"
params = {{ {camera} }}

[nodes.relay]
kind = "relay"

[nodes.sink]
kind = "sink"
params = {{ {sink} }}

[[edges]]
from = "camera.out"
to = "relay.in"
policy = "{policy}"
transport = "{transport}"
pattern = "{pattern}"

[[edges]]
from = "relay.out"
to = "sink.in"
policy = "{policy}"
transport = "{transport}"
pattern = "{pattern}"
"""


def demo_toml(udp_port: int, oracle: bool = False) -> str:
    """The demo profile with its whole graph, calibration paths absolute, the valve bar on `udp_port`;
    with `oracle`, the belt's truth stands in for the model's masks (perfect segmentation)."""
    text = DEMO.read_text().replace('"calibration/', f'"{DEMO.parent}/calibration/')
    text = text.replace('address = "127.0.0.1:5700"', f'address = "127.0.0.1:{udp_port}"')
    if oracle:
        head, infer = text.split("[nodes.infer]\n", 1)
        infer = infer.replace('kind = "infer"', 'kind = "oracle"', 1)
        text = (head + "[nodes.infer]\n" + infer).replace(
            'from = "register.out"\nto = "infer.in"', 'from = "belt.truth"\nto = "infer.in"')
        assert 'kind = "oracle"' in text and 'from = "belt.truth"\nto = "infer.in"' in text
    return text


def node_toml(name: str, kind: str, params: str = "") -> str:
    return f'\n[nodes.{name}]\nkind = "{kind}"\nparams = {{ {params} }}\n'


def edge_toml(src: str, dst: str) -> str:
    return f'\n[[edges]]\nfrom = "{src}"\nto = "{dst}"\n'


def belt_graph(belt: str, sink: str, streams: tuple[str, ...] = ("rgb", "hsi", "truth")) -> str:
    """The synthetic belt (node "belt") with these params, its streams into a sink."""
    return (node_toml("belt", "simulate", belt) + node_toml("sink", "sink", sink)
            + "".join(edge_toml(f"belt.{s}", "sink.in") for s in streams))


def write_config(path: Path, graph: str, run_dir: Path, extra: str = "") -> Path:
    path.write_text(
        machine_toml()
        + extra
        + f'\n[graph]\nname = "test"\nruntime_dir = "{run_dir}"\n\n'
        + "[supervisor]\nstatus_every_s = 1\nheartbeat_s = 0.2\n\n"
        + graph
    )
    return path


@pytest.fixture
def run_dir():
    # Short, private and on tmpfs: ipc socket paths must stay under 108 bytes.
    base = "/dev/shm" if os.path.isdir("/dev/shm") else None
    path = Path(tempfile.mkdtemp(prefix="sl-", dir=base))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def sortline(*args, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], capture_output=True, text=True,
                          cwd=ROOT, **kwargs)


def start(*args, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "pipeline.cli", *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kwargs)


def stop(proc: subprocess.Popen, timeout: float = 10) -> tuple[int, str, str]:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def scrape(port: int) -> dict[str, float]:
    """A node's Prometheus endpoint, as {'name{labels}': value}."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read().decode()
    result = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            result[key] = float(value)
    return result


def metric(samples: dict[str, float], name: str, **labels) -> float:
    """Sum of the samples of `name` whose labels include `labels`."""
    total = 0.0
    for key, value in samples.items():
        m = re.fullmatch(r"([^{]+)(?:\{(.*)\})?", key)
        if m.group(1) != name:
            continue
        have = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2) or ""))
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


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pid_of(*words: str) -> int:
    """The pid of the process whose command line holds all these words."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                argv = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
            except OSError:
                continue
            if all(w in argv for w in words):
                return int(entry.name)
    raise LookupError(f"no process running {words}")


def load_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())
