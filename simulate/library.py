"""PACBED/CBED libraries on disk: reading (numpy + h5py only) and symmetry expansion.

Layout of a library file (all angles in mrad, thickness in nm)::

    /patterns            (n_tilt, n_thickness, k0, k1) float32, fraction of the incident probe per pixel
    /position_patterns   (n_simulated, n_thickness, N0, N1, k0, k1) float16, only with
                         --keep-positions; per simulated tilt (derive others with tilt_op)
    /thickness_nm        (n_thickness,)  abTEM's exit-plane thicknesses
    /tilt_mrad           (n_tilt, 2)     Probe(tilt=(t0, t1)), detector frame (DESIGN.md)
    /tilt_crystal_mrad   (n_tilt, 2)     the same along attrs axis0_direction / axis1_direction
    /tilt_simulated      (n_tilt,) bool  False: derived by a symmetry operation
    /tilt_op             (n_tilt, 2, 2)  operation applied to the simulated pattern
    /tilt_source         (n_tilt,)       index into /simulated_tilt_mrad
    /simulated_tilt_mrad, /phonon_seed_entropy, /seconds   per simulated tilt
    /probe_positions_frac (N0·N1, 2)     probe positions within the unit cell (from the mirror origin)
    attrs: kv, alpha_mrad, mrad_per_px, center_px, material, zone, simulator, simulator_version,
           params (JSON), plan (JSON), stemlive_version, created
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np


@dataclass
class PacbedLibrary:
    """A library loaded in memory (patterns as float32)."""

    patterns: np.ndarray
    thickness_nm: np.ndarray
    tilt_mrad: np.ndarray
    mrad_per_px: float
    kv: float
    alpha_mrad: float
    attrs: dict
    position_patterns: np.ndarray | None = None  # per simulated tilt
    tilt_source: np.ndarray | None = None
    tilt_op: np.ndarray | None = None

    def positions_for_tilt(self, index: int) -> np.ndarray:
        """Per-position CBED (thickness, N0, N1, k0, k1) at ``tilt_mrad[index]``, derived with the
        stored symmetry operation; positions are mapped with it (grid starts on the mirror origin)."""
        from .symmetry import apply_to_position_grid

        if self.position_patterns is None:
            raise ValueError("library loaded without per-position CBED (positions=True)")
        src = self.position_patterns[self.tilt_source[index]].astype(np.float32)
        return apply_to_position_grid(src, self.tilt_op[index])

    @classmethod
    def load(cls, path: str | Path, positions: bool = False) -> "PacbedLibrary":
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"library {path} does not exist; build it with `stemlive simulate pacbed`")
        with h5py.File(path, "r") as f:
            if "patterns" not in f:
                raise ValueError(f"{path} is not a stemlive PACBED library (no /patterns)")
            attrs = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in f.attrs.items()}
            pos = f["position_patterns"][()] if positions and "position_patterns" in f else None
            if positions and pos is None:
                raise ValueError(f"{path} has no per-position CBED; rebuild with --keep-positions")
            source, ops = f["tilt_source"][()], f["tilt_op"][()]
            return cls(
                patterns=f["patterns"][()].astype(np.float32),
                thickness_nm=f["thickness_nm"][()],
                tilt_mrad=f["tilt_mrad"][()],
                mrad_per_px=float(attrs["mrad_per_px"]),
                kv=float(attrs["kv"]),
                alpha_mrad=float(attrs["alpha_mrad"]),
                attrs=attrs,
                position_patterns=pos,
                tilt_source=source,
                tilt_op=ops,
            )

    @property
    def params(self) -> dict:
        return json.loads(self.attrs["params"])

    def tilt_index(self, tilt: tuple[float, float], tol: float = 1e-6) -> int:
        d = np.abs(self.tilt_mrad - np.asarray(tilt, float)).max(axis=1)
        i = int(np.argmin(d))
        if d[i] > tol:
            raise KeyError(f"tilt {tuple(tilt)} mrad is not in the library")
        return i

    def pattern(self, thickness_nm: float, tilt: tuple[float, float]) -> np.ndarray:
        """The stored pattern nearest in thickness at exactly ``tilt`` (either quadrant on a
        symmetric zone: other quadrants are derived with the crystal's mirrors)."""
        it = int(np.argmin(np.abs(self.thickness_nm - thickness_nm)))
        try:
            return self.patterns[self.tilt_index(tilt), it]
        except KeyError:
            signed = expand_signed(self)
            return signed.patterns[signed.tilt_index(tilt), it]


def expand_signed(lib: PacbedLibrary) -> PacbedLibrary:
    """Derive negative tilts from a first-quadrant library with the zone's mirrors (if it has them)."""
    from .symmetry import apply_to_pattern

    ops = [np.array(o) for o in json.loads(lib.attrs.get("point_group", "[]"))]
    mirrors = {(s0, s1): np.diag([s0, s1]) for s0 in (1, -1) for s1 in (1, -1)}
    have = {tuple(np.diag(o)) for o in ops if o[0, 1] == 0}
    tilts, pats = [], []
    for (s0, s1), g in mirrors.items():
        if (s0, s1) not in have:
            continue
        for i, t in enumerate(lib.tilt_mrad):
            nt = g @ t
            if any(np.allclose(nt, x) for x in tilts):
                continue
            tilts.append(nt)
            pats.append(apply_to_pattern(lib.patterns[i], g))
    return PacbedLibrary(np.stack(pats), lib.thickness_nm, np.array(tilts), lib.mrad_per_px, lib.kv,
                         lib.alpha_mrad, lib.attrs, None)
