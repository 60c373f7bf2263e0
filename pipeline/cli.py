"""The `sortline` command."""

from __future__ import annotations

import argparse
import logging
import sys

from pipeline.config import EX_CONFIG, ConfigError, load_config

DESCRIPTION = """\
sortline: a streaming pipeline for sensor-based sorting machines.

Every command that runs the machine takes --config FILE, a TOML file that
describes the machine (belt, cameras, valve bar, model) and the graph of
nodes; SORTLINE_* environment variables override it (SORTLINE_BELT__SPEED_M_S=3).
"""


def _config(path: str):
    try:
        return load_config(path)
    except ConfigError as exc:
        for line in exc.lines:
            print(f"sortline: config error: {line}", file=sys.stderr)
        sys.exit(EX_CONFIG)


def cmd_run(args) -> int:
    from pipeline.supervisor import Supervisor

    settings = _config(args.config)
    print(f"sortline: profile {settings.profile}, graph {settings.graph.name}, "
          f"{len(settings.nodes)} nodes; latency budget {settings.budget_derivation()}", flush=True)
    return Supervisor(settings, args.config, seconds=args.seconds, report=args.report).run()


def cmd_node(args) -> int:
    from pipeline.node import main

    settings = _config(args.config)
    if args.name not in settings.nodes:
        print(f"sortline: config error: no node named {args.name!r}; the graph has {', '.join(settings.nodes)}",
              file=sys.stderr)
        return EX_CONFIG
    return main(settings, args.name, args.heartbeat, args.metrics_port)


def cmd_check(args) -> int:
    from pipeline.graph import edges, topo_order

    settings = _config(args.config)
    print(f"{args.config}: valid (profile {settings.profile})")
    for cam in ("rgb", "hsi"):
        print(f"  {cam} line rate: {settings.line_rate_hz(cam):.0f} lines/s at {settings.belt.speed_m_s:g} m/s")
    print(f"  RGB:HSI ratio: {settings.hsi_ratio}")
    print(f"  latency budget: {settings.budget_derivation()}")
    print(f"  runtime directory: {settings.runtime_dir()}")
    print(f"  nodes (data-flow order): {', '.join(topo_order(settings))}")
    for e in edges(settings):
        print(f"  edge {e.name}: {e.policy}, {'shared memory' if e.shm else 'inline'}, {e.address}")
    return 0


def _lazy(module: str):
    """A command whose module (and torch with it) is imported only when it runs."""
    def run(args) -> int:
        from importlib import import_module

        return import_module(module).main(args)
    return run


def _model_commands(sub) -> None:
    """train, evaluate, export, build-engine: their modules import torch only when run."""
    from models import cli_args

    for name, module, add, short, long in (
        ("train", "models.train", cli_args.add_train,
         "train a segmentation model (synthetic belt or SpectralWaste)",
         "Train a model; seeded, resumable (--resume), safetensors checkpoints."),
        ("evaluate", "models.evaluate", cli_args.add_evaluate,
         "mIoU, per-class IoU and confusion matrix of a model on held-out data",
         "Evaluate a checkpoint on held-out data: mIoU, per-class IoU, a confusion matrix as a table and "
         "a PNG; --json PATH for the figures."),
        ("export", "models.export", cli_args.add_export,
         "export a checkpoint to ONNX for a strip size, checked against torch",
         "Export a checkpoint to ONNX at the configured strip size (strip + overlap), run it in ONNX "
         "Runtime and report the largest difference from torch."),
        ("build-engine", "models.engine", cli_args.add_build_engine,
         "build a TensorRT engine from an ONNX model (on the GPU that will run it)",
         "Build a TensorRT engine (FP16, or INT8 with calibration strips) with a timing cache and "
         "metadata; needs the .[gpu] extra on an NVIDIA machine."),
    ):
        p = sub.add_parser(name, help=short, description=long)
        add(p)
        p.set_defaults(func=_lazy(module))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sortline", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("run", help="run every node of the graph, each as its own supervised process",
                       description="Start every node of the configured graph as its own process, restart "
                       "one that dies (with backoff), print a status table, stop them all cleanly on "
                       "SIGTERM/SIGINT or after --seconds.")
    p.add_argument("--config", required=True, help="machine configuration (TOML)")
    p.add_argument("--seconds", type=float, default=None, help="stop after this long (default: run until stopped)")
    p.add_argument("--report", default=None, help="write each node's final metrics and status here (JSON)")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("node", help="run one node in this process (what a systemd unit starts)",
                       description="Run one node of the configured graph in the foreground.")
    p.add_argument("name", help="the node's name in the configuration")
    p.add_argument("--config", required=True, help="machine configuration (TOML)")
    p.add_argument("--heartbeat", default=None, help="ZeroMQ address of a supervisor's heartbeat socket")
    p.add_argument("--metrics-port", type=int, default=0, help="serve Prometheus metrics on this port (0: off)")
    p.set_defaults(func=cmd_node)

    p = sub.add_parser("check", help="validate a configuration and print the figures derived from it",
                       description="Validate a configuration; print line rates, the latency budget and "
                       "its derivation, and the graph's edges.")
    p.add_argument("--config", required=True, help="machine configuration (TOML)")
    p.set_defaults(func=cmd_check)
    _model_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s", stream=sys.stderr)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
