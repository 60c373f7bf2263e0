"""The synthetic belt: a source node that plays both cameras and tells the truth.

It publishes exactly what the two acquisition nodes would (stream "rgb":
lines × pixels × 3 uint8; stream "hsi": lines × pixels × bands uint16 raw
12-bit counts; headers with encoder positions and timestamps), plus a
"truth" stream aligned with the RGB messages: per-pixel class labels and
object ids on the RGB grid, and the objects that start in that message (id,
class, extent, and look: clear, white, coloured, black, ...).

Content depends only on the seed and the encoder position, never on timing:
the same seed gives the same bytes, paced or not. Pacing follows the belt
motion (drift and jitter), so line timing looks like a real encoder's. So a
machine too big for one process is played by several nodes with the same
seed, each with its own `cameras` (and core): their streams are the ones a
single node would publish.
"""

from __future__ import annotations

import time
from typing import Literal

import numpy as np
from pydantic import Field, field_validator

from sortline.nodes.simulate.belt import BeltMotion
from sortline.nodes.simulate.cameras import HSICamera, Misregistration, Noise, RGBCamera
from sortline.nodes.simulate.materials import CLASSES, DEFAULT_MIX, ENDMEMBER_LOOK, PALETTE
from sortline.nodes.simulate.scene import Scene
from sortline.nodes.streams import LINES, TRUTH, CameraMeta, TruthMeta, TruthObject
from sortline.pipeline.config import Machine, Section
from sortline.pipeline.node import Node

STREAM_ID = {"rgb": 1, "hsi": 2}
CAMERAS = ("rgb", "hsi")


class MisregistrationParams(Section):
    offset_mm: float = Field(6.0, ge=-100, le=100)
    scale: float = Field(1.015, ge=0.8, le=1.25)
    rotation_deg: float = Field(0.35, ge=-5, le=5)
    distortion: float = Field(-0.004, ge=-0.1, le=0.1)
    scan_line_error_mm: float = Field(1.7, ge=-50, le=50)


