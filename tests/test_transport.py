"""Output ports in one process: slots handed out and given back."""

from __future__ import annotations

import zmq

from sortline.pipeline.graph import Edge, prepare_runtime_dir
from sortline.pipeline.transport import Output


def test_slots_of_messages_never_sent_are_given_back(run_dir):
    address = f"ipc://{run_dir}/o.sock"
    edge = Edge(name="a.out->b.in", src="a", src_port="out", dst="b", dst_port="in", policy="lossless",
                pattern="pushpull", shm=True, hwm=1, slots=3, address=address, bind=address, lane=0)
    ctx = zmq.Context()
    stopping = []
    out = Output(ctx, "a", "out", [edge], run_dir, lambda: bool(stopping))
    try:
        shape = {"x": ((16,), "uint8")}
        taken = [out.new(shape, stream="s", seq=i) for i in range(3)]
        assert all(m is not None for m in taken)
        stopping.append(True)
        assert out.new(shape, stream="s", seq=3) is None  # every slot is out
        out.abandon_unsent()  # what a node's failed step had taken
        again = [out.new(shape, stream="s", seq=i) for i in range(3)]
        assert all(m is not None for m in again)
        assert {m.outgoing[1] for m in again} == {0, 1, 2}
    finally:
        out.close()
        ctx.term()
    assert not list(run_dir.glob("*.slots"))  # the producer removes its segment


def test_the_runtime_directory_is_private(tmp_path):
    shared = tmp_path / "run"
    shared.mkdir(mode=0o755)
    shared.chmod(0o755)
    assert prepare_runtime_dir(shared).stat().st_mode & 0o777 == 0o700
    fresh = prepare_runtime_dir(tmp_path / "a" / "b")
    assert fresh.stat().st_mode & 0o777 == 0o700
