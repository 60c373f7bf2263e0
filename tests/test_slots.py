"""The shared-memory slot pool: ownership, overwrite detection, dead consumers."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest

from sortline.pipeline.messages import ArraySpec, MessageError, SlotRef
from sortline.pipeline.slots import SlotPool, SlotReader

never = lambda: False  # noqa: E731
always = lambda: True  # noqa: E731


SPEC = [ArraySpec("a", "uint8", (1024,), 0)]


def fill(pool: SlotPool, value: int, lane_count: int = 1) -> SlotRef:
    slot = pool.acquire(1024, never)
    pool.view(slot, SPEC[0])[:] = value
    gen = pool.publish(slot)
    for lane in range(lane_count):
        pool.mark_sent(lane, slot, gen)
    return SlotRef(pool.segment, slot, gen, 0)


def test_write_read_release_cycle(run_dir):
    pool = SlotPool(str(run_dir / "p.slots"), 4, 1024, [True])
    reader = SlotReader(str(run_dir / "p.slots"))
    seen = set()
    for i in range(20):
        ref = fill(pool, i)
        lease, arrays = reader.lease(ref, SPEC)
        assert (arrays["a"] == i).all() and not arrays["a"].flags.writeable
        seen.add(ref.index)
        lease.release()
    assert len(seen) == 1  # the slot released last is reused: it is still in the caches
    held = [reader.lease(fill(pool, i), SPEC)[0] for i in range(4)]
    assert {lease.ref.index for lease in held} == {0, 1, 2, 3}


def test_lossless_lane_holds_slots_until_released(run_dir):
    pool = SlotPool(str(run_dir / "p.slots"), 3, 1024, [True])
    reader = SlotReader(str(run_dir / "p.slots"))
    leases = [reader.lease(fill(pool, i), SPEC)[0] for i in range(3)]
    assert pool.acquire(1024, always) is None  # all held: a lossless producer waits
    leases[1].release()
    assert pool.acquire(1024, always) == leases[1].ref.index


def test_bounded_lane_keeps_its_queue_and_never_makes_the_producer_wait(run_dir):
    pool = SlotPool(str(run_dir / "p.slots"), 2, 1024, [False], [True])
    reader = SlotReader(str(run_dir / "p.slots"))
    first, second = fill(pool, 1), fill(pool, 2)
    never = lambda: False  # noqa: E731 - a lossless pool would block forever here
    assert pool.acquire(1024, never) is None     # full: the new message is dropped, at once
    for ref, value in ((first, 1), (second, 2)):  # nothing queued was overwritten
        lease, arrays = reader.lease(ref, SPEC)
        assert (arrays["a"] == value).all()
        lease.release()
    assert pool.acquire(1024, never) in (0, 1)


@pytest.mark.system
def test_an_output_with_lossless_and_bounded_readers_waits_instead_of_dropping(run_dir):
    """A recorder (lossless) beside a bounded live consumer that holds every slot: the new message
    must wait for a slot, not be dropped (the recorder would lose it unseen)."""
    import threading
    import time

    pool = SlotPool(str(run_dir / "p.slots"), 2, 1024, [True, False], [False, True])
    reader = SlotReader(str(run_dir / "p.slots"))
    refs = [fill(pool, i, lane_count=2) for i in range(2)]
    for ref in refs:                                     # the lossless reader is done with both
        lease, _ = reader.lease(ref, SPEC)
        lease.release()

    def bounded_reader_catches_up():
        time.sleep(0.1)
        lease, _ = reader.lease(SlotRef(refs[0].segment, refs[0].index, refs[0].generation, 1), SPEC)
        lease.release()

    threading.Thread(target=bounded_reader_catches_up).start()
    t0 = time.monotonic()
    assert pool.acquire(1024, never) == refs[0].index
    assert time.monotonic() - t0 >= 0.09


def test_latest_lane_overwrites_queued_messages_not_the_one_being_read(run_dir):
    pool = SlotPool(str(run_dir / "p.slots"), 2, 1024, [False])
    reader = SlotReader(str(run_dir / "p.slots"))
    first, second = fill(pool, 1), fill(pool, 2)
    lease, arrays = reader.lease(first, SPEC)
    fill(pool, 3)  # no free slot: a latest producer never waits, and takes the queued one
    assert lease.intact() and (arrays["a"] == 1).all()
    with pytest.raises(MessageError) as exc:
        reader.lease(second, SPEC)
    assert exc.value.kind == "overwritten"
    lease.release()
    fill(pool, 4)
    fill(pool, 5)
    assert not lease.intact()  # the generation tells a reader its slot was reused


def test_a_reader_that_starts_between_the_look_and_the_claim_keeps_its_slot(run_dir, monkeypatch):
    """The race of a latest edge: the producer looks for a slot nobody reads, a reader then marks
    that slot and checks its generation, and only then does the producer claim it. The claim looks
    again and leaves the slot to the reader."""
    pool = SlotPool(str(run_dir / "p.slots"), 2, 1024, [False])
    reader = SlotReader(str(run_dir / "p.slots"))
    first, second = fill(pool, 1), fill(pool, 2)
    lease, arrays = reader.lease(first, SPEC)          # the reader is in (its mark is set)
    pick, looks = pool._pick, []

    def stale_look():                                   # the first look predates the reader's mark
        looks.append(1)
        return first.index if len(looks) == 1 else pick()

    monkeypatch.setattr(pool, "_pick", stale_look)
    slot = pool.acquire(1024, never)
    assert slot == second.index and len(looks) == 2
    assert lease.intact() and (arrays["a"] == 1).all()  # untouched: not half overwritten
    lease.release()


@pytest.mark.system
def test_a_killed_consumer_gives_its_slots_back(run_dir):
    path = run_dir / "p.slots"
    pool = SlotPool(str(path), 4, 1024, [True])
    refs = [fill(pool, i) for i in range(4)]
    # A real consumer process takes every slot and is killed -9 while holding them.
    code = textwrap.dedent(f"""
        import sys, time
        from sortline.pipeline.messages import ArraySpec, SlotRef
        from sortline.pipeline.slots import SlotReader
        reader = SlotReader({str(path)!r})
        held = [reader.lease(SlotRef(*r), [ArraySpec("a", "uint8", (1024,), 0)]) for r in {[(r.segment, r.index, r.generation, r.lane) for r in refs]!r}]
        print("holding", flush=True)
        time.sleep(60)
    """)
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                             cwd=os.path.dirname(os.path.dirname(__file__)))
    assert child.stdout.readline().strip() == "holding"
    assert pool.acquire(1024, always) is None  # it holds them all
    child.send_signal(signal.SIGKILL)
    child.wait()
    slot = pool.acquire(1024, lambda: False)  # would block forever if the lane were not reaped
    assert slot in range(4)
    assert pool.reclaimed_lanes == 1


def test_reader_refuses_what_is_not_a_pool(run_dir):
    (run_dir / "junk.slots").write_bytes(b"\0" * 8192)
    with pytest.raises(MessageError, match="not a slot segment"):
        SlotReader(str(run_dir / "junk.slots"))
    (run_dir / "short.slots").write_bytes(b"\0" * 10)
    with pytest.raises(MessageError, match="too short"):
        SlotReader(str(run_dir / "short.slots"))
