"""The acquisition node: one GenICam camera as a source of line messages.

Setup opens the producers, chooses the device, sets its features and checks
that what it delivers fits the configured camera geometry: all of that is a
configuration matter (exit 78, no restart loop) when it fails. From then on
the acquisition thread keeps the camera going through losses and reconnects,
and this node publishes each full ring slot as one message.
"""

from __future__ import annotations

import time
from typing import Literal

import numpy as np
from pydantic import Field, model_validator

from sortline.nodes.acquire import device
from sortline.nodes.acquire.acquisition import Acquisition
from sortline.nodes.acquire.camera import Camera
from sortline.nodes.acquire.features import Feature, FeatureError
from sortline.nodes.streams import LINES, CameraMeta
from sortline.pipeline.config import ConfigError, Section
from sortline.pipeline.node import Node

TAKE_WAIT_S = 0.1  # the main loop's wait for a message: short, so heartbeats and stops are prompt


class Acquire(Node):
    outputs = {"out": LINES}

    class Params(Section):
        camera: Literal["rgb", "hsi"] = "rgb"
        stream: str = Field("", description="stream name; empty: the camera key")
        cti: list[str] = Field([], description="GenTL producers; empty: [genicam].cti, then GENICAM_GENTL64_PATH")
        serial: str = Field("", description="choose the device by serial number...")
        user_name: str = Field("", description="... and/or by its user-defined name...")
        model: str = Field("", description="... and/or by model; every key given must match")
        features: list[Feature] = Field([], description="GenICam features to set, in this order")
        layout: Literal["lines", "spectral_rows", "spectral_columns"] = Field(
            "lines", description="lines: frame rows are belt lines (RGB, mono); spectral_rows / spectral_columns: "
            "a pushbroom frame is one line, with bands along its rows / columns")
        reverse_bands: bool = Field(False, description="the sensor's spectral axis runs from long to short wavelengths")
        chunks: bool = Field(True, description="read frame id, timestamp and encoder value chunks where offered")
        buffers: int = Field(16, ge=2, le=256, description="GenTL buffers announced to the producer: how many "
                             "frames it can hold while the node is held up (harvesters' own default is 3)")
        ring: int = Field(16, ge=2, le=1024, description="message slots between the acquisition thread and the graph")
        fetch_timeout_s: float = Field(0.1, gt=0, le=5)
        stall_timeout_s: float = Field(2.0, ge=0, le=600, description="no frame for this long: the camera is lost "
                                       "and reopened; 0: never (a triggered camera on a belt that stops)")
        reconnect_backoff_s: float = Field(0.5, gt=0, le=60)
        reconnect_backoff_max_s: float = Field(10.0, gt=0, le=600)
        startup_wait_s: float = Field(5.0, ge=0, le=600, description="how long setup looks for the device")
        encoder_bits: int = Field(32, ge=8, le=64, description="width of the camera's encoder counter (it wraps)")
        count: int = Field(0, ge=0, description="messages to publish, then end the stream; 0: no end")

        @model_validator(mode="after")
        def _backoff(self):
            if self.reconnect_backoff_max_s < self.reconnect_backoff_s:
                raise ValueError("reconnect_backoff_max_s must be at least reconnect_backoff_s")
            return self

    def setup(self) -> None:
        p = self.params
        cam = getattr(self.machine.cameras, p.camera)
        self.stream = p.stream or p.camera
        self.ticks_per_line = cam.ticks_per_line
        cti = p.cti or self.machine.genicam.cti or device.default_cti()
        selector = {"serial": p.serial, "user_name": p.user_name, "model": p.model}
        where = f"nodes.{self.name}.params"

        def open_camera() -> Camera:
            return Camera(cti, selector, list(p.features), p.layout, p.reverse_bands, p.buffers, p.chunks, self.log)

        self.acq = Acquisition(self.name, open_camera, cam.lines_per_frame, cam.ticks_per_line, p.ring,
                               p.fetch_timeout_s, p.stall_timeout_s, p.reconnect_backoff_s,
                               p.reconnect_backoff_max_s, p.encoder_bits, self.log, self.start_thread)
        deadline = time.monotonic() + p.startup_wait_s
        while True:
            try:
                camera = self.acq.connect()
                break
            except device.DeviceError as exc:
                # A camera still booting may appear shortly; a wrong selector never will.
                if time.monotonic() >= deadline or exc.final:
                    raise ConfigError([f"{where}: {exc}"]) from None
                if not self.sleep_until(time.monotonic_ns() + 500_000_000):
                    self.log.info("stopped while looking for the camera: %s", exc)
                    raise SystemExit(0)
            except (FeatureError, ValueError) as exc:
                raise ConfigError([f"{where}: {exc}"]) from None
        shape = camera.shape
        if (shape.pixels, shape.channels) != (cam.pixels, cam.bands):
            self.acq.stop()
            raise ConfigError([f"{where}: {camera.info.label()} delivers {shape.pixels} pixels x {shape.channels} "
                               f"channels per line; cameras.{p.camera} says pixels = {cam.pixels}, bands = {cam.bands}"])
        fmt = shape.fmt
        self.shape = (cam.lines_per_frame, shape.pixels, shape.channels)
        self.dtype = shape.dtype
        # Spectral references are only valid at the exposure they were taken at: recordings say which.
        exposure = camera.applied.get("ExposureTime")
        self.meta = CameraMeta(p.camera, camera.info.serial, fmt.name, fmt.bit_depth,
                               float(exposure) if isinstance(exposure, (int, float)) else None)
        self.seq = 0
        self.log.info("%s: %s, %dx%d %s frames -> messages %s %s, %d frames each; applied %s",
                      self.stream, camera.info.label(), shape.width, shape.height, fmt.name, self.shape,
                      self.dtype.name, self.acq.batch_frames, camera.applied)
        self.started = False

    def step(self):
        if not self.started:
            self.acq.start()
            self.started = True
        if self.params.count and self.seq >= self.params.count:
            self.finish()
            return None
        batch = self.acq.take(TAKE_WAIT_S)
        if batch is None:
            return None
        try:
            lines = self.acq.ring.data[batch.slot, :batch.lines]
            msg = self.out["out"].new(
                {"lines": (lines.shape, self.dtype)}, stream=self.stream, seq=self.seq, position=batch.position,
                ticks_per_line=self.ticks_per_line, device_ts_ns=batch.device_ts_ns, host_ts=batch.host_ts,
                gap=batch.gap, meta=self.meta)
            if msg is None:  # stopping while a lossless consumer holds every slot
                return None
            np.copyto(msg.arrays["lines"], lines)
        finally:
            self.acq.release(batch)
        msg.t_in_ns = batch.ready_ns
        self.seq += 1
        return [("out", msg)]

    def status(self) -> dict:
        acq = getattr(self, "acq", None)
        if acq is None or not hasattr(acq, "ring"):
            return {}
        c = acq.counts
        status = {"connected": int(acq.connected), "state": acq.state, "fps": round(acq.fps, 1),
                  "frames": c["frames"], "messages": self.seq,
                  "lost": c["lost_device"] + c["lost_ring_full"] + c["lost_outage"], **c, "queued": acq.ring.queued()}
        if acq.error:
            status["error"] = acq.error
        return status

    def teardown(self) -> None:
        if hasattr(self, "acq"):
            self.acq.stop()
        device.close()
