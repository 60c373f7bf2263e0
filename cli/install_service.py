"""`sortline install-service`: the systemd units and the configuration, in place.

What it writes under ROOT (`/` on the machine, a scratch directory for a
test or an image build):

- etc/sortline/sortline.toml, the configuration (and the calibration and
  model files it names by relative path, beside it; a `shipped:` model is
  found in the package wherever that is);
- etc/systemd/system/sortline.target and the template sortline@.service, its
  ExecStart pointing at this installation's `sortline`, and the service user
  (etc/sysusers.d/sortline.conf);
- per node of this host, a drop-in ordering it after the nodes it sends to:
  systemd then starts consumers first (each says READY=1 when set up) and
  stops sources first, as the supervisor does;
- the real-time drop-in for the ejector nodes (optionally pinned to CPUs);
- sortline-control.service, the recipes and the OPC UA server beside the nodes
  (`sortline control`), with a drop-in that starts it before them;
- the links `systemctl enable` would make, so that the target starts every
  node of this host, and the control process, at boot.
"""

from __future__ import annotations

import os
import shutil
import sys
import tomllib
from importlib.resources import files
from pathlib import Path

from sortline.pipeline import registry
from sortline.pipeline.config import ConfigError, Settings
from sortline.pipeline.graph import REPLICA, edges, load_config, processes, replica_names, replica_of

UNITS = files("sortline") / "systemd"   # package data: the same in a checkout and in an installed wheel
SHIPPED_PREFIX = "/opt/sortline"  # where the shipped units expect the virtual environment
ETC = Path("etc/sortline")
UNIT_DIR = Path("etc/systemd/system")
TEMPLATE = "sortline@.service"
CONTROL = "sortline-control.service"


def unit_name(process: str) -> str:
    """The unit of a node's process: sortline@NAME.service; a replica's '#' escaped as systemd escapes it
    (sortline@infer\\x231.service), the template's %I undoing it."""
    escaped = process.replace(REPLICA, "\\x23")
    return f"sortline@{escaped}.service"


def realtime_default(settings: Settings) -> list[str]:
    """The nodes that fire valves: they get the real-time drop-in unless told otherwise."""
    return [name for name, node in settings.nodes.items() if node.kind == "ejector"]


def install(config: str | os.PathLike, root: str | os.PathLike = "/", prefix: str = sys.prefix,
            nodes: list[str] | None = None, realtime: list[str] | None = None, realtime_cpus: str = "") -> list[Path]:
    """Install for the nodes of this host (default: all); returns the files written."""
    config = Path(config)
    settings = load_config(config)  # never install a configuration that would not start
    # A node with replicas is a unit per replica (infer#0, infer#1); naming the node names them all.
    known = processes(settings)
    nodes = known if nodes is None else nodes
    realtime = realtime_default(settings) if realtime is None else realtime
    unknown = [n for n in [*nodes, *realtime] if n not in known and n not in settings.nodes]
    if unknown:
        raise ConfigError([f"no node named {n!r}; the graph has {', '.join(known)}" for n in unknown])
    nodes = [p for n in nodes for p in (replica_names(settings, n) if n in settings.nodes else [n])]
    realtime = [p for n in realtime for p in (replica_names(settings, n) if n in settings.nodes else [n])]
    exe = Path(prefix) / "bin" / "sortline"
    if not os.access(exe, os.X_OK):
        raise ConfigError([f"--prefix {prefix}: {exe} is not an executable; give the virtual environment "
                           "sortline is installed in"])
    root = Path(root)
    etc, unit_dir = root / ETC, root / UNIT_DIR
    written: list[Path] = []

    def write(path: Path, text: str) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        written.append(path)

    def link(path: Path, target: str) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.unlink(missing_ok=True)
        path.symlink_to(target)
        written.append(path)

    write(etc / "sortline.toml", config.read_text())
    for rel in _relative_files(config):
        (etc / rel).parent.mkdir(parents=True, exist_ok=True)
        written.append(Path(shutil.copyfile(config.parent / rel, etc / rel)))

    write(unit_dir / TEMPLATE, (UNITS / TEMPLATE).read_text().replace(f"{SHIPPED_PREFIX}/bin/", f"{prefix}/bin/"))
    write(unit_dir / "sortline.target", (UNITS / "sortline.target").read_text())
    write(root / "etc/sysusers.d/sortline.conf", (UNITS / "sortline.sysusers").read_text())
    link(unit_dir / "multi-user.target.wants" / "sortline.target", "../sortline.target")
    consumers: dict[str, set[str]] = {}
    for e in edges(settings):
        if e.dst in nodes:
            consumers.setdefault(e.src, set()).add(e.dst)
    for name in nodes:
        unit = unit_name(name)
        after = " ".join(unit_name(d) for d in sorted(consumers.get(name, ())))
        kind = settings.nodes[replica_of(name)[0]].kind
        write(unit_dir / f"{unit}.d" / "node.conf",
              f"# {name}: a {kind} node ({registry.node_class(kind).__name__}); written by sortline install-service\n"
              f"[Unit]\nDescription=sortline node {name} ({kind})\n" + (f"After={after}\n" if after else ""))
        if name in realtime:
            text = (UNITS / "ejector" / "realtime.conf").read_text()
            write(unit_dir / f"{unit}.d" / "realtime.conf", text + (f"CPUAffinity={realtime_cpus}\n" if realtime_cpus else ""))
        link(unit_dir / "sortline.target.wants" / unit, f"../{TEMPLATE}")
    write(unit_dir / CONTROL, (UNITS / CONTROL).read_text().replace(f"{SHIPPED_PREFIX}/bin/", f"{prefix}/bin/"))
    watched = "" if set(nodes) == set(known) else f" --nodes {','.join(nodes)}"
    write(unit_dir / f"{CONTROL}.d" / "nodes.conf",
          "# written by sortline install-service: up before this host's nodes, watching them\n"
          f"[Unit]\nBefore={' '.join(unit_name(n) for n in nodes)}\n"
          + (f"[Service]\nExecStart=\nExecStart={exe} control --config /etc/sortline/sortline.toml{watched}\n"
             if watched else ""))
    link(unit_dir / "sortline.target.wants" / CONTROL, f"../{CONTROL}")
    return written


