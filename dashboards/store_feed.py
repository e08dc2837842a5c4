"""A result store as a feed: read with plain h5py (the layout is DESIGN.md's contract), and
followed while its run is still writing it.

The writer (live/store.py) pre-allocates every dataset, writes raw data only and marks a block
done last, so a reader that opens the file between two writes sees whole blocks.  The file is
polled (its size, modification time and ``/progress``): on a change it is read again and only
what changed is marked for the pages -- the rows of blocks that changed, the scan rows of the
virtual images that changed.  A read that meets the file in the middle of a write (an HDF5 error)
is retried at the next poll; the feed stops following once the store says complete or aborted.

Rings the operator chooses are summed from the store's per-frame radial profiles
(``/virtual/radial``) by `protocol.rings` (what the engine does live), read again only when the
file has changed since the last ring request.
"""
from __future__ import annotations

import json
import math
import os
import threading
import time
from datetime import datetime
from pathlib import Path

import h5py
import numpy as np

from ..protocol.requests import check_rings
from ..protocol.rings import ring_images_from_profiles, ring_scale
from .snapshot import Snapshot, atoms_from

REQUIRED_ATTRS = ("scan_shape", "block_shape", "models", "flag_names", "state")


def read_view(path: str | Path) -> dict:
    """What the page shows of a store: attributes, maps, virtual images, block flags, atoms."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    if not h5py.is_hdf5(path):
        raise ValueError(f"{path} is not an HDF5 file (a stemlive result store is)")
    with h5py.File(path, "r", locking=False) as f:
        missing = [k for k in REQUIRED_ATTRS if k not in f.attrs] + [g for g in ("maps", "blocks") if g not in f]
        if missing:
            raise ValueError(f"{path} is not a stemlive result store (it lacks {', '.join(missing)})")
        attrs = dict(f.attrs)
        for k in ("models", "rings", "flag_names"):
            if isinstance(attrs.get(k), (str, bytes)):
                attrs[k] = json.loads(attrs[k])
        out = {"attrs": attrs, "maps": {k: ds[()] for k, ds in f["maps"].items()},
               "virtual": {k: ds[()] for k, ds in f["virtual"].items() if ds.ndim == 2} if "virtual" in f else {},
               "done": f["blocks/done"][()], "counts": f["blocks/counts"][()],
               "progress": f["progress"][()] if "progress" in f else np.zeros(3)}
        if "atoms" in f:
            g = f["atoms"]
            n = int(g["count"][()])
            out["atoms"] = {k: g[k][:n] for k in ("positions", "confidence", "intensity", "block",
                                                  "species", "anomaly", "anomaly_flag") if k in g}
            if "species" in g and "names" in g["species"].attrs:
                out["species_names"] = json.loads(g["species"].attrs["names"])
        if "virtual/radial" in f:
            out["radial"] = _radial_info(f)
    return out


def _radial_info(f: h5py.File) -> dict:
    """Bins, bin width and the ring scale of a store's per-frame profiles (no profiles read).

    α in px: the radius the run's rings used (``/virtual/radial`` attribute ``radius_px``), else
    from the calibration, else the median fitted disk radius (stores from before the attribute)."""
    ds, a = f["virtual/radial"], f.attrs
    radius = float(ds.attrs.get("radius_px", math.nan))
    if not math.isfinite(radius) and "maps/radius_px" in f:
        fitted = f["maps/radius_px"][()]
        if np.isfinite(fitted).any():
            radius = float(np.nanmedian(fitted))
    scale = ring_scale(a.get("alpha_mrad"), a.get("mrad_per_px"), radius if math.isfinite(radius) else None)
    return {"bin_px": float(ds.attrs["bin_px"]), "n_bins": int(ds.shape[-1]), "radius_px": scale.radius_px,
            "mrad_per_px": scale.mrad_per_px}


class StoreRings:
    """Ring images of the whole scan from a store's ``/virtual/radial``; the profiles are read
    again only when the file changed (size or modification time) since the last request."""

    def __init__(self, path):
        self.path = Path(path)
        self._lock = threading.Lock()
        self._cached = None  # (file stamp, profiles, info, alpha_mrad)

    def _load(self):
        st = os.stat(self.path)
        stamp = (st.st_size, st.st_mtime_ns)
        if self._cached is None or self._cached[0] != stamp:
            with h5py.File(self.path, "r", locking=False) as f:
                if "virtual/radial" not in f:
                    raise ValueError(f"{self.path} holds no per-frame radial profiles (/virtual/radial): "
                                     "its rings cannot be changed")
                info = _radial_info(f)
                self._cached = (stamp, f["virtual/radial"][()], info, float(f.attrs.get("alpha_mrad", math.nan)))
        return self._cached[1:]

    def ring_images(self, rings: dict) -> tuple[dict, dict[str, np.ndarray]]:
        """(header, {name: image}) for ``rings`` = {name: (inner, outer, unit)}."""
        rings = check_rings(rings)
        with self._lock:
            profiles, info, alpha = self._load()
        scale = ring_scale(alpha, info["mrad_per_px"], info["radius_px"])
        images = ring_images_from_profiles(profiles, info["bin_px"], rings, scale)
        header = {"type": "rings", "source": "store", "rings": {k: list(v) for k, v in rings.items()},
                  "alpha_mrad": alpha, "radial": info}
        return header, images


def _json(v) -> dict:
    try:
        out = json.loads(v) if isinstance(v, (str, bytes)) else v
    except ValueError:
        return {}
    return out if isinstance(out, dict) else {}


def _seconds(a: dict) -> float | None:
    try:
        return (datetime.fromisoformat(a["finished"]) - datetime.fromisoformat(a["started"])).total_seconds()
    except (KeyError, TypeError, ValueError):
        return None


def snapshot_of(view: dict, path, version: int) -> Snapshot:
    a = view["attrs"]
    frames = int(np.prod(a["scan_shape"]))
    seen = int(view["progress"][0])
    status = {"state": str(a["state"]), "blocks_done": int(view["done"].sum()), "blocks_total": int(view["done"].size),
              "frames_seen": seen, "frames_total": frames, "reason": str(a.get("reason", "")),
              "blocks_dropped": int(a.get("blocks_dropped", 0)), "frames_dropped": int(a.get("frames_dropped", 0)),
              "atoms": len(view["atoms"]["positions"]) if "atoms" in view else 0}
    took = _seconds(a)
    if took is not None:
        status["elapsed_s"] = took
    elif status["state"] == "running":
        started = a.get("started")
        try:
            elapsed = time.time() - datetime.fromisoformat(started).timestamp()
            status["frames_per_s"] = seen / elapsed if elapsed > 0 else 0.0
        except (TypeError, ValueError):
            status["frames_per_s"] = 0.0
    step = float(a.get("scan_step_nm", math.nan))
    meta = {"alpha_mrad": float(a.get("alpha_mrad", math.nan)), "kv": float(a.get("kv", math.nan)),
            "store": str(path), "models": [m.get("id") for m in a["models"]],
            "mrad_per_px": float(a.get("mrad_per_px", math.nan)), "scan_step_nm": step,
            "rings": a.get("rings", {}), "read_only": True, "radial": view.get("radial"),
            "method": str(a.get("method", "network")), "check": _json(a.get("check", "{}")),
            "holder_axis_deg": float(a["holder_axis_deg"]) if "holder_axis_deg" in a else None}
    if view.get("species_names"):
        meta["species_names"] = list(view["species_names"])
    return Snapshot(meta=meta, status=status, scan_shape=tuple(int(v) for v in a["scan_shape"]),
                    block_shape=tuple(int(v) for v in a["block_shape"]), flag_names=list(a["flag_names"]),
                    maps=view["maps"], virtual=view["virtual"], done=view["done"], counts=view["counts"],
                    version=version, dirty_rows={version: ("state", None)},
                    atoms=atoms_from(view.get("atoms", {}), prefix=""))


def changed_rows(old: dict[str, np.ndarray], new: dict[str, np.ndarray]) -> set[int]:
    """Rows (axis 0) where any array differs (NaN equal to NaN)."""
    rows: set[int] = set()
    for k, b in new.items():
        a = old.get(k)
        if a is None or a.shape != b.shape:
            return set(range(b.shape[0]))
        diff = ~((a == b) | (np.isnan(a) & np.isnan(b)) if a.dtype.kind == "f" else a == b)
        rows |= set(np.nonzero(diff.reshape(diff.shape[0], -1).any(axis=1))[0].tolist())
    return rows


class StoreFitter:
    """The library check of a run's setting, opened in this (the dashboard's) process on the
    first block asked for -- on the request worker thread: opening takes about a second -- and
    drawn here (`block_fit`, a few ms), for a live run's blocks as for a store's: the engine's
    REP thread does not share the check with the engine's check thread, nor spend its cores.
    Refused (with the words why) when the run's check data has another sha256 than the file
    found here.

    None where the check data does not ship for the store's kV and α, or the run used the
    networks alone; ``reason`` then says so in words."""

    def __init__(self, kv: float, alpha_mrad: float, method: str | None, sha256: str | None = None):
        self.kv, self.alpha_mrad, self.method, self.sha256 = kv, alpha_mrad, method, sha256
        self._lock = threading.Lock()
        self._opened = False
        self.checker = None
        self.reason = ""

    def get(self):
        with self._lock:
            if not self._opened:
                self._opened = True
                self.checker, self.reason = self._open()
        return self.checker

    def _open(self):
        if self.method == "network":
            return None, "the run read blocks with the networks alone (method network)"
        from ..models.checked_analysis import Checker, check_data_path

        try:
            path = check_data_path(self.kv, self.alpha_mrad)
            if not path.exists():
                return None, (f"no library-check data ships for {self.kv:g} kV, {self.alpha_mrad:g} mrad "
                              f"({path.name}): no library fit to show")
            checker = Checker.open(path, self.kv, self.alpha_mrad)
            if self.sha256 and checker.info.get("sha256") != self.sha256:
                return None, (f"the run's library-check data is not the shipped {path.name} (another sha256): "
                              "its fit cannot be redrawn here")
            return checker, ""
        except (ValueError, OSError) as exc:  # no card for the setting, a refused or unreadable file
            return None, f"no library check for this store's setting: {exc}"

    def fit(self, pac: np.ndarray, est: dict) -> tuple[dict, dict[str, np.ndarray]]:
        from ..models.checked_analysis import block_fit

        checker = self.get()
        return block_fit(checker, pac, est, no_checker=self.reason)


def store_block_pacbed(path, snap: Snapshot, i: int, j: int,
                       fitter: StoreFitter | None = None) -> tuple[dict, np.ndarray]:
    """A block's mean PACBED and estimates read from a result store; with ``fitter``, the
    library's fitted pattern too (header ``fit``, images in ``fit_images``, as `LiveFeed` gives)."""
    ny, nx = snap.done.shape
    if not (0 <= i < ny and 0 <= j < nx):
        raise ValueError(f"block ({i}, {j}) is outside the {ny}×{nx} block grid")
    with h5py.File(path, "r", locking=False) as f:
        n = int(f["blocks/counts"][i, j])
        pac = f["blocks/pacbed"][i, j] / max(n, 1)
        est = {k: np.asarray(f[f"maps/{k}"][i, j]).tolist() for k in f["maps"]}
        done = bool(f["blocks/done"][i, j])
    header = {"type": "pacbed", "block": [i, j], "done": done, "frames": n, "estimate": est, "meta": snap.meta}
    if fitter is not None:
        header["fit"], header["fit_images"] = fitter.fit(pac, est)
    return header, pac


