"""`sortline keys HOST`: this host's CURVE certificate for tcp edges (docs/service.md)."""

from __future__ import annotations

import sys


def keys(args) -> int:
    from sortline.pipeline.security import make_keys

    try:
        public, secret = make_keys(args.out, args.name)
    except OSError as exc:
        print(f"sortline: keys: {exc}", file=sys.stderr)
        return 1
    print(f"public certificate: {public}\n  copy it into security.authorized of every host this one connects to,\n"
          f"  and name it as server_key on the edges whose producer runs here")
    print(f"secret certificate: {secret}\n  stays on this host: security.key (readable by the service's group only)")
    return 0


def add(sub) -> None:
    p = sub.add_parser("keys", help="make this host's CURVE certificate for tcp edges",
                       description="Write NAME.key (public) and NAME.key_secret (secret) into --out: the keys "
                       "that authenticate and encrypt tcp edges between hosts (security.curve). See docs/service.md.")
    p.add_argument("name", help="the host's name (the files' names)")
    p.add_argument("--out", default="/etc/sortline/keys", help="directory (default /etc/sortline/keys)")
    p.set_defaults(func=keys)
