"""`sortline record`: the configured cameras alone, recorded (calibration references and targets, test belts)."""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

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
    with tempfile.TemporaryDirectory(prefix="sortline-record-") as tmp:
        report = args.report or str(Path(tmp) / "run.json")
        rc = common.run_rewritten(settings, lambda s: with_recorder(sources_alone(s), args.file), args.seconds,
                                  report)
        status = json.loads(Path(report).read_text())["nodes"]["record"]["status"] if Path(report).exists() else {}
    if rc == 0 and "failed" in status:
        print(f"sortline: record: the recording failed ({status['failed']}); {args.file} holds what was written "
              f"before, {status.get('lost', 0)} messages were lost", file=sys.stderr)
        return 1
    return rc


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
