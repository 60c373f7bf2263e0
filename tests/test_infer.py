"""The infer node on real sockets: strips in over shared memory, masks out, checked
against the same model run directly; bad models and bad strips refused."""

from __future__ import annotations

import sys
import time

import numpy as np
import pytest
import zmq

from conftest import ROOT, free_port, metric, scrape, start, stop, write_config
from sortline.models.backends import open_backend
from sortline.models.contract import StripShape
from sortline.nodes.simulate import Simulation
from sortline.pipeline.config import EX_CONFIG
from sortline.pipeline.graph import load_config
from sortline.pipeline.graph import inputs_of, outputs_of
from sortline.pipeline.messages import TraceEntry
from sortline.pipeline.transport import Input, Output, SlotReaders

WEIGHTS = ROOT / "models" / "weights" / "belt-fusion-nano.safetensors"   # the demo profile's model


# The graph the config names; only infer runs as a process: this test binds register.out and reads infer.out.
# Strips sent while the node loads its model would be late on a live line: these tests take every strip
# (timing = false) unless they test that.
GRAPH = """
[nodes.camera]
kind = "pattern"

[nodes.register]
kind = "relay"

[[edges]]
from = "camera.out"
to = "register.in"

[nodes.infer]
kind = "infer"
params = { timing = TIMING }

[nodes.sink]
kind = "sink"

[[edges]]
from = "register.out"
to = "infer.in"

[[edges]]
from = "infer.out"
to = "sink.in"
"""


def strips(settings, count: int, seed: int = 1100):
    """Registered strips of the held-out belt, as the register node sends them."""
    from sortline.calibration.spectral import bin_bands

    m = settings.model
    lines = m.strip_lines + 2 * m.overlap_lines
    sim = Simulation(settings, seed=seed, occupancy=0.5)
    for i in range(count):
        s = sim.strip(i * m.strip_lines, lines)
        yield s["rgb"], bin_bands(s["hsi"], m.bands, dtype=np.float16)


class Around:
    """The infer node as a process, with this test process as its register and its sink."""

    def __init__(self, tmp_path, run_dir, model: str, backend: str = "onnxruntime", targets=("PET",), timing=False,
                 python: str = sys.executable):
        self.port = free_port()
        graph = GRAPH.replace("TIMING", str(timing).lower())
        self.cfg = write_config(tmp_path / "c.toml", graph, run_dir, extra=f"\n[metrics]\nport_base = {self.port}\n",
                                model={"path": str(model), "backend": backend}, recipe={"targets": list(targets)})
        self.settings = load_config(self.cfg)
        self.ctx = zmq.Context()
        self.readers = SlotReaders(run_dir)
        self.out = Output(self.ctx, "register", "out", outputs_of(self.settings, "register")["out"], run_dir,
                          lambda: False)
        self.inp = Input(self.ctx, "sink", "in", inputs_of(self.settings, "sink")["in"], self.readers)
        self.node = start("node", "infer", "--config", str(self.cfg), "--metrics-port", str(self.port), python=python)

    def send(self, seq: int, rgb, hsi, acquired_ns: int | None = None, **meta) -> None:
        """A strip, acquired now or at `acquired_ns` (the first entry of its trace, as a camera's would be)."""
        m = self.settings.model
        t = time.monotonic_ns() if acquired_ns is None else acquired_ns
        msg = self.out.new({"rgb": (rgb.shape, rgb.dtype), "hsi": (hsi.shape, hsi.dtype)}, stream="strip", seq=seq,
                           position=1000 + seq * m.strip_lines * 15, ticks_per_line=15, gap=seq == 0,
                           trace=[TraceEntry("camera", t, t)],
                           meta={"overlap": m.overlap_lines, "ratio": self.settings.hsi_ratio,
                                 "valid_lines": m.strip_lines, **meta})
        msg.arrays["rgb"][...] = rgb
        msg.arrays["hsi"][...] = hsi
        self.out.send(msg, time.monotonic_ns(), "register")

    def receive(self, timeout: float = 60.0):
        sock = next(iter(self.inp.sockets))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if sock.poll(100):
                for frames in self.inp.read(sock):
                    msg = self.inp.decode(frames)
                    arrays = {k: v.copy() for k, v in msg.arrays.items()}
                    header = msg.header
                    msg.release()
                    return header, arrays
            assert self.node.poll() is None, "the infer node died"
        raise AssertionError("no mask within the timeout")

    def close(self):
        rc, out, err = stop(self.node)
        self.out.close()
        self.inp.close()
        self.readers.close()
        self.ctx.destroy(0)
        return rc, err


