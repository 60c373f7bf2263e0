"""`sortline calibrate spectral | spatial | check`: calibration files from recordings (docs/calibration.md)."""

from __future__ import annotations

import sys

from sortline.cli import common

# What the check accepts before it says "recalibrate".
MAX_ACROSS_HSI_PX = 0.3
MAX_ALONG_LINES = 1.0


def calibrate(args) -> int:
    from sortline.calibration import from_recordings as run
    from sortline.calibration.spectral import CalibrationError

    settings = common.load(args.config)
    try:
        if args.what == "spectral":
            return run.spectral(settings, args.dark, args.white, args.out, args.white_reflectance, args.exposure_us)
        if args.what == "spatial":
            return run.spatial(settings, args.recording, args.out, args.png)
        return run.check(settings, args.recording, args.png, args.max_across_hsi_px, args.max_along_lines)
    except (CalibrationError, OSError) as exc:
        print(f"sortline: calibrate {args.what}: {exc}", file=sys.stderr)
        return 2


def add(sub) -> None:
    p = sub.add_parser("calibrate", help="make or check calibration files from recordings",
                       description="spectral: dark and white references of the HSI camera; spatial: the "
                       "RGB-HSI co-registration from a recording of the calibration target; check: measure "
                       "the residuals of the config's spatial calibration on a new target recording "
                       "(exit 1: out of limits, recalibrate). See docs/calibration.md.")
    csub = p.add_subparsers(dest="what", required=True, metavar="WHAT")
    c = csub.add_parser("spectral", help="dark and white references -> spectral calibration file")
    common.add_config(c, demo=False)
    c.add_argument("--dark", required=True, help="recording with the lamp off (MCAP)")
    c.add_argument("--white", required=True, help="recording of a white tile under the whole line (MCAP)")
    c.add_argument("--white-reflectance", type=float, default=0.92, help="the tile's reflectance (default 0.92)")
    c.add_argument("--exposure-us", type=float, default=None,
                   help="the HSI exposure time the references were taken at, kept in the file "
                   "(default: what the recording's frames say, if anything)")
    c.add_argument("--out", required=True, help="the calibration file to write (.npz)")
    c = csub.add_parser("spatial", help="target recording -> spatial calibration file")
    c.add_argument("recording", help="recording of the calibration target passing under both cameras (MCAP)")
    common.add_config(c, demo=False)
    c.add_argument("--out", required=True, help="the calibration file to write (.json)")
    c.add_argument("--png", default=None, help="draw the residuals across the belt here")
    c = csub.add_parser("check", help="residuals of the config's spatial calibration on a new target recording")
    c.add_argument("recording", help="recording of the calibration target (MCAP)")
    common.add_config(c, demo=False)
    c.add_argument("--png", default=None, help="draw the residuals across the belt here")
    c.add_argument("--max-across-hsi-px", type=float, default=MAX_ACROSS_HSI_PX,
                   help=f"limit across the belt (default {MAX_ACROSS_HSI_PX})")
    c.add_argument("--max-along-lines", type=float, default=MAX_ALONG_LINES,
                   help=f"limit along the belt (default {MAX_ALONG_LINES:g})")
    p.set_defaults(func=calibrate)
