"""`sortline recipe show|set`: the running graph's recipe, changed without a restart (docs/plc.md).

It asks the graph's supervisor on `control.sock` in the private runtime
directory (mode 0700: only the graph's own user can ask). The supervisor
checks the change against the classes the nodes know, gives it the belt
position from which it holds, writes it to the audit log, names this command
as `cli USER@HOST` there, and hands it to every node.
"""

from __future__ import annotations

import getpass
import json
import socket
import sys

from sortline.cli import common

TIMEOUT_MS = 5000
EX_NOT_RUNNING = 3   # as `sortline status` says of a graph that is down
EX_REFUSED = 1


def ask(settings, request: dict) -> dict | None:
    """The supervisor's answer, or None when no supervisor answers."""
    import zmq

    path = settings.runtime_dir() / "control.sock"
    if not path.exists():
        return None
    ctx = zmq.Context()
    sock = ctx.socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(f"ipc://{path}")
        sock.send_json(request)
        if not sock.poll(TIMEOUT_MS):
            return None
        return sock.recv_json()
    finally:
        sock.close()
        ctx.term()


def recipe(args) -> int:
    settings = common.load(args.config)
    if args.action == "show":
        request = {"op": "show"}
    else:
        if args.targets is None and args.priority is None:
            print("sortline: recipe set: give --targets, --priority or both", file=sys.stderr)
            return 2
        targets = None if args.targets is None else [t.strip() for t in args.targets.split(",") if t.strip()]
        request = {"op": "set", "targets": targets, "priority": args.priority,
                   "source": f"cli {getpass.getuser()}@{socket.gethostname()}"}
    reply = ask(settings, request)
    if reply is None:
        print(f"sortline: recipe: graph {settings.graph.name} is not running (no supervisor answers in "
              f"{settings.runtime_dir()})", file=sys.stderr)
        return EX_NOT_RUNNING
    if not reply.get("ok"):
        print(f"sortline: recipe {args.action}: refused: {reply.get('error')}", file=sys.stderr)
        return EX_REFUSED
    if args.json:
        print(json.dumps(reply, indent=2))
    elif args.action == "show":
        r = reply["recipe"]
        since = "from the start" if reply["change"] == 0 else f"since belt position {reply['at_tick']} (change {reply['change']})"
        print(f"targets {', '.join(r['targets'])}, priority {r['priority']}, {since}; the belt is at "
              f"{reply['position']}; the model's classes: {', '.join(reply['classes'] or ['(not known yet)'])}")
    elif reply["record"] is None:
        print("the recipe is that already: nothing changed")
    else:
        rec = reply["record"]
        print(f"recipe change {rec['change']}: targets {', '.join(rec['new']['targets'])}, priority "
              f"{rec['new']['priority']} (was {', '.join(rec['old']['targets'])}, {rec['old']['priority']}), "
              f"in force from belt position {rec['at_tick']} on (the belt is at {rec['position_now']})")
    return 0


def add(sub) -> None:
    p = sub.add_parser("recipe", help="show or change the running graph's recipe (targets, priority), no restart",
                       description="show: the recipe in force, where it took effect, the model's classes. set: "
                       "change targets and/or priority; the change takes effect for every node at one belt "
                       "position a little ahead of the scan line, so each object is judged whole by one "
                       "recipe, and is appended to the audit log. A class the model does not know is refused "
                       "(exit 1); a graph that is not running: exit 3. See docs/plc.md.")
    p.add_argument("action", choices=["show", "set"])
    common.add_config(p)
    p.add_argument("--targets", default=None, help="comma-separated class names, e.g. PP or PET,PP")
    p.add_argument("--priority", choices=["recovery", "balanced", "purity"], default=None)
    p.add_argument("--json", action="store_true", help="print the supervisor's answer as JSON")
    p.set_defaults(func=recipe)