@pytest.mark.system
def test_masks_match_the_model_run_directly(tmp_path, run_dir):
    h = Around(tmp_path, run_dir, str(WEIGHTS))
    try:
        settings = h.settings
        shape = StripShape.from_machine(settings)
        direct = open_backend("onnxruntime", WEIGHTS, shape)
        sent = list(strips(settings, 3))
        for seq, (rgb, hsi) in enumerate(sent):
            h.send(seq, rgb, hsi)
        m, k = settings.model, settings.model.mask_stride
        assert k == 4 and shape.core == (m.strip_lines // 4, 160)    # the demo profile's mask: 3.75 mm cells
        for seq, (rgb, hsi) in enumerate(sent):
            header, arrays = h.receive()
            classes, conf = direct.run(rgb, hsi)
            assert header.stream == "mask" and header.seq == seq
            assert header.position == 1000 + (seq * m.strip_lines + m.overlap_lines) * 15     # the first core line
            assert header.gap == (seq == 0) and header.ticks_per_line == 15 * k
            assert [t.stage for t in header.trace] == ["camera", "register", "infer"]
            assert header.meta["classes"][:3] == ["belt", "PET", "PP"] and header.meta["model"] == direct.model_hash
            assert header.meta["stride"] == k and header.meta["valid_lines"] == m.strip_lines // k
            assert arrays["classes"].shape == shape.core and arrays["classes"].dtype == np.uint8
            assert np.array_equal(arrays["classes"], classes)
            assert np.array_equal(arrays["confidence"], conf)
            # A trained model finds objects: not everything is belt, and it is sure of the belt.
            assert 0.05 < (classes > 0).mean() < 0.95 and np.median(conf[classes == 0]) > 200

        # Strips that do not fit the model: dropped, counted, logged; the node carries on. The port refuses
        # those that are not strips of this machine; the node those made for another overlap.
        rgb, hsi = sent[0]
        h.send(10, rgb[:-4], hsi[:-1])                      # a truncated strip
        h.send(11, rgb, hsi, overlap=8)                     # another overlap than the model's
        h.send(12, rgb, hsi.astype(np.float32)[..., :16])   # too few bands, and not float16
        h.send(13, rgb, hsi, valid_lines="all")             # a meta that is not a strip's
        h.send(14, rgb, hsi)
        header, arrays = h.receive()
        assert header.seq == 14 and np.array_equal(arrays["classes"], direct.run(rgb, hsi)[0])
        samples = scrape(h.port)
        assert metric(samples, "sortline_malformed_messages_total", node="infer", kind="payload") == 3
        assert metric(samples, "sortline_malformed_messages_total", node="infer", kind="process") == 1
    finally:
        rc, err = h.close()
    assert rc == 0, err
    assert err.count("dropped a message") >= 1


@pytest.mark.system
def test_a_strip_too_late_to_be_blown_is_dropped_counted_and_the_next_mask_says_so(tmp_path, run_dir):
    """On a live line a strip older than a quarter of the latency budget when the node takes it is not inferred (on a host that cannot keep up, inferring it would make every later strip
    late too): it is counted as a late drop, the next mask carries the gap, and fresh strips go on."""
    h = Around(tmp_path, run_dir, str(WEIGHTS), timing=True)
    try:
        budget_ns = h.settings.machine().budget_ms() * 1e6
        assert budget_ns == 140e6      # the demo profile at 2 m/s: strips older than 35 ms are late
        (rgb, hsi), = strips(h.settings, 1)
        # The node has opened its model once its backend metric is up: strips sent before would be late.
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if metric(scrape(h.port), "sortline_infer_backend_info", node="infer") == 1:
                    break
            except OSError:
                pass
            assert h.node.poll() is None, "the infer node died"
            time.sleep(0.2)
        # A busy host may still hold a fresh strip past 35 ms as the node's loop starts: send until one is back.
        for seq in range(5):
            h.send(seq, rgb, hsi)
            try:
                header, _ = h.receive(timeout=10)
                break
            except AssertionError:
                pass
        assert header.seq == seq
        late = metric(scrape(h.port), "sortline_edge_drops_total", edge="infer.in", reason="late")
        assert late == seq       # those before it, if any, came too late
        h.send(100, rgb, hsi, acquired_ns=time.monotonic_ns() - int(budget_ns * 0.4))   # 56 ms old: late
        h.send(101, rgb, hsi)
        header, arrays = h.receive()
        assert header.seq == 101 and header.gap
        h.send(102, rgb, hsi, acquired_ns=time.monotonic_ns() - int(budget_ns * 0.1))   # 14 ms old: in time
        header, arrays2 = h.receive()
        assert header.seq == 102 and not header.gap and np.array_equal(arrays["classes"], arrays2["classes"])
        samples = scrape(h.port)
        assert metric(samples, "sortline_edge_drops_total", edge="infer.in", reason="late") == late + 1
    finally:
        rc, err = h.close()
    assert rc == 0, err


@pytest.mark.system
@pytest.mark.parametrize("problem", ["missing", "not_a_model", "other_strips", "other_stride", "unknown_target",
                                     "no_tensorrt"])
def test_a_model_that_cannot_work_stops_with_a_config_error(tmp_path, run_dir, problem):
    backend, targets = "onnxruntime", ("PET",)
    if problem == "unknown_target":   # the recipe ejects a class the model does not know
        model, targets = WEIGHTS, ("PET", "glass")
    elif problem == "no_tensorrt":   # an engine on a machine without TensorRT (every CPU machine)
        from sortline.models.contract import write_engine

        model, backend = write_engine(tmp_path / "m.engine", {"tensorrt": "10.0"}, b"plan"), "tensorrt"
    elif problem == "missing":
        model = tmp_path / "nothing.safetensors"
    elif problem == "not_a_model":
        model = tmp_path / "junk.onnx"
        model.write_bytes(b"not an onnx file")
    else:   # an ONNX model exported for another strip size, or a mask per RGB pixel
        from sortline.models.training import checkpoint
        from sortline.models.training.export import export

        net, meta = checkpoint.load(WEIGHTS)
        lines, stride = (160, 4) if problem == "other_strips" else (96, 1)
        model = export(net, meta, StripShape(lines=lines, width=640, overlap=16, ratio=4, bands=32, stride=stride),
                       tmp_path / "m.onnx")
    h = Around(tmp_path, run_dir, str(model), backend, targets)
    try:
        rc = h.node.wait(timeout=60)
    finally:
        _, err = h.close()
    assert rc == EX_CONFIG
    expected = {"missing": "no such model file", "not_a_model": "not a usable ONNX model",
                "other_strips": "does not fit: RGB input (1, 160, 640, 3)",
                "no_tensorrt": "no TensorRT here (No module named",
                "other_stride": "mask stride 1, model.mask_stride is 4",
                "unknown_target": "recipe.targets: glass not among the classes of model ee954ef282ebd667 (PET, PP, "
                                  "HDPE, LDPE, PS, PVC, paper, aluminium, other)"}[problem]
    assert expected in err
    if problem == "no_tensorrt":   # and nothing to fall back to
        assert "the ONNX model the engine" in err and "is not beside it to run on the CPU instead" in err
    assert len([line for line in err.splitlines() if "ERROR" in line]) == 1, err   # one line says it


@pytest.mark.system
@pytest.mark.parametrize("model", ["onnx", "engine", "checkpoint"])
def test_a_gpu_backend_that_cannot_run_here_falls_back_to_onnx_runtime_on_the_cpu(tmp_path, run_dir, model):
    """model.backend = "tensorrt" on this machine (no TensorRT, no GPU): the node runs the model's ONNX file
    (the model file itself, or the one an engine was built from, beside it) on ONNX Runtime, says so once at
    start-up, and its metric names the backend that runs. Its masks are ONNX Runtime's."""
    import shutil

    from sortline.models.contract import model_file, write_engine

    onnx_path = tmp_path / "model.onnx"
    shutil.copy(model_file("shipped:belt-fusion-nano.onnx"), onnx_path)
    if model == "engine":   # as build-engine writes it on the GPU machine: the ONNX metadata and the ONNX file's name
        import onnx

        meta = {p.key: p.value for p in onnx.load(str(onnx_path)).metadata_props}
        path = write_engine(tmp_path / "model.engine", {**meta, "tensorrt": "10.3.0", "gpu": "NVIDIA H200",
                                                        "precision": "fp16", "onnx": onnx_path.name}, b"plan")
    else:
        path = onnx_path if model == "onnx" else WEIGHTS
    h = Around(tmp_path, run_dir, str(path), backend="tensorrt")
    try:
        shape = StripShape.from_machine(h.settings)
        direct = open_backend("onnxruntime", onnx_path if model != "checkpoint" else WEIGHTS, shape)
        rgb, hsi = next(strips(h.settings, 1))
        h.send(0, rgb, hsi)
        _, arrays = h.receive()
        classes, conf = direct.run(rgb, hsi)
        assert np.array_equal(arrays["classes"], classes) and np.array_equal(arrays["confidence"], conf)
        samples = scrape(h.port)
        assert metric(samples, "sortline_infer_backend_info", node="infer", backend="onnxruntime") == 1
        assert metric(samples, "sortline_infer_backend_info", backend="tensorrt") == 0
    finally:
        rc, err = h.close()
    assert rc == 0, err
    warnings = [line for line in err.splitlines() if "WARNING" in line]
    assert len(warnings) == 1, err
    why = {"onnx": "model.onnx is not a TensorRT engine", "engine": "no TensorRT here (No module named",
           "checkpoint": "belt-fusion-nano.safetensors is not a TensorRT engine"}[model]
    assert "model.backend = 'tensorrt' cannot run here: " + why in warnings[0], warnings[0]
    assert "Running model ee954ef282ebd667 on ONNX Runtime on the CPU instead" in warnings[0]


def test_the_fallback_names_what_is_missing_and_never_runs_another_model(tmp_path):
    """open_for_machine, as the infer node calls it: onnxruntime-cuda without ONNX Runtime's CUDA provider (this
    machine) runs on the CPU provider; an engine whose ONNX file beside it is another model is refused."""
    import shutil

    import onnx

    from sortline.models.backends import open_for_machine
    from sortline.models.contract import ModelFileError, model_file, write_engine

    settings = load_config(ROOT / "configs" / "demo.toml")
    shape = StripShape.from_machine(settings)
    onnx_path = tmp_path / "model.onnx"
    shutil.copy(model_file("shipped:belt-fusion-nano.onnx"), onnx_path)
    backend, missing = open_for_machine("onnxruntime-cuda", onnx_path, shape, device=1)
    assert backend.name == "onnxruntime" and backend.model_hash == "ee954ef282ebd667"
    assert missing == "ONNX Runtime has no CUDA provider here (the onnxruntime-gpu package)"
    assert open_for_machine("onnxruntime", onnx_path, shape)[1] == ""      # a CPU backend asked for: nothing missing

    meta = {p.key: p.value for p in onnx.load(str(onnx_path)).metadata_props}
    engine = write_engine(tmp_path / "model.engine", {**meta, "model_hash": "0123456789abcdef", "onnx": "model.onnx"},
                          b"plan")
    with pytest.raises(ModelFileError, match="model.onnx beside the engine is model ee954ef282ebd667, not the "
                                             "engine's 0123456789abcdef"):
        open_for_machine("tensorrt", engine, shape)
