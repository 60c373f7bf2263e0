"""The processing stages at production rates, each on one core: register, plan, ejector, and infer on CPU.

The production profile (configs/production.toml: RGB 2560 px at 6400 lines/s
and HSI 640 px x 224 bands at 1600 lines/s at 3 m/s, 256-line strips with
2 x 32 lines of context, 96 valves) needs 25 strips/s. Each stage runs its
own node's code in this process, pinned to one core, BLAS, OpenCV, torch and
ONNX Runtime on one thread; inputs come from the simulator at production
geometry and are made before any timing starts. The baseline is the belt:
a stage's real-time factor is what it does per second over what 3 m/s needs.

- register: StripCutter (HSI counts to reflectance in the model's bands,
  pairing by position, RGB strip assembly, HSI resampled onto the RGB grid)
  over simulated frames, with the spatial mapping the config implies (the work
  does not depend on the fitted values), each strip written into arrays like
  the node's message (rgb uint8, hsi float16), as the node does. Also timed the
  straightforward way in the same run, per-band reflectance binned by numpy
  (bin_bands(reflectance)): `register_vs_per_band`.
- plan: the eject-plan node's process() on masks of the belt's truth labels at
  the config's model.mask_stride (and at 4, the model's own grid, when the
  config's differs), with misread specks; 25 masks/s needed.
- ejector: the ejector node's process() for the plan's windows and its
  sender's work (the schedule's due commands, datagrams with their MAC sent
  over UDP to a local socket), on a clock stepped in the sender's 5 ms, the
  messages arriving 10 ms after their strip is complete (so that every window
  can still be sent); belt seconds per second of that work.
- infer: ONNX Runtime, one thread, on the production strip (320 x 2560), for
  the model the config's [model] names, or else the shipped nano checkpoint
  exported at that strip into a temporary directory; the output says which.
  `infer_cpu_cores_needed_production` = ms per strip x strips/s / 1000.

    python benchmarks/production.py [--quick] [--json PATH] [--runs N] [--no-infer]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
if hasattr(os, "sched_setaffinity"):
    os.sched_setaffinity(0, {0})

import cv2  # noqa: E402
import numpy as np  # noqa: E402

from sortline.calibration.spatial import Geometry, SpatialCalibration  # noqa: E402
from sortline.calibration.spectral import SpectralReference, bin_bands  # noqa: E402
from sortline.nodes.belt.encoder import EncoderTrack  # noqa: E402
from sortline.nodes.eject_plan import EjectPlan  # noqa: E402
from sortline.nodes.ejector import Ejector  # noqa: E402
from sortline.nodes.register import StripCutter  # noqa: E402
from sortline.nodes.simulate import Simulation  # noqa: E402
from sortline.nodes.simulate.materials import CLASSES  # noqa: E402
from sortline.nodes.streams import EjectMeta, MaskMeta  # noqa: E402
from sortline.pipeline.graph import load_config  # noqa: E402
from sortline.pipeline.testing import Harness  # noqa: E402

cv2.setNumThreads(1)
SPEED = 3.0
DELIVERY_S = 0.010   # a strip's windows reach the ejector this long after the strip is complete


class Clock:
    """Wall time and this process's CPU time of what runs inside `with clock:`, added up."""

    def __init__(self):
        self.wall = self.cpu = 0.0

    def __enter__(self):
        self._w, self._c = time.perf_counter(), time.process_time()

    def __exit__(self, *exc):
        self.wall += time.perf_counter() - self._w
        self.cpu += time.process_time() - self._c


# Register.

def references(settings) -> tuple[SpectralReference, SpatialCalibration]:
    dark = np.concatenate([Simulation(settings, seed=2, scene="dark").hsi(f) for f in range(4)])
    white = np.concatenate([Simulation(settings, seed=2, scene="white").hsi(f) for f in range(4)])
    geo = Geometry.from_machine(settings)
    cross, along = geo.nominal()
    spatial = SpatialCalibration(cross=cross.tolist(), along=along.tolist(), rgb_pixels=geo.rgb_pixels,
                                 hsi_pixels=geo.hsi_pixels, ratio=settings.hsi_ratio)
    return SpectralReference.from_frames(dark, white, white_reflectance=0.92), spatial


