"""`sortline control`: the machine's recipes and its OPC UA server, beside nodes that systemd runs.

Under `sortline run` the supervisor does this itself. Under systemd every node is its own unit
(sortline@NAME.service) and nothing else would hold the run's recipe, answer `sortline recipe`
or serve the PLC; this command, as sortline-control.service, does, reading the nodes' heartbeats
as the supervisor does and starting none of them (pipeline.supervisor, `start_nodes=False`).
"""

from __future__ import annotations

import sys

from sortline.cli import common


def control(args) -> int:
    from sortline.pipeline.graph import processes
    from sortline.pipeline.supervisor import Supervisor

    settings = common.load(args.config)
    nodes = None if args.nodes is None else [n for n in args.nodes.split(",") if n]
    known = processes(settings)
    unknown = [n for n in nodes or () if n not in known]
    if unknown:
        print(f"sortline: control --nodes: no node named {', '.join(unknown)}; the graph has {', '.join(known)}",
              file=sys.stderr)
        return 2
    print(f"sortline: profile {settings.profile}, graph {settings.graph.name}: watching "
          f"{len(nodes) if nodes is not None else len(known)} nodes that systemd runs; recipes, `sortline recipe`"
          + (f" and OPC UA at {settings.opcua.endpoint}" if settings.opcua.enabled else ""), flush=True)
    return Supervisor(settings, args.config, start_nodes=False, nodes=nodes).run()


def add(sub) -> None:
    p = sub.add_parser("control", help="recipes, `sortline recipe` and the OPC UA server for nodes systemd runs",
                       description="Under systemd (one unit per node, no supervisor): hold the run's recipe, "
                       "answer `sortline recipe`, serve the PLC over OPC UA when opcua.enabled, from the nodes' "
                       "heartbeats. Starts no node. Installed as sortline-control.service by `sortline "
                       "install-service`. See docs/plc.md.")
    common.add_config(p)
    p.add_argument("--nodes", default=None, help="comma-separated nodes of this host to watch (default: all)")
    p.set_defaults(func=control)
