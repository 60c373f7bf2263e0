"""Camera frames to message arrays: pixel formats and axis orders.

Pure numpy/OpenCV, importable without a camera or a GenTL producer, so the
conversions are tested on plain arrays (formats the simulated producer does
not offer: Bayer, Mono12, BGR8). Each conversion reads the frame once and
writes straight into its destination (a slot of the acquisition ring): that
is the one copy out of the GenTL buffer, after which the buffer can go back
to the producer.

Message arrays are (lines, pixels, channels): RGB in R,G,B order, HSI with
bands in ascending wavelength, mono cameras with one channel.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import cv2
import numpy as np

Layout = Literal["lines", "spectral_rows", "spectral_columns"]


@dataclass(frozen=True)
class PixelFormat:
    name: str
    channels: int  # channels in the frame buffer (RGBa8 has 4, of which 3 are kept)
    dtype: str  # the buffer's container type, and the message's dtype
    bit_depth: int
    color: Literal["rgb", "bgr"] | None = None  # the order of the buffer's colour channels
    bayer: int | None = None  # OpenCV demosaicing code

    @property
    def out_channels(self) -> int:
        return 3 if self.color is not None or self.bayer is not None else 1


def _formats() -> dict[str, PixelFormat]:
    table = {}
    for bits in (8, 10, 12, 14, 16):
        dtype = "uint8" if bits == 8 else "uint16"
        table[f"Mono{bits}"] = PixelFormat(f"Mono{bits}", 1, dtype, bits)
    table["RGB8"] = PixelFormat("RGB8", 3, "uint8", 8, color="rgb")
    table["BGR8"] = PixelFormat("BGR8", 3, "uint8", 8, color="bgr")
    table["RGBa8"] = PixelFormat("RGBa8", 4, "uint8", 8, color="rgb")
    table["BGRa8"] = PixelFormat("BGRa8", 4, "uint8", 8, color="bgr")
    # PFNC names the 2x2 cell by its top-left pixels, as do OpenCV's four-letter
    # codes (its older two-letter codes are shifted by one pixel: avoid them).
    for cell, code in (("RG", cv2.COLOR_BayerRGGB2RGB), ("GR", cv2.COLOR_BayerGRBG2RGB),
                       ("GB", cv2.COLOR_BayerGBRG2RGB), ("BG", cv2.COLOR_BayerBGGR2RGB)):
        for bits in (8, 10, 12, 16):
            dtype = "uint8" if bits == 8 else "uint16"
            table[f"Bayer{cell}{bits}"] = PixelFormat(f"Bayer{cell}{bits}", 1, dtype, bits, bayer=code)
    return table


FORMATS = _formats()


def pixel_format(name: str) -> PixelFormat:
    """The format named by the device's PixelFormat, or ValueError naming those supported."""
    try:
        return FORMATS[name]
    except KeyError:
        raise ValueError(f"pixel format {name!r} is not supported (packed formats such as Mono12p are not); "
                         f"supported: {', '.join(FORMATS)}") from None


@dataclass(frozen=True)
class FrameShape:
    """How one camera frame maps onto message lines."""

    fmt: PixelFormat
    width: int  # frame columns, as the device reports them
    height: int  # frame rows
    layout: Layout = "lines"
    reverse_bands: bool = False  # the sensor's spectral axis runs from long to short wavelengths

    def __post_init__(self):
        if self.layout != "lines" and (self.fmt.channels != 1 or self.fmt.bayer is not None):
            raise ValueError(f"a hyperspectral layout ({self.layout}) needs a mono pixel format, not {self.fmt.name}")

    @property
    def lines(self) -> int:
        """Message lines one frame gives: every row of a line-scan frame, one line of a pushbroom frame."""
        return self.height if self.layout == "lines" else 1

    @property
    def pixels(self) -> int:
        return self.height if self.layout == "spectral_columns" else self.width

    @property
    def channels(self) -> int:
        if self.layout == "spectral_rows":
            return self.height
        if self.layout == "spectral_columns":
            return self.width
        return self.fmt.out_channels

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.fmt.dtype)

    def frame_bytes(self) -> int:
        return self.width * self.height * self.fmt.channels * self.dtype.itemsize


def frame_view(data: np.ndarray, shape: FrameShape) -> np.ndarray:
    """The buffer's bytes as a (rows, columns, buffer channels) array, no copy."""
    raw = np.asarray(data).reshape(-1).view(np.uint8)
    need = shape.frame_bytes()
    if raw.size < need:
        raise ValueError(f"frame of {raw.size} bytes, {shape.width}x{shape.height} {shape.fmt.name} needs {need}")
    return raw[:need].view(shape.dtype).reshape(shape.height, shape.width, shape.fmt.channels)


_COLOR_CODES = {(3, "rgb"): None, (3, "bgr"): cv2.COLOR_BGR2RGB,
                (4, "rgb"): cv2.COLOR_RGBA2RGB, (4, "bgr"): cv2.COLOR_BGRA2RGB}


def convert(data: np.ndarray, shape: FrameShape, out: np.ndarray) -> np.ndarray:
    """Write one frame into `out`, of shape (shape.lines, shape.pixels, shape.channels)."""
    frame = frame_view(data, shape)
    fmt = shape.fmt
    if shape.layout == "spectral_rows":  # rows are bands: (bands, pixels) -> (1, pixels, bands)
        src = frame[:, :, 0].T
    elif shape.layout == "spectral_columns":  # rows are pixels: (pixels, bands) -> (1, pixels, bands)
        src = frame[:, :, 0]
    elif fmt.bayer is not None:
        cv2.cvtColor(frame[:, :, 0], fmt.bayer, dst=out)
        return out
    elif fmt.color is not None:
        # OpenCV, not a strided numpy copy: 40x faster for an 800x800 RGBa8 frame (0.1 ms, not 5).
        code = _COLOR_CODES[(fmt.channels, fmt.color)]
        if code is None:
            np.copyto(out, frame)
        else:
            cv2.cvtColor(frame, code, dst=out)
        return out
    else:
        src = frame
    if shape.layout != "lines":
        src = src[None, :, ::-1] if shape.reverse_bands else src[None]
    np.copyto(out, src)
    return out
