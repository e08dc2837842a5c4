"""Requests to the publisher's REP socket: JSON objects, checked on arrival.

``{"type": "state"}``: the full current state; ``{"type": "pacbed", "block": [i, j]}``: one
block's mean PACBED and estimates.  Replies are wire messages (`wire.py`); a refused request gets
``{"type": "error", "error": ...}``.
"""
from __future__ import annotations

import json

REQUESTS = ("state", "pacbed")


class RequestError(ValueError):
    """A request the publisher cannot answer (not JSON, an unknown type, a malformed block)."""


def state_request() -> dict:
    return {"type": "state"}


def pacbed_request(i: int, j: int) -> dict:
    return {"type": "pacbed", "block": [int(i), int(j)]}


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
    return kind, ()
