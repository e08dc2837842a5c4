"""A minimal DigitalMicrograph 3/4 writer for tests (RosettaSciIO reads DM files but writes none).

Writes the tag structure GMS uses for a plain image: ImageList/<group>/ImageData/{Data,
DataType, Dimensions, Calibrations}, header and tag headers big-endian, data little-endian.
"""
from __future__ import annotations

import struct

import numpy as np

_TAG_TYPE = {np.dtype("int16"): (2, "h"), np.dtype("int32"): (3, "i"), np.dtype("uint16"): (4, "H"),
             np.dtype("uint32"): (5, "I"), np.dtype("float32"): (6, "f"), np.dtype("float64"): (7, "d"),
             np.dtype("uint8"): (10, "B")}
_IMAGE_TYPE = {np.dtype("int16"): 1, np.dtype("float32"): 2, np.dtype("uint8"): 6, np.dtype("int32"): 7,
               np.dtype("uint16"): 10, np.dtype("uint32"): 11, np.dtype("float64"): 12}


_V = {"n": ">i", "v": 3}  # the version being written: DM4 uses 8-byte counts and tag lengths


def _name(name: str) -> bytes:
    return struct.pack(">h", len(name)) + name.encode()


def _data(name: str, info: list[int], payload: bytes) -> bytes:
    n = _V["n"]
    pad = b"\x00" * 8 if _V["v"] == 4 else b""
    return (b"\x15" + _name(name) + pad + b"%%%%" + struct.pack(n, len(info))
            + b"".join(struct.pack(n, i) for i in info) + payload)


def _scalar(name: str, value, kind: str) -> bytes:
    code = {"i": 3, "f": 6}[kind]
    return _data(name, [code], struct.pack("<" + kind, value))


def _text(name: str, text: str) -> bytes:
    return _data(name, [20, 4, len(text)], struct.pack(f"<{len(text)}H", *map(ord, text)))


def _group(name: str, tags: list[bytes]) -> bytes:
    body = b"".join(tags)
    size = struct.pack(">q", len(body)) if _V["v"] == 4 else b""
    return b"\x14" + _name(name) + b"\x00\x01" + size + struct.pack(_V["n"], len(tags)) + body


def write_dm(path, image: np.ndarray, title: str = "PACBED", version: int = 3) -> None:
    _V.update(v=version, n=">q" if version == 4 else ">i")
    image = np.ascontiguousarray(image)
    if image.dtype not in _IMAGE_TYPE:
        raise ValueError(f"dtype {image.dtype} not supported")
    code, fmt = _TAG_TYPE[image.dtype]
    calib = _group("", [_scalar("Origin", 0.0, "f"), _scalar("Scale", 1.0, "f"), _text("Units", "")])
    image_data = _group("ImageData", [
        _group("Calibrations", [_group("Brightness", [_scalar("Origin", 0.0, "f"), _scalar("Scale", 1.0, "f"),
                                                      _text("Units", "")]),
                                _group("Dimension", [calib] * image.ndim)]),
        _data("Data", [20, code, image.size], image.astype(image.dtype.newbyteorder("<")).tobytes()),
        _scalar("DataType", _IMAGE_TYPE[image.dtype], "i"),
        _group("Dimensions", [_scalar("", n, "i") for n in image.shape[::-1]]),
        _scalar("PixelDepth", image.dtype.itemsize, "i"),
    ])
    root = [_group("ImageList", [_group("", [image_data, _group("ImageTags", []), _text("Name", title)])])]
    body = b"\x00\x01" + struct.pack(_V["n"], len(root)) + b"".join(root)
    header = struct.pack(">i", version) + struct.pack(_V["n"], len(body) + 4) + struct.pack(">i", 1)
    with open(path, "wb") as fh:
        fh.write(header + body + b"\x00" * 8)
