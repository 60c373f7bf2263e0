"""Node kinds by name: a registry the installed packages fill.

The runtime knows no node kind itself. A configuration's `kind = "register"`
names an entry point of the group `sortline.nodes`: sortline publishes its
own kinds there (pyproject.toml), and a machine builder's package can add
one (a fieldbus valve driver, a plant's own camera) the same way, without
changing sortline:

    [project.entry-points."sortline.nodes"]
    profinet_valves = "acme_sorting.valves:ProfinetValves"

A kind's module is imported only when a graph uses it.
"""

from __future__ import annotations

from functools import cache
from importlib.metadata import EntryPoint, entry_points

from sortline.pipeline.config import ConfigError

GROUP = "sortline.nodes"


@cache
def kinds() -> dict[str, EntryPoint]:
    """Every registered kind. The same name registered twice by different packages is refused:
    which one a graph got would depend on install order."""
    found: dict[str, EntryPoint] = {}
    clashes = []
    for ep in entry_points(group=GROUP):
        if ep.name in found and found[ep.name].value != ep.value:
            clashes.append(f"node kind {ep.name!r} is registered twice: {found[ep.name].value} and {ep.value} "
                           f"(entry points {GROUP}); uninstall one of the packages")
        found[ep.name] = ep
    if clashes:
        raise ConfigError(clashes)
    return found


@cache
def node_class(kind: str) -> type:
    """The Node subclass of a kind (its module imported now)."""
    ep = kinds().get(kind)
    if ep is None:
        raise ConfigError([f"unknown node kind {kind!r}; one of {', '.join(sorted(kinds()))}"])
    try:
        return ep.load()
    except ImportError as exc:
        raise ConfigError([f"node kind {kind!r} ({ep.value}) cannot be imported: {exc} "
                           "(is the extra it needs installed? see README, Extras)"]) from None
