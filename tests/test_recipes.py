"""Recipes at run time, in memory: the history by belt position, what a change may name, and each object judged
whole by the recipe in force at its first position (the plan, the ejector, the machine's view for the PLC)."""

from __future__ import annotations

import json
import socket

import numpy as np
import pytest

from conftest import DEMO
from sortline.nodes.belt.datagram import decode, read_key
from sortline.nodes.eject_plan import EjectPlan
from sortline.nodes.ejector import EJECTIONS, Ejector
from sortline.nodes.streams import EjectMeta, MaskMeta, Window
from sortline.pipeline import recipes
from sortline.pipeline.config import Recipe
from sortline.pipeline.graph import load_config
from sortline.pipeline.machine_state import MachineView
from sortline.pipeline.recipes import FIRST, Entry, RecipeBook, RecipeError, make_recipe
from sortline.pipeline.testing import Harness

CLASSES = ["background", "PET", "PP", "HDPE"]
TPL = 60          # the demo's mask line: 4 RGB lines of 15 ticks
WIDTH = 160


@pytest.fixture(scope="module")
def settings():
    return load_config(DEMO)


def test_the_book_gives_the_recipe_in_force_at_each_position_and_takes_each_change_once():
    book = RecipeBook(Recipe(targets=["PET"]))
    pp = Entry(1, 5000, Recipe(targets=["PP"], priority="purity"))
    assert book.add(pp) and not book.add(pp)                      # the history comes again every second
    assert [book.at(t).recipe.targets for t in (FIRST, 0, 4999, 5000, 10**9)] == [["PET"]] * 3 + [["PP"]] * 2
    with pytest.raises(ValueError, match="does not follow"):
        book.add(Entry(3, 6000, Recipe(targets=["PET"])))          # change 2 is missing
    with pytest.raises(ValueError, match="does not follow"):
        book.add(Entry(2, 5000, Recipe(targets=["PET"])))          # not after the last one
    again = RecipeBook(Recipe(targets=["PET"]))
    for entry in RecipeBook.load(book.dump()):
        again.add(entry)
    assert again.entries == book.entries and book.targets_ever() == ["PET", "PP"]


def test_a_change_naming_what_the_model_does_not_know_is_refused_with_the_reason():
    old = Recipe(targets=["PET"])
    known = ["PET", "PP", "HDPE"]
    assert make_recipe(["PP"], None, old, known) == Recipe(targets=["PP"], priority="balanced")
    assert make_recipe(None, "purity", old, known) == Recipe(targets=["PET"], priority="purity")
    with pytest.raises(RecipeError, match=r"recipe.targets: glass not among the model's classes \(PET, PP, HDPE\)"):
        make_recipe(["PP", "glass"], None, old, known)
    with pytest.raises(RecipeError, match="recipe.priority"):
        make_recipe(None, "fast", old, known)
    with pytest.raises(RecipeError, match="recipe.targets"):
        make_recipe([], None, old, known)
    with pytest.raises(RecipeError, match="names a class twice"):
        make_recipe(["PP", "PP"], None, old, known)
    with pytest.raises(RecipeError, match="no node of the graph has said which classes"):
        make_recipe(["PP"], None, old, None)


def test_the_audit_log_appends_one_line_per_change(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path))
    old, new = Entry(0, FIRST, Recipe(targets=["PET"])), Entry(1, 9000, Recipe(targets=["PP"]))
    recipes.audit("g", "cli ann@line3", old, new, 4000)
    recipes.audit("g", "opcua plc from 10.0.0.5:4711", new, Entry(2, 12000, Recipe(targets=["PET"])), 8000)
    lines = (tmp_path / "sortline" / "recipes-g.jsonl").read_text().splitlines()
    first, second = map(json.loads, lines)
    assert first["source"] == "cli ann@line3" and first["old"]["targets"] == ["PET"] and first["new"]["targets"] == ["PP"]
    assert (first["at_tick"], first["position_now"], second["change"]) == (9000, 4000, 2)
    assert first["time"].endswith("+00:00")


