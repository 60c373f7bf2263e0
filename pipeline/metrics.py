"""Prometheus metrics of a node process, and the snapshot its heartbeat carries.

Each node process has its own registry (prometheus_client's default one);
with `metrics.port_base` set, node i serves it on port_base + i. The same
figures travel in the heartbeat to the supervisor, which prints them.
"""

from __future__ import annotations

import platform
import socket
import urllib.request
from importlib import metadata

from prometheus_client import REGISTRY, Counter, Gauge, Histogram, start_http_server

from sortline.pipeline.config import ConfigError
from sortline.pipeline.graph import topo_order

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.14, 0.2, 0.3, 0.5, 1.0, 2.0)

MESSAGES = Counter("sortline_messages", "Messages a node received or sent", ["node", "port", "direction"])
DROPS = Counter("sortline_edge_drops", "Messages dropped on an edge", ["edge", "reason"])
MALFORMED = Counter("sortline_malformed_messages", "Messages that did not fit the contract", ["node", "kind"])
STAGE_SECONDS = Histogram("sortline_stage_seconds", "Time a node spends on one message", ["node"], buckets=LATENCY_BUCKETS)
E2E_SECONDS = Histogram(
    "sortline_latency_seconds", "Age of a message when it reaches this node, from its first trace entry",
    ["node"], buckets=LATENCY_BUCKETS,
)
SLOT_RECLAIMS = Counter("sortline_slot_lane_reclaims", "Slot lanes reclaimed from a consumer that died", ["node", "port"])
AUTH_REFUSED = Counter("sortline_auth_refused", "Connections to a tcp edge refused: the peer's CURVE key is not "
                       "authorised", ["node"])
LINES = Counter("sortline_lines", "Camera lines arriving at a node's input", ["node", "port"])
UP = Gauge("sortline_node_up", "1 while the node's main loop runs", ["node"])
INFER_BACKEND = Gauge("sortline_infer_backend_info", "1 for the inference backend the infer node runs (onnxruntime "
                      "where a GPU backend was asked for and cannot run here)", ["node", "backend"])
THREAD_ERRORS = Counter("sortline_thread_errors", "Exceptions that ended a worker thread of a node (the node then "
                        "stops, to be restarted)", ["node", "thread"])
REORDER_GAPS = Counter("sortline_reorder_gaps", "Gaps the merge after a replicated node gave up waiting for (a "
                       "replica died or dropped messages)", ["edge"])
REORDER_MISSING = Counter("sortline_reorder_missing", "Messages missing in those gaps", ["edge"])
BUILD_INFO = Gauge("sortline_build_info", "1, labelled with what this node runs: sortline's version, Python's, and "
                   "the inference backends whose libraries are installed (comma-separated)",
                   ["node", "version", "python", "backends"])


def version() -> str:
    """The installed sortline package's version (its metadata: the same for a wheel and a checkout installed
    with `pip install -e`)."""
    return metadata.version("sortline")


def set_build_info(node: str, backends: list[str]) -> None:
    BUILD_INFO.labels(node, version(), platform.python_version(), ",".join(sorted(backends))).set(1)


def port_of(settings, name: str) -> int:
    """The process's Prometheus port: process i in data-flow order (a node, or each replica of one: infer#0,
    infer#1) serves port_base + i (0: none).
    The supervisor, a node started by systemd and `sortline status` all agree on it."""
    if not settings.metrics.port_base:
        return 0
    return settings.metrics.port_base + topo_order(settings).index(name)


def serve(bind: str, port: int) -> None:
    """Serve this process's metrics; a port that cannot be had is a configuration error (no restart fixes it)."""
    try:
        start_http_server(port, addr=bind)
    except OSError as exc:
        raise ConfigError([f"metrics port {bind}:{port}: {exc.strerror or exc} (metrics.port_base)"]) from None


def port_problems(settings, ours_running_ok: bool = False) -> list[str]:
    """The metrics ports the graph's nodes would serve that cannot be had, one line each.
    ours_running_ok: a port served by that very node of a graph already running is fine (`sortline
    check` beside the running service)."""
    problems = []
    for name in topo_order(settings) if settings.metrics.port_base else ():
        port = port_of(settings, name)
        with socket.socket() as s:
            try:
                s.bind((settings.metrics.bind, port))
                continue
            except OSError as exc:
                why = exc.strerror or str(exc)
        if ours_running_ok and _served_by(settings.metrics.bind, port, name):
            continue
        problems.append(f"metrics.port_base = {settings.metrics.port_base}: node {name}'s port {port} on "
                        f"{settings.metrics.bind}: {why}")
    return problems


def _served_by(bind: str, port: int, node: str) -> bool:
    host = "127.0.0.1" if bind in ("0.0.0.0", "") else bind
    try:
        text = urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=1).read().decode(errors="replace")
    except OSError:
        return False
    return f'sortline_node_up{{node="{node}"}}' in text


def snapshot() -> dict[str, float]:
    """Every sortline_* sample of this process, keyed as Prometheus prints them."""
    result = {}
    for family in REGISTRY.collect():
        if not family.name.startswith("sortline_"):
            continue
        for sample in family.samples:
            if sample.name.endswith(("_created", "_bucket")):
                continue
            result[key(sample.name, sample.labels)] = sample.value
    return result


def key(name: str, labels: dict[str, str]) -> str:
    """A sample's key as Prometheus prints it, labels sorted: 'name{a="1",b="2"}'."""
    text = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    return f"{name}{{{text}}}"


def total(samples: dict[str, float], prefix: str, needle: str = "") -> float:
    """Sum of the snapshot's samples whose key starts with prefix and holds needle."""
    return sum(v for k, v in samples.items() if k.startswith(prefix) and needle in k)


def rate(samples: dict, before: dict, dt: float, needle: str, prefix: str = "sortline_messages_total") -> float:
    """Per second, between two snapshots dt seconds apart."""
    if dt <= 0:
        return 0.0
    return (total(samples, prefix, needle) - total(before, prefix, needle)) / dt
