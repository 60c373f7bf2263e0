"""The wiring: which node sends what to whom, over which socket.

Nodes never name each other; they declare ports. The configuration's
`[[edges]]` connect `node.port` to `node.port`, and this module turns that
into concrete sockets and shared-memory lanes, checks the graph (kinds,
params, ports, payloads, cycles), and orders it (sources first) for start-up
and shutdown. Node kinds come from the registry (pipeline.registry).
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from graphlib import CycleError, TopologicalSorter
from pathlib import Path

from pydantic import ValidationError

from sortline.pipeline import registry
from sortline.pipeline.config import ConfigError, Settings, format_validation, read_config

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


def node_params(settings: Settings, name: str):
    return registry.node_class(settings.nodes[name].kind).Params.model_validate(settings.nodes[name].params)


def topo_order(settings: Settings) -> list[str]:
    """Node names, every producer before its consumers; the same order for the same configuration
    (a node's place in it gives its metrics port). graphlib.CycleError for a graph with a cycle."""
    sorter = TopologicalSorter({name: [] for name in settings.nodes})
    for e in edges(settings):
        sorter.add(e.dst, e.src)
    return list(sorter.static_order())


def check_graph(settings: Settings) -> list[str]:
    """Problems with the graph, one line each (empty when it is sound)."""
    problems = []
    classes = {}
    try:
        known = registry.kinds()
    except ConfigError as exc:
        return exc.lines
    for name, node in settings.nodes.items():
        if node.kind not in known:
            problems.append(f"nodes.{name}.kind = {node.kind!r}: unknown node kind, one of {', '.join(sorted(known))}")
            continue
        try:
            cls = classes[name] = registry.node_class(node.kind)
            cls.Params.model_validate(node.params)
        except ConfigError as exc:
            problems.extend(f"nodes.{name}: {line}" for line in exc.lines)
        except ValidationError as exc:
            problems.extend(format_validation(exc, prefix=f"nodes.{name}.params"))
    if problems:
        return problems

    connected = set()
    for i, e in enumerate(edges(settings)):
        where = f"edges[{i}]"
        src, dst = classes.get(e.src), classes.get(e.dst)
        if src is None:
            problems.append(f"{where}.from = '{e.src}.{e.src_port}': no node named {e.src!r}")
        elif e.src_port not in src.outputs:
            problems.append(f"{where}.from = '{e.src}.{e.src_port}': {e.src} has outputs {list(src.outputs)}")
            src = None
        if dst is None:
            problems.append(f"{where}.to = '{e.dst}.{e.dst_port}': no node named {e.dst!r}")
        elif e.dst_port not in dst.inputs:
            problems.append(f"{where}.to = '{e.dst}.{e.dst_port}': {e.dst} has inputs {list(dst.inputs)}")
            dst = None
        if src is not None and dst is not None:
            sends, takes = src.outputs[e.src_port], dst.inputs[e.dst_port]
            if not takes.accepts(sends):
                problems.append(f"{where}: {e.src}.{e.src_port} sends {sends.name} messages, "
                                f"{e.dst}.{e.dst_port} takes {takes.name}")
        for addr in {e.address, e.bind}:
            if addr.startswith("ipc://") and len(addr) - len("ipc://") > IPC_PATH_MAX:
                problems.append(f"{where}: ipc path {addr[6:]!r} is longer than {IPC_PATH_MAX} bytes; shorten graph.runtime_dir")
        if settings.security.curve and e.address.startswith("tcp://") and not e.server_key:
            problems.append(f"{where}: a tcp edge with security.curve needs server_key, the public certificate "
                            f"of {e.src}'s host")
        connected.add((e.dst, e.dst_port))
    port_base = settings.metrics.port_base
    if port_base and port_base + len(settings.nodes) - 1 > 65535:
        problems.append(f"metrics.port_base = {port_base}: the graph's {len(settings.nodes)} nodes need ports up to "
                        f"{port_base + len(settings.nodes) - 1}, past 65535")
    for name, cls in classes.items():
        for port in cls.inputs:
            if (name, port) not in connected:
                problems.append(f"nodes.{name}: input {port!r} has no edge; add an [[edges]] entry with to = '{name}.{port}'")
    if not problems:
        try:
            topo_order(settings)
        except CycleError as exc:
            problems.append(f"edges: the graph has a cycle ({' -> '.join(exc.args[1])}); data must flow one way")
    return problems


def load_config(path: str | os.PathLike) -> Settings:
    """A configuration whose values and graph are sound (kinds, params, ports, payloads), or ConfigError
    with one line per problem: what every command and node starts from."""
    settings = read_config(path)
    problems = check_graph(settings)
    if problems:
        raise ConfigError([f"{path}: {line}" for line in problems])
    return settings


def open_edges(settings: Settings) -> list[str]:
    """tcp edges bound to every interface without CURVE: anyone on the network can join them."""
    if settings.security.curve:
        return []
    return [f"edge {e.name} is bound to {e.bind} without security.curve: any host that reaches it can read "
            "its messages (bind to one interface, or turn on security.curve)"
            for e in edges(settings) if e.bind.startswith(("tcp://*", "tcp://0.0.0.0", "tcp://[::]", "tcp://::"))]


def source_nodes(settings: Settings) -> list[str]:
    """Nodes without inputs: cameras, simulators, test patterns, replays."""
    return [name for name, node in settings.nodes.items() if not registry.node_class(node.kind).inputs]


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
    """Create the private runtime directory (mode 0700) or refuse a shared one, or one whose parent
    another user could rename it out of (a directory that user owns, or may write to without the
    sticky bit: /dev/shm/sortline-UID made first by someone else). Every failure is a ConfigError:
    a restart would not fix it."""
    try:
        if not path.parent.exists():
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        parent = path.parent.stat()
        path.mkdir(mode=0o700, exist_ok=True)
        st = path.stat()
    except OSError as exc:
        raise ConfigError([f"runtime directory {path}: {exc.strerror} (set graph.runtime_dir)"]) from None
    if parent.st_uid not in (os.getuid(), 0) or (parent.st_mode & 0o022 and not parent.st_mode & stat.S_ISVTX):
        raise ConfigError([f"runtime directory {path}: its parent {path.parent} belongs to uid {parent.st_uid} "
                           f"with mode {stat.S_IMODE(parent.st_mode):o}: another user could take the graph's "
                           "directory; remove it, or set graph.runtime_dir"])
    if st.st_uid != os.getuid():
        raise ConfigError([f"runtime directory {path} belongs to uid {st.st_uid}, not to this user (uid "
                           f"{os.getuid()}); set graph.runtime_dir"])
    if st.st_mode & 0o077:
        path.chmod(0o700)
    return path
