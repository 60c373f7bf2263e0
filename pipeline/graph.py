"""The wiring: which node sends what to whom, over which socket.

Nodes never name each other; they declare ports. The configuration's
`[[edges]]` connect `node.port` to `node.port`, and this module turns that
into concrete sockets and shared-memory lanes, checks the graph (kinds,
params, ports, payloads, cycles), and orders it (sources first) for start-up
and shutdown. Node kinds come from the registry (pipeline.registry).

It is also the one place that knows about replicas: a node with
`replicas = N` is N processes, NAME#0 .. NAME#N-1, and each edge into or out
of it becomes one edge per replica, marked so that the producer sends each
message on one of them (round robin, pipeline.transport) and the consumer
merges them back in order (pipeline.reorder). docs/architecture.md, "Replicas".
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
    # Replicas (docs/architecture.md, "Replicas"): the [[edges]] entry this edge comes from, and at a replicated
    # end which replica of how many it serves. fanout > 1: the producer sends each message on one edge of the
    # group; merge > 1: the consumer merges the group's messages back in seq order, holding at most `window`
    # messages for at most `timeout_s` while it waits for an earlier one.
    group: int = 0
    replica: int = 0
    fanout: int = 1
    merge: int = 1
    window: int = 0
    timeout_s: float = 0.0

    @property
    def configured(self) -> str:
        """The name of the [[edges]] entry: infer.out->plan.in for infer#1.out->plan.in."""
        return f"{replica_of(self.src)[0]}.{self.src_port}->{replica_of(self.dst)[0]}.{self.dst_port}"


REPLICA = "#"   # infer#1: replica 1 of the node infer, in process, log, metrics and file names


def replica_names(settings: Settings, node: str) -> list[str]:
    """The processes of a configured node: the node itself, or NAME#0 .. NAME#N-1 with replicas = N."""
    n = settings.nodes[node].replicas if node in settings.nodes else 1
    return [node] if n == 1 else [f"{node}{REPLICA}{i}" for i in range(n)]


def replica_of(process: str) -> tuple[str, int]:
    """The configured node of a process and its replica index: 'infer#1' -> ('infer', 1), 'plan' -> ('plan', 0)."""
    node, _, index = process.partition(REPLICA)
    return node, int(index) if index.isdigit() else 0


def processes(settings: Settings) -> list[str]:
    """Every process of the graph: one per node, N for a node with replicas = N."""
    return [p for node in settings.nodes for p in replica_names(settings, node)]


def cpus_of(settings: Settings, process: str) -> list[int]:
    """The cores a process may run on: its node's cpus, or with replicas = N its share of them (N equal
    runs in order: with N entries, replica i gets cpus[i])."""
    node, i = replica_of(process)
    cfg = settings.nodes[node]
    share = len(cfg.cpus) // cfg.replicas
    return cfg.cpus[i * share:(i + 1) * share]


def _one(value: str | list[str], i: int) -> str:
    """An address, bind or server_key of replica i (a list has one per replica, checked by check_graph)."""
    if isinstance(value, list):
        return value[i] if i < len(value) else ""
    return value


def edges(settings: Settings) -> list[Edge]:
    """The sockets of the graph. An [[edges]] entry is one edge, or, at a replicated node, one edge per
    replica: this expansion is the one place that knows about replicas (the nodes' code does not)."""
    run_dir = settings.runtime_dir()
    lanes: dict[str, int] = {}
    result = []
    for group, cfg in enumerate(settings.edges):
        src, src_port = cfg.src.split(".")
        dst, dst_port = cfg.dst.split(".")
        srcs, dsts = replica_names(settings, src), replica_names(settings, dst)
        # Into a replicated node: the producer sends each message to one replica. Out of one: the consumer
        # merges the replicas' messages, by the window of the replicated node. (An edge between two replicated
        # nodes is refused by check_graph; here it would connect every pair.)
        merged = settings.nodes[src] if len(srcs) > 1 else None
        for s in srcs:
            for d in dsts:
                i = replica_of(s if merged else d)[1]
                address = _one(cfg.address, i) or f"ipc://{run_dir}/{s}.{src_port}-{d}.{dst_port}.sock"
                shm = cfg.transport == "shm" or (cfg.transport == "auto" and address.startswith("ipc://"))
                lane = lanes.get(f"{s}.{src_port}", 0)
                lanes[f"{s}.{src_port}"] = lane + 1
                result.append(Edge(
                    name=f"{s}.{src_port}->{d}.{dst_port}", src=s, src_port=src_port, dst=d, dst_port=dst_port,
                    policy=cfg.policy, pattern=cfg.pattern, shm=shm, hwm=cfg.hwm,
                    # The replicas of a node fed by this output share its pool.
                    slots=cfg.slots or min(cfg.hwm * len(dsts) + 4, 64),
                    address=address, bind=_one(cfg.bind, i) or address, lane=lane,
                    server_key=_one(cfg.server_key, i), group=group, replica=i, fanout=len(dsts), merge=len(srcs),
                    window=merged.reorder_window if merged else 0,
                    timeout_s=merged.reorder_timeout_ms / 1000 if merged else 0.0,
                ))
    return result


def node_params(settings: Settings, name: str):
    node = settings.nodes[replica_of(name)[0]]
    return registry.node_class(node.kind).Params.model_validate(node.params)


