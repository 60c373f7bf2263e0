"""Foxglove's well-known message schemas (protobuf), as the recorder and the live view send them.

The classes come from foxglove-schemas-protobuf (Foxglove's own generated code); a
channel's schema is the FileDescriptorSet of the message's .proto file and those it
imports, which is what Foxglove and the mcap library's protobuf decoder build the
message class from: a reader needs neither sortline nor these classes.
"""

from __future__ import annotations

import numpy as np
from foxglove_schemas_protobuf.RawImage_pb2 import RawImage
from google.protobuf.descriptor_pb2 import FileDescriptorSet

ENCODING = "protobuf"   # the schema encoding and the message encoding of these channels


def schema_of(message_class) -> tuple[str, bytes]:
    """(schema name, FileDescriptorSet) of a generated message class: its file and every file it imports."""
    files = FileDescriptorSet()
    seen: set[str] = set()

    def add(fd) -> None:
        if fd.name in seen:
            return
        seen.add(fd.name)
        for dep in fd.dependencies:   # imports first: a reader adds them to its pool in this order
            add(dep)
        fd.CopyToProto(files.file.add())

    add(message_class.DESCRIPTOR.file)
    return message_class.DESCRIPTOR.full_name, files.SerializeToString()


def raw_image(pixels: np.ndarray, time_ns: int, frame_id: str = "belt") -> bytes:
    """A foxglove.RawImage (rgb8) of (rows, columns, 3) uint8 pixels, R, G, B."""
    if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[2] != 3:
        raise ValueError(f"a picture is (rows, columns, 3) uint8, not {pixels.shape} {pixels.dtype}")
    rows, cols = pixels.shape[:2]
    image = RawImage(width=cols, height=rows, encoding="rgb8", step=cols * 3,
                     data=np.ascontiguousarray(pixels).tobytes(), frame_id=frame_id)
    image.timestamp.FromNanoseconds(time_ns)
    return image.SerializeToString()
