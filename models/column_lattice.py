"""Lattice sites from located columns: the reference a column's patch is centred on.

The point-defect anomaly (`column_anomaly`) judges a column against where the *lattice* puts it,
not against where the column itself was fitted: a Ti column displaced 5-20 pm (a ferroelectric
off-centring), or a column pulled by an interstitial, would sit at the centre of its own
fitted-position patch and look like bulk -- the fit follows exactly the displacement the anomaly
should see (and adds its own ~5-10 pm error, as large as the displacements).  A lattice, fitted
to every column at once, is fixed by the hundreds of columns around and moves by no single one.

`fit_lattice`: two basis vectors and an origin (a Bravais lattice; the columns found in one image
of SrTiO3 [001] form one: Sr + Ti-O in HAADF, a/√2 apart; every column incl. O in ABF, a/2):

1. the basis from the first-shell neighbour vectors (their densest cluster, then the densest one
   not parallel to it; both refined below, so any primitive pair will do);
2. every column indexed (i, j) by rounding its fractional coordinates, and origin + basis refined
   by least squares on the columns within ``max_residual`` of a lattice point -- first near the
   centre, then over ever larger discs (a basis 1 % off would mis-index columns 50 cells away).

`lattice_sites`: each column's site is its nearest lattice point, optionally shifted by the
median offset (column − lattice point) of the other columns within ``local_cells`` of it -- so
slow scan distortion and drift move the sites with the image, while the column's own offset
never enters its own site.  ``sublattice`` ((i mod 2, j mod 2), 0-3) groups columns that are
the same kind in a crystal whose cell is at most twice the fitted lattice's (SrTiO3 [001]: Sr
and Ti-O from HAADF, Sr, Ti-O, O, O from ABF): the neighbours a column is compared with.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.spatial import cKDTree

MIN_COLUMNS = 6


@dataclass
class Lattice:
    origin: np.ndarray  # (2,) px (row, col)
    basis: np.ndarray  # (2, 2) rows: the two basis vectors [px]

    def fractional(self, positions_px: np.ndarray) -> np.ndarray:
        """(n, 2) lattice coordinates of positions."""
        return np.linalg.solve(self.basis.T, (np.asarray(positions_px, float) - self.origin).T).T

    def indices(self, positions_px: np.ndarray) -> np.ndarray:
        """(n, 2) int: the nearest lattice point's (i, j)."""
        return np.rint(self.fractional(positions_px)).astype(np.int64)

    def points(self, ij: np.ndarray) -> np.ndarray:
        return self.origin + np.asarray(ij, float) @ self.basis

    @property
    def cell_area_px2(self) -> float:
        return float(abs(np.linalg.det(self.basis)))

    @property
    def spacing_px(self) -> float:
        """The shorter basis vector's length."""
        return float(np.hypot(*self.basis.T).min())


@dataclass
class LatticeSites:
    lattice: Lattice
    sites_px: np.ndarray  # (n, 2) each column's site
    indices: np.ndarray  # (n, 2) int lattice indices of the sites
    offset_px: np.ndarray  # (n, 2) column position − site
    on_lattice: np.ndarray  # (n,) bool: the column lies within max_residual of its lattice point
    sublattice: np.ndarray  # (n,) int 0-3: (i mod 2) * 2 + (j mod 2)
    rms_residual_px: float  # of the on-lattice columns about the global lattice


def _basis_from_neighbours(pos: np.ndarray) -> np.ndarray:
    tree = cKDTree(pos)
    k = min(9, len(pos))
    dist, idx = tree.query(pos, k=k)
    d = float(np.median(dist[:, 1]))
    vec = (pos[idx[:, 1:]] - pos[:, None]).reshape(-1, 2)
    length = np.hypot(*vec.T)
    vec, length = vec[length <= 1.6 * d], length[length <= 1.6 * d]
    # fold v and -v together: angle in [0, π)
    flip = (vec[:, 0] < 0) | ((vec[:, 0] == 0) & (vec[:, 1] < 0))
    vec[flip] *= -1
    vtree = cKDTree(vec)
    count = vtree.query_ball_point(vec, 0.2 * d, return_length=True).astype(float)

    def cluster(mask: np.ndarray) -> tuple[np.ndarray, float]:
        best = np.flatnonzero(mask)
        # densest clusters (within half the best count), the shortest of them
        top = count[best].max()
        cand = best[count[best] >= 0.5 * top]
        c = cand[np.argmin(length[cand])] if len(cand) else best[np.argmax(count[best])]
        near = np.hypot(*(vec - vec[c]).T) <= 0.2 * d
        return vec[near].mean(axis=0), float(count[c])

    a1, _ = cluster(length <= 1.2 * d)
    u1 = a1 / np.hypot(*a1)
    sin = np.abs(vec[:, 0] * u1[1] - vec[:, 1] * u1[0]) / np.maximum(length, 1e-12)
    other = sin > 0.35
    if not other.any():
        raise ValueError("the columns lie along lines, not on a 2D lattice; no lattice to fit")
    a2, _ = cluster(other)
    return np.array([a1, a2])


