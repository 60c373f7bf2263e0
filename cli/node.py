"""`sortline node NAME`: one node of the graph in this process (what the supervisor and a systemd unit start).

`sortline node --standby` is the supervisor's spare: it starts Python, imports every node kind and checks
the configuration, then waits on its standard input for the name of the node to become. A node that dies
is then back after its own setup, not after a whole process start, which on a machine whose cores are
busy with the line takes seconds."""

from __future__ import annotations

import os
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
    name, metrics_port = args.name, args.metrics_port
    if args.standby:
        stamp = _stamp(args.config)
        order = sys.stdin.readline().split()
        if not order:
            return 0   # the supervisor stopped without needing it
        name = order[0]
        metrics_port = int(order[1]) if len(order) > 1 else None
        if _stamp(args.config) != stamp:   # edited while this process waited: a fresh start would read it
            settings = common.load(args.config)
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        import setproctitle
        setproctitle.setproctitle(" ".join([sys.executable, "-m", "sortline", "node", name, "--config",
                                            args.config, "--heartbeat", args.heartbeat or ""]))
    elif name is None:
        print(logs.error_line("sortline: config error: name the node to run (or --standby)"), file=sys.stderr)
        return EX_CONFIG
    if name not in processes(settings):
        print(logs.error_line(f"sortline: config error: no node named {name!r}; the graph has "
                              f"{', '.join(processes(settings))}"), file=sys.stderr)
        return EX_CONFIG
    set_build_info(name, installed())
    return main(settings, name, args.heartbeat, metrics_port)


def _stamp(path: str) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_mtime_ns, st.st_size


def add(sub) -> None:
    p = sub.add_parser("node", help="run one node in this process (what a systemd unit starts)",
                       description="Run one node of the configured graph in the foreground.")
    p.add_argument("name", nargs="?", help="the node's name in the configuration (a replica: NAME#I, e.g. infer#1)")
    common.add_config(p, demo=False)
    p.add_argument("--heartbeat", default=None, help="ZeroMQ address of a supervisor's heartbeat socket")
    p.add_argument("--metrics-port", type=int, default=None,
                   help="serve Prometheus metrics on this port (0: off; default: metrics.port_base + the "
                   "node's place in data-flow order, off when port_base is 0)")
    p.add_argument("--standby", action="store_true",
                   help="start, check the configuration, then wait for a line 'NAME [METRICS_PORT]' on standard "
                   "input and run that node (the supervisor's spare process)")
    p.set_defaults(func=node)
