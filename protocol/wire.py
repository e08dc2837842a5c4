"""The engine <-> dashboard wire format: a JSON header, then raw little-endian arrays.

Multipart ZMQ messages whose first part is a UTF-8 JSON header carrying the schema version and,
for each following part, the array's name, dtype and shape.  No pickle on our sockets.
"""
from __future__ import annotations

import json

import numpy as np

WIRE_SCHEMA = 1


class WireError(ValueError):
    """A message that does not follow the wire format."""


def encode(header: dict, arrays: dict[str, np.ndarray] | None = None) -> list[bytes]:
    """Header dict + named arrays -> multipart frames."""
    arrays = arrays or {}
    parts, specs = [], []
    for name, arr in arrays.items():
        a = np.asarray(arr)
        if a.dtype == object:
            raise WireError(f"array {name!r} has dtype object; only numeric arrays go on the wire")
        a = np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("<") if a.dtype.byteorder == ">" else a.dtype)
        specs.append({"name": name, "dtype": a.dtype.str, "shape": list(a.shape)})
        parts.append(a.tobytes())
    head = dict(header, schema=WIRE_SCHEMA, arrays=specs)
    return [json.dumps(head, allow_nan=True).encode()] + parts


def decode(frames: list[bytes]) -> tuple[dict, dict[str, np.ndarray]]:
    """Multipart frames -> (header, arrays); a clear WireError for anything malformed."""
    if not frames:
        raise WireError("empty message")
    try:
        header = json.loads(bytes(frames[0]))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise WireError(f"message header is not JSON: {exc}") from None
    if not isinstance(header, dict) or header.get("schema") != WIRE_SCHEMA:
        raise WireError(f"message schema {header.get('schema') if isinstance(header, dict) else None!r}, expected {WIRE_SCHEMA}")
    specs = header.get("arrays", [])
    if len(specs) != len(frames) - 1:
        raise WireError(f"header announces {len(specs)} arrays, message carries {len(frames) - 1}")
    arrays = {}
    for spec, buf in zip(specs, frames[1:]):
        dtype = np.dtype(spec["dtype"])
        if dtype.kind not in "biuf":
            raise WireError(f"array {spec['name']!r} has unsupported dtype {spec['dtype']}")
        shape = tuple(spec["shape"])
        if dtype.itemsize * int(np.prod(shape)) != len(buf):
            raise WireError(f"array {spec['name']!r}: {len(buf)} bytes for shape {shape} {dtype}")
        arrays[spec["name"]] = np.frombuffer(bytes(buf), dtype).reshape(shape)
    return header, arrays
