"""`sortline node NAME`: one node of the graph in this process (what the supervisor and a systemd unit start)."""

from __future__ import annotations

import sys

from sortline.cli import common
from sortline.pipeline import logs
from sortline.pipeline.config import EX_CONFIG


def node(args) -> int:
    from sortline.models.backends import installed
    from sortline.pipeline.graph import processes
    from sortline.pipeline.metrics import set_build_info
    from sortline.pipeline.node import main

    settings = common.load(args.config)
    if args.name not in processes(settings):
        print(logs.error_line(f"sortline: config error: no node named {args.name!r}; the graph has "
                              f"{', '.join(processes(settings))}"), file=sys.stderr)
        return EX_CONFIG
    set_build_info(args.name, installed())
    return main(settings, args.name, args.heartbeat, args.metrics_port)


def add(sub) -> None:
    p = sub.add_parser("node", help="run one node in this process (what a systemd unit starts)",
                       description="Run one node of the configured graph in the foreground.")
    p.add_argument("name", help="the node's name in the configuration (a replica: NAME#I, e.g. infer#1)")
    common.add_config(p, demo=False)
    p.add_argument("--heartbeat", default=None, help="ZeroMQ address of a supervisor's heartbeat socket")
    p.add_argument("--metrics-port", type=int, default=None,
                   help="serve Prometheus metrics on this port (0: off; default: metrics.port_base + the "
                   "node's place in data-flow order, off when port_base is 0)")
    p.set_defaults(func=node)
