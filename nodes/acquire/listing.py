"""`sortline cameras`: the devices the producers offer, and what a configuration needs from them."""

from __future__ import annotations

import sys

from sortline.nodes.acquire import device


def producers_of(settings) -> list[str]:
    """Every producer a configuration names: [genicam].cti and each acquire node's own."""
    paths = list(settings.genicam.cti)
    for node in settings.nodes.values():
        if node.kind == "acquire":
            paths += [p for p in node.params.get("cti", []) if p not in paths]
    return paths or device.default_cti()


def selections_of(settings) -> dict[str, dict[str, str]]:
    return {name: {k: node.params[k] for k in ("serial", "user_name", "model") if node.params.get(k)}
            for name, node in settings.nodes.items() if node.kind == "acquire"}


def list_cameras(cti: list[str], selections: dict[str, dict[str, str]] | None = None, out=sys.stdout) -> int:
    try:
        h = device.producers(cti)
        found = device.devices(h)
    except device.DeviceError as exc:
        print(f"sortline: {exc}", file=sys.stderr)
        return 1
    print(f"{len(found)} device(s) from {', '.join(cti)}", file=out)
    for d in found:
        print(f"\n{d.label()}", file=out)
        print(f"  vendor: {d.vendor}\n  model: {d.model}\n  serial: {d.serial}\n  user_name: {d.user_name or '-'}"
              f"\n  id: {d.id}\n  transport: {d.tl_type}", file=out)
        for line in device.describe(h, d):
            print(f"  {line}", file=out)
    for node, keys in (selections or {}).items():
        try:
            chosen = device.select(found, **keys).label()
        except device.DeviceError as exc:
            chosen = f"ERROR: {exc}"
        print(f"\nnode {node} ({', '.join(f'{k}={v!r}' for k, v in keys.items()) or 'no selector'}): {chosen}",
              file=out)
    device.close()
    return 0
