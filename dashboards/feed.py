"""What the dashboard shows, kept once per server process and shared by every browser session.

`LiveFeed`: one ZMQ SUB (blocks, virtual rows, status) and one REQ (the full state on start and
after any gap, a block's PACBED on demand) to a running engine.  `StoreFeed`: a finished (or
running) result store read from disk.  Both expose the same `Snapshot` and a version number that
grows with every change, so a session knows whether it must redraw.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import zmq

from ..live.security import secure_client
from ..live.wire import WireError, decode


@dataclass
class Snapshot:
    meta: dict
    status: dict
    scan_shape: tuple[int, int]
    block_shape: tuple[int, int]
    flag_names: list[str]
    maps: dict[str, np.ndarray]
    virtual: dict[str, np.ndarray]
    done: np.ndarray
    counts: np.ndarray
    version: int = 0
    # version -> (kind, block rows): ("blocks", rows), ("virtual", scan rows or None for all),
    # ("atoms", None), ("status", set()),
    # ("state", None)
    dirty_rows: dict = field(default_factory=dict)
    # the atom table: positions (n, 2) scan px, confidence, intensity, block; empty when none
    atoms: dict = field(default_factory=lambda: empty_atoms())


ATOM_FIELDS = ("positions", "confidence", "intensity", "block")


def empty_atoms() -> dict:
    return {"positions": np.zeros((0, 2), np.float32), "confidence": np.zeros(0, np.float32),
            "intensity": np.zeros(0, np.float32), "block": np.zeros((0, 2), np.int32)}


def atoms_from(arrays: dict, prefix: str = "atoms/") -> dict:
    """The atom table out of a message's or a store's arrays (empty when it has none)."""
    if f"{prefix}positions" not in arrays:
        return empty_atoms()
    return {k: np.array(arrays[f"{prefix}{k}"]) for k in ATOM_FIELDS}


def snapshot_from_state(header: dict, arrays: dict) -> Snapshot:
    maps = {k.split("/", 1)[1]: np.array(v) for k, v in arrays.items() if k.startswith("maps/")}
    virtual = {k.split("/", 1)[1]: np.array(v) for k, v in arrays.items() if k.startswith("virtual/")}
    return Snapshot(meta=header.get("meta", {}), status=header.get("status", {}),
                    scan_shape=tuple(header["scan_shape"]), block_shape=tuple(header["block_shape"]),
                    flag_names=list(header.get("flag_names", [])), maps=maps, virtual=virtual,
                    done=np.array(arrays["blocks/done"]), counts=np.array(arrays["blocks/counts"]),
                    atoms=atoms_from(arrays))


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
        self.connected = False
        self.error = ""
        self._stop = threading.Event()
        self._req_lock = threading.Lock()
        self._req = None
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
        """From the engine; once the engine has gone (scan over), from its result store."""
        try:
            header, arrays = self.request({"type": "pacbed", "block": [int(i), int(j)]})
            return header, arrays["pacbed"]
        except TimeoutError:
            store = (self.snapshot.meta.get("store") if self.snapshot else None) or ""
            if not store or not Path(store).exists():
                raise
            return store_block_pacbed(store, self.snapshot, i, j)

    def _resync(self) -> None:
        header, arrays = self.request({"type": "state"})
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
                snap.status["blocks_done"] = int(snap.done.sum())
            elif kind == "virtual":
                r0, r1 = header["rows"]
                for k, v in arrays.items():
                    snap.virtual[k[8:]][r0:r1] = v
                rows = ("virtual", set(range(r0, r1)))
            elif kind == "atoms":
                new = atoms_from(arrays)
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
            self.connected, self.error = True, ""


def store_block_pacbed(path, snap: Snapshot, i: int, j: int) -> tuple[dict, np.ndarray]:
    """A block's mean PACBED and estimates read from a result store."""
    import h5py

    ny, nx = snap.done.shape
    if not (0 <= i < ny and 0 <= j < nx):
        raise ValueError(f"block ({i}, {j}) is outside the {ny}×{nx} block grid")
    with h5py.File(path, "r", locking=False) as f:
        n = int(f["blocks/counts"][i, j])
        pac = f["blocks/pacbed"][i, j] / max(n, 1)
        est = {k: np.asarray(f[f"maps/{k}"][i, j]).tolist() for k in f["maps"]}
        done = bool(f["blocks/done"][i, j])
    return {"type": "pacbed", "block": [i, j], "done": done, "frames": n, "estimate": est, "meta": snap.meta}, pac


class StoreFeed:
    """A result store on disk (read-only); re-read when it changes while its run goes on."""

    def __init__(self, path):
        from ..live.store import read_store

        self.path = path
        self._read = read_store
        self.lock = threading.Lock()
        self.connected = True
        self.error = ""
        self.received = 0
        self.snapshot = self._load(version=1)

    def _load(self, version: int) -> Snapshot:
        r = self._read(self.path)
        a = r["attrs"]
        status = {"state": a["state"], "blocks_done": int(r["blocks"]["done"].sum()),
                  "blocks_total": int(r["blocks"]["done"].size), "frames_seen": int(r["progress"][0]),
                  "frames_total": int(np.prod(a["scan_shape"])), "reason": a.get("reason", ""),
                  "frames_per_s": 0.0, "blocks_dropped": int(a.get("blocks_dropped", 0)),
                  "frames_dropped": int(a.get("frames_dropped", 0)),
                  "atoms": len(r["atoms"]["positions"]) if "atoms" in r else 0}
        meta = {"alpha_mrad": float(a["alpha_mrad"]), "kv": float(a["kv"]), "store": str(self.path),
                "models": [m.get("id") for m in a["models"]], "mrad_per_px": float(a["mrad_per_px"]),
                "scan_step_nm": float(a.get("scan_step_nm", np.nan)), "rings": a.get("rings", {}),
                "read_only": True}
        return Snapshot(meta=meta, status=status, scan_shape=tuple(int(v) for v in a["scan_shape"]),
                        block_shape=tuple(int(v) for v in a["block_shape"]), flag_names=list(a["flag_names"]),
                        maps=r["maps"], virtual=r["virtual"], done=r["blocks"]["done"],
                        counts=r["blocks"]["counts"], version=version, dirty_rows={version: ("state", None)},
                        atoms=atoms_from(r.get("atoms", {}), prefix=""))

    def block_pacbed(self, i: int, j: int) -> tuple[dict, np.ndarray]:
        return store_block_pacbed(self.path, self.snapshot, i, j)

    def close(self) -> None:
        pass
