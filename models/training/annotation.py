"""A data set folder's labels in and out of annotation tools, and its statistics (`sortline teach`).

The exchange layout is CVAT's "Segmentation mask 1.1" (the Pascal VOC segmentation layout), which CVAT
imports and exports and Label Studio's converters read:

    OUT/labelmap.txt                       # label:color_rgb:parts:actions, one line per class
    OUT/ImageSets/Segmentation/default.txt # the strips' names, one a line
    OUT/SegmentationClass/<name>.png       # the labels as colours (labelmap.txt's)
    OUT/JPEGImages/<name>.png              # the RGB strip, the image to annotate

Colours are the Pascal VOC colour map (class 0, the background, black), so a round trip through the tool
gives the class indices back exactly.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from sortline.models.training.data import read_index, read_labels, strip_paths, write_labels
from sortline.models.training.teachin import objects_per_class

LABELMAP = "labelmap.txt"
LIST = Path("ImageSets") / "Segmentation" / "default.txt"


def palette(n: int) -> np.ndarray:
    """(n, 3) uint8 RGB: the Pascal VOC colour map (bits of the index spread over R, G and B)."""
    out = np.zeros((n, 3), np.uint8)
    for i in range(n):
        c, r, g, b = i, 0, 0, 0
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        out[i] = r, g, b
    return out


def export_cvat(root: str | Path, out: str | Path, sources: list[str] | None = None) -> int:
    """Write the folder's labels (of the strips of `sources`, or all) in CVAT's Segmentation mask 1.1 layout;
    the number of strips written."""
    index = read_index(root)
    known = {s["name"] for s in index["sources"]}
    if sources and set(sources) - known:
        raise ValueError(f"no source {sorted(set(sources) - known)} in {root}; it has {sorted(known)}")
    classes = index["classes"]
    colours = palette(len(classes))
    out = Path(out)
    for sub in ("SegmentationClass", "JPEGImages", LIST.parent):
        (out / sub).mkdir(parents=True, exist_ok=True)
    (out / LABELMAP).write_text("# label:color_rgb:parts:actions\n" + "".join(
        f"{c}:{','.join(map(str, rgb))}::\n" for c, rgb in zip(classes, colours)))
    names = [s["name"] for s in index["strips"] if not sources or s["source"] in sources]
    for name in names:
        paths = strip_paths(root, name)
        labels = read_labels(paths["labels"])
        if labels.max() >= len(classes):
            raise ValueError(f"{paths['labels']}: class {labels.max()}, the data set has {len(classes)} classes")
        mask = colours[labels]
        if not cv2.imwrite(str(out / "SegmentationClass" / f"{name}.png"), cv2.cvtColor(mask, cv2.COLOR_RGB2BGR)):
            raise OSError(f"{out}: could not write")
        (out / "JPEGImages" / f"{name}.png").write_bytes(paths["rgb"].read_bytes())
    (out / LIST).write_text("".join(f"{n}\n" for n in names))
    return len(names)


def read_labelmap(path: Path) -> dict[tuple[int, int, int], str]:
    """colour → label name of a CVAT labelmap.txt."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing (a CVAT Segmentation mask 1.1 export has one)")
    out = {}
    for k, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip() or line.startswith("#"):
            continue
        name, _, rest = line.partition(":")
        try:
            rgb = tuple(int(v) for v in rest.split(":")[0].split(","))
            assert len(rgb) == 3
        except (ValueError, AssertionError):
            raise ValueError(f"{path}:{k}: {line!r} is not label:r,g,b:parts:actions") from None
        out[rgb] = name
    return out


