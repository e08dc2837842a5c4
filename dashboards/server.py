"""The Bokeh server: one feed per process, one document per browser session.

Binds 127.0.0.1 with the websocket origin set to it; another address is opt-in and then needs
an access token (Bokeh's signed session ids, keyed by the token).
"""
from __future__ import annotations

from functools import partial

from ..protocol.security import check_token, is_loopback


def make_server(feed, port: int = 5006, address: str = "127.0.0.1", token: str | None = None,
                holder_axis_deg: float | None = None):
    """A started-but-not-running Bokeh Server serving the dashboard at /.  ``holder_axis_deg``:
    the holder's α axis on the detector (region statistics then give holder α/β)."""
    from bokeh.application import Application
    from bokeh.application.handlers.function import FunctionHandler
    from bokeh.server.server import Server

    from .app import make_document

    check_token(token)
    loopback = is_loopback(f"tcp://{address}:1")
    if not loopback and not token:
        raise PermissionError(f"serving the dashboard on {address} needs an access token (--token or "
                              "STEMLIVE_TOKEN); without one it binds 127.0.0.1")
    kw = {}
    if token:  # signed session ids: only a URL carrying a session id signed with the token opens
        kw.update(sign_sessions=True, generate_session_ids=False, secret_key=token.encode())
    origins = [f"127.0.0.1:{port}", f"localhost:{port}"] + ([f"{address}:{port}"] if not loopback else [])
    app = Application(FunctionHandler(partial(make_document, feed=feed, holder_axis_deg=holder_axis_deg)))
    server = Server({"/": app}, port=port, address=address, allow_websocket_origin=origins,
                    num_procs=1, **kw)
    server.start()
    return server


def signed_url(port: int, address: str, token: str) -> str:
    """A URL with a session id signed by the token (what a remote operator opens)."""
    from bokeh.util.token import generate_session_id

    sid = generate_session_id(secret_key=token.encode(), signed=True)
    return f"http://{address}:{port}/?bokeh-session-id={sid}"


def serve_in_thread(feed, port: int = 5006, address: str = "127.0.0.1", token: str | None = None,
                    timeout_s: float = 30.0):
    """Run the dashboard server on its own thread (and event loop); returns (server, url).

    Used by `stemlive demo`, whose main thread runs the acquisition.
    """
    import asyncio
    import threading

    box: dict = {}
    ready = threading.Event()

    def run():
        asyncio.set_event_loop(asyncio.new_event_loop())
        try:
            box["server"] = make_server(feed, port, address, token)
        except BaseException as exc:  # reported to the caller
            box["error"] = exc
            ready.set()
            return
        ready.set()
        box["server"].io_loop.start()

    threading.Thread(target=run, name="stemlive-dashboard", daemon=True).start()
    if not ready.wait(timeout_s):
        raise RuntimeError(f"the dashboard did not start within {timeout_s:.0f} s")
    if "error" in box:
        raise box["error"]
    server = box["server"]
    url = signed_url(server.port, address, token) if token else f"http://{address}:{server.port}/"
    return server, url
