"""`sortline keys HOST`: this host's CURVE certificate for tcp edges (docs/service.md)."""

from __future__ import annotations

import sys
from pathlib import Path


def keys(args) -> int:
    from sortline.pipeline.security import make_keys

    if args.valve:
        return valve_key(args)
    try:
        public, secret = make_keys(args.out, args.name)
    except OSError as exc:
        print(f"sortline: keys: {exc}", file=sys.stderr)
        return 1
    print(f"public certificate: {public}\n  copy it into security.authorized of every host this one connects to,\n"
          f"  and name it as server_key on the edges whose producer runs here")
    print(f"secret certificate: {secret}\n  stays on this host: security.key (readable by the service's group only)")
    return 0


def valve_key(args) -> int:
    from sortline.nodes.belt.datagram import make_key

    try:
        path = make_key(Path(args.out) / f"{args.name}.valve_key")
    except OSError as exc:
        print(f"sortline: keys: {exc}", file=sys.stderr)
        return 1
    print(f"valve controller key: {path}\n  name it as ejector.key on the host that sends the commands, and give the "
          f"same key to the controller\n  (it authenticates every datagram; readable by the service's group only)")
    return 0


def add(sub) -> None:
    p = sub.add_parser("keys", help="make this host's CURVE certificate for tcp edges, or a valve controller's key",
                       description="Write NAME.key (public) and NAME.key_secret (secret) into --out: the keys "
                       "that authenticate and encrypt tcp edges between hosts (security.curve). With --valve, "
                       "NAME.valve_key instead: the key every valve datagram is authenticated with (ejector.key). "
                       "See docs/service.md and docs/ejection.md.")
    p.add_argument("name", help="the host's (or the valve controller's) name: the files' names")
    p.add_argument("--out", default="/etc/sortline/keys", help="directory (default /etc/sortline/keys)")
    p.add_argument("--valve", action="store_true", help="a valve controller's key, not a host certificate")
    p.set_defaults(func=keys)
