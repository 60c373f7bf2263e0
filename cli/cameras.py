"""`sortline cameras`: the GenICam devices the producers offer, with the features a camera config needs."""

from __future__ import annotations

from sortline.cli import common


def cameras(args) -> int:
    from sortline.nodes.acquire.device import default_cti
    from sortline.nodes.acquire.listing import list_cameras, producers_of, selections_of

    if args.config:
        settings = common.load(args.config)
        return list_cameras(args.cti or producers_of(settings), selections_of(settings))
    return list_cameras(args.cti or default_cti())


def add(sub) -> None:
    p = sub.add_parser("cameras", help="list the cameras the GenTL producers offer, with their key features",
                       description="List the devices of the GenTL producers named by --config (its [genicam] "
                       "section and acquire nodes) or by --cti: vendor, model, serial, and the features a camera "
                       "configuration needs (size, pixel formats, rates, trigger, chunks). With --config, also "
                       "which device each acquire node selects. Needs the .[cameras] extra.")
    common.add_config(p, demo=False, required=False)
    p.add_argument("--cti", action="append", default=[], metavar="PATH",
                   help="a GenTL producer (.cti); repeat for several (default: GENICAM_GENTL64_PATH)")
    p.set_defaults(func=cameras)
