"""GenTL producers and the devices they offer: loading, listing, choosing one.

harvesters keeps its producers per process, and a second Harvester in a
process that already has one sees no devices; so each process holds one
(`producers()`), and a reconnect re-reads its device list rather than
building a new one.
"""

from __future__ import annotations

import glob
import logging
import os
from dataclasses import dataclass

from harvesters.core import Harvester

from sortline.nodes.acquire.features import readable


class DeviceError(Exception):
    """No device, or more than one, matches a selection; or no producer loads."""

    def __init__(self, text: str, final: bool = False):
        super().__init__(text)
        self.final = final  # waiting will not help (several devices match, a producer is missing)


@dataclass(frozen=True)
class DeviceInfo:
    vendor: str
    model: str
    serial: str
    user_name: str
    id: str
    tl_type: str
    index: int  # in the Harvester's device list at the time it was read

    def label(self) -> str:
        name = f" ({self.user_name})" if self.user_name else ""
        return f"{self.vendor} {self.model} serial {self.serial}{name}"


def default_cti() -> list[str]:
    """The producers GenTL consumers find by convention: *.cti in GENICAM_GENTL64_PATH."""
    found = []
    for folder in filter(None, os.environ.get("GENICAM_GENTL64_PATH", "").split(os.pathsep)):
        found += sorted(glob.glob(os.path.join(folder, "*.cti")))
    return found


_harvester: Harvester | None = None
_loaded: tuple[str, ...] = ()


def producers(cti: list[str]) -> Harvester:
    """This process's Harvester, with these producers loaded."""
    global _harvester, _loaded
    paths = tuple(os.path.abspath(p) for p in cti)
    if not paths:
        raise DeviceError("no GenTL producer given: set [genicam] cti = [\"/path/to/vendor.cti\"] "
                          "(or the node's cti param, or GENICAM_GENTL64_PATH)", final=True)
    for p in paths:
        if not os.path.isfile(p):
            raise DeviceError(f"GenTL producer {p}: no such file", final=True)
    if _harvester is not None and paths != _loaded:
        close()
    if _harvester is None:
        # harvesters logs (with tracebacks) events that sortline counts and
        # reports itself, e.g. a fetch on a device that has just gone away.
        # A producer that fails to load is only logged by harvesters: catch that here.
        quiet = logging.getLogger("sortline.harvesters")
        quiet.propagate = False
        quiet.setLevel(logging.WARNING)
        failures = _Collect()
        quiet.addHandler(failures)
        try:
            h = Harvester(logger=quiet)
            for p in paths:
                h.add_file(p)
            h.update()
        finally:
            quiet.removeHandler(failures)
            quiet.setLevel(logging.CRITICAL)
        if failures.messages:
            h.reset()
            raise DeviceError(f"GenTL producer could not be loaded: {failures.messages[0]}", final=True)
        _harvester, _loaded = h, paths
    return _harvester


class _Collect(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def close() -> None:
    global _harvester, _loaded
    if _harvester is not None:
        _harvester.reset()
        _harvester, _loaded = None, ()


def devices(h: Harvester) -> list[DeviceInfo]:
    """Re-read the producers' device lists."""
    h.update()
    found = []
    for i, info in enumerate(h.device_info_list):
        d = info.property_dict
        found.append(DeviceInfo(vendor=str(d.get("vendor") or ""), model=str(d.get("model") or ""),
                                serial=str(d.get("serial_number") or ""), user_name=str(d.get("user_defined_name") or ""),
                                id=str(d.get("id_") or ""), tl_type=str(d.get("tl_type") or ""), index=i))
    return found


def select(found: list[DeviceInfo], serial: str = "", user_name: str = "", model: str = "") -> DeviceInfo:
    """The one device matching every given key, or DeviceError listing what was found."""
    wanted = {k: v for k, v in (("serial", serial), ("user_name", user_name), ("model", model)) if v}
    matches = [d for d in found if all(getattr(d, k) == v for k, v in wanted.items())]
    if len(matches) == 1:
        return matches[0]
    what = ", ".join(f"{k} {v!r}" for k, v in wanted.items()) or "any device"
    listing = "; ".join(d.label() for d in found) or "none"
    if not matches:
        raise DeviceError(f"no device matches {what}; found {len(found)}: {listing}")
    raise DeviceError(f"{len(matches)} devices match {what}, choose one by serial or user_name; "
                      f"found {len(found)}: {listing}", final=True)


# `sortline cameras`: what a user needs to write a camera's configuration.

KEY_FEATURES = ("DeviceScanType", "SensorWidth", "SensorHeight", "Width", "Height", "OffsetX", "PixelFormat",
                "AcquisitionLineRate", "AcquisitionFrameRate", "ExposureTime", "TriggerSelector", "TriggerMode",
                "TriggerSource", "EncoderSelector", "ChunkModeActive", "ChunkSelector")


def describe_feature(node_map, name: str) -> str | None:
    """A feature's value, range and choices on one line; None where the device lacks it."""
    value = readable(node_map, name)
    if value is None:
        return None
    node = node_map.get_node(name)
    text = f"{value!r}" if isinstance(value, str) else f"{value:g}" if isinstance(value, float) else str(value)
    try:
        if hasattr(node, "symbolics"):
            text += f"  (choices: {', '.join(node.symbolics)})"
        elif hasattr(node, "min") and hasattr(node, "max"):
            inc = getattr(node, "inc", None) if hasattr(node, "inc") else None
            step = f", step {inc}" if isinstance(inc, int) and inc > 1 else ""
            text += f"  (range {node.min:g}..{node.max:g}{step})"
    except Exception:  # a device may refuse to tell a range: the value alone still helps
        pass
    return text


def describe(h: Harvester, device: DeviceInfo) -> list[str]:
    """The key features of one device, opened briefly (it must not be in use)."""
    try:
        ia = h.create(device.index)
    except Exception as exc:
        return [f"features not read: the device could not be opened ({type(exc).__name__}: {exc})"]
    try:
        lines = []
        node_map = ia.remote_device.node_map
        for name in KEY_FEATURES:
            text = describe_feature(node_map, name)
            lines.append(f"{name}: {text if text is not None else 'not offered'}")
        return lines
    finally:
        ia.destroy()
