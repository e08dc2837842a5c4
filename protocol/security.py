"""Loopback by default; beyond it, only with an access token (ZMQ CURVE keys derived from it).

The server's CURVE key pair is derived from the token, so only a client that knows the token
knows the server's public key and can complete the handshake; the traffic is encrypted.
"""
from __future__ import annotations

import hashlib
import ipaddress
from urllib.parse import urlparse

import zmq
from zmq.utils import z85


def is_loopback(address: str) -> bool:
    """True for tcp://127.x.x.x / [::1] / localhost and for ipc:// and inproc:// addresses."""
    if not address.startswith("tcp://"):
        return address.startswith(("ipc://", "inproc://"))
    host = urlparse(address).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # an interface name or a host name: not loopback


MIN_TOKEN_CHARS = 16  # ~96 bits from a random URL-safe token: not guessable over a network


def check_token(token: str | None) -> None:
    """Refuse a guessable access token (it derives the encryption keys and signs dashboard sessions)."""
    if token is None:
        return
    if len(token) < MIN_TOKEN_CHARS or len(set(token)) < 6:
        raise ValueError(f"the access token is too weak ({len(token)} characters, {len(set(token))} distinct): "
                         f"use at least {MIN_TOKEN_CHARS} random characters, e.g. from "
                         "`python -c \"import secrets; print(secrets.token_urlsafe(24))\"`")


def check_bind(address: str, token: str | None) -> None:
    """Refuse to bind beyond loopback without an access token, and any weak token."""
    check_token(token)
    if not is_loopback(address) and not token:
        raise PermissionError(f"binding {address} exposes the results beyond this machine: give an access token "
                              "(--token, or STEMLIVE_TOKEN) or bind 127.0.0.1")


def server_keys(token: str) -> tuple[bytes, bytes]:
    """(public, secret) CURVE keys of a server, derived from the token."""
    secret = z85.encode(hashlib.sha256(b"stemlive-curve:" + token.encode()).digest())
    return zmq.curve_public(secret), secret


def secure_server(sock: zmq.Socket, token: str) -> None:
    public, secret = server_keys(token)
    sock.curve_secretkey = secret
    sock.curve_publickey = public
    sock.curve_server = True


def secure_client(sock: zmq.Socket, token: str) -> None:
    """Make ``sock`` a CURVE client of a stemlive server that uses ``token``."""
    public, _ = server_keys(token)
    client_public, client_secret = zmq.curve_keypair()
    sock.curve_serverkey = public
    sock.curve_publickey = client_public
    sock.curve_secretkey = client_secret
