"""The protocol the engine (`stemlive.live`) and the dashboard (`stemlive.dashboards`) both speak:
the wire format of their ZMQ messages, the requests the publisher answers, and the access rules
of every stemlive socket.  Both sides import it; neither imports the other for it.
"""
from .requests import REQUESTS, RequestError, pacbed_request, parse_request, state_request
from .security import check_bind, check_token, is_loopback, secure_client, secure_server
from .wire import WIRE_SCHEMA, WireError, decode, encode

__all__ = ["REQUESTS", "RequestError", "WIRE_SCHEMA", "WireError", "check_bind", "check_token", "decode", "encode",
           "is_loopback", "pacbed_request", "parse_request", "secure_client", "secure_server", "state_request"]
