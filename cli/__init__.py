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

from sortline.cli import (build_engine, calibrate, cameras, check, evaluate, export, hil, inspect,
                          install_service, keys, node, record, replay, run, score, simulate, status, train)
from sortline.cli.common import config_errors
from sortline.pipeline.config import ConfigError

DESCRIPTION = """\
sortline: a streaming pipeline for sensor-based sorting machines.

Every command that runs the machine takes --config FILE, a TOML file that
describes the machine (belt, cameras, valve bar, model, recipe) and the graph
of nodes; SORTLINE_* environment variables override it (SORTLINE_BELT__SPEED_M_S=3).
"""

# In the order `sortline --help` lists them.
COMMANDS = (run, record, replay, simulate, score, hil, calibrate, inspect, node, install_service, status, keys, check,
            cameras, train, evaluate, export, build_engine)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sortline", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        command.add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s", stream=sys.stderr)
    try:
        return args.func(args)
    except ConfigError as exc:  # found after loading: a directory, a file the config names
        return config_errors(exc)
