"""`sortline simulate`: the synthetic belt alone, recorded: both cameras and the truth."""

from __future__ import annotations

from sortline.cli import common
from sortline.cli.run import with_recorder
from sortline.pipeline.config import NodeConfig


def simulate(args) -> int:
    settings = common.load(args.config)
    # The config's own simulate node (if any) gives the defaults: the same belt as `sortline run`.
    base = next((settings.nodes[n].params for n in common.nodes_of_kind(settings, "simulate")), {})
    # Both cameras, always: a config may split them over two nodes (one camera each) of the same belt.
    params = {**{k: v for k, v in base.items() if k != "cameras"}, "seconds": args.seconds, "paced": args.paced}
    params.update({k: v for k, v in (("seed", args.seed), ("scene", args.scene), ("speed_m_s", args.speed),
                                     ("occupancy", args.occupancy), ("drop_rate", args.drop_rate)) if v is not None})

    def rewrite(s):
        alone = s.model_copy(update={"nodes": {"belt": NodeConfig(kind="simulate", params=params)}, "edges": []})
        return with_recorder(alone, args.record)

    # --seconds is belt time here; the graph ends by itself when the belt has run that long.
    return common.run_recording(settings, rewrite, None, args.report, args.record, "simulate")


def add(sub) -> None:
    p = sub.add_parser("simulate", help="record the synthetic belt: both cameras and the ground truth",
                       description="Run the synthetic belt (the config's simulate node settings, if it has "
                       "one, else the defaults) for --seconds of belt time and record its rgb, hsi and truth "
                       "streams to an MCAP file. Unpaced unless --paced: as fast as the recorder writes.")
    common.add_config(p)
    p.add_argument("--seconds", type=common.seconds, required=True, help="belt time to simulate")
    p.add_argument("--record", metavar="FILE", required=True, help="the MCAP file to write")
    p.add_argument("--report", default=None, help="write each node's final metrics and status here (JSON)")
    p.add_argument("--seed", type=int, default=None, help="same seed, same bytes (default: the config's, else 1)")
    p.add_argument("--scene", choices=["belt", "target", "white", "dark"], default=None,
                   help="belt (objects), target (calibration board), white or dark (spectral references)")
    p.add_argument("--speed", type=common.belt_speed, default=None, help="belt speed, m/s (default: the config's)")
    p.add_argument("--occupancy", type=float, default=None, help="fraction of the belt covered")
    p.add_argument("--drop-rate", type=float, default=None, help="chance a frame is lost (a gap)")
    p.add_argument("--paced", action="store_true", help="at the belt's own pace instead of as fast as possible")
    p.set_defaults(func=simulate)
