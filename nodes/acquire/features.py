"""Setting GenICam features on a device, in the order the configuration declares.

Order matters to GenICam devices: Width must shrink before OffsetX can grow,
TriggerSelector picks which trigger the following TriggerMode/TriggerSource
apply to. A required feature that the device lacks or rejects stops start-up
with the feature, the value and the device named; an optional one is skipped
with a log line. What the device actually applied is read back and logged,
since devices round values to their increments and ranges.
"""

from __future__ import annotations

import logging
from typing import Union

from genicam.genapi import GenericException as GenApiError
from pydantic import Field

from sortline.pipeline.config import Section

Value = Union[bool, int, float, str]


class Feature(Section):
    name: str = Field(pattern=r"^[A-Za-z][A-Za-z0-9_]*$", description="SFNC feature name, e.g. Width")
    value: Value
    required: bool = True


class FeatureError(Exception):
    """A required feature the device lacks or rejects."""


def readable(node_map, name: str):
    """A feature's current value, or None where the device lacks it or cannot read it now."""
    try:
        if not node_map.has_node(name):
            return None
        return node_map.get_node(name).value
    except (GenApiError, AttributeError):
        return None


def _write(node, value: Value) -> None:
    try:
        node.value = value
    except TypeError:
        # An enumeration given as a number, a float feature given as text...:
        # let GenApi parse the text the way the device's XML describes it.
        node.from_string(str(value).lower() if isinstance(value, bool) else str(value))


def apply(node_map, features: list[Feature], device: str, log: logging.Logger) -> dict[str, object]:
    """Set each feature in turn; returns what the device applied, by name."""
    applied: dict[str, object] = {}
    for f in features:
        try:
            if not node_map.has_node(f.name):
                raise FeatureError("the device has no such feature")
            node = node_map.get_node(f.name)
            if hasattr(node, "execute"):
                raise FeatureError("it is a command, not a value")
            _write(node, f.value)
            applied[f.name] = node.value
        except (FeatureError, GenApiError, AttributeError, TypeError) as exc:
            reason = _reason(exc)
            if f.required:
                raise FeatureError(f"feature {f.name} = {f.value!r} on {device}: {reason}") from None
            log.info("optional feature %s = %r skipped on %s: %s", f.name, f.value, device, reason)
            continue
        if _differs(applied[f.name], f.value):
            log.warning("feature %s: asked for %r, %s applied %r", f.name, f.value, device, applied[f.name])
        else:
            log.info("feature %s = %r", f.name, applied[f.name])
    return applied


def _differs(got, wanted) -> bool:
    if isinstance(got, float) or isinstance(wanted, float):
        try:
            return abs(float(got) - float(wanted)) > 1e-6 * max(1.0, abs(float(wanted)))
        except (TypeError, ValueError):
            return True
    return str(got) != str(wanted)


def _reason(exc: Exception) -> str:
    # GenApi messages end with the C++ source file and line: keep the reason only.
    return str(exc).split("(file", 1)[0].strip().rstrip(":").strip() or type(exc).__name__
