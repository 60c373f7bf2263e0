"""The network: shapes and sizes per variant, locality of the fusion, checkpoints, ONNX export."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sortline.models.training import checkpoint
from sortline.models.blocks import WindowBlock
from sortline.nodes.simulate.materials import CLASSES
from sortline.models.config import ModelConfig, make_config
from sortline.models.contract import ModelFileError, StripShape
from sortline.models.training.export import compare, export
from sortline.models.fusion import CrossFusion
from sortline.models.hsi import SliceCollapse
from sortline.models.net import SortNet, count_params

torch.set_num_threads(1)


def inputs(lines=64, width=128, bands=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(1, lines, width, 3, generator=g) * 255, torch.rand(1, lines // 4, width // 4, bands, generator=g)


@pytest.mark.parametrize("variant", ["fusion", "rgb", "hsi"])
def test_every_variant_gives_logits_at_rgb_resolution(variant):
    net = SortNet(make_config("tiny", variant, classes=CLASSES)).eval()
    with torch.no_grad():
        out = net(*inputs())
    assert out.shape == (1, 10, 64, 128) and torch.isfinite(out).all()


def test_deployed_gives_the_argmax_and_its_softmax_probability():
    """The exported head computes confidence as 1 / sum(exp(logit - max)): check it is max softmax."""
    from sortline.models.net import Deployed

    net = SortNet(make_config("tiny", "fusion", classes=CLASSES)).eval()
    x = inputs(lines=96)
    with torch.no_grad():
        logits = net(*x)[:, :, 16:-16]
        classes, conf = Deployed(net, 16).eval()(*x)
    prob = logits.softmax(1)
    assert classes.shape == (1, 64, 128) and classes.dtype == torch.int32
    assert torch.equal(classes.long(), prob.argmax(1))
    assert torch.allclose(conf, prob.max(1).values, atol=1e-6)


@pytest.mark.parametrize("size", ["tiny", "nano"])
def test_a_coarser_mask_is_the_decoder_grid_without_upsampling(size):
    """Stride 4: one class per 4 x 4 RGB pixels, from the logits the full-resolution mask is
    interpolated from, the overlap cropped in cells."""
    from sortline.models.net import Deployed

    net = SortNet(make_config(size, "fusion", classes=CLASSES)).eval()
    x = inputs(lines=96)
    with torch.no_grad():
        fine = net(*x)
        coarse = net(*x, stride=4)
        classes, conf = Deployed(net, 16, stride=4).eval()(*x)
    assert fine.shape == (1, 10, 96, 128) and coarse.shape == (1, 10, 24, 32)
    prob = coarse[:, :, 4:-4].softmax(1)
    assert classes.shape == (1, 16, 32) and torch.equal(classes.long(), prob.argmax(1))
    assert torch.allclose(conf, prob.max(1).values, atol=1e-6)
    # Bilinear upsampling by 4 puts the cell value near each cell's centre: the fine mask agrees
    # with the coarse one on most pixels at the cells' centres.
    centres = fine[:, :, 16:-16][:, :, 1::4, 1::4].argmax(1)
    assert (centres == classes.long()).float().mean() > 0.6
    with pytest.raises(ValueError, match="multiple of the mask stride"):
        Deployed(net, 6, stride=4)


def test_sizes():
    tiny = {v: count_params(SortNet(make_config("tiny", v, classes=CLASSES))) for v in ("fusion", "rgb", "hsi")}
    assert 1.0e6 < tiny["fusion"] < 2.5e6          # the design point: ~2 M parameters or fewer
    assert tiny["rgb"] < tiny["fusion"] and tiny["hsi"] < tiny["fusion"]
    assert count_params(SortNet(make_config("base", "fusion", classes=CLASSES))) > 4 * tiny["fusion"]
    assert count_params(SortNet(make_config("nano", "fusion", classes=CLASSES))) < 0.5 * tiny["fusion"]
    make_config("nano", classes=CLASSES).check_strip(96, 640)    # the demo profile's strip: 64 + 2 x 16 lines
    assert make_config("nano", classes=CLASSES).hsi_input == "absorbance" and make_config("tiny", classes=CLASSES).hsi_input == "reflectance"
    with pytest.raises(ValueError, match="hsi_input 'counts'"):
        make_config("tiny", hsi_input="counts", classes=CLASSES)


def test_absorbance_input_turns_a_brightness_change_into_an_offset():
    """Half as bright (a thinner or darker item) shifts every band's absorbance by ln 2: the spectral
    shape the HSI backbone sees is unchanged, however dark the item."""
    net = SortNet(make_config("nano", "fusion", classes=CLASSES)).eval()
    seen = []
    net.hsi.register_forward_pre_hook(lambda module, args: seen.append(args[0].clone()))
    rgb, hsi = inputs(lines=96)
    hsi = hsi * 0.8 + 0.1
    with torch.no_grad():
        net(rgb, hsi)
        net(rgb, hsi * 0.5)
    shift = (seen[1] - seen[0]) * net.config.hsi_std
    assert torch.allclose(shift, torch.full_like(shift, float(torch.log(torch.tensor(2.0)))), atol=1e-5)


def test_strips_that_do_not_fit_both_grids_are_refused():
    c = make_config("tiny", classes=CLASSES)
    c.check_strip(160, 640)                  # the demo strip with its overlap
    c.check_strip(320, 2560)                 # the production strip
    with pytest.raises(ValueError, match="multiples of 32"):
        c.check_strip(144, 640)
    with pytest.raises(ValueError, match="bands"):
        make_config("tiny", bands=30, classes=CLASSES)
    with pytest.raises(ValueError, match="variant"):
        make_config("tiny", "both", classes=CLASSES)


def test_slice_collapse_weighs_each_cell_from_its_own_tokens():
    """No pooling over the strip: changing one cell changes that cell's output only."""
    torch.manual_seed(0)
    col = SliceCollapse(16).eval()
    x = torch.randn(1, 4, 5, 7, 16)
    y = x.clone()
    y[0, :, 2, 3] += 3.0
    with torch.no_grad():
        diff = (col(x) - col(y)).abs().sum(-1)[0]
    assert diff[2, 3] > 0
    diff[2, 3] = 0
    assert diff.max() == 0


