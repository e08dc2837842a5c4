"""A tick's document changes as one websocket message.

Bokeh's server sends every document change as its own PATCH-DOC message, held changes too
(``Document.unhold`` re-triggers them one by one).  Each message serialises a reference to every
model of the document (~1,100 on this dashboard: ~2 ms of the server's one thread) and the
browser applies each on its own; a tick that patches ten maps, their colour ranges, the
histogram and the latency probe was ~30 messages per session.  Bokeh's protocol takes a list of
events in one PATCH-DOC (the browser sends its own changes that way), so the events a tick
collects go out together, in order, with the same suppression of a change's echo to the
connection it came from as Bokeh's ``ServerSession._document_patched``.

Needs Bokeh's server session (``doc.session_context._session``, Bokeh 3.x); without it -- a
document outside a server, a Bokeh that moved it -- the changes go out as Bokeh sends them.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from bokeh.document import Document


def _server_session(doc: Document) -> Any | None:
    session = getattr(getattr(doc, "session_context", None), "_session", None)
    needed = ("_document_patched", "_subscribed_connections", "_current_patch_connection")
    if session is None or not all(hasattr(session, name) for name in needed):
        return None
    if getattr(session, "_pending_writes", None) is None:  # outside the document lock
        return None
    return session


@contextmanager
def one_message(doc: Document) -> Iterator[None]:
    """Changes made inside the block reach each browser as one PATCH-DOC message (repeated
    changes of one property combined, as ``doc.hold("combine")`` does)."""
    doc.hold("combine")
    try:
        yield
    finally:
        session = _server_session(doc)
        if session is None:
            doc.unhold()
        else:
            events: list = []
            session._document_patched = events.append  # the receiver Bokeh dispatches to
            try:
                doc.unhold()
            finally:
                del session._document_patched
            send_together(session, events)


def send_together(session: Any, events: list) -> None:
    """One PATCH-DOC per connection with ``events`` (each minus the echo of its own change)."""
    if not events:
        return
    for connection in list(session._subscribed_connections):
        mine = [e for e in events
                if not (e.setter is session and connection is session._current_patch_connection)]
        if not mine:
            continue
        socket = getattr(connection, "_socket", None)
        if socket is None:  # not the connection this was written against: Bokeh's way
            session._pending_writes.extend(connection.send_patch_document(e) for e in mine)
        else:
            session._pending_writes.append(socket.send_message(connection.protocol.create("PATCH-DOC", mine)))