def _relative_files(config: Path) -> list[Path]:
    """Calibration, model and valve key files the configuration names by a path relative to
    itself: they go beside it, at the same relative place."""
    data = tomllib.loads(config.read_text())
    named = [*data.get("calibration", {}).values(), data.get("model", {}).get("path", ""),
             data.get("ejector", {}).get("key", "")]
    found = [Path(p) for p in named if p and not os.path.isabs(p) and (config.parent / p).is_file()]
    outside = [str(p) for p in found if ".." in p.parts]
    if outside:
        raise ConfigError([f"{config}: {', '.join(outside)}: a file named by a relative path that leaves the "
                           "configuration's folder cannot go beside it; name it by an absolute path"])
    return found


def install_service(args) -> int:
    def names(text: str | None) -> list[str] | None:
        return None if text is None else [n for n in text.split(",") if n]

    try:
        written = install(args.config, args.root, args.prefix, names(args.nodes), names(args.realtime),
                          args.realtime_cpus)
    except OSError as exc:
        print(f"sortline: install-service: {exc}", file=sys.stderr)
        return 1
    for path in written:
        print(f"  {path}")
    print(f"installed {len(written)} files under {args.root}")
    if args.root == "/":
        print("next: systemd-sysusers && systemctl daemon-reload && systemctl enable --now sortline.target"
              "   (docs/service.md)")
    return 0


def add(sub) -> None:
    p = sub.add_parser("install-service", help="install the systemd units and the configuration (/etc/sortline)",
                       description="Copy the configuration to ROOT/etc/sortline/sortline.toml (with the calibration "
                       "and model files it names by relative path), install sortline.target and the template unit "
                       "sortline@.service for the nodes of this host, each ordered after the nodes it sends to, "
                       "and sortline-control.service (recipes, OPC UA), and enable them. See docs/service.md.")
    p.add_argument("--config", required=True, help="machine configuration (TOML)")
    p.add_argument("--root", default="/", help="install under this directory instead of / (an image, a test)")
    p.add_argument("--prefix", default=sys.prefix,
                   help="the virtual environment whose bin/sortline the units run (default: this one)")
    p.add_argument("--nodes", default=None, help="comma-separated nodes that run on this host (default: all)")
    p.add_argument("--realtime", default=None,
                   help="comma-separated nodes given real-time priority (default: the ejector nodes)")
    p.add_argument("--realtime-cpus", default="", help="pin those nodes to these CPUs (systemd CPUAffinity=, e.g. 3)")
    p.set_defaults(func=install_service)