def topo_order(settings: Settings) -> list[str]:
    """Process names (a node, or each of its replicas), every producer before its consumers; the same order
    for the same configuration (a process's place in it gives its metrics port). graphlib.CycleError for a
    graph with a cycle."""
    sorter = TopologicalSorter({name: [] for name in processes(settings)})
    for e in edges(settings):
        sorter.add(e.dst, e.src)
    return list(sorter.static_order())


def _replica_problems(settings: Settings, classes: dict) -> list[str]:
    """What cannot work with the configured replicas, one line each."""
    problems = []
    for name, node in settings.nodes.items():
        where = f"nodes.{name}"
        if REPLICA in name:
            problems.append(f"{where}: a node name cannot hold {REPLICA!r} (it names replicas: {name}{REPLICA}0)")
        if node.replicas == 1:
            continue
        if name in classes and not classes[name].inputs:
            problems.append(f"{where}.replicas = {node.replicas}: a source (a node without inputs) cannot have "
                            "replicas: replicas share the messages of their input between them")
        if node.cpus and (len(node.cpus) < node.replicas or len(node.cpus) % node.replicas):
            problems.append(f"{where}.replicas = {node.replicas} with cpus = {node.cpus}: each replica needs its own "
                            f"cores, an equal share of cpus; give {node.replicas} entries (one core each), or none")
    for i, cfg in enumerate(settings.edges):
        src, dst = cfg.src.split(".")[0], cfg.dst.split(".")[0]
        if src not in settings.nodes or dst not in settings.nodes:
            continue
        n_src, n_dst = settings.nodes[src].replicas, settings.nodes[dst].replicas
        if n_src > 1 and n_dst > 1:
            problems.append(f"edges[{i}]: {src} and {dst} both have replicas: an edge between two replicated "
                            "nodes is not supported; put a node with one replica between them")
            continue
        n = max(n_src, n_dst)
        for key in ("address", "bind", "server_key"):
            value = getattr(cfg, key)
            if isinstance(value, list) and len(value) != n:
                where = f"{dst if n_dst > 1 else src}, which has replicas = {n}" if n > 1 else "no replicated end"
                problems.append(f"edges[{i}].{key}: {len(value)} entries for {where}; a list has one entry per "
                                "replica, else give one string")
        if n > 1 and isinstance(cfg.address, str) and cfg.address.startswith("tcp://"):
            problems.append(f"edges[{i}].address = {cfg.address!r}: a tcp edge at a node with replicas = {n} needs "
                            f"one address per replica, a list of {n} (each replica has its own socket)")
    return problems


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

    problems = _replica_problems(settings, classes)
    if problems:
        return problems
    connected = set()
    for e in edges(settings):
        where = f"edges[{e.group}]"
        src_node, dst_node = replica_of(e.src)[0], replica_of(e.dst)[0]
        src, dst = classes.get(src_node), classes.get(dst_node)
        cfg_src, cfg_dst = f"{src_node}.{e.src_port}", f"{dst_node}.{e.dst_port}"
        if src is None:
            problems.append(f"{where}.from = '{cfg_src}': no node named {src_node!r}")
        elif e.src_port not in src.outputs:
            problems.append(f"{where}.from = '{cfg_src}': {src_node} has outputs {list(src.outputs)}")
            src = None
        if dst is None:
            problems.append(f"{where}.to = '{cfg_dst}': no node named {dst_node!r}")
        elif e.dst_port not in dst.inputs:
            problems.append(f"{where}.to = '{cfg_dst}': {dst_node} has inputs {list(dst.inputs)}")
            dst = None
        if src is not None and dst is not None:
            sends, takes = src.outputs[e.src_port], dst.inputs[e.dst_port]
            if not takes.accepts(sends):
                problems.append(f"{where}: {cfg_src} sends {sends.name} messages, {cfg_dst} takes {takes.name}")
        for addr in {e.address, e.bind}:
            if addr.startswith("ipc://") and len(addr) - len("ipc://") > IPC_PATH_MAX:
                problems.append(f"{where}: ipc path {addr[6:]!r} is longer than {IPC_PATH_MAX} bytes; shorten graph.runtime_dir")
        if settings.security.curve and e.address.startswith("tcp://") and not e.server_key:
            problems.append(f"{where}: a tcp edge with security.curve needs server_key, the public certificate "
                            f"of {e.src}'s host")
        connected.add((dst_node, e.dst_port))
    problems = list(dict.fromkeys(problems))   # once for a configured edge, not once per replica
    port_base, count = settings.metrics.port_base, len(processes(settings))
    if port_base and port_base + count - 1 > 65535:
        problems.append(f"metrics.port_base = {port_base}: the graph's {count} processes need ports up to "
                        f"{port_base + count - 1}, past 65535")
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


def finished_mark(run_dir: Path, node: str) -> Path:
    """The file a node that has finished (a finite source, a consumer whose inputs all ended) leaves in
    the runtime directory, so that its consumers can tell its end of stream from a forged one (and a
    watcher under systemd, a node that finished from one that died)."""
    return run_dir / f"{node}.finished"


def heartbeat_address(run_dir: Path) -> str:
    """Where a graph's nodes send their heartbeats: the supervisor (`sortline run`) or, under systemd, the
    control process (`sortline control`) listens there; with neither, the beats go nowhere."""
    return f"ipc://{run_dir}/supervisor.sock"


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
