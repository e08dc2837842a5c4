"""Requests to the publisher's REP socket: JSON objects, checked on arrival.

``{"type": "state"}``: the full current state; ``{"type": "pacbed", "block": [i, j]}``: one
block's mean PACBED and estimates; ``{"type": "rings", "rings": {name: [inner, outer, unit]}}``:
ring images of the whole scan for rings the operator chose (unit "alpha", "mrad" or "px"), summed
from the per-frame radial profiles (`protocol/rings.py`).  Replies are wire messages
(`wire.py`); a refused request gets ``{"type": "error", "error": ...}``.
"""
from __future__ import annotations

import json
import math
import re

REQUESTS = ("state", "pacbed", "rings")
RING_UNITS = ("alpha", "mrad", "px")
MAX_RINGS = 8  # one request: the four standard detectors, a custom annulus and a few spare
_RING_NAME = re.compile(r"^[A-Za-z0-9_-]{1,32}$")


class RequestError(ValueError):
    """A request the publisher cannot answer (not JSON, an unknown type, a malformed block or ring)."""


def state_request() -> dict:
    return {"type": "state"}


def pacbed_request(i: int, j: int) -> dict:
    return {"type": "pacbed", "block": [int(i), int(j)]}


def check_rings(rings) -> dict[str, tuple[float, float, str]]:
    """{name: (inner, outer, unit)} checked: short names, finite numbers, 0 <= inner < outer, a
    known unit, at most MAX_RINGS rings.  RequestError naming the first thing wrong (the same
    check on both sides, so a dashboard learns of a bad ring before it asks)."""
    if not isinstance(rings, dict) or not rings:
        raise RequestError(f"\"rings\" must be a non-empty object {{name: [inner, outer, unit]}}, got {rings!r}")
    if len(rings) > MAX_RINGS:
        raise RequestError(f"at most {MAX_RINGS} rings per request, got {len(rings)}")
    out = {}
    for name, spec in rings.items():
        if not isinstance(name, str) or not _RING_NAME.match(name):
            raise RequestError(f"ring name {name!r}: use 1-32 letters, digits, '_' or '-'")
        if not (isinstance(spec, (list, tuple)) and len(spec) == 3):
            raise RequestError(f"ring {name!r}: need [inner, outer, unit], got {spec!r}")
        inner, outer, unit = spec
        for what, v in (("inner", inner), ("outer", outer)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise RequestError(f"ring {name!r}: {what} radius must be a finite number, got {v!r}")
        if not 0 <= inner < outer:
            raise RequestError(f"ring {name!r}: need 0 <= inner < outer, got inner {inner}, outer {outer}")
        if unit not in RING_UNITS:
            raise RequestError(f"ring {name!r}: unit must be one of {', '.join(RING_UNITS)}, got {unit!r}")
        out[name] = (float(inner), float(outer), unit)
    return out


def rings_request(rings: dict) -> dict:
    """Ring images of the whole scan for ``rings`` = {name: (inner, outer, unit)} (checked here)."""
    return {"type": "rings", "rings": {k: list(v) for k, v in check_rings(rings).items()}}


def parse_request(raw: bytes) -> tuple[str, tuple]:
    """(kind, arguments) of a request's bytes; RequestError naming what is wrong."""
    try:
        req = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RequestError(f"request is not JSON: {exc}") from None
    kind = req.get("type") if isinstance(req, dict) else None
    if kind not in REQUESTS:
        raise RequestError(f"unknown request type {kind!r}; use one of {', '.join(map(repr, REQUESTS))}")
    if kind == "pacbed":
        block = req.get("block")
        if not (isinstance(block, list) and len(block) == 2 and all(isinstance(v, int) for v in block)):
            raise RequestError(f"a pacbed request needs \"block\": [i, j] (two integers), got {block!r}")
        return kind, tuple(block)
    if kind == "rings":
        return kind, (check_rings(req.get("rings")),)
    return kind, ()
