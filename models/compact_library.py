"""A simulated PACBED library in the canonical frame, compressed by its principal components.

The library check (`pacbed_check.py`) scores a pattern against every (tilt, thickness) entry of
a library; it ships with the models, so it must be small (a full first-quadrant library in the
canonical frame is ~250 MB) and fast to score.  Both come from one fact: neighbouring
thicknesses and tilts give similar patterns, so the unit-normalised, mean-free canonical
patterns Ŝ lie close to a subspace of a few hundred dimensions.  With an orthonormal basis U
(R × 64²) of that subspace and the coefficients c = U·Ŝ, the least-squares fit of a pattern
I ≈ a·Ŝ + b scores (Ĩ·Ŝ)² = ((U·Ĩ)·c)², one (entries × R) product for the whole library.

Stored (HDF5, plain h5py): the basis (float16 by default: the rows are orthonormal, their rounding
adds ~2e-4 relative error, a tenth of the compression's own; read back as float32), the
coefficients (float16), each entry's mean
and norm in the canonical frame (to turn the fitted scale back into a background level), the
thickness and tilt grids, the setting (kV, α), the source library's sha256 and the worst
relative reconstruction error.  Only first-quadrant tilts are kept: the other quadrants are the
crystal's mirrors, applied to the pattern instead (as the LSF does).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from . import canonical

SCHEMA = 1
WINDOW_ALPHA = canonical.ANALYSIS_WINDOW_ALPHA  # the check fits inside the analysis window


@dataclass
class CompactLibrary:
    basis: np.ndarray  # (R, P²) orthonormal rows, full canonical frame
    coef: np.ndarray  # (T, K, R) coefficients of the unit, mean-free (in the window) patterns
    entry_mean: np.ndarray  # (T, K) mean of each canonical pattern in the window
    entry_norm: np.ndarray  # (T, K) |S − mean| in the window
    thickness_nm: np.ndarray  # (K,)
    tilt_mrad: np.ndarray  # (T, 2), first quadrant (crystal frame)
    kv: float
    alpha_mrad: float
    attrs: dict

    @property
    def window(self) -> np.ndarray:
        return canonical.window_mask(WINDOW_ALPHA).ravel()

    def patterns(self, ti: np.ndarray, ki: np.ndarray) -> np.ndarray:
        """Ŝ (unit, mean-free in the window) of the given entries, full frame: (n, P²)."""
        return self.coef[ti, ki].astype(np.float32) @ self.basis

    # -- files ---------------------------------------------------------------------------
    def save(self, path: str | Path, basis_dtype=np.float16) -> None:
        """Write (beside, then renamed over ``path``).  ``basis_dtype`` float16 (default) keeps a
        shipped 384-rank library of ~15 000 entries under 15 MB; float32 for a bit-exact basis."""
        path = Path(path)
        tmp = path.with_name(f".{path.name}.partial")
        with h5py.File(tmp, "w") as f:
            f.create_dataset("basis", data=self.basis.astype(basis_dtype), compression="gzip", shuffle=True)
            f.create_dataset("coef", data=self.coef.astype(np.float16), compression="gzip", shuffle=True)
            for name in ("entry_mean", "entry_norm", "thickness_nm", "tilt_mrad"):
                f.create_dataset(name, data=np.asarray(getattr(self, name), np.float32))
            f.attrs.update({"schema": SCHEMA, "kv": self.kv, "alpha_mrad": self.alpha_mrad,
                            "canonical_pixels": canonical.PIXELS, "alpha_px": canonical.ALPHA_PX,
                            "window_alpha": WINDOW_ALPHA, "meta": json.dumps(self.attrs)})
        tmp.replace(path)

    @classmethod
    def load(cls, path: str | Path) -> "CompactLibrary":
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"compact library {path} does not exist (`stemlive simulate compact-library`)")
        with h5py.File(path, "r") as f:
            if "coef" not in f or int(f.attrs.get("schema", 0)) != SCHEMA:
                raise ValueError(f"{path} is not a stemlive compact PACBED library (schema {SCHEMA})")
            if int(f.attrs["canonical_pixels"]) != canonical.PIXELS or \
                    not np.isclose(float(f.attrs["alpha_px"]), canonical.ALPHA_PX):
                raise ValueError(f"{path} was made for another canonical frame")
            return cls(basis=f["basis"][()].astype(np.float32), coef=f["coef"][()], entry_mean=f["entry_mean"][()],
                       entry_norm=f["entry_norm"][()], thickness_nm=f["thickness_nm"][()].astype(float),
                       tilt_mrad=f["tilt_mrad"][()].astype(float), kv=float(f.attrs["kv"]),
                       alpha_mrad=float(f.attrs["alpha_mrad"]), attrs=json.loads(f.attrs["meta"]))


def canonical_library(library) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """First-quadrant patterns of a `PacbedLibrary` in the canonical frame: (T, K, P²), tilts, thicknesses."""
    lib = library
    quad = np.flatnonzero((lib.tilt_mrad >= 0).all(axis=1))
    k = lib.patterns.shape[-1]
    c = ((k - 1) / 2, (k - 1) / 2)
    alpha_px = lib.alpha_mrad / lib.mrad_per_px
    K, P = len(lib.thickness_nm), canonical.PIXELS
    out = np.empty((len(quad), K, P * P), np.float32)
    for i, q in enumerate(quad):
        if alpha_px < 1.5 * canonical.ALPHA_PX:
            crops = canonical.to_canonical_stack(lib.patterns[q], np.tile(c, (K, 1)), np.full(K, alpha_px), np.zeros(K))
        else:
            crops = np.stack([canonical.to_canonical(p, c, alpha_px) for p in lib.patterns[q]])
        out[i] = crops.reshape(K, -1)
    return out, lib.tilt_mrad[quad].astype(float), np.asarray(lib.thickness_nm, float)


def build_compact(library, rank: int | None = None, tolerance: float = 2e-3, max_rank: int = 512,
                  progress: bool = False) -> CompactLibrary:
    """Compress a `PacbedLibrary` (or its path): the smallest rank whose worst entry is
    reconstructed within ``tolerance`` (relative RMS in the window), or ``rank`` if given."""
    from ..simulate.library import PacbedLibrary

    path = None
    if not isinstance(library, PacbedLibrary):
        path = Path(library)
        library = PacbedLibrary.load(path)
    full, tilts, thick = canonical_library(library)
    T, K, N = full.shape
    win = canonical.window_mask(WINDOW_ALPHA).ravel()
    mean = full[..., win].mean(axis=-1)
    centred = full - mean[..., None]
    norm = np.linalg.norm(centred[..., win], axis=-1)
    unit = (centred / np.maximum(norm, 1e-30)[..., None]).reshape(T * K, N)
    # principal directions: from the pixels' Gram matrix (N × N, N = 4096) for a full library;
    # a library of fewer entries than pixels spans at most T·K directions, which the thin SVD of
    # its entries gives at once (a 4096² eigen-decomposition takes ~40 s on 2 cores)
    if T * K < N:
        _, _, vt = np.linalg.svd(unit.astype(np.float64), full_matrices=False)
        vecs = vt.astype(np.float32)
    else:
        cov = unit.T.astype(np.float64) @ unit.astype(np.float64)  # (N, N)
        vals, vecs = np.linalg.eigh(cov)
        order = np.argsort(vals)[::-1]
        vecs = vecs[:, order].T.astype(np.float32)  # rows: principal directions
    if rank is None:
        rank = _smallest_rank(unit, vecs, win, tolerance, max_rank)
    basis = vecs[:rank]
    coef = unit @ basis.T
    err = _reconstruction_error(unit, basis, coef, win)
    attrs = {"source": str(path) if path else None, "rank": int(rank), "max_relative_error": float(err.max()),
             "median_relative_error": float(np.median(err)), "source_attrs_params": library.attrs.get("params")}
    if path is not None:
        attrs["source_sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    return CompactLibrary(basis=basis, coef=coef.reshape(T, K, rank), entry_mean=mean, entry_norm=norm,
                          thickness_nm=thick, tilt_mrad=tilts, kv=float(library.kv),
                          alpha_mrad=float(library.alpha_mrad), attrs=attrs)


def _reconstruction_error(unit, basis, coef, win) -> np.ndarray:
    """Relative RMS error of each entry's reconstruction inside the window (entries are unit there)."""
    rec = coef.astype(np.float16).astype(np.float32) @ basis  # as stored (float16 coefficients)
    return np.linalg.norm((rec - unit)[:, win], axis=1)


def _smallest_rank(unit, vecs, win, tolerance: float, max_rank: int) -> int:
    lo, hi = 8, min(max_rank, vecs.shape[0])
    while lo < hi:  # bisection on the worst reconstruction error
        mid = (lo + hi) // 2
        basis = vecs[:mid]
        if _reconstruction_error(unit, basis, unit @ basis.T, win).max() <= tolerance:
            hi = mid
        else:
            lo = mid + 1
    return lo