class Simulation:
    """Everything but the node: the scene, the motion and both cameras, for a machine config.

    Also used directly (training data, calibration tests, benchmarks): call
    rgb(frame), hsi(frame), truth(frame) for the content of any frame along the belt.
    """

    def __init__(self, machine: Machine, *, seed: int = 1, scene: str = "belt", occupancy: float = 0.3,
                 mix: dict[str, float] | None = None, cluster: float = 0.3, speed_m_s: float = 0.0,
                 drift: float = 0.02, jitter: float = 0.005, misregistration: Misregistration = Misregistration(),
                 cameras: tuple[str, ...] = CAMERAS, camera: int | None = None):
        """cameras: the ones this simulation plays; without "rgb" the scene's RGB map is not drawn (and
        rgb() and strip() are refused), which makes an HSI-only simulation cheaper; content is the same.
        camera: the seed of the HSI camera's fixed pattern (dark level, bad pixels); None: the belt's seed."""
        rgb, hsi, belt = machine.cameras.rgb, machine.cameras.hsi, machine.belt
        self.seed, self.machine, self.cameras = seed, machine, tuple(cameras)
        self.rgb_cam_cfg, self.hsi_cam_cfg = rgb, hsi
        row_mm = rgb.ticks_per_line / belt.ticks_per_mm
        self.scene = Scene(seed, belt.width_mm, row_mm, rgb.mm_per_pixel, rgb.pixels, mode=scene,
                           occupancy=occupancy, mix=mix, cluster=cluster, draw_rgb="rgb" in self.cameras)
        self.motion = BeltMotion(seed, speed_m_s or belt.speed_m_s, belt.ticks_per_mm, drift=drift, jitter=jitter)
        self.noise = Noise(seed)
        self.lamp = 0.0 if scene == "dark" else 1.0
        self.rgb_cam = RGBCamera(rgb.pixels, self.noise)
        self.hsi_cam = HSICamera(
            pixels=hsi.pixels, bands=hsi.bands, wavelength_nm=hsi.wavelength_nm or (900.0, 1700.0),
            mm_per_pixel=hsi.mm_per_pixel, ticks_per_line=hsi.ticks_per_line, ticks_per_mm=belt.ticks_per_mm,
            scan_line_mm=hsi.scan_line_mm - rgb.scan_line_mm, belt_width_mm=belt.width_mm, row_mm=row_mm,
            col_mm=rgb.mm_per_pixel, scene_cols=rgb.pixels, misregistration=misregistration,
            seed=seed if camera is None else camera,
            noise=self.noise, subsample=max(1, round(hsi.mm_per_pixel / rgb.mm_per_pixel)))

    def position(self, stream: str, frame: int) -> int:
        """Encoder position of the first line of a camera's frame number `frame`."""
        cam = self.rgb_cam_cfg if stream in ("rgb", "truth") else self.hsi_cam_cfg
        return frame * cam.lines_per_frame * cam.ticks_per_line

    def _rng(self, stream: str, frame: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, STREAM_ID[stream], frame])

    def rgb(self, frame: int, out: np.ndarray | None = None) -> np.ndarray:
        """(lines, pixels, 3) uint8: RGB frame `frame`."""
        self._playing("rgb")
        cfg = self.rgb_cam_cfg
        row0 = self.position("rgb", frame) // cfg.ticks_per_line
        img = self.rgb_cam.read(self.scene.rows(row0, cfg.lines_per_frame)["rgb"], self._rng("rgb", frame), self.lamp)
        if out is not None:
            out[...] = img
            return out
        return img

    def hsi(self, frame: int, out: np.ndarray | None = None) -> np.ndarray:
        """(lines, pixels, bands) uint16 raw counts: HSI frame `frame`."""
        self._playing("hsi")
        img = self.hsi_cam.read(self.scene, self.position("hsi", frame), self.hsi_cam_cfg.lines_per_frame,
                                self._rng("hsi", frame), self.lamp)
        if out is not None:
            out[...] = img
            return out
        return img

    def _playing(self, camera: str) -> None:
        if camera not in self.cameras:
            raise ValueError(f"this simulation plays only {', '.join(self.cameras)}, not {camera}")

    def truth(self, frame: int) -> tuple[dict[str, np.ndarray], list[TruthObject]]:
        """Labels and object ids on the RGB grid for RGB frame `frame`, and the objects starting in it."""
        cfg = self.rgb_cam_cfg
        row0 = self.position("rgb", frame) // cfg.ticks_per_line
        maps = self.scene.rows(row0, cfg.lines_per_frame)
        table = self.scene.object_table(row0, cfg.lines_per_frame, cfg.ticks_per_line)
        objects = [TruthObject(int(o["id"]), int(o["cls"]), round(float(o["x0_mm"]), 2), round(float(o["x1_mm"]), 2),
                               int(o["p0"]), int(o["p1"]), ENDMEMBER_LOOK[int(o["endmember"])]) for o in table]
        return {"labels": maps["labels"], "instances": maps["instances"]}, objects


    def strip(self, row0: int, lines: int) -> dict[str, np.ndarray]:
        """A perfectly co-registered strip from scene row `row0` (an RGB line number), for training.

        rgb: (lines, pixels, 3) uint8 as the RGB camera reads it; hsi: (lines/r, pixels/r, bands) float32
        reflectance on the RGB grid coarsened by r (what calibration and the register node aim for);
        labels: (lines, pixels) uint8. `lines` must be a multiple of r.
        """
        self._playing("rgb")
        r = self.hsi_cam.ss
        if lines % r:
            raise ValueError(f"strip lines ({lines}) must be a multiple of the RGB:HSI ratio {r}")
        rng = np.random.default_rng([self.seed, 5, row0 + 2**40])
        maps = self.scene.rows(row0, lines)
        return {"rgb": self.rgb_cam.read(maps["rgb"], rng, self.lamp),
                "hsi": self.hsi_cam.read_registered(self.scene, row0, lines, rng),
                "labels": maps["labels"].copy()}