def test_cross_fusion_is_confined_to_the_cell():
    """The spectral tokens of one HSI cell reach exactly its r x r RGB children."""
    torch.manual_seed(0)
    fuse = CrossFusion(24, 16, 2, 2.0).eval()
    rgb, hsi = torch.randn(1, 8, 12, 24), torch.randn(1, 4, 4, 6, 16)     # r = 2
    other = hsi.clone()
    other[0, :, 1, 2] += 2.0
    with torch.no_grad():
        diff = (fuse(rgb, hsi) - fuse(rgb, other)).abs().sum(-1)[0]
    changed = diff > 1e-6
    expected = torch.zeros(8, 12, dtype=torch.bool)
    expected[2:4, 4:6] = True
    assert torch.equal(changed, expected)


def test_shifted_windows_never_attend_across_the_strip_edges():
    """The cyclic shift wraps the top lines onto the bottom ones; the mask keeps them apart."""
    torch.manual_seed(0)
    block = WindowBlock(16, 2, 8, shift=True, mlp_ratio=2.0).eval()
    x = torch.randn(1, 16, 16, 16)
    y = x.clone()
    y[0, 0] += 2.0                                     # the top line
    with torch.no_grad():
        diff = (block(x) - block(y)).abs().sum(-1)[0].sum(-1)
    assert (diff[:4] > 0).all()                         # its own shifted window: lines 0-3
    assert (diff[4:] == 0).all()                        # never the bottom lines it wrapped next to


def test_checkpoint_round_trip_and_bad_files(tmp_path):
    net = SortNet(make_config("tiny", "rgb", classes=CLASSES))
    path = checkpoint.save(tmp_path / "m.safetensors", net, step=7)
    back, meta = checkpoint.load(path)
    assert back.config == net.config and meta["step"] == "7"
    assert meta["hash"] == checkpoint.model_hash(net.config, net.state_dict())
    x = inputs()
    with torch.no_grad():
        assert torch.equal(net.eval()(*x), back(*x))
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 64)
    with pytest.raises(ModelFileError, match="not a readable safetensors"):
        checkpoint.load(junk)
    with pytest.raises(ModelFileError, match="no such model file"):
        checkpoint.load(tmp_path / "none.safetensors")
    assert ModelConfig.from_dict(net.config.to_dict()) == net.config