def mask_stream(lines: int = 16, chunks: int = 6):
    """Masks of the demo grid with: PET at line 4, a long PP from line 10 to 60 (it crosses the change at line
    40), PP at line 50 and PET at line 52 (both after it)."""
    classes = np.zeros((lines * chunks, WIDTH), np.uint8)
    classes[4:14, 10:20] = 1        # PET, before the change
    classes[10:60, 40:50] = 2       # PP, starts before the change and goes on after it
    classes[50:60, 90:100] = 2      # PP, after it
    classes[52:62, 130:140] = 1     # PET, after it
    conf = np.full(classes.shape, 240, np.uint8)
    for i in range(chunks):
        rows = slice(i * lines, (i + 1) * lines)
        yield {"classes": classes[rows], "confidence": conf[rows]}, i * lines * TPL


def test_the_plan_judges_each_object_whole_by_the_recipe_at_its_first_line(settings):
    h = Harness(EjectPlan, settings.machine(), {"timing": False}, name="plan-recipe")
    at_tick = 40 * TPL
    windows, decided = [], {}
    for i, (arrays, position) in enumerate(mask_stream()):
        if i == 1:   # the change arrives before any data for its position (lines 40 on)
            entry = Entry(1, at_tick, Recipe(targets=["PP"]))
            h.node.recipes.add(entry)
            h.node.on_recipe(entry.recipe, entry.at_tick)
        for _, msg in h.send("in", arrays, position=position, ticks_per_line=TPL, meta=MaskMeta(CLASSES, "m", 4, 16)):
            windows += msg.meta.windows
            decided.update({o.id: (o.cls, o.decision) for o in msg.meta.objects})
    for _, msg in h.end():
        decided.update({o.id: (o.cls, o.decision) for o in msg.meta.objects})
    pet_before, pp_across, pp_after, pet_after = 4 * WIDTH + 10, 10 * WIDTH + 40, 50 * WIDTH + 90, 52 * WIDTH + 130
    assert decided == {pet_before: ("PET", "eject"), pp_across: ("PP", "not_target"),
                       pp_after: ("PP", "eject"), pet_after: ("PET", "not_target")}
    # No air for any part of the PP that started under the PET recipe, though most of it passed after the change.
    assert {w.object_id for w in windows} == {pet_before, pp_after}
    assert h.node.recipe_classes() == ["PET", "PP", "HDPE"]


def test_an_object_being_ejected_stays_judged_as_it_began_when_it_grows_into_an_earlier_one(settings):
    """A PP arm found after a change to PP is being blown when it joins a PP arm that began before the change
    (a V, or two items touching): the object that results has the earlier arm's id, but it is judged, and
    its windows named, as its air began. Else the plan would go on blowing it (its front has been blown)
    under an id the ejector finds under the old recipe, and the ejector would refuse the rest of it."""
    h = Harness(EjectPlan, settings.machine(), {"timing": False}, name="plan-merge")
    at_tick = 40 * TPL
    classes = np.zeros((16 * 7, WIDTH), np.uint8)
    classes[30:80, 40:46] = 2        # arm A: PP from line 30, before the change
    classes[45:80, 60:66] = 2        # arm B: PP from line 45, after it
    classes[74:80, 40:66] = 2        # the two joined from line 74 on
    conf = np.full(classes.shape, 240, np.uint8)
    windows, decided = [], {}
    for i in range(7):
        if i == 1:
            entry = Entry(1, at_tick, Recipe(targets=["PP"]))
            h.node.recipes.add(entry)
            h.node.on_recipe(entry.recipe, entry.at_tick)
        rows = slice(i * 16, (i + 1) * 16)
        for _, msg in h.send("in", {"classes": classes[rows], "confidence": conf[rows]}, position=i * 16 * TPL,
                             ticks_per_line=TPL, meta=MaskMeta(CLASSES, "m", 4, 16)):
            windows += msg.meta.windows
            decided.update({o.id: (o.cls, o.decision) for o in msg.meta.objects})
    for _, msg in h.end():
        windows += msg.meta.windows
        decided.update({o.id: (o.cls, o.decision) for o in msg.meta.objects})
    arm_a, arm_b = 30 * WIDTH + 40, 45 * WIDTH + 60
    assert decided == {arm_a: ("PP", "eject")}                  # one object, of the earlier arm's id
    assert windows and {w.object_id for w in windows} == {arm_b}
    # Air for the joined lines too, not only for arm B's first stretch.
    assert max(w.close_pos for w in windows) >= 74 * TPL


