"""What the commands share: reading the configuration, and running a graph under the supervisor."""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from pathlib import Path
from typing import Annotated, Callable

from pydantic import TypeAdapter, ValidationError

from sortline.pipeline import logs
from sortline.pipeline.config import EX_CONFIG, Belt, ConfigError, Settings, config_toml
from sortline.pipeline.graph import load_config
from sortline.pipeline.graph import prepare_runtime_dir


def config_errors(exc: ConfigError) -> int:
    for line in exc.lines:
        print(logs.error_line(f"sortline: config error: {line}"), file=sys.stderr)
    return EX_CONFIG


def load(path: str) -> Settings:
    """The configuration, or one line per problem and exit 78."""
    try:
        return load_config(path)
    except ConfigError as exc:
        sys.exit(config_errors(exc))


def add_config(p: argparse.ArgumentParser, demo: bool = True, required: bool = True,
               help: str = "machine configuration (TOML)") -> None:
    """--config FILE. demo: without it, the command runs on the shipped demo profile and says so (see
    default_config): for commands that can run on a CPU alone. Otherwise --config is required (commands that set
    up a real machine), or, not required, the command goes without one."""
    if demo:
        p.add_argument("--config", default=None, help=f"{help}; default: the shipped demo profile")
        p.set_defaults(demo_config=True)
    else:
        p.add_argument("--config", required=required, default=None, help=help)


def default_config(args: argparse.Namespace) -> None:
    """A command that takes the demo profile by default and was given no --config gets it, with a line on
    stderr that says so (the path, to copy it from)."""
    if getattr(args, "demo_config", False) and args.config is None:
        args.config = shipped_config("demo")
        print(f"sortline: no --config given: using the shipped demo profile {args.config}", file=sys.stderr)


_SPEED = TypeAdapter(Annotated[float, Belt.model_fields["speed_m_s"]])


def belt_speed(text: str) -> float:
    """A --speed option: in m/s, within the bounds the configuration allows (argparse turns the error into a usage
    line)."""
    try:
        return _SPEED.validate_python(float(text))
    except ValidationError as exc:   # the configuration's own bounds say what is allowed
        raise argparse.ArgumentTypeError(f"{text!r} is no belt speed: {exc.errors()[0]['msg']} m/s") from exc
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r} is no belt speed (a number, m/s)") from exc


def seconds(text: str) -> float:
    """A --seconds option: a finite, positive time."""
    value = float(text)
    if not 0 < value < math.inf:
        raise argparse.ArgumentTypeError(f"{text!r}: give a time in seconds, more than 0")
    return value


def add_run_options(p: argparse.ArgumentParser, record_help: str) -> None:
    """What every command that runs a graph takes."""
    add_config(p)
    p.add_argument("--seconds", type=seconds, default=None, help="stop after this long (default: run until stopped)")
    p.add_argument("--report", default=None, help="write each node's final metrics and status here (JSON)")
    p.add_argument("--record", metavar="FILE", default=None, help=record_help)
    p.add_argument("--commands", metavar="FILE", default=None,
                   help="write every valve command the ejector sent (valve, open and close position in encoder "
                   "ticks, object id) and their timing to FILE (.npz) when the run ends")


def supervise(settings: Settings, config_path: str, seconds: float | None, report: str | None) -> int:
    from sortline.pipeline.supervisor import Supervisor

    print(f"sortline: profile {settings.profile}, graph {settings.graph.name}, "
          f"{len(settings.nodes)} nodes; latency budget {settings.budget_derivation()}", flush=True)
    return Supervisor(settings, config_path, seconds=seconds, report=report).run()


def run_rewritten(settings: Settings, rewrite: Callable[[Settings], Settings], seconds: float | None = None,
                  report: str | None = None) -> int:
    """Run the graph `rewrite(settings)` under the supervisor. Node processes read their
    configuration from a file: the derived one is written to the runtime directory for the
    length of the run."""
    try:
        derived = rewrite(settings)
    except ConfigError as exc:
        return config_errors(exc)
    run_dir = prepare_runtime_dir(derived.runtime_dir())
    with tempfile.NamedTemporaryFile("w", suffix=".toml", prefix="graph-", dir=run_dir) as fh:
        fh.write(config_toml(derived))
        fh.flush()
        return supervise(load(fh.name), fh.name, seconds, report)


def with_params(settings: Settings, node: str, **params) -> Settings:
    """The configuration with these params set on one node."""
    cfg = settings.nodes[node]
    nodes = {**settings.nodes, node: cfg.model_copy(update={"params": {**cfg.params, **params}})}
    return settings.model_copy(update={"nodes": nodes})


def nodes_of_kind(settings: Settings, kind: str) -> list[str]:
    return [name for name, node in settings.nodes.items() if node.kind == kind]


def with_commands(settings: Settings, path: str) -> Settings:
    """The graph with its ejector writing every command it sends to `path` (its samples file)."""
    ejectors = nodes_of_kind(settings, "ejector")
    if len(ejectors) != 1:
        raise ConfigError([f"--commands: the graph has {len(ejectors)} ejector nodes; it takes one"])
    return with_params(settings, ejectors[0], samples=str(Path(path).absolute()))


def by_position(settings: Settings) -> Settings:
    """The graph on a belt that waits for it (a recording or the synthetic belt as fast as the graph takes
    them): every edge lossless, so that back-pressure holds the source back where a live edge would drop;
    the infer node takes every strip however late, the plan and the ejector decide and send by belt
    position alone (the clock says nothing about a belt that waits); the valve-bar simulator places the
    air by the commands' positions."""
    for kind in ("infer", "eject_plan", "ejector"):
        for name in nodes_of_kind(settings, kind):
            settings = with_params(settings, name, timing=False)
    for name in nodes_of_kind(settings, "valve_sim"):
        settings = with_params(settings, name, by_position=True)
    edges = [e.model_copy(update={"policy": "lossless", "pattern": "pushpull"}) for e in settings.edges]
    return settings.model_copy(update={"edges": edges})


def run_recording(settings: Settings, rewrite, seconds: float | None, report: str | None, file: str,
                  command: str) -> int:
    """Run a rewritten graph that ends in its recorder (node "record"); a recording that failed on the way is
    exit 1, said in one line with what the file holds."""
    with tempfile.TemporaryDirectory(prefix=f"sortline-{command}-") as tmp:
        report = report or str(Path(tmp) / "run.json")
        rc = run_rewritten(settings, rewrite, seconds, report)
        status = json.loads(Path(report).read_text())["nodes"]["record"]["status"] if Path(report).exists() else {}
    if rc == 0 and "failed" in status:
        print(f"sortline: {command}: the recording failed ({status['failed']}); {file} holds what was written "
              f"before, {status.get('lost', 0)} messages were lost", file=sys.stderr)
        return 1
    return rc


def shipped_config(profile: str) -> str:
    """A machine profile that comes with sortline (configs/PROFILE.toml, package data)."""
    from importlib.resources import files

    return str(files("sortline") / "configs" / f"{profile}.toml")