def fitter_for(meta: dict) -> StoreFitter:
    """The `StoreFitter` of a store whose snapshot meta is ``meta``."""
    check = meta.get("check") or {}
    return StoreFitter(float(meta.get("kv", math.nan)), float(meta.get("alpha_mrad", math.nan)), meta.get("method"),
                       check.get("sha256") if isinstance(check, dict) else None)


class StoreFeed:
    """A result store on disk (read-only); followed while its ``state`` is running."""

    def __init__(self, path, poll_s: float = 0.5, follow: bool = True):
        self.path = Path(path)
        self.poll_s = poll_s
        self.lock = threading.Lock()
        self.connected = True
        self.error = ""
        self.received = 0
        self.latest_block: tuple[int, int] | None = None
        self.snapshot = snapshot_of(read_view(self.path), self.path, version=1)
        self._rings = StoreRings(self.path)
        self._fitter = fitter_for(self.snapshot.meta)
        self._stamp = self._file_stamp()
        self._stop = threading.Event()
        self._thread = None
        if follow and self.snapshot.status["state"] == "running":
            self._thread = threading.Thread(target=self._follow, name="stemlive-store-follow", daemon=True)
            self._thread.start()

    @property
    def following(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _file_stamp(self):
        try:
            st = os.stat(self.path)
            return st.st_size, st.st_mtime_ns
        except OSError:
            return None

    def _follow(self) -> None:
        while not self._stop.wait(self.poll_s):
            stamp = self._file_stamp()
            if stamp == self._stamp:
                continue
            try:
                view = read_view(self.path)
            except (OSError, KeyError, ValueError) as exc:  # met a write half-way: try again next poll
                self.error = f"re-reading {self.path}: {exc}"
                continue
            self._stamp, self.error = stamp, ""
            self.received += 1
            self._apply(view)
            if self.snapshot.status["state"] != "running":
                return

    def _apply(self, view: dict) -> None:
        with self.lock:
            old = self.snapshot
            new = snapshot_of(view, self.path, old.version)
            rows = changed_rows({**old.maps, "done": old.done}, {**new.maps, "done": new.done})
            vrows = changed_rows(old.virtual, new.virtual)
            fresh = np.argwhere(new.done & ~old.done)
            if len(fresh):
                self.latest_block = tuple(int(v) for v in fresh[-1])
            changes = [("blocks", rows)] if rows else []
            changes += [("virtual", vrows)] if vrows else []
            changes += [("atoms", None)] if len(new.atoms["positions"]) != len(old.atoms["positions"]) else []
            changes += [("status", set())]
            # the pages hold references to the snapshot: update it in place
            old.maps, old.virtual, old.done, old.counts, old.atoms = new.maps, new.virtual, new.done, new.counts, new.atoms
            old.status, old.meta = new.status, new.meta
            for change in changes:
                old.version += 1
                old.dirty_rows[old.version] = change
            for v in [v for v in old.dirty_rows if v < old.version - 1000]:
                del old.dirty_rows[v]

    def block_pacbed(self, i: int, j: int) -> tuple[dict, np.ndarray]:
        """The block's PACBED and estimates, and the library's fitted pattern where the check
        data ships (opened here on the first call: call off the event loop)."""
        return store_block_pacbed(self.path, self.snapshot, i, j, self._fitter)

    def ring_images(self, rings: dict) -> tuple[dict, dict[str, np.ndarray]]:
        """Ring images of the whole scan for the operator's ``rings``, from the store's profiles."""
        return self._rings.ring_images(rings)

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(2)