def test_the_ejector_takes_windows_of_the_targets_of_each_objects_recipe(settings):
    listener = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    listener.bind(("127.0.0.1", 0))
    listener.settimeout(2)
    m = settings.machine()
    m = m.model_copy(update={"ejector": m.ejector.model_copy(update={"address": f"127.0.0.1:{listener.getsockname()[1]}"})})
    h = Harness(Ejector, m, {"timing": False}, name="ejector-recipe")
    entry = Entry(1, 40 * TPL, Recipe(targets=["PP"]))
    h.node.recipes.add(entry)
    h.node.on_recipe(entry.recipe, entry.at_tick)
    pp_before = EJECTIONS.labels("ejector-recipe", "PP")._value.get()
    try:
        windows = [Window(3, 3, 1000, 1600, 4 * WIDTH + 10, "PET", 0.9),     # PET, first line 4: the old recipe
                   Window(5, 5, 1000, 1600, 10 * WIDTH + 40, "PP", 0.9),     # PP, first line 10: refused
                   Window(9, 9, 5000, 5400, 50 * WIDTH + 90, "PP", 0.9),     # PP, first line 50: the new one
                   Window(12, 12, 5000, 5400, 52 * WIDTH + 130, "PET", 0.9)]  # PET after the change: refused
        h.send("in", meta=EjectMeta(windows))
        got = sorted(decode(listener.recv(64), read_key(m.ejector.key), 48, 200_000).valve_lo for _ in range(2))
    finally:
        h.close()
        listener.close()
    assert got == [3, 9] and h.node.status()["sent"] == 2
    assert EJECTIONS.labels("ejector-recipe", "PP")._value.get() - pp_before == 1


class Child:
    def __init__(self, state="running", beat=1.0, metrics=None):
        self.state, self.last_beat, self.restarts, self.last_error = state, beat, 0, ""
        self._metrics = metrics or {}

    def totals(self):
        return self._metrics


def test_the_machine_view_says_running_counts_by_class_and_raises_alarms(settings):
    view = MachineView(settings, {"belt"})
    plan = {'sortline_objects_total{cls="PET",decision="eject",node="plan"}': 5.0,
            'sortline_objects_total{cls="PET",decision="small",node="plan"}': 2.0,
            'sortline_objects_total{cls="PP",decision="not_target",node="plan"}': 4.0}
    ejector = {'sortline_ejections_total{cls="PET",node="ejector"}': 5.0, 'sortline_valve_commands_total{node="ejector"}': 9.0,
               'sortline_ejector_late_total{node="ejector"}': 0.0}
    children = {"belt": Child(), "plan": Child(metrics=plan), "ejector": Child(metrics=ejector)}
    v = view.update("up", children, 1000, now=1.5)
    assert v["state"] == "running" and v["objects"] == {"PET": 7.0, "PP": 4.0} and v["ejections"] == {"PET": 5.0}
    assert not any(c.active for c in v["alarms"].values()), v["alarms"]
    # Late commands, the camera gone, commands stopping while objects are still decided for ejection.
    ejector['sortline_ejector_late_total{node="ejector"}'] = 3.0
    plan['sortline_objects_total{cls="PET",decision="eject",node="plan"}'] = 9.0
    children["belt"] = Child(state="waiting")
    v = view.update("up", children, 1000, now=5.0)
    alarms = v["alarms"]
    assert v["state"] == "fault"
    assert alarms["CameraLost"].active and "belt" in alarms["CameraLost"].message
    assert alarms["LateCommands"].active and alarms["LateCommands"].message.startswith("3 valve commands late")
    assert alarms["ValveControllerSilent"].active and "no command sent" in alarms["ValveControllerSilent"].message
    assert view.update("stopping", children, 1000, now=6.0)["state"] == "stopped"