def import_cvat(masks: str | Path, root: str | Path) -> tuple[int, int]:
    """Read the masks of a CVAT Segmentation mask 1.1 folder into the data set folder's labels, by strip name;
    (strips read, pixels changed). A colour or a label the data set does not know is an error, and nothing is
    written then."""
    masks = Path(masks)
    index = read_index(root)
    classes = index["classes"]
    by_colour = read_labelmap(masks / LABELMAP)
    unknown = sorted(set(by_colour.values()) - set(classes))
    if unknown:
        raise ValueError(f"{masks / LABELMAP} has labels {unknown} the data set does not: it has {classes}")
    # A colour's code: r << 16 | g << 8 | b, looked up in a sorted table.
    codes = np.array([(r << 16) | (g << 8) | b for r, g, b in by_colour], np.int64)
    values = np.array([classes.index(by_colour[c]) for c in by_colour], np.uint8)
    order = np.argsort(codes)
    codes, values = codes[order], values[order]
    names = {s["name"] for s in index["strips"]}
    listed = masks / LIST
    wanted = listed.read_text().split() if listed.is_file() else sorted(
        p.stem for p in (masks / "SegmentationClass").glob("*.png"))
    new = {}
    for name in wanted:
        if name not in names:
            raise ValueError(f"{masks}: strip {name!r} is not in {root}")
        img = cv2.imread(str(masks / "SegmentationClass" / f"{name}.png"), cv2.IMREAD_COLOR)
        if img is None:
            raise ValueError(f"{masks}/SegmentationClass/{name}.png: missing or unreadable")
        rgb = cv2.cvtColor(img, cv2.COLOR_BGR2RGB).astype(np.int64)
        code = (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]
        at = np.clip(np.searchsorted(codes, code), 0, len(codes) - 1)
        bad = codes[at] != code
        if bad.any():
            colours = sorted({tuple(int(v) for v in c) for c in rgb[bad][:1000]})[:5]
            raise ValueError(f"{name}.png: {int(bad.sum())} pixels of colours not in labelmap.txt "
                             f"(e.g. {colours}): anti-aliased brush edges? export masks without smoothing")
        old = read_labels(strip_paths(root, name)["labels"])
        if old.shape != code.shape:
            raise ValueError(f"{name}.png is {code.shape[1]} x {code.shape[0]}, the strip "
                             f"{old.shape[1]} x {old.shape[0]}")
        new[name] = (values[at], int((values[at] != old).sum()))
    for name, (labels, _) in new.items():
        write_labels(strip_paths(root, name)["labels"], labels)
    return len(new), sum(c for _, c in new.values())


def stats(root: str | Path) -> dict:
    """Strips (and validation strips), pixels per class and objects per class, per source and in all.

    Objects are counted on a source's strips laid end to end in belt order, so an object that two strips
    share counts once."""
    index = read_index(root)
    classes = index["classes"]
    k = len(classes)
    by_source: dict[str, list[dict]] = {s["name"]: [] for s in index["sources"]}
    for s in index["strips"]:
        by_source[s["source"]].append(s)
    out, total = [], {"strips": 0, "val": 0, "pixels": np.zeros(k, np.int64), "objects": np.zeros(k, np.int64)}
    for source in index["sources"]:
        strips = sorted(by_source[source["name"]], key=lambda s: s["position"])
        pixels, objects = np.zeros(k, np.int64), np.zeros(k, np.int64)
        if strips:
            belt = np.concatenate([read_labels(strip_paths(root, s["name"])["labels"]) for s in strips])
            pixels = np.bincount(belt.ravel(), minlength=k)[:k]
            objects = objects_per_class(belt, k)
        row = {"name": source["name"], "material": source["material"], "labels": source["labels"],
               "strips": len(strips), "val": sum(s["split"] == "val" for s in strips),
               "pixels": pixels.tolist(), "objects": objects.tolist()}
        out.append(row)
        total["strips"] += row["strips"]
        total["val"] += row["val"]
        total["pixels"] += pixels
        total["objects"] += objects
    total = {**total, "pixels": total["pixels"].tolist(), "objects": total["objects"].tolist()}
    return {"classes": classes, "sources": out, "total": total}
