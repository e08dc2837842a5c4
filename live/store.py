"""`ResultStore`: one HDF5 file per acquisition, pre-allocated and written block by block.

Layout and attributes are DESIGN.md's ("Contracts").  Crash behaviour comes from how it is
written: every dataset is contiguous and filled (NaN / zeros) when the file is created, so a
block's write touches raw data only, never HDF5 metadata; the file is opened for each batch of
blocks and closed again, without file locking, so plain ``h5py.File(path, "r")`` reads it at any
time during the run and after.  A fault or Ctrl-C closes it with ``state`` = "aborted" and the
reason; a killed process leaves ``state`` = "running" with ``/progress`` showing when it last
wrote -- every completed block is in the file either way.

Since schema 2 the maps also say which method produced each block's values and what the
library check found (`stemlive pacbed analyze` JSON schema 2 has the same fields):

* ``/maps/method`` (uint8): 0 not analysed, 1 network (the networks' reading: ``--method
  network``, a block the check does not apply to -- an error or ``partial-field`` -- or one whose
  check had not landed when the run closed), 2 check (the networks' reading re-fitted against
  the simulated library, `models/pacbed_check.py`).  Live, a block is written with 1 as soon as
  the networks have read it and rewritten with 2 when its check lands.
* ``/maps/fit_quality``: the fraction of the pattern's structure beyond the zero disk that the
  best library pattern leaves unexplained (~0 good; above ~0.08 flag ``model-mismatch``);
  ``/maps/thickness_alt_nm``: the runner-up thickness (≥ 3 nm from the best); ``/maps/
  alt_delta_chi2``: how much worse it fits, in units of the best fit's residual per pixel (below
  25: flag ``ambiguous``; +inf: no runner-up).  NaN where the check did not run.
* attributes ``method`` (what the run asked for and got: "check" or "network"), ``check`` (JSON:
  the check data file, its sha256, kV, α, rank; {} without the check), and at the end
  ``checks_done``, ``checks_unfinished`` (blocks left with the networks' values because the
  run closed first) and ``checks_failed``.

The atom table (``/atoms/``, one row per column, rows [0, ``count``) valid while running, cut
to them at the end): ``positions`` (n, 2) scan px, ``confidence``, ``intensity``, ``block`` (n, 2)
the block that owns the column, ``analysed`` (block grid); attribute ``contrast``.  With the
per-column analyses (`models/atoms_analyse.BlockColumns`: the run knows its scan step and has
both HAADF and ABF rings) also ``species`` (int8 index into the attribute ``names`` (JSON), -1
unknown), ``species_prob`` (n, k float32, NaN unknown; attribute ``names``), ``anomaly``
(float32 score, per-image standardised within the block's window, NaN unknown: e.g. a window
with too few columns to standardise) and ``anomaly_flag`` (bool, score above the anomaly card's
threshold, attribute ``threshold``); the models are in the store's ``models`` list.  Stores
written before them lack these four datasets (`read_store` then leaves them out).

Per-frame radial profiles (``/virtual/radial``, float32, (scan_y, scan_x, n_bins)): frame (y, x)'s
intensity in the radial bins [k·Δ, (k+1)·Δ) px around the calibrated disk centre, k = 0 …
n_bins-1, with Δ = attribute ``bin_px`` (0.5 px; pixels split into 4×4 sub-pixels, so bin edges
are not quantised to whole pixels) out to the frame's half diagonal, and the centre in the
attribute ``center_px`` (row, col; NaN until calibrated) and the zero disk's radius α in px
(attribute ``radius_px``, the calibration the rings in units of α used; NaN until calibrated;
mrad per px is the store's ``mrad_per_px``, else ``alpha_mrad`` / ``radius_px``).  NaN for frames
not recorded yet.  Any
virtual ring [a, b) px is a sum over bins, the two edge bins weighted by the fraction they
cover (``stemlive.udf.radial_bins.ring_bin_weights``: ``profiles @ ring_bin_weights(n_bins, a,
b, Δ)``) -- which is how ``/virtual/{bf, abf, adf, haadf}`` are made (exactly for frames
recorded around the calibrated centre).  Frames recorded before the centre was known are stored
recentred to first order from their bin dipoles (their ring images may then differ from a sum of
stored bins by a fraction of the edge bins' content).
"""
from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib.metadata import version
from pathlib import Path
from typing import Sequence