def test_onnx_export_matches_torch(tmp_path):
    """Exported at the demo strip size; ONNX Runtime against torch, difference bounded."""
    import onnx

    net = SortNet(make_config("tiny", "fusion", classes=CLASSES)).eval()
    shape = StripShape(lines=160, width=640, overlap=16, ratio=4, bands=32)
    path = export(net, {"hash": "abc"}, shape, tmp_path / "m.onnx")
    check = compare(net, path, shape)
    assert check["max_abs_diff_confidence"] < 1e-4
    assert check["class_agreement"] > 0.9999
    proto = onnx.load(str(path))
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta["rgb_shape"] == "[1, 160, 640, 3]" and meta["model_hash"] == "abc" and meta["overlap"] == "16"
    # Static shapes throughout: no runtime shape arithmetic left in the graph.
    ops = {n.op_type for n in proto.graph.node}
    assert not ops & {"Shape", "NonZero", "Loop", "If", "ScatterND"}, ops
    outputs = {o.name: [d.dim_value for d in o.type.tensor_type.shape.dim] for o in proto.graph.output}
    assert outputs == {"classes": [1, 128, 640], "confidence": [1, 128, 640]}
    # The strip goes in as the register node makes it; the graph converts it.
    assert {i.name: i.type.tensor_type.elem_type for i in proto.graph.input} == {
        "rgb": onnx.TensorProto.UINT8, "hsi": onnx.TensorProto.FLOAT16}
    # Window masks and position biases stay factorised: no constant per window, and no bias expanded to
    # (heads, 64, 64): each layer gathers its bias in the graph from its learned table by a shared int index.
    initializers = {t.name: tuple(t.dims) for t in proto.graph.initializer}
    fixed = {n.output[0]: (tuple(a.t.dims), a.t.data_type) for n in proto.graph.node if n.op_type == "Constant"
             for a in n.attribute if a.t.dims}
    constants = list(initializers.values()) + [d for d, _ in fixed.values()]
    assert not [d for d in constants if len(d) >= 3 and d[-2:] == (64, 64)]
    heads = {f"net.{name}.bias_table": m.heads for name, m in net.named_modules() if isinstance(m, WindowBlock)}
    gathers = {n.input[0]: n.input[1] for n in proto.graph.node if n.op_type == "Gather"}
    assert {table: initializers[table] for table in gathers} == {t: ((2 * 8 - 1) ** 2, h) for t, h in heads.items()}
    assert {fixed[i] for i in gathers.values()} == {((n, n), onnx.TensorProto.INT64) for n in (64, 40)}
    assert len(set(gathers.values())) == 2   # one index for all the layers of a window size (8 x 8 and 5 x 8)
    largest = max(int(np.prod(d)) for d in constants)
    assert largest == max(p.numel() for p in net.parameters()), largest   # a weight matrix, nothing per grid
    # The broadcast masks reshape the scores to 7 dimensions; TensorRT takes at most 8.
    inferred = onnx.shape_inference.infer_shapes(proto).graph.value_info
    assert max(len(v.type.tensor_type.shape.dim) for v in inferred) == 7


