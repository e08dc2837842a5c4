"""`LiveState`: the acquisition's current results in memory, shared by engine and publisher.

The engine writes analysed blocks and virtual images into it, and later the library check's
values for blocks already there (``maps/method`` says which a block shows); the publisher's REP
thread reads it to answer "full state" and "PACBED of block (i, j)" (its mean pattern, estimates and the run's meta:
a dashboard draws the library check's fit from them in its own process) for a dashboard that
connects late, and "ring images for these rings": the engine hands over each new frame's radial
profile (around the calibrated centre once it is known; before, around the centre the frame was
recorded with, as the engine's own ring images then are) with its ring images, and any ring the
operator chooses is summed from them (`protocol/rings.py`) for the whole scan.  The profiles are
copied under the lock and summed outside it, so a ring request holds up the engine for a copy only.
"""
from __future__ import annotations

import threading
import time

import numpy as np

from ..models.atom_regions import AtomRows
from ..protocol.rings import ring_images_from_profiles
from ..udf.radial_bins import RingScale
from .store import MAP_FIELDS, STORE_FLAGS, StoreLayout


class LiveState:
    def __init__(self, layout: StoreLayout, meta: dict):
        ny, nx = layout.grid_shape
        self.layout = layout
        self.meta = dict(meta)  # alpha, kv, calibration, models: sent with every full state
        self.lock = threading.Lock()
        self.maps = {k: np.full((ny, nx, *trail), fill, dtype) for k, (trail, dtype, fill) in MAP_FIELDS.items()}
        self.done = np.zeros((ny, nx), bool)
        self.partial = np.zeros((ny, nx), bool)
        self.counts = np.zeros((ny, nx), np.int64)
        self.pacbed = np.zeros((ny, nx, *layout.sig_shape), np.float32)
        self.virtual = {n: np.full(layout.scan_shape, np.nan, np.float32) for n in layout.virtual}
        # per-frame radial profiles (scan_y, scan_x, n_bins), NaN until recorded; allocated with the first
        self.radial: np.ndarray | None = None
        self.radial_bin_px = float(layout.radial_bin_px)
        self.ring_scale: RingScale | None = None  # the engine's α / mrad -> px when it last evaluated rings
        self.status = {"state": "running", "frames_seen": 0, "frames_total": int(np.prod(layout.scan_shape)),
                       "blocks_done": 0, "blocks_total": ny * nx, "frames_per_s": 0.0,
                       "blocks_dropped": 0, "frames_dropped": 0, "started": time.time(), "reason": ""}
        # the atom table (scan px) as the batches found, joined only when the full state is asked for
        self._atom_batches: list = []
        self.atoms_analysed = np.zeros((ny, nx), bool)
        self.seq = 0  # increases with every change; lets a subscriber see what it missed

    def apply_blocks(self, indices: np.ndarray, rows: dict[str, np.ndarray], pacbed: np.ndarray,
                     counts: np.ndarray, partial: np.ndarray) -> int:
        with self.lock:
            ii, jj = np.asarray(indices).T
            for k, v in rows.items():
                self.maps[k][ii, jj] = v
            self.pacbed[ii, jj] = pacbed
            self.counts[ii, jj] = counts
            self.partial[ii, jj] = partial
            self.done[ii, jj] = True
            self.status["blocks_done"] = int(self.done.sum())
            self.seq += 1
            return self.seq

    def apply_maps(self, indices: np.ndarray, rows: dict[str, np.ndarray]) -> int:
        """New map values for blocks already applied (the library check's, when it lands)."""
        with self.lock:
            ii, jj = np.asarray(indices).reshape(-1, 2).T
            for k, v in rows.items():
                self.maps[k][ii, jj] = v
            self.seq += 1
            return self.seq

    def apply_virtual(self, rows: slice, images: dict[str, np.ndarray], *, frames: np.ndarray | None = None,
                      profiles: np.ndarray | None = None, scale: RingScale | None = None,
                      bin_px: float | None = None) -> int:
        """Ring images of scan ``rows``; with ``profiles`` ((n, n_bins) of the flat scan indices
        ``frames``), the radial profiles they were summed from and the ``scale`` that made the
        rings pixels, kept for rings the operator asks for later."""
        with self.lock:
            for n, img in images.items():
                self.virtual[n][rows] = img
            if profiles is not None and frames is not None and len(frames):
                profiles = np.asarray(profiles, np.float32)
                if self.radial is None or self.radial.shape[-1] != profiles.shape[-1]:
                    self.radial = np.full((*self.layout.scan_shape, profiles.shape[-1]), np.nan, np.float32)
                self.radial.reshape(-1, profiles.shape[-1])[np.asarray(frames, np.int64)] = profiles
                if bin_px is not None:
                    self.radial_bin_px = float(bin_px)
                if scale is not None:
                    self.ring_scale = scale
            self.seq += 1
            return self.seq

    def radial_info(self) -> dict | None:
        """What a dashboard needs to size its ring sliders: bins, their width, the scale (or None)."""
        if self.radial is None:
            return None
        sc = self.ring_scale
        return {"bin_px": self.radial_bin_px, "n_bins": int(self.radial.shape[-1]),
                "radius_px": None if sc is None else sc.radius_px, "mrad_per_px": None if sc is None else sc.mrad_per_px}

    def ring_images(self, rings: dict) -> tuple[dict, dict[str, np.ndarray]]:
        """Ring images of the whole scan (NaN where no frame yet) for ``rings`` = {name: (inner,
        outer, unit)}, checked by the caller; a ValueError when no profile or scale is known yet."""
        with self.lock:  # a copy only: the sum runs outside, the engine is not held up by it
            if self.radial is None or self.ring_scale is None:
                raise ValueError("no per-frame radial profiles yet: the first frames or the ring scale "
                                 "(disk calibration) have not come")
            profiles, scale, bin_px, seq = self.radial.copy(), self.ring_scale, self.radial_bin_px, self.seq
            info = self.radial_info()
        images = ring_images_from_profiles(profiles, bin_px, rings, scale)
        header = {"type": "rings", "seq": seq, "source": "engine", "rings": {k: list(v) for k, v in rings.items()},
                  "alpha_mrad": self.meta.get("alpha_mrad"), "radial": info}
        return header, {f"rings/{k}": v for k, v in images.items()}

    def apply_atoms(self, rows, blocks: list[tuple[int, int]]) -> int:
        """Append found columns (an `AtomRows`) and mark their blocks analysed."""
        with self.lock:
            self._atom_batches.append(rows)
            for i, j in blocks:
                self.atoms_analysed[i, j] = True
            self.status["atoms"] = self.status.get("atoms", 0) + len(rows)
            self.seq += 1
            return self.seq

    def update_status(self, **kw) -> dict:
        with self.lock:
            self.status.update(kw)
            return dict(self.status)

    def full_state(self) -> tuple[dict, dict[str, np.ndarray]]:
        """Header + arrays of everything a dashboard shows (not the PACBEDs: those on request)."""
        with self.lock:
            arrays = {f"maps/{k}": v.copy() for k, v in self.maps.items()}
            arrays.update({f"virtual/{k}": v.copy() for k, v in self.virtual.items()})
            arrays["blocks/done"] = self.done.copy()
            arrays["blocks/partial"] = self.partial.copy()
            arrays["blocks/counts"] = self.counts.copy()
            table = AtomRows.concat(self._atom_batches)
            if table.species is None and self.layout.atom_classes:  # analyses on, no column yet
                table = table.with_unknown(len(self.layout.atom_classes))
            arrays.update(table.arrays())
            arrays["atoms/analysed"] = self.atoms_analysed.copy()
            header = {"type": "state", "seq": self.seq, "status": dict(self.status), "meta": self.meta,
                      "scan_shape": list(self.layout.scan_shape), "block_shape": list(self.layout.block_shape),
                      "flag_names": list(STORE_FLAGS), "radial": self.radial_info()}
            if self.layout.atom_classes:  # what atoms/species indexes, and the anomaly's flag level
                header["atoms"] = {"species_names": list(self.layout.atom_classes),
                                   "anomaly_threshold": self.layout.anomaly_threshold}
        return header, arrays

    def block_pacbed(self, i: int, j: int) -> tuple[dict, dict[str, np.ndarray]]:
        """The mean PACBED of block (i, j) and its estimates; a ValueError if out of the grid."""
        ny, nx = self.layout.grid_shape
        if not (0 <= i < ny and 0 <= j < nx):
            raise ValueError(f"block ({i}, {j}) is outside the {ny}×{nx} block grid")
        with self.lock:
            n = int(self.counts[i, j])
            mean = self.pacbed[i, j] / max(n, 1)
            est = {k: np.asarray(v[i, j]).tolist() for k, v in self.maps.items()}
            header = {"type": "pacbed", "block": [i, j], "done": bool(self.done[i, j]), "frames": n,
                      "estimate": est, "meta": self.meta}
        return header, {"pacbed": mean.astype(np.float32)}