def time_register(settings, spectral, spatial, sim, rgb_frames, hsi_frames, per_band=False) -> tuple[Clock, int]:
    """Time per strip (wall, CPU), and the strips made."""
    cut = StripCutter(settings, spectral, spatial)
    if per_band:
        cut.binned = lambda raw, out: np.copyto(out, bin_bands(spectral.reflectance(raw), cut.groups))
    # What the node writes each strip into: its message's arrays (a few, as the slots of a shared-memory pool).
    slots = [(np.full(cut.rgb_shape, 0, np.uint8), np.full(cut.hsi_shape, 0, np.float16)) for _ in range(4)]
    strips, clock = 0, Clock()
    with clock:
        for f in range(len(rgb_frames)):
            cut.hsi(sim.position("hsi", f), hsi_frames[f], False)
            cut.rgb(sim.position("rgb", f), rgb_frames[f], False)
            strips += sum(1 for _ in cut.strips(lambda top, valid, gap: slots[cut.seq % len(slots)]))
    clock.wall, clock.cpu = clock.wall / strips, clock.cpu / strips
    return clock, strips


# Plan and ejector.

def with_stride(machine, k: int):
    return machine.model_copy(update={"model": machine.model.model_copy(update={"mask_stride": k})})


def mask_messages(machine, sim, count: int, harness) -> list:
    """Masks of the belt's truth at the machine's mask stride, 1 % of cells misread as another class."""
    k, core = machine.model.mask_stride, machine.model.strip_lines
    rng = np.random.default_rng(5)
    msgs = []
    for i in range(count):
        labels = np.ascontiguousarray(sim.scene.rows(i * core, core)["labels"][k // 2::k, k // 2::k])
        misread = rng.random(labels.shape) < 0.01
        labels[misread] = rng.integers(1, len(CLASSES), int(misread.sum()))
        conf = rng.integers(150, 256, labels.shape).astype(np.uint8)
        msgs.append(harness.message("in", {"classes": labels, "confidence": conf}, position=i * core * 15,
                                    ticks_per_line=machine.cameras.rgb.ticks_per_line * k,
                                    meta=MaskMeta(list(CLASSES), "oracle", k, len(labels))))
    return msgs


def time_plan(machine, sim, count: int) -> tuple[Clock, list[tuple[int, EjectMeta]]]:
    """Time per mask (wall, CPU), and the windows made, with the belt position of their mask."""
    h = Harness(EjectPlan, machine, {"timing": False}, name="plan")
    msgs = mask_messages(machine, sim, count, h)
    made, clock = [], Clock()
    for msg in msgs:
        with clock:
            h.node.process("in", msg)
        made.append((msg.header.position, EjectMeta(list(h.node.windows))))
    clock.wall, clock.cpu = clock.wall / count, clock.cpu / count
    return clock, made


def time_ejector(machine, made, tmp: Path) -> dict:
    """The ejector's work for the plan's windows on a stepped clock: belt seconds per second of work."""
    receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    receiver.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
    receiver.bind(("127.0.0.1", 0))
    key = tmp / "valves.valve_key"
    key.write_text(os.urandom(32).hex())
    ejector = machine.ejector.model_copy(update={"driver": "udp", "key": str(key),
                                                 "address": f"127.0.0.1:{receiver.getsockname()[1]}"})
    h = Harness(Ejector, machine.model_copy(update={"ejector": ejector}), {"timing": True}, name="ejector")
    node = h.node
    node.running = False            # this loop does the sender thread's work, on its own clock
    node.wake.set()
    node.sender.join()
    tpl, core = machine.cameras.rgb.ticks_per_line, machine.model.strip_lines
    track = EncoderTrack(machine.belt.ticks_per_mm, SPEED)
    track.update(0, 1)
    done = (core + machine.model.overlap_lines) * tpl      # a strip is complete with its lower context
    arrive = [(track.time_at(pos + done) + DELIVERY_S * 1e9,
               h.message("in", {}, position=pos, ticks_per_line=tpl, meta=meta)) for pos, meta in made]
    belt_ns = track.time_at(made[-1][0] + core * tpl) + 0.3e9     # and the last air has left the bar
    step, now, i, work = 5e6, 0.0, 0, Clock()
    while now < belt_ns:
        work.__enter__()
        while i < len(arrive) and arrive[i][0] <= now:
            node.process("in", arrive[i][1])
            i += 1
        send, late = node.schedule.due(now, track)
        for w, t_cmd, duration in send:
            node._send(w, t_cmd, duration, int(now))
        node.late += len(late)
        work.__exit__()
        now += step
    h.close()
    receiver.close()
    return {"belt_s": (belt_ns - 1) / 1e9, "wall_s": work.wall, "cpu_s": work.cpu, "sent": node.sent, "late": node.late,
            "windows": sum(len(m.windows) for _, m in made)}


# Infer.

def infer_model(settings, tmp: Path, shape) -> tuple[Path, str]:
    """The model the config's [model] names, if that file exists and runs on a CPU (ONNX, or a checkpoint
    exported here at this strip), else the shipped nano checkpoint exported at this strip."""
    from sortline.models.contract import ModelFileError, model_file
    from sortline.models.training import checkpoint
    from sortline.models.training.export import export

    named = settings.model.path
    try:
        path = model_file(named) if named else None
    except ModelFileError:
        path = None
    if path is not None and path.is_file() and path.suffix == ".onnx":
        return path, f"{named} (the config's)"
    if path is not None and path.is_file() and path.suffix == ".safetensors":
        why = "the config's"
    else:
        why = (f"the config's [model] names {named!r}, not a file ONNX Runtime can run here" if named
               else "the config's [model] names none")
        path = model_file("shipped:belt-fusion-nano.safetensors")
    net, meta = checkpoint.load(path)
    out = export(net, meta, shape, tmp / f"{path.stem}-production.onnx")
    return out, f"{path.name} exported at {shape.lines}x{shape.width}, mask stride {shape.stride} ({why})"


def time_infer(settings, tmp: Path, runs: int) -> dict:
    import torch

    from sortline.models.backends.onnxruntime import OnnxRuntimeBackend
    from sortline.models.contract import StripShape

    torch.set_num_threads(1)
    shape = StripShape.from_machine(settings)
    path, which = infer_model(settings, tmp, shape)
    m = settings.model
    sim = Simulation(settings, seed=1100, occupancy=0.5)
    strips = []
    for i in range(2):
        s = sim.strip(i * m.strip_lines, m.strip_lines + 2 * m.overlap_lines)
        strips.append((s["rgb"], bin_bands(s["hsi"], m.bands, dtype=np.float16)))
    backend = OnnxRuntimeBackend(path, threads=1)
    backend.run(*strips[0])                       # warm-up: allocations, first-run kernel choices
    wall, cpu = [], []
    for i in range(runs):
        clock = Clock()
        with clock:
            backend.run(*strips[i % len(strips)])
        wall.append(clock.wall)
        cpu.append(clock.cpu)
    return {"ms": statistics.median(cpu) * 1000, "wall_ms": statistics.median(wall) * 1000, "model": which,
            "runs": runs}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a short run (under a minute)")
    parser.add_argument("--json", metavar="PATH", help="write the figures as one flat JSON object")
    parser.add_argument("--runs", type=int, default=3, help="runs of register and plan; medians (default 3)")
    parser.add_argument("--no-infer", action="store_true", help="leave out inference (it needs torch to export)")
    args = parser.parse_args()
    runs = 1 if args.quick else args.runs
    settings = load_config(ROOT / "configs" / "production.toml")
    machine = settings.machine()
    needed = settings.line_rate_hz("rgb", SPEED) / settings.model.strip_lines
    load = os.getloadavg()[0]

    # Inputs first: frames, references, masks' scene.
    frames = 16 if args.quick else 72
    spectral, spatial = references(settings)
    sim = Simulation(settings, seed=3)
    rgb_frames = [sim.rgb(f) for f in range(frames)]
    hsi_frames = [sim.hsi(f) for f in range(frames)]
    masks = 6 if args.quick else 40

    reg = [time_register(settings, spectral, spatial, sim, rgb_frames, hsi_frames) for _ in range(runs)]
    reg_cpu, reg_wall = statistics.median(c.cpu for c, _ in reg), statistics.median(c.wall for c, _ in reg)
    per_band = time_register(settings, spectral, spatial, sim, rgb_frames, hsi_frames, per_band=True)[0]

    stride = machine.model.mask_stride
    plans = [time_plan(machine, sim, masks) for _ in range(runs)]
    plan_cpu, plan_wall, made = (statistics.median(c.cpu for c, _ in plans),
                                 statistics.median(c.wall for c, _ in plans), plans[0][1])
    plans4 = [time_plan(with_stride(machine, 4), sim, masks)[0] for _ in range(runs)] if stride != 4 else []
    plan4_cpu = statistics.median(c.cpu for c in plans4) if plans4 else plan_cpu
    with tempfile.TemporaryDirectory() as tmp:
        ej = time_ejector(machine, made, Path(tmp))
        inf = None if args.no_infer else time_infer(settings, Path(tmp), 4 if args.quick else 20)

    def factor(seconds: float) -> float:
        return round(1 / seconds / needed, 2)

    figures = {
        "speed_m_s": SPEED,
        "strips_per_s_needed_production": round(needed, 2),
        "load_average": round(load, 2),
        "register_ms_per_strip_production": round(reg_cpu * 1000, 2),
        "register_realtime_factor_production": factor(reg_cpu),
        "register_realtime_factor_production_wall": factor(reg_wall),
        "register_per_band_ms_per_strip_production": round(per_band.cpu * 1000, 2),
        "register_vs_per_band": round(per_band.cpu / reg_cpu, 2),
        "register_strips": reg[0][1],
        "plan_mask_stride_production": stride,
        "plan_ms_per_mask_production": round(plan_cpu * 1000, 2),
        "plan_realtime_factor_production": factor(plan_cpu),
        "plan_realtime_factor_production_wall": factor(plan_wall),
        "plan_ms_per_mask_production_stride_4": round(plan4_cpu * 1000, 2),
        "plan_realtime_factor_production_stride_4": factor(plan4_cpu),
        "plan_masks": masks,
        "ejector_realtime_factor_production": round(ej["belt_s"] / ej["cpu_s"], 1),
        "ejector_realtime_factor_production_wall": round(ej["belt_s"] / ej["wall_s"], 1),
        "ejector_windows": ej["windows"],
        "ejector_commands_sent": ej["sent"],
        "ejector_commands_late": ej["late"],
    }
    if inf is not None:
        figures.update({
            "infer_cpu_ms_per_strip_production": round(inf["ms"], 1),
            "infer_cpu_ms_per_strip_production_wall": round(inf["wall_ms"], 1),
            "infer_cpu_cores_needed_production": round(inf["ms"] * needed / 1000, 2),
            "infer_cpu_realtime_factor_production": round(1000 / inf["ms"] / needed, 3),
            "infer_model": inf["model"],
        })
    f = figures
    print(f"production profile at {SPEED:g} m/s: {needed:.0f} strips/s of {settings.model.strip_lines}+2x"
          f"{settings.model.overlap_lines} lines x {settings.cameras.rgb.pixels} px, each stage on one core; "
          f"CPU time (wall time, load average {load:.1f} at the start)")
    print(f"  register: {reg_cpu * 1000:.1f} ms per strip -> {f['register_realtime_factor_production']:.2f}x real "
          f"time ({f['register_realtime_factor_production_wall']:.2f}x); {f['register_vs_per_band']:.1f}x the "
          f"per-band reflectance binned by numpy ({per_band.cpu * 1000:.0f} ms)")
    print(f"  plan: {plan_cpu * 1000:.1f} ms per mask at stride {stride} -> {f['plan_realtime_factor_production']:.2f}x "
          f"real time ({f['plan_realtime_factor_production_wall']:.2f}x)"
          + (f"; at stride 4 {plan4_cpu * 1000:.1f} ms -> {f['plan_realtime_factor_production_stride_4']:.1f}x"
             if stride != 4 else ""))
    print(f"  ejector: {ej['windows']} windows, {ej['sent']} commands sent ({ej['late']} late) over "
          f"{ej['belt_s']:.2f} s of belt in {ej['cpu_s'] * 1000:.0f} ms -> "
          f"{f['ejector_realtime_factor_production']:.0f}x real time ({f['ejector_realtime_factor_production_wall']:.0f}x)")
    if inf is not None:
        print(f"  infer (ONNX Runtime, 1 thread): {inf['ms']:.0f} ms per strip ({inf['wall_ms']:.0f}) -> "
              f"{f['infer_cpu_cores_needed_production']:.2f} cores needed; model: {inf['model']}")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