import h5py
import numpy as np

from ..models.pacbed_analysis import FLAGS, PacbedEstimate
from .outputs import beside, check_output, replacing

STORE_SCHEMA = 2  # 2: /maps/{method, fit_quality, thickness_alt_nm, alt_delta_chi2}, flags ambiguous, model-mismatch
# bit i of /maps/flags = STORE_FLAGS[i]; bits keep their meaning, new names are appended
_STORE_FLAGS_FIXED = ("vacuum", "not-on-zone", "thickness-at-range-edge", "low-confidence", "saturated",
                      "partial-field", "error", "partial", "ambiguous", "model-mismatch")
STORE_FLAGS = _STORE_FLAGS_FIXED + tuple(f for f in FLAGS if f not in _STORE_FLAGS_FIXED)
STATES = ("running", "complete", "aborted")
METHOD_CODES = {"none": 0, "network": 1, "check": 2}  # /maps/method
ATOM_ANALYSES = ("species", "species_prob", "anomaly", "anomaly_flag")  # /atoms/... with the column analyses

# name -> (trailing shape, dtype, fill) of the per-block maps
MAP_FIELDS = {
    "thickness_nm": ((), np.float32, np.nan),
    "thickness_sigma_nm": ((), np.float32, np.nan),
    "tilt_mrad": ((2,), np.float32, np.nan),
    "tilt_sigma_mrad": ((2,), np.float32, np.nan),
    "tilt_crystal_mrad": ((2,), np.float32, np.nan),
    "center_px": ((2,), np.float32, np.nan),
    "radius_px": ((), np.float32, np.nan),
    "rotation_deg": ((), np.float32, np.nan),
    "background": ((), np.float32, np.nan),
    "in_range": ((), np.int8, -1),  # -1 not analysed, 0 no, 1 yes
    "flags": ((), np.uint32, 0),
    "method": ((), np.uint8, 0),  # METHOD_CODES
    "fit_quality": ((), np.float32, np.nan),
    "thickness_alt_nm": ((), np.float32, np.nan),
    "alt_delta_chi2": ((), np.float32, np.nan),
}


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass(frozen=True)
class StoreLayout:
    """What a store is pre-allocated for."""

    scan_shape: tuple[int, int]
    block_shape: tuple[int, int]
    sig_shape: tuple[int, int]
    virtual: tuple[str, ...] = ("bf", "abf", "adf", "haadf")
    atoms: str | None = None  # the virtual image atoms are found in ("haadf", "abf"), or none
    atom_classes: tuple[str, ...] = ()  # species names of the per-column analyses (empty: off)
    anomaly_threshold: float | None = None  # the anomaly model card's threshold (with the classes)
    radial_bins: int = 0  # per-frame radial profiles of this many bins in /virtual/radial (0: none)
    radial_bin_px: float = 0.5

    @property
    def max_atoms(self) -> int:
        """Rows pre-allocated for the atom table: one column per 4 scan pixels, more than any
        lattice the finder resolves (it enlarges images until columns are ~8 px apart, the
        network's target peaks are 1.5 px wide); a table that fills up is marked truncated."""
        return int(np.prod(self.scan_shape)) // 4 + 64

    @property
    def grid_shape(self) -> tuple[int, int]:
        return tuple(-(-s // b) for s, b in zip(self.scan_shape, self.block_shape))


def flag_bits(flags: Sequence[str]) -> int:
    """Bitmask of flag names (unknown names are an error: the store could not say them back)."""
    bits = 0
    for name in flags:
        if name not in STORE_FLAGS:
            raise ValueError(f"unknown flag {name!r}; the store knows {list(STORE_FLAGS)}")
        bits |= 1 << STORE_FLAGS.index(name)
    return bits


def flag_names(bits: int) -> list[str]:
    return [n for i, n in enumerate(STORE_FLAGS) if int(bits) >> i & 1]


class ResultStore:
    """Writer of one acquisition's results.  Use :meth:`create`, then write, then :meth:`finish`."""

    def __init__(self, path: Path, layout: StoreLayout, final_path: Path | None = None):
        self.path = Path(path)  # where this run writes
        self.final_path = Path(final_path or path)  # where the store ends up when the run succeeds
        self.layout = layout
        self.state = "running"
        self.reason = ""
        # the engine's two stages (networks, library check) write from two threads: one at a time,
        # the per-block maps being read, updated and written whole
        self._lock = threading.RLock()

    @classmethod
    def create(cls, path: str | Path, layout: StoreLayout, *, alpha_mrad: float, kv: float,
               mrad_per_px: float | None = None, scan_step_nm: float | None = None,
               scan_rotation_deg: float = 0.0, models: Sequence[dict] = (), rings: dict | None = None,
               source: str = "", overwrite: bool = False, method: str = "network",
               check: dict | None = None, holder_axis_deg: float | None = None) -> "ResultStore":
        """Create and pre-allocate the file.

        An existing file is replaced only with ``overwrite``, and not now: this run writes beside
        it (``R.incomplete.h5``) and :meth:`finish` renames that over it when the run succeeded,
        so a run that fails leaves the earlier store as it was.
        """
        final = check_output(path, overwrite=overwrite)
        path = beside(final, "incomplete") if final.exists() else final
        path.parent.mkdir(parents=True, exist_ok=True)
        ny, nx = layout.grid_shape
        sy, sx = layout.scan_shape
        with replacing(path, "creating") as tmp, h5py.File(tmp, "w", locking=False) as f:
            a = f.attrs
            a["schema"] = STORE_SCHEMA
            a["scan_shape"] = np.asarray(layout.scan_shape, np.int64)
            a["block_shape"] = np.asarray(layout.block_shape, np.int64)
            a["alpha_mrad"] = float(alpha_mrad)
            a["kv"] = float(kv)
            a["mrad_per_px"] = np.nan if mrad_per_px is None else float(mrad_per_px)
            a["scan_step_nm"] = np.nan if scan_step_nm is None else float(scan_step_nm)
            a["scan_rotation_deg"] = float(scan_rotation_deg)
            if holder_axis_deg is not None:  # the holder's α axis on the detector (axis 1 towards 0)
                a["holder_axis_deg"] = float(holder_axis_deg)
            a["models"] = json.dumps(list(models))
            a["rings"] = json.dumps(rings or {})
            a["flag_names"] = json.dumps(list(STORE_FLAGS))
            a["source"] = source
            a["method"] = method
            a["check"] = json.dumps(check or {})
            a["stemlive_version"] = version("stemlive")
            a["started"] = _now()
            a["finished"] = ""
            a["state"] = "running"
            a["reason"] = ""
            for name, (trail, dtype, fill) in MAP_FIELDS.items():
                f.create_dataset(f"maps/{name}", data=np.full((ny, nx, *trail), fill, dtype))
            for name in layout.virtual:
                f.create_dataset(f"virtual/{name}", data=np.full((sy, sx), np.nan, np.float32))
            if layout.radial_bins:
                ds = f.create_dataset("virtual/radial", data=np.full((sy, sx, layout.radial_bins), np.nan, np.float32))
                ds.attrs["bin_px"] = float(layout.radial_bin_px)
                ds.attrs["center_px"] = np.full(2, np.nan)
                ds.attrs["radius_px"] = np.nan
            f.create_dataset("blocks/pacbed", data=np.zeros((ny, nx, *layout.sig_shape), np.float32))
            f.create_dataset("blocks/counts", data=np.zeros((ny, nx), np.int64))
            f.create_dataset("blocks/done", data=np.zeros((ny, nx), bool))
            f.create_dataset("blocks/partial", data=np.zeros((ny, nx), bool))
            if layout.atoms:  # the atom table: rows [0, /atoms/count) are valid, the rest NaN until finish
                g = f.create_group("atoms")
                g.attrs["contrast"] = layout.atoms
                g.attrs["units"] = json.dumps({"positions": "scan px (row, col), pixel centres at integers",
                                               "intensity": "virtual image sum around the column"})
                n = layout.max_atoms
                g.create_dataset("positions", data=np.full((n, 2), np.nan, np.float32))
                g.create_dataset("confidence", data=np.full(n, np.nan, np.float32))
                g.create_dataset("intensity", data=np.full(n, np.nan, np.float32))
                g.create_dataset("block", data=np.full((n, 2), -1, np.int32))
                if layout.atom_classes:  # species and anomaly of every column (BlockColumns)
                    ds = g.create_dataset("species", data=np.full(n, -1, np.int8))
                    ds.attrs["names"] = json.dumps(list(layout.atom_classes))
                    ds = g.create_dataset("species_prob", data=np.full((n, len(layout.atom_classes)), np.nan,
                                                                        np.float32))
                    ds.attrs["names"] = json.dumps(list(layout.atom_classes))
                    g.create_dataset("anomaly", data=np.full(n, np.nan, np.float32))
                    ds = g.create_dataset("anomaly_flag", data=np.zeros(n, bool))
                    ds.attrs["threshold"] = (np.nan if layout.anomaly_threshold is None
                                             else float(layout.anomaly_threshold))
                g.create_dataset("count", data=np.int64(0))
                g.create_dataset("analysed", data=np.zeros((ny, nx), bool))
            # frames seen, blocks done, unix time of the last write: a reader can tell a stalled run
            f.create_dataset("progress", data=np.array([0.0, 0.0, time.time()]))
        return cls(path, layout, final)

    def _open(self):
        return h5py.File(self.path, "r+", locking=False)

    def write_blocks(self, indices: np.ndarray, pacbed: np.ndarray, counts: np.ndarray,
                     estimates: Sequence[PacbedEstimate] | None, partial: np.ndarray, frames_seen: int, *,
                     rows: dict[str, np.ndarray] | None = None) -> None:
        """Write analysed blocks (their sums, counts and estimates) and mark them done.

        ``rows``: the blocks' map values as the engine already stacked them (`estimate_row` per
        block); without them they are made here from ``estimates``.  The per-block maps are
        small: they are read, updated and written whole (a few h5py calls instead of one per
        block and field); only the block PACBEDs go one by one.
        """
        indices = np.asarray(indices, np.int64).reshape(-1, 2)
        ii, jj = indices.T
        if rows is None:
            made = [estimate_row(est, bool(part)) for est, part in zip(estimates, partial)]
            rows = {k: np.stack([r[k] for r in made]) for k in MAP_FIELDS}
        with self._lock, self._open_running() as f:
            for n, (i, j) in enumerate(indices):
                f["blocks/pacbed"][i, j] = pacbed[n]
            self._write_rows(f, ii, jj, rows)
            for name, values in (("blocks/counts", counts), ("blocks/partial", partial)):
                full = f[name][()]
                full[ii, jj] = values
                f[name][...] = full
            done = f["blocks/done"][()]
            done[ii, jj] = True  # last: a block marked done is whole
            f["blocks/done"][...] = done
            f["progress"][...] = [frames_seen, float(done.sum()), time.time()]
            f.flush()

    def write_maps(self, indices: np.ndarray, rows: dict[str, np.ndarray]) -> None:
        """Replace the map values of blocks already written (the library check's results:
        ``rows`` as `estimate_row` gives them, stacked); sums, counts and done stay."""
        indices = np.asarray(indices, np.int64).reshape(-1, 2)
        with self._lock, self._open_running() as f:
            self._write_rows(f, *indices.T, rows)
            f["progress"][2] = time.time()
            f.flush()

    def _open_running(self):
        if self.state != "running":
            raise RuntimeError(f"store {self.path} is closed ({self.state})")
        return self._open()

    @staticmethod
    def _write_rows(f, ii, jj, rows: dict[str, np.ndarray]) -> None:
        for k in MAP_FIELDS:
            ds = f[f"maps/{k}"]
            full = ds[()]
            full[ii, jj] = rows[k]
            ds[...] = full

    def write_virtual(self, images: dict[str, np.ndarray], frames_seen: int | None = None) -> None:
        """Replace the virtual images (scan grid, NaN where not scanned yet)."""
        with self._lock, self._open() as f:
            for name, img in images.items():
                if f"virtual/{name}" in f:
                    f[f"virtual/{name}"][...] = img
            if frames_seen is not None:
                f["progress"][0] = frames_seen
                f["progress"][2] = time.time()
            f.flush()

    def write_radial(self, frames: np.ndarray, profiles: np.ndarray, center_px: tuple[float, float],
                     radius_px: float | None = None) -> None:
        """Per-frame radial profiles (flat scan indices ``frames``, (n, n_bins)) around ``center_px``
        (``radius_px``: the disk radius, α, the rings were scaled with).

        The scan rows they span are read, updated and written whole (frames arrive in runs of
        whole rows, so this is one contiguous write, not one per frame)."""
        frames = np.asarray(frames, np.int64)
        if not self.layout.radial_bins or frames.size == 0:
            return
        sx = self.layout.scan_shape[1]
        r0, r1 = int(frames.min()) // sx, int(frames.max()) // sx + 1
        with self._lock, self._open() as f:
            ds = f["virtual/radial"]
            rows = ds[r0:r1]
            rows.reshape(-1, rows.shape[-1])[frames - r0 * sx] = profiles
            ds[r0:r1] = rows
            ds.attrs["center_px"] = np.asarray(center_px, np.float64)
            if radius_px is not None:
                ds.attrs["radius_px"] = float(radius_px)
            f.flush()

    def write_atoms(self, rows, analysed: np.ndarray) -> None:
        """Append found columns (an `AtomRows`) and mark the blocks analysed; the count goes last."""
        with self._lock, self._open() as f:
            g = f["atoms"]
            n0, n = int(g["count"][()]), len(rows)
            if n0 + n > g["positions"].shape[0]:  # keep what fits and say so; the run goes on
                n = g["positions"].shape[0] - n0
                g.attrs["truncated"] = True
                rows = rows.head(n)
            if n:
                g["positions"][n0:n0 + n] = rows.positions_px
                g["confidence"][n0:n0 + n] = rows.confidence
                g["intensity"][n0:n0 + n] = rows.intensity
                g["block"][n0:n0 + n] = rows.block
                if "species" in g and rows.species is not None:
                    for name in ATOM_ANALYSES:
                        g[name][n0:n0 + n] = getattr(rows, name)
            g["analysed"][...] = analysed
            g["count"][()] = n0 + n
            f.flush()

    def finish(self, state: str = "complete", reason: str = "", replace: bool = True, **counts: int) -> None:
        """Close the acquisition: ``state`` complete or aborted (with the reason); the atom
        table is cut to the columns found; ``counts`` (frames_dropped, blocks_dropped, blocks_failed)
        become attributes.  A complete store written beside the one it replaces
        is renamed over it (unless ``replace`` is False: nothing useful came out); otherwise it
        stays beside, and the reason says so."""
        if state not in STATES[1:]:
            raise ValueError(f"final state must be 'complete' or 'aborted', not {state!r}")
        with self._lock:
            self._finish(state, reason, replace, counts)

    def _finish(self, state: str, reason: str, replace: bool, counts: dict) -> None:
        if self.state != "running":
            return
        replacing = self.path != self.final_path
        if replacing and not (state == "complete" and replace):
            reason = (f"{reason}; " if reason else "") + (f"{self.final_path} was left as it was, this run's "
                                                          f"results are in {self.path}")
        with self._open() as f:
            if "atoms" in f:
                g = f["atoms"]
                n = int(g["count"][()])
                for name in ("positions", "confidence", "intensity", "block") + ATOM_ANALYSES:
                    if name not in g:
                        continue
                    data, attrs = g[name][:n], dict(g[name].attrs)
                    del g[name]
                    g.create_dataset(name, data=data).attrs.update(attrs)
            f.attrs["state"] = state
            f.attrs["reason"] = reason
            f.attrs["finished"] = _now()
            for name, value in counts.items():
                f.attrs[name] = int(value)
            f.flush()
        self.state = state
        self.reason = reason
        if replacing and state == "complete" and replace:
            os.replace(self.path, self.final_path)
            self.path = self.final_path


def estimate_row(est: PacbedEstimate | None, partial: bool, check=None) -> dict:
    """One block's map values from its estimate (NaN / -1 and the error bit when it failed).

    ``check``: the library check's `CheckOutcome` for this block; its estimate then replaces
    ``est`` and the row says method "check" with the fit quality and runner-up."""
    row = {k: np.full(trail, fill, dtype) for k, (trail, dtype, fill) in MAP_FIELDS.items()}
    flags = ["partial"] if partial else []
    if est is not None or check is not None:
        row["method"] = np.uint8(METHOD_CODES["network" if check is None else "check"])
    if check is not None:
        est = check.estimate
        for k in ("fit_quality", "thickness_alt_nm", "alt_delta_chi2"):
            row[k] = np.float32(getattr(check, k))
    if est is None or est.error is not None:
        row["flags"] = np.uint32(flag_bits(flags + ["error"]))
        return row
    for k in ("thickness_nm", "thickness_sigma_nm", "tilt_mrad", "tilt_sigma_mrad", "tilt_crystal_mrad",
              "center_px", "radius_px", "rotation_deg", "background"):
        v = getattr(est, k)
        if v is not None:
            row[k] = np.asarray(v, MAP_FIELDS[k][1])
    row["in_range"] = np.int8(1 if est.in_range else 0)
    row["flags"] = np.uint32(flag_bits(list(est.flags) + flags))
    return row


def read_store(path: str | Path) -> dict:
    """Everything in a store as numpy arrays and attributes (for the dashboard, reanalyse, tests).

    ``out["virtual"]`` holds the ring images only; the per-frame profiles, where the store has
    them, are ``out["radial"]`` = {"profiles" (scan_y, scan_x, n_bins), "bin_px", "center_px",
    "radius_px"} (radius_px NaN in stores written before it was recorded)."""
    out: dict = {"maps": {}, "virtual": {}, "blocks": {}}
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path} does not exist")
    if not h5py.is_hdf5(path):
        raise ValueError(f"{path} is not an HDF5 file (a stemlive result store is)")
    with h5py.File(path, "r", locking=False) as f:
        missing = [k for k in ("scan_shape", "block_shape", "models", "rings", "flag_names") if k not in f.attrs]
        missing += [g for g in ("maps", "virtual", "blocks", "progress") if g not in f]
        if missing:
            raise ValueError(f"{path} is not a stemlive result store (it lacks {', '.join(missing)})")
        attrs = dict(f.attrs)
        for k in ("models", "rings", "flag_names", "check"):
            if k in attrs:
                attrs[k] = json.loads(attrs[k])
        for group in ("maps", "virtual", "blocks"):
            for name, ds in f[group].items():
                if group == "virtual" and name == "radial":  # per-frame profiles, not an image
                    out["radial"] = {"profiles": ds[()], "bin_px": float(ds.attrs["bin_px"]),
                                     "center_px": np.asarray(ds.attrs["center_px"], np.float64),
                                     "radius_px": float(ds.attrs.get("radius_px", np.nan))}
                    continue
                out[group][name] = ds[()]
        if "atoms" in f:
            g = f["atoms"]
            n = int(g["count"][()])
            out["atoms"] = {k: g[k][:n] for k in ("positions", "confidence", "intensity", "block")}
            out["atoms"]["analysed"] = g["analysed"][()]
            out["atoms"]["contrast"] = str(g.attrs["contrast"])
            if "species" in g:  # stores before the per-column analyses have none of these
                out["atoms"].update({k: g[k][:n] for k in ATOM_ANALYSES})
                out["atoms"]["species_names"] = json.loads(g["species"].attrs["names"])
                out["atoms"]["anomaly_threshold"] = float(g["anomaly_flag"].attrs["threshold"])
        out["progress"] = f["progress"][()]
    out["attrs"] = attrs
    return out