class Simulate(Node):
    outputs = {"rgb": LINES, "hsi": LINES, "truth": TRUTH}

    class Params(Section):
        seed: int = Field(1, ge=0)
        camera: int = Field(1, ge=0, description="which cameras of their models the machine has: the HSI camera's "
                            "fixed pattern (dark level, bad pixels) and the serials SIM-RGB-<camera> and "
                            "SIM-HSI-<camera>. The belt's seed leaves them alone, "
                            "as running other material leaves a machine's camera alone; another value plays a "
                            "replacement camera, which needs calibrating again")
        cameras: list[Literal["rgb", "hsi"]] = Field(
            list(CAMERAS), min_length=1, description="the cameras this node plays (and the truth with rgb); "
            "two nodes with the same seed, one per camera, publish what one node with both would")
        scene: Literal["belt", "target", "white", "dark"] = Field(
            "belt", description="belt: objects; target: calibration boards; white/dark: spectral references")
        occupancy: float = Field(0.3, ge=0, le=0.9, description="fraction of the belt covered by objects")
        mix: dict[str, float] = Field(default_factory=dict, description="class → weight; empty: the default mix")
        materials: list[str] = Field(default_factory=list, description="only objects of these classes (weighed as "
                                     "in the mix), e.g. [\"PP\"] for a teach-in run of one material; from the "
                                     "environment: PP or PET,PP; empty: every class of the mix. An empty belt: "
                                     "occupancy = 0")
        cluster: float = Field(0.3, ge=0, le=1, description="chance an object touches the one before it")
        speed_m_s: float = Field(0.0, ge=0, le=10, description="0: the belt's nominal speed")
        drift: float = Field(0.02, ge=0, le=0.5, description="slow speed drift, relative amplitude")
        jitter: float = Field(0.005, ge=0, le=0.2, description="speed jitter per 20 mm, relative")
        misregistration: MisregistrationParams = MisregistrationParams()
        paced: bool = Field(True, description="false: as fast as the graph accepts (recording, training data)")
        seconds: float = Field(0.0, ge=0, description="belt time to simulate, then end the stream; 0: no end")
        drop_rate: float = Field(0.0, ge=0, le=0.5, description="chance a frame is lost (a gap), per message")
        max_lag_ms: float = Field(100.0, gt=0, description="paced: a frame this late is lost, as a camera's "
                                  "buffers overrun when the host cannot keep up")
        camera_stops: dict[Literal["rgb", "hsi"], float] = Field(
            default_factory=dict, description="camera -> belt time (s) from which it delivers nothing more, "
            "as a camera unplugged does (the other goes on)")

        @field_validator("cameras")
        @classmethod
        def _once_each(cls, cameras):
            if len(set(cameras)) != len(cameras):
                raise ValueError(f"each camera once: {cameras}")
            return cameras

        @field_validator("materials", mode="before")
        @classmethod
        def _listed(cls, materials):
            # An environment override (SORTLINE_NODES__BELT__PARAMS__MATERIALS=PET,PP) arrives as one string.
            return [m.strip() for m in materials.split(",") if m.strip()] if isinstance(materials, str) else materials

        @field_validator("mix", "materials")
        @classmethod
        def _known_classes(cls, names):
            unknown = set(names) - set(CLASSES[1:])
            if unknown:
                raise ValueError(f"unknown classes {sorted(unknown)}; known: {', '.join(CLASSES[1:])}")
            return names

        def belt_mix(self) -> dict[str, float] | None:
            """The class weights of the belt: the mix, narrowed to `materials` where they are given."""
            if not self.materials:
                return self.mix or None
            mix = self.mix or DEFAULT_MIX
            return {m: mix.get(m) or 1.0 for m in self.materials}

    def setup(self) -> None:
        p = self.params
        unplayed = [port for port in ("rgb", "hsi", "truth") if self.out[port].edges
                    and (port if port != "truth" else "rgb") not in p.cameras]
        if unplayed:
            # Not an error: a recorder connects every port of every source (`--record`).
            self.log.warning("cameras = %s: nothing comes out of port %s (the truth goes with the RGB camera); "
                             "the node that plays it has to feed its edges", p.cameras, ", ".join(unplayed))
        self.sim = Simulation(self.machine, seed=p.seed, scene=p.scene, occupancy=p.occupancy, mix=p.belt_mix(),
                              cluster=p.cluster, speed_m_s=p.speed_m_s, drift=p.drift, jitter=p.jitter,
                              misregistration=Misregistration(**p.misregistration.model_dump()),
                              cameras=tuple(p.cameras), camera=p.camera)
        cams = self.machine.cameras
        self.cam = {"rgb": cams.rgb, "hsi": cams.hsi}
        self.frame = {"rgb": 0, "hsi": 0}     # next frame index along the belt (dropped ones count)
        self.seq = {"rgb": 0, "hsi": 0}       # next message number (contiguous)
        self.gap = {"rgb": False, "hsi": False}
        self.dropped = {"rgb": 0, "hsi": 0}
        self.overruns = 0
        self.want_truth = bool(self.out["truth"].edges) and "rgb" in p.cameras
        # A camera nobody listens to is not drawn (the truth goes with the RGB frames, so RGB always is).
        self.cameras = [c for c in p.cameras if c == "rgb" or self.out[c].edges] or list(p.cameras)
        self.t0 = 0
        self.meta = {"rgb": CameraMeta("rgb", f"SIM-RGB-{p.camera}", "RGB8", 8),
                     "hsi": CameraMeta("hsi", f"SIM-HSI-{p.camera}", "Mono12", 12)}
        self.log.info("%s scene (%s), seed %d, %.2f m/s; playing %s (rgb %s lines/frame, hsi %s lines/frame), truth %s",
                      p.scene, "empty belt" if not p.occupancy else ", ".join(p.materials) or "mixed", p.seed,
                      p.speed_m_s or self.machine.belt.speed_m_s, " and ".join(self.cameras),
                      cams.rgb.lines_per_frame, cams.hsi.lines_per_frame, "on" if self.want_truth else "off")

    def _span(self, stream: str) -> tuple[int, int]:
        cam = self.cam[stream]
        start = self.frame[stream] * cam.lines_per_frame * cam.ticks_per_line
        return start, start + cam.lines_per_frame * cam.ticks_per_line

    def step(self):
        p = self.params
        self.t0 = self.t0 or time.monotonic_ns()
        # The next frame to complete on the belt, whichever camera it is.
        stream = min(self.cameras, key=lambda s: self.sim.motion.time_s(self._span(s)[1]))
        start, end = self._span(stream)
        if p.seconds and self.sim.motion.time_s(start) >= p.seconds:
            self.finish()
            return None
        complete_ns = self.t0 + int(self.sim.motion.time_s(end) * 1e9)
        if p.paced and not self.sleep_until(complete_ns):
            return None
        frame = self.frame[stream]
        self.frame[stream] += 1
        if stream in p.camera_stops and self.sim.motion.time_s(start) >= p.camera_stops[stream]:
            return None   # unplugged: no message, no gap flag (nothing will come after it)
        if p.drop_rate and np.random.default_rng([p.seed, 99, STREAM_ID[stream], frame]).random() < p.drop_rate:
            self.dropped[stream] += 1
            self.gap[stream] = True
            return None
        if p.paced and time.monotonic_ns() - complete_ns > p.max_lag_ms * 1e6:
            # Behind the belt (this machine is too busy): a camera would lose frames, not fall behind.
            self.overruns += 1
            self.gap[stream] = True
            return None
        cam = self.cam[stream]
        fields = dict(seq=self.seq[stream], position=start, ticks_per_line=cam.ticks_per_line,
                      device_ts_ns=self.t0 + int(self.sim.motion.time_s(start) * 1e9), host_ts=True,
                      gap=self.gap[stream])
        dtype = np.uint8 if stream == "rgb" else np.uint16
        msg = self.out[stream].new({"lines": ((cam.lines_per_frame, cam.pixels, cam.bands), dtype)},
                                   stream=stream, meta=self.meta[stream], **fields)
        if msg is None:
            self.gap[stream] = True     # no room downstream (counted there): this frame is lost
            return None
        getattr(self.sim, stream)(frame, out=msg.arrays["lines"])
        msg.t_in_ns = complete_ns if p.paced else time.monotonic_ns()
        self.seq[stream] += 1
        self.gap[stream] = False
        outputs = [(stream, msg)]
        if stream == "rgb" and self.want_truth:
            maps, objects = self.sim.truth(frame)
            truth = self.out["truth"].new({k: (v.shape, v.dtype) for k, v in maps.items()}, stream="truth",
                                          meta=TruthMeta(list(CLASSES), objects, PALETTE.tolist()), **fields)
            if truth is not None:
                for k, v in maps.items():
                    truth.arrays[k][...] = v
                truth.t_in_ns = msg.t_in_ns
                outputs.append(("truth", truth))
        return outputs

    def status(self) -> dict:
        return {"rgb": self.seq["rgb"], "hsi": self.seq["hsi"], "dropped": sum(self.dropped.values()),
                "overruns": self.overruns,
                "belt_m": round(max(self._span(c)[0] for c in self.cameras) / self.machine.belt.ticks_per_mm / 1000, 2)}
