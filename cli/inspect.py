"""`sortline inspect`: what a recording holds, and a picture of a stretch of its belt."""

from __future__ import annotations

import sys


def inspect(args) -> int:
    from sortline.pipeline import recording

    why = recording.check_mcap(args.file)
    if why:
        print(f"sortline: {args.file}: {why}", file=sys.stderr)
        return 1
    info = recording.contents(args.file, verify=args.verify)
    print(describe(info))
    if args.png:
        from sortline.cli.belt_image import save

        start = args.from_ticks
        if start is None:
            firsts = [s.first_position for s in info.streams.values() if s.first_position is not None]
            start = min(firsts) if firsts else 0
        try:
            saved = save(args.file, args.png, start, args.length_mm)
        except (ValueError, OSError) as exc:
            print(f"sortline: {exc}", file=sys.stderr)
            return 1
        print(f"picture: {args.png}, {saved['rows']} RGB lines from position {start} "
              f"({args.length_mm:g} mm), streams {', '.join(saved['streams']) or 'none'}")
    return 2 if info.damage else 0


def describe(info) -> str:
    """What `sortline inspect` prints about a recording."""
    from sortline.pipeline import recording

    meta = info.metadata.get(recording.META_RUN, {})
    cfg = info.config()
    ticks_per_mm = float(cfg.get("belt", {}).get("ticks_per_mm") or meta.get("belt_ticks_per_mm") or 0)
    out = [f"{info.path}: {info.size / 1e6:.1f} MB, "
           + ("figures from the recorder's summary" if info.from_summary else "figures from a scan of every message")]
    if meta:
        out.append("  recorded by sortline {sortline_version}, profile {profile}, graph {graph}, "
                   "started {start_time}, {compression}".format_map({k: meta.get(k, "?") for k in (
                       "sortline_version", "profile", "graph", "start_time", "compression")}))
    if info.damage:
        out.append(f"  DAMAGED: {info.damage}")
    for name, s in sorted(info.streams.items()):
        duration = (s.last_time_ns - s.first_time_ns) / 1e9
        belt = ""
        if ticks_per_mm and s.first_position is not None:
            belt = f", belt {(s.end_position - s.first_position) / ticks_per_mm / 1000:.2f} m " \
                   f"(positions {s.first_position}..{s.end_position})"
        gaps = f"{s.gap_count} gaps" + (f" at {', '.join(map(str, s.gaps[:10]))}"
                                        + (" ..." if s.gap_count > 10 else "") if s.gap_count else "")
        out.append(f"  stream {name}: {s.messages} messages, {s.lines} lines, {s.bytes / 1e6:.1f} MB, "
                   f"{duration:.2f} s{belt}, seq {s.first_seq}..{s.last_seq}, {gaps}")
    if not info.streams:
        out.append("  no messages")
    else:
        streams = info.streams.values()
        first = min(s.first_time_ns for s in streams)
        duration = (max(s.last_time_ns for s in streams) - first) / 1e9
        total = f"  all: {sum(s.messages for s in streams)} messages, {duration:.2f} s"
        placed = [s for s in streams if s.first_position is not None]
        if ticks_per_mm and placed:
            span = max(s.end_position for s in placed) - min(s.first_position for s in placed)
            total += f", belt {span / ticks_per_mm / 1000:.2f} m"
        out.append(total)
    for topic, n in sorted(info.pictures.items()):
        out.append(f"  pictures {topic}: {n} messages (for Foxglove; replay and training skip them)")
    for name, data in sorted(info.attachments.items()):
        out.append(f"  attachment {name}: {len(data)} bytes")
    return "\n".join(out)


def add(sub) -> None:
    p = sub.add_parser("inspect", help="print what a recording holds; draw a stretch of belt",
                       description="Print a recording's streams (messages, lines, duration, belt length, "
                       "gaps), picture channels and attachments; with --png, save a picture of a stretch of belt: RGB, a "
                       "false-colour HSI view and the labels. Exit code 2: the file is damaged.")
    p.add_argument("file", help="the recording (MCAP)")
    p.add_argument("--verify", action="store_true",
                   help="read every message and check every chunk's checksum (default: trust the summary)")
    p.add_argument("--png", default=None, help="save a picture of the belt here")
    p.add_argument("--from", dest="from_ticks", type=int, default=None,
                   help="first belt position of the picture (encoder ticks; default: the start)")
    p.add_argument("--length-mm", type=float, default=500.0, help="length of belt in the picture (default 500)")
    p.set_defaults(func=inspect)
