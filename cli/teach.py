"""`sortline teach`: a labelled data set from the machine's own recordings (docs/teach-in.md).

build     one recording per material and one of the empty belt → a data set folder, every object
          found against the empty belt and labelled with its run's material
prelabel  a mixed run, labelled by a model, for a person to correct
export    the label masks as CVAT "Segmentation mask 1.1" (colour PNGs, labelmap.txt)
import    corrected masks back into the folder
stats     strips, pixels and objects per class, per recording

The recordings' raw camera lines go through the register node's own strip cutter (co-registration and
spectral calibration from the config's `calibration.*` files), cut into strips without overlap; the
strips hold what the register node gives the model. The simulator's truth stream, where a recording has
one, is never read.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from sortline.cli import common

BACKGROUND = "belt"


def recorded_strips(settings, path: str, lines: int):
    """(position, rgb (lines, W, 3) uint8, hsi (lines/r, W/r, bands) float16) of each whole strip of a
    recording, as the register node cuts them (strips a gap cut short are left out, counted on stderr)."""
    from sortline.nodes.register import cutter_for
    from sortline.pipeline.messages import MessageError
    from sortline.pipeline.recording import Damage, decode_frame, frames

    machine = settings.model_copy(update={"model": settings.model.model_copy(
        update={"strip_lines": lines, "overlap_lines": 0})})
    cutter = cutter_for(machine)
    feed = {"rgb": cutter.rgb, "hsi": cutter.hsi}
    short = bad = 0

    def into(position, valid, gap):
        return np.empty(cutter.rgb_shape, np.uint8), np.empty(cutter.hsi_shape, np.float16)

    try:
        for frame in frames(path):
            if frame.stream not in feed:
                continue
            try:
                header, arrays = decode_frame(frame.data)
            except MessageError:
                bad += 1
                continue
            if "lines" not in arrays:
                continue
            feed[frame.stream](header.position, arrays["lines"], header.gap)
            for position, rgb, hsi, valid, _ in cutter.strips(into):
                if valid < lines:
                    short += 1
                    continue
                yield position, rgb, hsi
    except Damage as exc:
        print(f"sortline: {exc}; using the strips before it", file=sys.stderr)
    if short or bad:
        print(f"sortline: {path}: {short} strips cut short by gaps and {bad} unreadable messages left out",
              file=sys.stderr)


def _geometry(settings, lines: int) -> dict:
    rgb, hsi = settings.cameras.rgb, settings.cameras.hsi
    return {"lines": lines, "width": rgb.pixels, "rgb_mm_per_pixel": rgb.mm_per_pixel,
            "hsi_mm_per_pixel": hsi.mm_per_pixel, "rgb_ticks_per_line": rgb.ticks_per_line,
            "ticks_per_mm": settings.belt.ticks_per_mm, "hsi_bands": hsi.bands,
            "band_ranges": [list(r) for r in settings.model.band_ranges]}


def _source_name(path: str, taken: set[str]) -> str:
    base = Path(path).name.removesuffix(".mcap")
    name, k = base, 1
    while name in taken:
        k += 1
        name = f"{base}-{k}"
    taken.add(name)
    return name


def _lines(text: str) -> int:
    if not text.isdigit() or int(text) <= 0 or int(text) % 32:
        raise argparse.ArgumentTypeError(f"{text!r}: a multiple of 32 lines (the model's grids)")
    return int(text)


def _new_folder(out: str) -> Path:
    root = Path(out)
    if root.exists() and any(root.iterdir()):
        raise SystemExit(f"sortline: {root} is not empty: give a new folder")
    (root / "strips").mkdir(parents=True, exist_ok=True)
    return root


def build(args) -> int:
    from sortline.models.training.data import val_split, write_index, write_strip
    from sortline.models.training.teachin import EmptyBelt, Segmentation, object_mask

    settings = common.load(args.config)
    runs = []
    for item in args.run:
        material, sep, path = item.partition("=")
        if not sep or not material or not path:
            raise SystemExit(f"sortline: --run {item!r}: give MATERIAL=RECORDING.mcap")
        runs.append((material, path))
    classes = args.classes.split(",") if args.classes else [BACKGROUND] + list(dict.fromkeys(m for m, _ in runs))
    missing = sorted({m for m, _ in runs} - set(classes[1:]))
    if missing or len(set(classes)) != len(classes):
        raise SystemExit(f"sortline: --classes {','.join(classes)}: each class once, the background first, every "
                         f"run's material in it (missing: {', '.join(missing) or 'none'})")
    for _, path in [("", args.empty), *runs]:
        if not Path(path).is_file():
            raise SystemExit(f"sortline: {path}: no such recording")
    seg = Segmentation(**{k: getattr(args, k) for k in Segmentation.__dataclass_fields__
                          if getattr(args, k) is not None})
    root = _new_folder(args.out)
    taken: set[str] = set()
    sources, strips = [], []

    def add(source: str, i: int, position: int, rgb, hsi, labels) -> None:
        name = f"{source}-{i:05d}"
        write_strip(root, name, rgb, hsi, labels)
        strips.append({"name": name, "source": source, "position": int(position), "split": val_split(i, args.val_every)})

    # The empty belt: its model, and its strips as they are (all background).
    source = _source_name(args.empty, taken)
    empty = []
    for i, (position, rgb, hsi) in enumerate(recorded_strips(settings, args.empty, args.lines)):
        add(source, i, position, rgb, hsi, np.zeros(rgb.shape[:2], np.uint8))
        empty.append((rgb, hsi))
    try:
        belt = EmptyBelt.fit(empty)
    except ValueError as exc:
        raise SystemExit(f"sortline: {args.empty}: {exc}") from None
    del empty
    np.savez(root / "empty-belt.npz", **belt.to_arrays())
    sources.append({"name": source, "recording": str(Path(args.empty).absolute()), "material": None,
                    "labels": "empty belt", "strips": sum(s["source"] == source for s in strips)})
    print(f"{args.empty}: the empty belt, {belt.lines} lines", file=sys.stderr)
    for material, path in runs:
        source = _source_name(path, taken)
        cls = classes.index(material)
        n = 0
        for n, (position, rgb, hsi) in enumerate(recorded_strips(settings, path, args.lines), start=1):
            mask = object_mask(belt, rgb, hsi, seg)
            add(source, n - 1, position, rgb, hsi, (mask * cls).astype(np.uint8))
        sources.append({"name": source, "recording": str(Path(path).absolute()), "material": material,
                        "labels": "teach-in", "strips": n})
        print(f"{path}: {material}, {n} strips" + ("" if n else ": no whole strip in it (does it hold both "
              "cameras' lines? `sortline inspect` it)"), file=sys.stderr)
    write_index(root, {"classes": classes, "bands": settings.model.bands, "ratio": settings.hsi_ratio,
                       "geometry": _geometry(settings, args.lines), "val_every": args.val_every,
                       "segmentation": vars(seg), "sources": sources, "strips": strips})
    print(f"wrote {root}: {len(strips)} strips of {len(sources)} recordings; `sortline teach stats {root}`")
    return 0


def prelabel(args) -> int:
    import torch

    from sortline.models.contract import model_file
    from sortline.models.training import checkpoint
    from sortline.models.training.data import read_index, val_split, write_index, write_strip

    settings = common.load(args.config)
    net, meta = checkpoint.load(model_file(args.model))
    net.eval()
    torch.set_num_threads(args.threads)
    classes = list(net.config.classes)
    root = Path(args.out)
    if (root / "dataset.json").exists():
        index = read_index(root)
        if index["classes"] != classes or index["geometry"]["lines"] != args.lines:
            raise SystemExit(f"sortline: {root} has classes {index['classes']} and strips of "
                             f"{index['geometry']['lines']} lines; the model has {classes}, --lines is {args.lines}")
    else:
        _new_folder(args.out)
        index = {"classes": classes, "bands": settings.model.bands, "ratio": settings.hsi_ratio,
                 "geometry": _geometry(settings, args.lines), "val_every": args.val_every, "sources": [],
                 "strips": []}
    if net.config.bands != index["bands"]:
        raise SystemExit(f"sortline: {args.model} takes {net.config.bands} bands, the data set has {index['bands']}")
    source = _source_name(args.recording, {s["name"] for s in index["sources"]})
    n = 0
    with torch.no_grad():
        for n, (position, rgb, hsi) in enumerate(recorded_strips(settings, args.recording, args.lines), start=1):
            logits = net(torch.from_numpy(rgb[None].astype(np.float32)), torch.from_numpy(hsi[None].astype(np.float32)))
            labels = logits[0].argmax(0).numpy().astype(np.uint8)
            name = f"{source}-{n - 1:05d}"
            write_strip(root, name, rgb, hsi, labels)
            index["strips"].append({"name": name, "source": source, "position": int(position),
                                    "split": val_split(n - 1, index["val_every"])})
    index["sources"].append({"name": source, "recording": str(Path(args.recording).absolute()), "material": None,
                             "labels": f"prelabel {meta.get('hash', '')}: to be corrected", "strips": n})
    index.pop("format", None)
    write_index(root, index)
    print(f"wrote {n} strips of {args.recording} to {root}, labelled by {args.model}; correct them: "
          f"`sortline teach export {root} --source {source} OUT`, then `sortline teach import OUT {root}`")
    return 0


def export(args) -> int:
    from sortline.models.training.annotation import export_cvat

    try:
        n = export_cvat(args.dir, args.out, sources=args.source or None)
    except (ValueError, FileNotFoundError) as exc:
        raise SystemExit(f"sortline: teach export: {exc}") from None
    print(f"wrote {n} strips to {args.out} (CVAT Segmentation mask 1.1)")
    return 0


def import_(args) -> int:
    from sortline.models.training.annotation import import_cvat

    try:
        n, changed = import_cvat(args.masks, args.dir)
    except (ValueError, FileNotFoundError) as exc:
        raise SystemExit(f"sortline: teach import: {exc}; nothing written") from None
    print(f"{args.dir}: labels of {n} strips read from {args.masks}; {changed} pixels changed")
    return 0


def stats(args) -> int:
    from sortline.models.training.annotation import stats as count

    try:
        result = count(args.dir)
    except (ValueError, FileNotFoundError) as exc:
        raise SystemExit(f"sortline: teach stats: {exc}") from None
    classes = result["classes"]
    width = max(len(c) for c in classes) + 1
    for source in result["sources"]:
        print(f"{source['name']}: {source['strips']} strips ({source['val']} val), {source['labels']}"
              + (f", {source['material']}" if source["material"] else ""))
        for c, px, obj in zip(classes, source["pixels"], source["objects"]):
            if px:
                print(f"  {c:<{width}} {px:>12,} px  {obj:>6} objects")
    t = result["total"]
    print(f"total: {t['strips']} strips ({t['val']} val)")
    for c, px, obj in zip(classes, t["pixels"], t["objects"]):
        print(f"  {c:<{width}} {px:>12,} px  {obj:>6} objects")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return 0


def add(sub) -> None:
    p = sub.add_parser("teach", help="teach-in: a labelled data set from the machine's own recordings",
                       description="Teach the machine a material from its own recordings (docs/teach-in.md): "
                       "record one material per run and the empty belt once (`sortline record`), build a labelled "
                       "data set from them, pre-label mixed runs with a model, correct labels in an annotation "
                       "tool (CVAT), and train on the folder (`sortline train --data DIR`).")
    sub2 = p.add_subparsers(dest="teach", required=True, metavar="STEP")

    b = sub2.add_parser("build", help="a data set folder from one recording per material and one of the empty belt",
                        description="Replay each recording through the register node's co-registration and "
                        "spectral calibration (the config's calibration files), cut strips, model the empty belt "
                        "per pixel column, find objects as what lies far from it (RGB and HSI), clean them up "
                        "morphologically and label each with its run's material.")
    common.add_config(b)
    b.add_argument("--empty", required=True, help="recording of the empty belt")
    b.add_argument("--run", action="append", required=True, metavar="MATERIAL=FILE",
                   help="a recording of one material (repeat: one per run)")
    b.add_argument("--out", required=True, help="the data set folder to write (new or empty)")
    b.add_argument("--classes", default="", help="the class list, comma-separated, background first (default: "
                   f"{BACKGROUND} and the runs' materials in order); a model trained on it has these classes")
    add_strip_options(b)
    # The segmentation's settings; unset, models.training.teachin.Segmentation's defaults (docs/teach-in.md).
    b.add_argument("--rgb-threshold", type=float, help="RGB distance from the empty belt that is an object "
                   "(RMS z-score over R, G, B; default 3.5)")
    b.add_argument("--hsi-threshold", type=float, help="HSI distance from the empty belt that is an object "
                   "(RMS z-score over the bands; default 4)")
    b.add_argument("--hsi-erode-px", type=int, help="the HSI mask shrunk by this (RGB px; default 8): the HSI's "
                   "coarse cells and blur reach past an object's edge")
    b.add_argument("--open-px", type=int, help="morphological opening (RGB px; default 5)")
    b.add_argument("--close-px", type=int, help="morphological closing (RGB px; default 7)")
    b.add_argument("--min-area", type=int, help="smaller objects are dropped (RGB px; default 150)")
    b.set_defaults(func=build)

    q = sub2.add_parser("prelabel", help="a mixed run labelled by a model, for a person to correct",
                        description="Replay a recording as `build` does and label its strips with a model "
                        "(checkpoint); into a new folder, or added to a data set folder with the model's classes.")
    common.add_config(q)
    q.add_argument("recording")
    q.add_argument("--model", required=True, help="checkpoint (.safetensors, or shipped:NAME)")
    q.add_argument("--out", required=True, help="the data set folder")
    q.add_argument("--threads", type=int, default=1, help="torch threads")
    add_strip_options(q)
    q.set_defaults(func=prelabel)

    e = sub2.add_parser("export", help="label masks for an annotation tool (CVAT Segmentation mask 1.1)",
                        description="Write OUT/labelmap.txt, OUT/ImageSets/Segmentation/default.txt, "
                        "OUT/SegmentationClass/<strip>.png (colour masks) and OUT/JPEGImages/<strip>.png (the RGB "
                        "strips): CVAT imports it as 'Segmentation mask 1.1' and exports the same layout.")
    e.add_argument("dir", help="the data set folder")
    e.add_argument("out", help="the folder to write")
    e.add_argument("--format", choices=("cvat",), default="cvat")
    e.add_argument("--source", action="append", default=[], help="only this recording's strips (repeat)")
    e.set_defaults(func=export)

    i = sub2.add_parser("import", help="corrected label masks back into the data set folder",
                        description="Read a CVAT 'Segmentation mask 1.1' folder (labelmap.txt, SegmentationClass/) "
                        "and write its masks as the labels of the strips of the same names.")
    i.add_argument("masks", help="the annotation tool's folder")
    i.add_argument("dir", help="the data set folder")
    i.set_defaults(func=import_)

    s = sub2.add_parser("stats", help="strips, pixels and objects per class, per recording")
    s.add_argument("dir", help="the data set folder")
    s.add_argument("--json", default="", metavar="PATH", help="the figures as JSON")
    s.set_defaults(func=stats)


def add_strip_options(p) -> None:
    p.add_argument("--lines", type=_lines, default=128, help="RGB lines per strip, a multiple of 32 (training crops "
                   "are at most this long)")
    p.add_argument("--val-every", type=int, default=10, help="every N-th strip of each recording goes to the "
                   "validation split")
