"""Node logic in memory (sortline.pipeline.testing): what the eject plan and the ejector make of masks and
windows, and what their ports refuse, without processes or sockets."""

from __future__ import annotations

import time

import numpy as np
import pytest

from conftest import DEMO
from sortline.nodes.belt.datagram import decode, read_key
from sortline.nodes.eject_plan import EjectPlan
from sortline.nodes.ejector import EJECTIONS, Ejector
from sortline.nodes.streams import EjectMeta, MaskMeta, Window
from sortline.pipeline.config import ConfigError
from sortline.pipeline.graph import load_config
from sortline.pipeline.messages import MessageError
from sortline.pipeline.testing import Harness

MODEL = ["background", "PP", "PET", "glass"]     # a retrained model: other classes, in another order


@pytest.fixture(scope="module")
def machine():
    return load_config(DEMO).machine()


def masks(lines: int = 16, width: int = 160):
    """Mask messages of the demo profile's grid (3.75 mm cells, 60 ticks a line) with three objects."""
    classes = np.zeros((lines * 3, width), np.uint8)
    classes[4:30, 10:20] = 2        # PET in MODEL's numbering, across two messages
    classes[8:14, 60:70] = 1        # PP
    classes[20:26, 100:104] = 2     # PET again, small but over min_area
    conf = np.full(classes.shape, 240, np.uint8)
    for i in range(3):
        rows = slice(i * lines, (i + 1) * lines)
        yield {"classes": classes[rows], "confidence": conf[rows]}, i * lines * 60


def plan(machine, **params):
    return Harness(EjectPlan, machine, {"timing": False, **params}, name="plan")


def test_the_plan_takes_class_names_from_the_masks_and_gives_each_object_its_id(machine):
    h = plan(machine)
    windows, objects = [], []
    for arrays, position in masks():
        for port, msg in h.send("in", arrays, position=position, ticks_per_line=60,
                                meta=MaskMeta(MODEL, "m1", 4, 16)):
            assert port == "out" and isinstance(msg.meta, EjectMeta)
            windows += msg.meta.windows
            objects += msg.meta.objects
    for _, msg in h.end():
        objects += msg.meta.objects
    # PET is class 2 of this model, not class 1 as on the synthetic belt: the names decide.
    assert {w.cls for w in windows} == {"PET"}
    ids = sorted({w.object_id for w in windows})
    assert len(ids) == 2 and 0 not in ids
    # An id is the object's first cell: line (position / 60) x the mask's width + column.
    assert ids == [4 * 160 + 10, 20 * 160 + 100]
    assert {o.id: (o.cls, o.decision) for o in objects} == {ids[0]: ("PET", "eject"), ids[1]: ("PET", "eject"),
                                                             8 * 160 + 60: ("PP", "not_target")}
    assert all(0.9 < w.confidence < 0.95 for w in windows)          # 240 / 255


def test_windows_are_clipped_as_they_leave_the_plan_not_when_planned(machine, monkeypatch):
    """A mask that takes long to plan (the first ones of a run took tens of ms) must not send a window whose
    front the belt has passed meanwhile: the clip is reckoned when the windows leave."""
    classes = np.zeros((16, 160), np.uint8)
    classes[1:15, 10:20] = 2                                          # one PET object (52 mm), complete in this mask
    arrays = {"classes": classes, "confidence": np.full(classes.shape, 240, np.uint8)}
    meta = MaskMeta(MODEL, "m1", 4, 16)
    untimed = [w for _, msg in plan(machine).send("in", arrays, position=0, ticks_per_line=60, meta=meta)
               for w in msg.meta.windows]
    front = min(w.open_pos for w in untimed)

    h = Harness(EjectPlan, machine, {"timing": True}, name="plan")
    node = h.node
    speed = node.track.nominal                                        # ticks per ns
    now = time.monotonic_ns()
    # The belt such that, as planning starts, the air could still arrive at the front 20 ms early.
    at_now = front - 20e6 * speed - node.command_ns * speed
    node.track.update(int(at_now - 0.1e9 * speed), now - int(0.1e9))
    node.track.update(int(at_now), now)
    planned, left = node.finder.feed, []

    def slow_feed(*args, **kwargs):                                  # planning that takes 35 ms
        out = planned(*args, **kwargs)
        time.sleep(0.035)
        left.append(node.track.position_at(time.monotonic_ns() + node.command_ns))
        return out

    monkeypatch.setattr(node.finder, "feed", slow_feed)
    windows = [w for _, msg in h.send("in", arrays, position=0, ticks_per_line=60, meta=meta) for w in msg.meta.windows]
    assert len(untimed) >= 2 and left[0] > front                      # the front passed while it was planned
    assert windows and all(w.open_pos >= left[0] for w in windows)    # no window leaves doomed to be late
    assert node.status()["clipped_windows"] == sum(w.open_pos < left[0] for w in untimed)


