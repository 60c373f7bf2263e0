"""`sortline run`: every node of the graph as its own supervised process; `--record` adds a recorder."""

from __future__ import annotations

from pathlib import Path

from sortline.pipeline import registry
from sortline.cli import common
from sortline.pipeline.config import ConfigError, EdgeConfig, NodeConfig, Settings
from sortline.pipeline.graph import source_nodes


def with_recorder(settings: Settings, path: str, node: str = "record", **params) -> Settings:
    """The graph plus a `record` node writing `path` (with the record node's `params`), fed
    by a lossless edge from every output port of every source node (one recorded stream each)."""
    if node in settings.nodes:
        raise ConfigError([f"nodes.{node}: the graph already has a node of that name; cannot add a recorder"])
    # Lossless, with room for a few frames of jitter in the recorder before a source waits.
    new_edges = [EdgeConfig.model_validate({"from": f"{src}.{port}", "to": f"{node}.in", "policy": "lossless",
                                            "hwm": 16})
                 for src in source_nodes(settings)
                 for port in registry.node_class(settings.nodes[src].kind).outputs]
    if not new_edges:
        raise ConfigError(["the graph has no source node to record"])
    recorder = NodeConfig(kind="record", params={"path": str(Path(path).absolute()), **params})
    return settings.model_copy(update={"nodes": {**settings.nodes, node: recorder},
                                       "edges": [*settings.edges, *new_edges]})


def run(args) -> int:
    settings = common.load(args.config)
    if not (args.record or args.commands):
        return common.supervise(settings, args.config, args.seconds, args.report)

    def rewrite(s):
        s = with_recorder(s, args.record) if args.record else s
        return common.with_commands(s, args.commands) if args.commands else s

    return common.run_rewritten(settings, rewrite, args.seconds, args.report)


def add(sub) -> None:
    p = sub.add_parser("run", help="run every node of the graph, each as its own supervised process",
                       description="Start every node of the configured graph as its own process, restart "
                       "one that dies (with backoff), print a status table, stop them all cleanly on "
                       "SIGTERM/SIGINT or after --seconds.")
    common.add_run_options(p, "also record every source's output to this MCAP file (adds a record node)")
    p.set_defaults(func=run)