def _refine(pos: np.ndarray, lat: Lattice, use: np.ndarray, max_residual: float) -> tuple[Lattice, np.ndarray]:
    ij = lat.indices(pos)
    res = pos - lat.points(ij)
    good = use & (np.hypot(*res.T) <= max_residual * lat.spacing_px)
    if good.sum() < MIN_COLUMNS or np.linalg.matrix_rank(np.column_stack([np.ones(good.sum()), ij[good]])) < 3:
        return lat, good  # too few or collinear columns to refine with: keep the lattice as it is
    a = np.column_stack([np.ones(good.sum()), ij[good]])
    coef, *_ = np.linalg.lstsq(a, pos[good], rcond=None)
    if abs(np.linalg.det(coef[1:3])) < 0.5 * lat.cell_area_px2:
        return lat, good
    return Lattice(coef[0], coef[1:3]), good


def fit_lattice(positions_px: np.ndarray, max_residual: float = 0.25) -> Lattice:
    """Origin and basis of the lattice the columns lie on (least squares over the columns within
    ``max_residual`` basis lengths of a lattice point).  Needs ≥ :data:`MIN_COLUMNS` columns."""
    pos = np.asarray(positions_px, np.float64).reshape(-1, 2)
    if len(pos) < MIN_COLUMNS:
        raise ValueError(f"a lattice fit needs at least {MIN_COLUMNS} columns, got {len(pos)}")
    if not np.isfinite(pos).all():
        raise ValueError("column positions hold NaN or infinite values")
    basis = _basis_from_neighbours(pos)
    if abs(np.linalg.det(basis)) < 1e-9:
        raise ValueError("the columns' neighbour vectors do not span a plane; no lattice to fit")
    centre = np.median(pos, axis=0)
    r = np.hypot(*(pos - centre).T)
    lat = Lattice(pos[np.argmin(r)].copy(), basis)
    radius = 4.0 * lat.spacing_px
    while True:
        for _ in range(2):
            lat, good = _refine(pos, lat, r <= radius, max_residual)
        if radius >= r.max():
            break
        radius *= 2
    lat, good = _refine(pos, lat, np.ones(len(pos), bool), max_residual)
    if good.sum() < MIN_COLUMNS:
        raise ValueError(f"only {int(good.sum())} of {len(pos)} columns lie on one lattice; no lattice to fit")
    return lat


def lattice_sites(positions_px: np.ndarray, local_cells: float | None = 3.0, max_residual: float = 0.25,
                  lattice: Lattice | None = None) -> LatticeSites:
    """Each column's lattice site (see the module docstring).  ``local_cells``: radius, in basis
    lengths, of the neighbours whose median offset shifts a site (None: the global lattice only)."""
    pos = np.asarray(positions_px, np.float64).reshape(-1, 2)
    lat = lattice or fit_lattice(pos, max_residual)
    ij = lat.indices(pos)
    ideal = lat.points(ij)
    res = pos - ideal
    on = np.hypot(*res.T) <= max_residual * lat.spacing_px
    rms = float(np.sqrt(np.mean(np.sum(res[on] ** 2, axis=1)))) if on.any() else float("nan")
    sites = ideal.copy()
    if local_cells is not None and on.sum() >= 2:
        src = np.flatnonzero(on)
        tree = cKDTree(pos[src])
        for k, nb in enumerate(tree.query_ball_point(pos, local_cells * lat.spacing_px)):
            nb = [src[m] for m in nb if src[m] != k]
            if len(nb) >= 3:
                sites[k] += np.median(res[nb], axis=0)
    sub = (ij[:, 0] % 2) * 2 + (ij[:, 1] % 2)
    return LatticeSites(lat, sites, ij, pos - sites, on, sub.astype(np.int64), rms)