def test_a_target_the_model_does_not_know_stops_the_plan(machine):
    h = plan(machine.model_copy(update={"recipe": machine.recipe.model_copy(update={"targets": ["PET", "PVC"]})}))
    arrays, position = next(masks())
    with pytest.raises(ConfigError, match=r"recipe.targets: PVC not among the model's classes \(PP, PET, glass\)"):
        h.send("in", arrays, position=position, ticks_per_line=60, meta=MaskMeta(MODEL, "m1", 4, 16))


def test_the_plan_port_refuses_masks_of_another_grid_or_without_names(machine):
    h = plan(machine)
    arrays, _ = next(masks())
    with pytest.raises(MessageError, match="width = 160"):          # a mask per RGB pixel is 640 wide
        h.send("in", {k: np.repeat(v, 4, axis=1) for k, v in arrays.items()}, ticks_per_line=60,
               meta=MaskMeta(MODEL, "m1", 4, 16))
    with pytest.raises(MessageError, match="ticks_per_line = 15"):
        h.send("in", arrays, ticks_per_line=15, meta=MaskMeta(MODEL, "m1", 4, 16))
    with pytest.raises(MessageError, match="mask meta"):
        h.send("in", arrays, ticks_per_line=60, meta={"model": "m1"})


def test_the_ejector_counts_ejections_per_object_and_refuses_other_classes(machine, tmp_path):
    import socket

    listener = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    listener.bind(("127.0.0.1", 0))
    listener.settimeout(2)
    address = f"127.0.0.1:{listener.getsockname()[1]}"
    m = machine.model_copy(update={"ejector": machine.ejector.model_copy(update={"address": address})})
    h = Harness(Ejector, m, {"timing": False}, name="ejector-unit")
    before = EJECTIONS.labels("ejector-unit", "PET")._value.get()
    try:
        windows = [Window(3, 3, 1000, 1600, 77, "PET", 0.9), Window(4, 4, 1000, 1600, 77, "PET", 0.9),
                   Window(9, 9, 5000, 5400, 78, "PET", 0.8), Window(20, 20, 900, 990, 79, "paper", 0.7)]
        assert h.send("in", meta=EjectMeta(windows)) == []
        key = read_key(m.ejector.key)
        got = [decode(listener.recv(64), key, 48, 200_000) for _ in range(3)]
    finally:
        h.close()
        listener.close()
    assert sorted((c.valve_lo, c.object_id) for c in got) == [(3, 77), (4, 77), (9, 78)]
    # Two objects ejected (77 with two valves counts once); the paper window is refused, not sent.
    assert EJECTIONS.labels("ejector-unit", "PET")._value.get() - before == 2
    assert h.node.status()["sent"] == 3


def test_a_worker_thread_that_fails_makes_the_node_unhealthy(machine):
    """No worker thread dies quietly: the sender's exception is counted and marks the node failed, which
    stops its main loop (exit 70, so that it is restarted)."""
    from sortline.pipeline.metrics import THREAD_ERRORS

    h = Harness(Ejector, machine, {"timing": True}, name="ejector-broken")

    def broken(*_):
        raise RuntimeError("a bug in a driver")

    h.node.schedule.due = broken
    before = THREAD_ERRORS.labels("ejector-broken", "sender")._value.get()
    h.node.wake.set()
    h.node.track.update(0, 0)                       # the sender only looks at the schedule once the belt is known
    deadline = time.monotonic() + 5
    while not h.node.failure and time.monotonic() < deadline:
        time.sleep(0.01)
    h.close()
    assert "a bug in a driver" in h.node.failure
    assert THREAD_ERRORS.labels("ejector-broken", "sender")._value.get() == before + 1


def test_a_runtime_directory_under_a_parent_another_user_could_swap_is_refused(tmp_path):
    import os

    from sortline.pipeline.graph import prepare_runtime_dir

    assert prepare_runtime_dir(tmp_path / "mine" / "graph").is_dir()
    assert (tmp_path / "mine").stat().st_mode & 0o777 == 0o700      # made private, parent and all
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)                                             # writable by anyone, no sticky bit
    with pytest.raises(ConfigError, match="another user could take the graph's directory"):
        prepare_runtime_dir(shared / "graph")
    if os.getuid() == 0:
        theirs = tmp_path / "theirs"
        theirs.mkdir(mode=0o700)
        os.chown(theirs, 12345, -1)
        with pytest.raises(ConfigError, match="belongs to uid 12345"):
            prepare_runtime_dir(theirs / "graph")
