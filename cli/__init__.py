"""The `sortline` command: one module per subcommand, each with `add(subparsers)`.

The commands sit on top of everything (runtime, nodes, models, calibration);
a command module imports what it needs when it runs, so that building the
parser (every node process does) stays cheap. The graph rewrites a command
needs live with it: `--record` in run, the sources alone in record, the replay
in replay, the scored belt run in score.
"""

from __future__ import annotations

import argparse
import logging
import sys

from sortline.cli import (build_engine, calibrate, calibrate_confidence, cameras, check, control, evaluate, export,
                          hil, inspect, install_service, keys, node, recipe, record, replay, run, score, simulate, status,
                          teach, train)
from sortline.cli.common import config_errors, default_config
from sortline.models.contract import ModelFileError
from sortline.pipeline import logs
from sortline.pipeline.config import ConfigError

DESCRIPTION = """\
sortline: a streaming pipeline for sensor-based sorting machines.

Every command that runs the machine takes --config FILE, a TOML file that
describes the machine (belt, cameras, valve bar, model, recipe) and the graph
of nodes; SORTLINE_* environment variables override it (SORTLINE_BELT__SPEED_M_S=3).
Those that can run on a CPU alone (run, score, check, ...) take the shipped
demo profile when --config is not given, and say so; those that set up a real
machine (install-service, calibrate, node) need it.
"""


class Version(argparse.Action):
    """--version: the installed package's version, looked up only when asked for (every node process builds
    this parser)."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, help="print sortline's version and exit")

    def __call__(self, parser, namespace, values, option_string=None):
        from sortline.pipeline.metrics import version

        print(f"sortline {version()}")
        parser.exit()

# In the order `sortline --help` lists them.
COMMANDS = (run, record, replay, simulate, score, hil, calibrate, inspect, node, install_service, control, status, recipe,
            keys, check, cameras, teach, train, evaluate, calibrate_confidence, export, build_engine)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sortline", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--version", action=Version)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        command.add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logs.setup(logging.DEBUG if args.verbose else logging.INFO)
    default_config(args)
    try:
        return args.func(args)
    except ConfigError as exc:  # found after loading: a directory, a file the config names
        return config_errors(exc)
    except ModelFileError as exc:  # a model file named on the command line: absent, corrupt, for other shapes
        print(f"sortline: {exc}", file=sys.stderr)
        return 2
