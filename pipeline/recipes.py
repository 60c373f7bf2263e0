"""Recipes at run time: which recipe is in force at which belt position, and who changed it.

A change of recipe (targets, priority) takes effect at one belt position, in
encoder ticks, far enough ahead of the scan line that every node has it
before the first data for that position exists. Each node then judges each
object by the recipe in force at the object's first belt position, so no
object is judged half under one recipe and half under another. The
supervisor keeps the history (`RecipeBook`): the configured recipe from the
start, then each accepted change, numbered. It writes the history to
`recipes.json` in the runtime directory before it publishes it on
`recipes.sock`, and publishes it again every second: a node that starts (or
restarts) reads the file, a running node takes what it has not seen from the
socket (pipeline.node). Every accepted change is appended to the audit log,
`recipes.jsonl` in the state directory (docs/plc.md).
"""

from __future__ import annotations

import bisect
import json
import os
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from pydantic import ValidationError

from sortline.pipeline.config import Recipe, format_validation

FIRST = -(1 << 62)   # the configured recipe is in force from the start of the belt


class RecipeError(ValueError):
    """A change that cannot be made: the message says why (to the OPC UA client, on the command line)."""


@dataclass(frozen=True)
class Entry:
    n: int            # 0: the configured recipe; 1, 2, ...: the accepted changes, in order
    at_tick: int      # in force from this belt position (encoder ticks) on
    recipe: Recipe


class RecipeBook:
    """The recipes of a run by belt position: entries in order of both their number and their position."""

    def __init__(self, recipe: Recipe):
        self.entries = [Entry(0, FIRST, recipe)]
        self._ticks = [FIRST]

    @property
    def current(self) -> Entry:
        return self.entries[-1]

    def at(self, tick: int) -> Entry:
        """The entry in force at belt position `tick`."""
        return self.entries[bisect.bisect_right(self._ticks, tick) - 1]

    def add(self, entry: Entry) -> bool:
        """Take a change published by the supervisor; False if it is one this book already has."""
        if entry.n <= self.current.n:
            return False
        if entry.n != self.current.n + 1 or entry.at_tick <= self.current.at_tick:
            raise ValueError(f"recipe change {entry.n} at tick {entry.at_tick} does not follow change "
                             f"{self.current.n} at tick {self.current.at_tick}")
        self.entries.append(entry)
        self._ticks.append(entry.at_tick)
        return True

    def targets_ever(self) -> list[str]:
        """Every class some recipe of the run targets, in the order they first appear."""
        return list(dict.fromkeys(t for e in self.entries for t in e.recipe.targets))

    def dump(self) -> bytes:
        return json.dumps([{"n": e.n, "at_tick": e.at_tick, **e.recipe.model_dump()} for e in self.entries]).encode()

    @staticmethod
    def load(raw: bytes | str) -> list[Entry]:
        return [Entry(int(d["n"]), int(d["at_tick"]), Recipe(targets=d["targets"], priority=d["priority"]))
                for d in json.loads(raw)]


def make_recipe(targets: list[str] | None, priority: str | None, old: Recipe, classes: list[str] | None) -> Recipe:
    """The recipe a change asks for (what it leaves out stays as it is), or RecipeError. `classes`: the
    classes every node that judges by class knows (None: no node has said yet)."""
    try:
        new = Recipe(targets=old.targets if targets is None else list(targets),
                     priority=old.priority if priority is None else priority)
    except ValidationError as exc:
        raise RecipeError("; ".join(format_validation(exc, "recipe"))) from None
    if len(set(new.targets)) != len(new.targets):
        raise RecipeError(f"recipe.targets: {new.targets} names a class twice")
    if classes is None:
        raise RecipeError("no node of the graph has said which classes it knows yet (the model is still "
                          "loading?): try again in a few seconds")
    unknown = [t for t in new.targets if t not in classes]
    if unknown:
        raise RecipeError(f"recipe.targets: {', '.join(unknown)} not among the model's classes "
                          f"({', '.join(classes)}); the recipe stays as it is")
    return new


def runtime_file(run_dir: Path) -> Path:
    """The run's recipe history, for nodes that start after a change."""
    return run_dir / "recipes.json"


def write_history(run_dir: Path, book: RecipeBook) -> None:
    path = runtime_file(run_dir)
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(book.dump())
    os.replace(tmp, path)


def read_history(run_dir: Path) -> list[Entry]:
    """The history the supervisor wrote; none without one (a node started on its own)."""
    try:
        return RecipeBook.load(runtime_file(run_dir).read_bytes())
    except FileNotFoundError:
        return []


def state_dir() -> Path:
    """Where sortline keeps what outlives a run: the unit's StateDirectory= under systemd, else
    $XDG_STATE_HOME/sortline (~/.local/state/sortline)."""
    if os.environ.get("STATE_DIRECTORY"):
        return Path(os.environ["STATE_DIRECTORY"].split(":")[0])
    return Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state") / "sortline"


def audit_path(graph: str) -> Path:
    return state_dir() / f"recipes-{graph}.jsonl"


def audit(graph: str, source: str, old: Entry, new: Entry, position: int) -> dict:
    """Append one accepted change to the audit log (one JSON object a line); the record written."""
    record = {"time": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
              "graph": graph, "source": source, "change": new.n,
              "old": old.recipe.model_dump(), "new": new.recipe.model_dump(),
              "at_tick": new.at_tick, "position_now": position}
    path = audit_path(graph)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:   # one write of one line: lines of two writers never interleave
        fh.write(json.dumps(record) + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    return record