def test_window_masks_factorised_are_the_region_mask():
    """WindowMask adds, per window row and column, what comparing the tokens' regions gives: 0 within a
    region, MASKED across, for every real token (padding rows only matter to padding, which is cropped)."""
    from sortline.models.blocks import MASKED, _regions, _window_tables

    for h, w, shift in [(10, 80, True), (20, 160, True), (12, 20, False), (5, 20, True), (16, 16, True)]:
        wh, ww, sh, sw, hp, wp, mask, _ = _window_tables(h, w, 8, shift)
        ry, rx = _regions(hp, h, wh, sh), _regions(wp, w, ww, sw)
        ids = (ry[:, None] * 4 + rx[None, :]).reshape(hp // wh, wh, wp // ww, ww).transpose(0, 2, 1, 3)
        real = ((ry[:, None] != 3) & (rx[None, :] != 3)).reshape(hp // wh, wh, wp // ww, ww).transpose(0, 2, 1, 3)
        ids, real = ids.reshape(-1, wh * ww), real.reshape(-1, wh * ww)
        want = np.where(ids[:, :, None] == ids[:, None, :], 0.0, MASKED)
        got = mask.apply(torch.zeros(2 * len(ids), 3, wh * ww, wh * ww)).numpy()
        for b in range(2):
            g = got[b * len(ids):(b + 1) * len(ids)]
            assert (g[:, 0] == g[:, 2]).all()                                    # the same for every head
            rows = real[:, :, None] & np.ones_like(want, bool)
            assert np.array_equal(g[:, 1][rows] < MASKED / 2, want[rows] < MASKED / 2), (h, w, shift)
            assert set(np.unique(g[:, 1][rows])) <= {0.0, MASKED, 2 * MASKED}


def test_a_timing_cache_that_tensorrt_refuses_is_said_and_rebuilt(tmp_path, caplog):
    """build-engine's timing cache: one this TensorRT or GPU refuses (set_timing_cache returns False, as
    TensorRT's builder config does for a cache from another version or device) is not dropped silently:
    a warning names the file, and the build starts from an empty cache it then writes anew."""
    from sortline.models.training.engine import use_timing_cache

    class BuilderConfig:   # the two calls of TensorRT's IBuilderConfig that use_timing_cache makes
        def __init__(self, refuse: bool):
            self.refuse, self.attached = refuse, None

        def create_timing_cache(self, blob: bytes):
            return {"from": bytes(blob)}

        def set_timing_cache(self, cache, ignore_mismatch: bool):
            assert ignore_mismatch is False
            if self.refuse and cache["from"]:
                return False
            self.attached = cache
            return True

    path = tmp_path / "model.timing"
    path.write_bytes(b"a cache from another GPU")
    with caplog.at_level("WARNING", logger="sortline.engine"):
        refusing = BuilderConfig(refuse=True)
        use_timing_cache(refusing, path)
        accepting = BuilderConfig(refuse=False)
        use_timing_cache(accepting, path)
    assert refusing.attached == {"from": b""} and accepting.attached == {"from": b"a cache from another GPU"}
    assert len(caplog.records) == 1 and str(path) in caplog.records[0].getMessage()
    assert "will be rebuilt" in caplog.records[0].getMessage()


def test_onnx_export_of_a_coarse_mask_matches_torch(tmp_path):
    """The demo profile's deployment: nano, 96-line strips, a mask of 4 x 4 pixel cells."""
    import onnx

    from dataclasses import replace

    from sortline.models.backends.onnxruntime import OnnxRuntimeBackend

    net = SortNet(make_config("nano", "fusion", classes=CLASSES)).eval()
    shape = StripShape(lines=96, width=640, overlap=16, ratio=4, bands=32, stride=4)
    assert shape.core == (16, 160)
    path = export(net, {"hash": "abc"}, shape, tmp_path / "m.onnx")
    check = compare(net, path, shape)
    assert check["max_abs_diff_confidence"] < 1e-4 and check["class_agreement"] > 0.9999
    proto = onnx.load(str(path))
    assert {p.key: p.value for p in proto.metadata_props}["mask_stride"] == "4"
    # The three top-down resizes of the decoder, and no final upsampling to the strip.
    assert [n.op_type for n in proto.graph.node].count("Resize") == 3
    backend = OnnxRuntimeBackend(path)
    backend.expect(shape)
    with pytest.raises(ModelFileError, match="mask stride 4, model.mask_stride is 1"):
        backend.expect(replace(shape, stride=1))


def test_engine_files_carry_a_header_and_junk_is_refused(tmp_path):
    from sortline.models.contract import read_engine_header, write_engine

    header = {"tensorrt": "10.3.0", "gpu": "NVIDIA H200", "rgb_shape": "[1, 160, 640, 3]", "precision": "fp16"}
    path = write_engine(tmp_path / "m.engine", header, b"\x01plan-bytes")
    back, offset = read_engine_header(path)
    assert back == header and path.read_bytes()[offset:] == b"\x01plan-bytes"
    junk = tmp_path / "junk.engine"
    junk.write_bytes(b"a serialized plan without our header")
    with pytest.raises(ModelFileError, match="not a sortline engine"):
        read_engine_header(junk)


def test_per_band_normalisation_and_temperature_are_in_the_exported_graph(tmp_path):
    """A trained model's band statistics and temperature ride in its config: the checkpoint keeps them, the
    network normalises each band with them, and the export gives the softmax at that temperature."""
    import dataclasses

    from sortline.models.net import Deployed

    base = make_config("nano", "fusion", classes=CLASSES)
    rng = np.random.default_rng(0)
    band_mean = tuple(float(v) for v in rng.uniform(1.0, 3.0, 32))
    band_std = tuple(float(v) for v in rng.uniform(0.5, 1.5, 32))
    config = dataclasses.replace(base, hsi_band_mean=band_mean, hsi_band_std=band_std, temperature=2.5).validate()
    torch.manual_seed(0)
    net = SortNet(config).eval()
    assert not [k for k in net.state_dict() if k.startswith("hsi_s")]        # constants, not weights
    back, _ = checkpoint.load(checkpoint.save(tmp_path / "m.safetensors", net))
    assert back.config == config
    rgb, hsi = inputs(lines=64, width=128)
    with torch.no_grad():
        expected = net.hsi((-torch.log(torch.clamp(hsi, min=1e-3)) - torch.tensor(band_mean)) / torch.tensor(band_std))
        assert all(torch.equal(a, b) for a, b in zip(back.hsi(
            (-torch.log(torch.clamp(hsi, min=1e-3)) - back.hsi_shift) / back.hsi_scale), expected))
        logits = back(rgb, hsi)[:, :, 16:-16]
        classes, conf = Deployed(back, 16).eval()(rgb, hsi)
    assert torch.equal(classes, logits.argmax(1).to(torch.int32))             # the classes do not change
    assert torch.allclose(conf, (logits / 2.5).softmax(1).max(1).values, atol=1e-6)
    assert not torch.allclose(conf, logits.softmax(1).max(1).values, atol=1e-3)
    shape = StripShape(lines=96, width=128, overlap=16, ratio=4, bands=32, stride=4)
    path = export(back, {"hash": "t"}, shape, tmp_path / "m.onnx")
    check = compare(back, path, shape)
    assert check["max_abs_diff_confidence"] < 1e-5 and check["class_agreement"] == 1.0
    with pytest.raises(ValueError, match="one value per band"):
        dataclasses.replace(base, hsi_band_mean=(1.0,), hsi_band_std=(1.0,)).validate()
    with pytest.raises(ValueError, match="positive"):
        dataclasses.replace(base, temperature=0.0).validate()


def test_the_shipped_models_give_exactly_their_shipped_outputs(tmp_path):
    """The shipped production checkpoint carries no band statistics and no temperature (it was trained
    before either existed), the demo's a fitted temperature: loaded and exported by this code, each gives
    the classes its shipped ONNX file gives, and its confidences within float rounding."""
    from sortline.cli.common import shipped_config
    from sortline.models.backends.onnxruntime import OnnxRuntimeBackend
    from sortline.models.contract import model_file
    from sortline.models.training.export import example_inputs
    from sortline.pipeline.graph import load_config

    for name, profile, temperature in (("belt-fusion-nano", "demo", 1.3373), ("belt-fusion-production",
                                                                              "production", 1.0)):
        net, meta = checkpoint.load(model_file(f"shipped:{name}.safetensors"))
        assert net.config.hsi_band_mean == () and net.hsi_shift is None
        assert abs(net.config.temperature - temperature) < 1e-3, (name, net.config.temperature)
        shape = StripShape.from_machine(load_config(shipped_config(profile)))
        shipped = OnnxRuntimeBackend(model_file(f"shipped:{name}.onnx"))
        again = OnnxRuntimeBackend(export(net, meta, shape, tmp_path / f"{name}.onnx"))
        for seed in range(2):
            rgb, hsi = example_inputs(shape, seed)
            (classes, confidence), (classes_again, confidence_again) = shipped.infer(rgb, hsi), again.infer(rgb, hsi)
            assert np.array_equal(classes, classes_again), name
            # Within float rounding: the export folds constants on this host's CPU, whose vector code may round
            # the last bit otherwise than the CPU the shipped file was made on (seen: 8e-8).
            assert np.abs(confidence - confidence_again).max() <= 1e-6, name
