"""What the dashboard shows, kept once per server process and shared by every browser session.

`LiveFeed`: one ZMQ SUB (blocks, virtual rows, status) and one REQ (the full state on start and
after any gap, a block's PACBED on demand) to a running engine.  `StoreFeed` (store_feed.py): a
result store read from disk, followed while its run still writes it.  Both expose the same
`Snapshot` and a version number that grows with every change, so a session knows whether it
must redraw.
"""
from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import zmq

from ..protocol import WireError, decode, pacbed_request, secure_client, state_request
from ..protocol.requests import check_rings, rings_request
from .snapshot import ATOM_FIELDS, Snapshot, atoms_from, empty_atoms, snapshot_from_state  # noqa: F401
from .store_feed import StoreFeed, StoreRings, fitter_for, store_block_pacbed  # noqa: F401  (the old import path)


class LiveFeed:
    """Subscribes to an engine's publisher; ``snapshot`` is always complete and current."""

    def __init__(self, sub: str, req: str, token: str | None = None, timeout_s: float = 5.0):
        self.sub_address, self.req_address, self.token = sub, req, token
        self.timeout_ms = int(timeout_s * 1000)
        self.ctx = zmq.Context.instance()
        self.lock = threading.Lock()
        self.snapshot: Snapshot | None = None
        self.received = 0
        self.latest_block: tuple[int, int] | None = None
        self.last_delay_s: float | None = None  # publish -> received here, of the latest block message
        self.last_sent: float | None = None  # publish time (engine clock) of the latest block message
        # when the engine had the last frame of the newest block the networks read (engine clock)
        self.last_completed: float | None = None
        self.connected = False
        self.error = ""
        self._stop = threading.Event()
        self._req_lock = threading.Lock()
        self._req = None
        self._store_rings: StoreRings | None = None
        self._fitter = None  # the run's library check, opened here on the first block asked for
        self._thread = threading.Thread(target=self._run, name="stemlive-dashboard-feed", daemon=True)
        self._thread.start()

    # -- requests ----------------------------------------------------------------------------
    def _new_req(self):
        sock = self.ctx.socket(zmq.REQ)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RCVTIMEO, self.timeout_ms)
        sock.setsockopt(zmq.SNDTIMEO, self.timeout_ms)
        if self.token:
            secure_client(sock, self.token)
        sock.connect(self.req_address)
        return sock

    def request(self, message: dict) -> tuple[dict, dict]:
        """One request to the engine's REP socket (a fresh socket after a timeout)."""
        with self._req_lock:
            if self._req is None:
                self._req = self._new_req()
            try:
                self._req.send_json(message)
                header, arrays = decode(self._req.recv_multipart())
            except zmq.Again:
                self._req.close()
                self._req = None
                raise TimeoutError(f"the engine at {self.req_address} did not answer within "
                                   f"{self.timeout_ms / 1000:.0f} s") from None
        if header.get("type") == "error":
            raise ValueError(header.get("error", "engine error"))
        return header, arrays

    def block_pacbed(self, i: int, j: int) -> tuple[dict, np.ndarray]:
        """From the engine; once the engine has gone (scan over), from its result store.  The
        library check's fitted pattern is drawn here (`StoreFitter`: the run's check data opened
        in this process): header ``fit`` says whether there is one, ``fit_images`` holds it
        (``observed``, ``model``, ``residual``; canonical frame).  Call off the event loop."""
        try:
            header, arrays = self.request(pacbed_request(i, j))
            pac = arrays["pacbed"]
            if self._fitter is None:
                self._fitter = fitter_for(header.get("meta") or self.snapshot.meta)
            header["fit"], header["fit_images"] = self._fitter.fit(pac, header.get("estimate", {}))
            return header, pac
        except TimeoutError:
            store = (self.snapshot.meta.get("store") if self.snapshot else None) or ""
            if not store or not Path(store).exists():
                raise
            if self._fitter is None:
                self._fitter = fitter_for(self.snapshot.meta)
            return store_block_pacbed(store, self.snapshot, i, j, self._fitter)

    def ring_images(self, rings: dict) -> tuple[dict, dict[str, np.ndarray]]:
        """Ring images of the whole scan for ``rings`` = {name: (inner, outer, unit)}: from the
        engine (its REP thread sums its per-frame profiles); once the engine has said the run is
        over, or does not answer, from its result store (the same profiles, written as they came)."""
        rings = check_rings(rings)
        snap = self.snapshot
        store = (snap.meta.get("store") if snap else None) or ""
        over = snap is not None and snap.status.get("state", "running") != "running"
        if not (over and store and Path(store).exists()):
            try:
                header, arrays = self.request(rings_request(rings))
                return header, {k[6:]: v for k, v in arrays.items() if k.startswith("rings/")}
            except TimeoutError:
                if not store or not Path(store).exists():
                    raise
        if self._store_rings is None or str(self._store_rings.path) != store:
            self._store_rings = StoreRings(store)
        return self._store_rings.ring_images(rings)

    def _resync(self) -> None:
        header, arrays = self.request(state_request())
        snap = snapshot_from_state(header, arrays)
        with self.lock:
            snap.version = (self.snapshot.version + 1) if self.snapshot else 1
            snap.dirty_rows = {snap.version: ("state", None)}  # everything
            self.snapshot = snap
            self._seq = header.get("seq", 0)
        self.connected = True
        self.error = ""

    # -- subscription ------------------------------------------------------------------------
    def _run(self) -> None:
        sub = self.ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.LINGER, 0)
        sub.setsockopt(zmq.RCVHWM, 10000)
        if self.token:
            secure_client(sub, self.token)
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        sub.connect(self.sub_address)
        self._seq = 0
        need_sync = True
        poller = zmq.Poller()
        poller.register(sub, zmq.POLLIN)
        while not self._stop.is_set():
            if need_sync:
                try:
                    self._resync()
                    need_sync = False
                except (TimeoutError, ValueError, WireError) as exc:
                    self.connected = False
                    self.error = str(exc)
                    time.sleep(1.0)
                    continue
            if not dict(poller.poll(200)):
                continue
            try:
                header, arrays = decode(sub.recv_multipart())
            except WireError as exc:
                self.error = f"bad message from the engine: {exc}"
                continue
            self.received += 1
            seq = header.get("seq")
            if seq is not None and seq != self._seq + 1 and seq > self._seq:
                need_sync = True  # missed messages (a gap): ask for the whole state again
                continue
            self._apply(header, arrays)
        sub.close()

    def _apply(self, header: dict, arrays: dict) -> None:
        kind = header.get("type")
        with self.lock:
            snap = self.snapshot
            if snap is None:
                return
            if kind == "blocks":
                ii, jj = arrays["indices"].T
                for k, v in arrays.items():
                    if k.startswith("maps/"):
                        snap.maps[k[5:]][ii, jj] = v
                snap.done[ii, jj] = True
                rows = ("blocks", set(int(i) for i in ii))
                self.latest_block = (int(ii[-1]), int(jj[-1]))
                if "sent" in header:
                    self.last_sent = header["sent"]
                    self.last_delay_s = max(0.0, time.time() - header["sent"])
                if "completed" in header and header.get("stage", "network") == "network":
                    self.last_completed = float(header["completed"])
                snap.status["blocks_done"] = int(snap.done.sum())
            elif kind == "virtual":
                r0, r1 = header["rows"]
                for k, v in arrays.items():
                    snap.virtual[k[8:]][r0:r1] = v
                rows = ("virtual", set(range(r0, r1)))
            elif kind == "atoms":
                new = atoms_from(arrays)
                if header.get("species_names"):
                    snap.meta["species_names"] = list(header["species_names"])
                snap.atoms = {k: np.concatenate([snap.atoms[k], new[k]]) for k in ATOM_FIELDS}
                snap.status["atoms"] = len(snap.atoms["positions"])
                rows = ("atoms", None)
            elif kind == "status":
                snap.status.update(header["status"])
                rows = ("status", set())
            else:
                return
            if header.get("seq") is not None:
                self._seq = header["seq"]
            snap.version += 1
            snap.dirty_rows[snap.version] = rows
            for v in [v for v in snap.dirty_rows if v < snap.version - 1000]:
                del snap.dirty_rows[v]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)

    def replace_with(self, other) -> None:
        """Serve ``other``'s data from now on (the demo, once its engine has finished)."""
        with self.lock:
            snap = other.snapshot
            snap.version = (self.snapshot.version + 1) if self.snapshot else 1
            snap.dirty_rows = {snap.version: ("state", None)}
            self.snapshot = snap
            self.block_pacbed = other.block_pacbed
            self.ring_images = other.ring_images
            self.connected, self.error = True, ""


