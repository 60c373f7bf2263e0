"""`sortline keys HOST`: this host's CURVE certificate for tcp edges (docs/service.md); with --valve a valve
controller's key, with --opcua an OPC UA certificate (docs/plc.md)."""

from __future__ import annotations

import sys
from pathlib import Path


def keys(args) -> int:
    from sortline.pipeline.security import make_keys

    if args.valve:
        return valve_key(args)
    if args.opcua:
        return opcua_certificate(args)
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


def opcua_certificate(args) -> int:
    """A self-signed OPC UA application certificate (DER) and its key (PEM), for the server (client: false)
    or for a client of it (a PLC, an HMI, a test)."""
    import asyncio
    import os
    import socket

    try:
        from asyncua.crypto.cert_gen import setup_self_signed_certificate
        from cryptography.x509.oid import ExtendedKeyUsageOID
    except ImportError:
        print("sortline: keys --opcua needs asyncua: pip install 'sortline[plc]'", file=sys.stderr)
        return 1
    out = Path(args.out)
    cert, key = out / f"{args.name}.der", out / f"{args.name}.pem"
    host = socket.gethostname()
    uri = args.uri or f"urn:sortline:{args.name}"
    use = [ExtendedKeyUsageOID.CLIENT_AUTH] + ([] if args.client else [ExtendedKeyUsageOID.SERVER_AUTH])
    try:
        out.mkdir(parents=True, exist_ok=True)
        old = os.umask(0o137)   # the key readable by the service's group only
        try:
            asyncio.run(setup_self_signed_certificate(key, cert, uri, host, use, {"commonName": args.name}))
        finally:
            os.umask(old)
    except OSError as exc:
        print(f"sortline: keys: {exc}", file=sys.stderr)
        return 1
    role = "client" if args.client else "server"
    print(f"OPC UA {role} certificate: {cert} (application URI {uri}, valid one year)\n"
          + ("  copy it into opcua.trusted of the sortline it connects to" if args.client else
             "  name it as opcua.certificate; give it to the PLC, which trusts it"))
    print(f"private key: {key}\n  stays on this host" + ("" if args.client else ": opcua.private_key"))
    return 0


def add(sub) -> None:
    p = sub.add_parser("keys", help="make this host's CURVE certificate for tcp edges, or a valve controller's key",
                       description="Write NAME.key (public) and NAME.key_secret (secret) into --out: the keys "
                       "that authenticate and encrypt tcp edges between hosts (security.curve). With --valve, "
                       "NAME.valve_key instead: the key every valve datagram is authenticated with (ejector.key). "
                       "With --opcua, NAME.der and NAME.pem: an OPC UA certificate and key (docs/plc.md). "
                       "See docs/service.md and docs/ejection.md.")
    p.add_argument("name", help="the host's (or the valve controller's) name: the files' names")
    p.add_argument("--out", default="/etc/sortline/keys", help="directory (default /etc/sortline/keys)")
    p.add_argument("--valve", action="store_true", help="a valve controller's key, not a host certificate")
    p.add_argument("--opcua", action="store_true", help="an OPC UA application certificate (NAME.der) and key "
                   "(NAME.pem): the server's (opcua.certificate), or with --client a client's")
    p.add_argument("--client", action="store_true", help="with --opcua: a client's certificate (a PLC, an HMI)")
    p.add_argument("--uri", default="", help="with --opcua: the application URI (default urn:sortline:NAME); a "
                   "client's must be the URI its OPC UA stack announces")
    p.set_defaults(func=keys)
