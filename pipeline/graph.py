"""The wiring: which node sends what to whom, over which socket.

Nodes never name each other; they declare ports. The configuration's
`[[edges]]` connect `node.port` to `node.port`, and this module turns that
into concrete sockets and shared-memory lanes, checks the graph, and orders
it (sources first) for start-up and shutdown.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError

from pipeline.config import Settings, format_validation

IPC_PATH_MAX = 107  # sun_path in struct sockaddr_un


@dataclass(frozen=True)
class Edge:
    name: str  # "src.port->dst.port"
    src: str
    src_port: str
    dst: str
    dst_port: str
    policy: str  # "lossless" | "bounded" | "latest"
    pattern: str  # "pushpull" | "pubsub"
    shm: bool  # arrays through the shared-memory pool, header through the socket
    hwm: int
    slots: int
    address: str  # what the consumer connects to
    bind: str  # what the producer binds
    lane: int  # this edge's lane in the producer's slot pool for src.port
    server_key: str = ""  # with CURVE: the producer host's public certificate


def edges(settings: Settings) -> list[Edge]:
    run_dir = settings.runtime_dir()
    lanes: dict[str, int] = {}
    result = []
    for cfg in settings.edges:
        src, src_port = cfg.src.split(".")
        dst, dst_port = cfg.dst.split(".")
        address = cfg.address or f"ipc://{run_dir}/{src}.{src_port}-{dst}.{dst_port}.sock"
        shm = cfg.transport == "shm" or (cfg.transport == "auto" and address.startswith("ipc://"))
        lane = lanes.get(cfg.src, 0)
        lanes[cfg.src] = lane + 1
        result.append(Edge(
            name=f"{cfg.src}->{cfg.dst}", src=src, src_port=src_port, dst=dst, dst_port=dst_port,
            policy=cfg.policy, pattern=cfg.pattern, shm=shm, hwm=cfg.hwm,
            slots=cfg.slots or min(cfg.hwm + 4, 64), address=address, bind=cfg.bind or address, lane=lane,
            server_key=cfg.server_key,
        ))
    return result


def node_class(settings: Settings, name: str):
    from nodes import node_class as lookup

    return lookup(settings.nodes[name].kind)


def node_params(settings: Settings, name: str):
    return node_class(settings, name).Params.model_validate(settings.nodes[name].params)


def topo_order(settings: Settings) -> list[str]:
    """Node names, every producer before its consumers."""
    downstream: dict[str, set[str]] = {n: set() for n in settings.nodes}
    indegree = dict.fromkeys(settings.nodes, 0)
    for e in edges(settings):
        if e.dst not in downstream[e.src]:
            downstream[e.src].add(e.dst)
            indegree[e.dst] += 1
    order, ready = [], [n for n, d in indegree.items() if d == 0]
    while ready:
        n = ready.pop(0)
        order.append(n)
        for m in sorted(downstream[n]):
            indegree[m] -= 1
            if indegree[m] == 0:
                ready.append(m)
    return order


def check_graph(settings: Settings) -> list[str]:
    """Problems with the graph, one line each (empty when it is sound)."""
    from nodes import KINDS

    problems = []
    ports: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {}
    for name, node in settings.nodes.items():
        if node.kind not in KINDS:
            problems.append(f"nodes.{name}.kind = {node.kind!r}: unknown node kind, one of {', '.join(sorted(KINDS))}")
            continue
        cls = node_class(settings, name)
        ports[name] = (cls.inputs, cls.outputs)
        try:
            cls.Params.model_validate(node.params)
        except ValidationError as exc:
            problems.extend(format_validation(exc, prefix=f"nodes.{name}.params"))
    if problems:
        return problems

    connected = set()
    for i, e in enumerate(edges(settings)):
        where = f"edges[{i}]"
        if e.src not in ports:
            problems.append(f"{where}.from = '{e.src}.{e.src_port}': no node named {e.src!r}")
        elif e.src_port not in ports[e.src][1]:
            problems.append(f"{where}.from = '{e.src}.{e.src_port}': {e.src} has outputs {list(ports[e.src][1])}")
        if e.dst not in ports:
            problems.append(f"{where}.to = '{e.dst}.{e.dst_port}': no node named {e.dst!r}")
        elif e.dst_port not in ports[e.dst][0]:
            problems.append(f"{where}.to = '{e.dst}.{e.dst_port}': {e.dst} has inputs {list(ports[e.dst][0])}")
        for addr in {e.address, e.bind}:
            if addr.startswith("ipc://") and len(addr) - len("ipc://") > IPC_PATH_MAX:
                problems.append(f"{where}: ipc path {addr[6:]!r} is longer than {IPC_PATH_MAX} bytes; shorten graph.runtime_dir")
        if settings.security.curve and e.address.startswith("tcp://") and not e.server_key:
            problems.append(f"{where}: a tcp edge with security.curve needs server_key, the public certificate "
                            f"of {e.src}'s host")
        connected.add((e.dst, e.dst_port))
    for name, (inputs, _) in ports.items():
        for port in inputs:
            if (name, port) not in connected:
                problems.append(f"nodes.{name}: input {port!r} has no edge; add an [[edges]] entry with to = '{name}.{port}'")
    if not problems and len(topo_order(settings)) != len(settings.nodes):
        problems.append("edges: the graph has a cycle; data must flow one way")
    return problems


def inputs_of(settings: Settings, name: str) -> dict[str, list[Edge]]:
    result: dict[str, list[Edge]] = {}
    for e in edges(settings):
        if e.dst == name:
            result.setdefault(e.dst_port, []).append(e)
    return result


def outputs_of(settings: Settings, name: str) -> dict[str, list[Edge]]:
    result: dict[str, list[Edge]] = {}
    for e in edges(settings):
        if e.src == name:
            result.setdefault(e.src_port, []).append(e)
    return result


def prepare_runtime_dir(path: Path) -> Path:
    """Create the private runtime directory (mode 0700) or refuse a shared one.
    Either failure is a ConfigError: a restart would not fix it."""
    from pipeline.config import ConfigError

    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = path.stat()
    except OSError as exc:
        raise ConfigError([f"runtime directory {path}: {exc.strerror} (set graph.runtime_dir)"]) from None
    if st.st_uid != os.getuid():
        raise ConfigError([f"runtime directory {path} belongs to uid {st.st_uid}, not to this user (uid "
                           f"{os.getuid()}); set graph.runtime_dir"])
    if st.st_mode & 0o077:
        path.chmod(0o700)
    return path


# Rewrites of a configured graph (for `sortline replay`, `--record`). Each
# returns new Settings; run them through config.config_toml, as node
# processes read their configuration from a file.

def source_nodes(settings: Settings) -> list[str]:
    """Nodes without inputs: cameras, simulators, test patterns, replays."""
    return [name for name in settings.nodes if not node_class(settings, name).inputs]


def with_recorder(settings: Settings, path: str, node: str = "record", **params) -> Settings:
    """The graph plus a `record` node writing `path` (with the record node's
    `params`), fed by a lossless edge from every output port of every source
    node (one recorded stream each)."""
    from pipeline.config import ConfigError, EdgeConfig, NodeConfig

    if node in settings.nodes:
        raise ConfigError([f"nodes.{node}: the graph already has a node of that name; cannot add a recorder"])
    # Lossless, with room for a few frames of jitter in the recorder before a source waits.
    new_edges = [EdgeConfig.model_validate({"from": f"{src}.{port}", "to": f"{node}.in", "policy": "lossless",
                                            "hwm": 16})
                 for src in source_nodes(settings) for port in node_class(settings, src).outputs]
    if not new_edges:
        raise ConfigError(["the graph has no source node to record"])
    recorder = NodeConfig(kind="record", params={"path": str(Path(path).absolute()), **params})
    return settings.model_copy(update={"nodes": {**settings.nodes, node: recorder},
                                       "edges": [*settings.edges, *new_edges]})


def replay_graph(settings: Settings, path: str, node: str = "replay", **params) -> Settings:
    """The graph with its source nodes replaced by one replay of `path`.

    Each edge that left a source now leaves the replay output of the stream
    that source produced: the source's port name when it is one of the
    replay's outputs ("rgb", "hsi", "truth"), else its `stream` or `camera`
    parameter. With speed 0 ("as fast as accepted") those edges become
    lossless, since only back-pressure makes that mean every message.
    """
    from nodes.replay import Replay
    from pipeline.config import ConfigError, NodeConfig

    sources = set(source_nodes(settings))
    if not sources:
        raise ConfigError(["the graph has no source node for the replay to replace"])
    new_edges, problems = [], []
    for i, edge in enumerate(settings.edges):
        src, port = edge.src.split(".")
        if src not in sources:
            new_edges.append(edge)
            continue
        src_params = settings.nodes[src].params
        stream = port if port in Replay.outputs else src_params.get("stream") or src_params.get("camera")
        if stream not in Replay.outputs:
            problems.append(f"edges[{i}].from = '{edge.src}': no recorded stream to take its place "
                            f"(a replay publishes {', '.join(Replay.outputs)})")
            continue
        update = {"src": f"{node}.{stream}"}
        if params.get("speed", 1.0) == 0:
            update.update(policy="lossless", pattern="pushpull")
        new_edges.append(edge.model_copy(update=update))
    if problems:
        raise ConfigError(problems)
    nodes = {name: cfg for name, cfg in settings.nodes.items() if name not in sources}
    nodes[node] = NodeConfig(kind="replay", params={"path": str(Path(path).absolute()), **params})
    return settings.model_copy(update={"nodes": nodes, "edges": new_edges})
