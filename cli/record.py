"""`sortline record`: the configured cameras alone, recorded (calibration references and targets, test belts)."""

from __future__ import annotations

from sortline.cli import common
from sortline.cli.run import with_recorder
from sortline.pipeline.config import Settings
from sortline.pipeline.graph import source_nodes


def sources_alone(settings: Settings) -> Settings:
    """The graph's source nodes (cameras, simulator, test patterns) without anything downstream of them."""
    nodes = {name: settings.nodes[name] for name in source_nodes(settings)}
    return settings.model_copy(update={"nodes": nodes, "edges": []})


def record(args) -> int:
    settings = common.load(args.config)
    return common.run_recording(settings, lambda s: with_recorder(sources_alone(s), args.file), args.seconds,
                                args.report, args.file, "record")


def add(sub) -> None:
    p = sub.add_parser("record", help="record the configured cameras alone (calibration recordings)",
                       description="Run only the source nodes of the configured graph (the cameras; the "
                       "synthetic belt in a simulated machine) with a recorder, and write their streams to FILE: "
                       "nothing downstream runs, so no calibration file is needed and no valve fires. Stop the "
                       "sortline service first (systemctl stop sortline.target): the cameras serve one program "
                       "at a time. "
                       "Runs for --seconds (start-up included), or until Ctrl-C.")
    p.add_argument("file", help="the MCAP file to write (an existing one is kept: FILE.1.mcap is written)")
    common.add_config(p, demo=False)   # a real machine's cameras: its calibration recordings
    p.add_argument("--seconds", type=common.seconds, default=None,
                   help="stop after this long, start-up included (default: until Ctrl-C)")
    p.add_argument("--report", default=None, help="write each node's final metrics and status here (JSON)")
    p.set_defaults(func=record)
