"""The wire format now lives in `stemlive.protocol.wire` (shared with the dashboard); this name stays."""
from ..protocol.wire import WIRE_SCHEMA, WireError, decode, encode

__all__ = ["WIRE_SCHEMA", "WireError", "decode", "encode"]
