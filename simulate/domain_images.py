"""Two-domain SrTiO3 [001] images: a grain turned by a known angle against the matrix.

The test specimen of the local-symmetry maps (rotationally invariant VAE, seed 004,
`models/column_rvae.py`): one field imaged in HAADF and ABF with the species image model
(`species_images.render_pair`: the convolution approximation calibrated on multislice, probe,
source, thickness, exponents, background, Poisson dose), every column bulk, but the lattice
on one side of a straight boundary is turned by ``grain_deg`` (5-30°, either sense) against
the matrix (itself at any rotation).  The boundary line passes near the field's centre at any
inclination.  Where the two lattices meet, a grain column closer than ``min_gap`` nearest-
neighbour spacings to a matrix column is left out (two columns cannot share a place).

Truth, for every cation column (Sr, Ti-O: what the HAADF finder locates): its position, its
domain (0 matrix, 1 grain), its lattice rotation in degrees modulo 90° in (-45°, 45°] (the
4-fold [001] projection), and its signed distance from the boundary in px (positive in the
grain).  Rotation sense: a positive angle turns the lattice from array axis 0 towards axis 1
(as `species_images.specimen_lattice` turns it).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
from scipy.spatial import cKDTree

from .species_images import MATERIAL, ZONE, SpeciesRanges, render_pair, specimen_lattice

SYMMETRY_DEG = 90.0  # [001] projection of a cubic perovskite: 4-fold


@dataclass
class DomainRanges:
    """What each specimen draws from (uniform unless noted)."""

    size_px: int = 256
    sampling_A: tuple[float, float] = (0.16, 0.24)  # log-uniform; ~12-17 px between cation columns
    matrix_deg: tuple[float, float] = (-45.0, 45.0)
    grain_deg: tuple[float, float] = (5.0, 30.0)  # magnitude; the sense is drawn
    boundary_normal_deg: tuple[float, float] = (0.0, 180.0)  # direction of the boundary's normal
    boundary_offset: float = 0.15  # the line passes within this fraction of the field from its centre
    dose_e_per_A2: tuple[float, float] = (1e3, 1e5)  # log-uniform
    min_gap: float = 0.5  # [nearest-neighbour spacings of all columns] closest grain-to-matrix column
    imaging: SpeciesRanges = field(default_factory=SpeciesRanges)  # probe, thickness, exponents, background: as species


@dataclass
class DomainImage:
    haadf: np.ndarray  # (H, W) float32 counts
    abf: np.ndarray  # (H, W) float32 counts
    sites_px: np.ndarray  # (n, 2) cation columns (row, col)
    domain: np.ndarray  # (n,) 0 matrix, 1 grain
    rotation_deg: np.ndarray  # (n,) lattice rotation, (-45, 45]
    boundary_px: np.ndarray  # (n,) signed distance from the boundary (positive: grain)
    meta: dict  # sampling_A, dose, matrix_deg, grain_deg (the turn), boundary point/normal, imaging


def wrap_deg(angle_deg, period: float = SYMMETRY_DEG) -> np.ndarray:
    """Angles modulo ``period`` in (-period/2, period/2]."""
    a = np.mod(np.asarray(angle_deg, np.float64) + period / 2, period) - period / 2
    return np.where(a == -period / 2, period / 2, a)


def domain_image(rng: np.random.Generator, r: DomainRanges = DomainRanges(), *, grain_deg: float | None = None,
                 dose_e_per_A2: float | None = None) -> DomainImage:
    """One two-domain specimen; ``grain_deg`` (signed) and ``dose_e_per_A2`` fix those draws."""
    from .atom_images import _columns

    cs = _columns(MATERIAL, ZONE)
    n = r.size_px
    s = float(np.exp(rng.uniform(*np.log(r.sampling_A))))
    theta0 = float(rng.uniform(*r.matrix_deg))
    if grain_deg is None:
        grain_deg = float(rng.uniform(*r.grain_deg)) * rng.choice([-1.0, 1.0])
    dose = float(np.exp(rng.uniform(*np.log(r.dose_e_per_A2)))) if dose_e_per_A2 is None else float(dose_e_per_A2)
    lattices = []
    for theta in (theta0, theta0 + grain_deg):
        lr = replace(r.imaging, size_px=n, sampling_A=(s, s), rotation_deg=(theta, theta))
        pos, index, _, _ = specimen_lattice(rng, lr)
        lattices.append((pos, index))
    beta = np.deg2rad(rng.uniform(*r.boundary_normal_deg))
    normal = np.array([np.cos(beta), np.sin(beta)])
    point = (n - 1) / 2 + rng.uniform(-r.boundary_offset, r.boundary_offset, 2) * n
    (pm, im), (pg, ig) = lattices
    dm, dg = (pm - point) @ normal, (pg - point) @ normal
    pm, im, dm = pm[dm < 0], im[dm < 0], dm[dm < 0]
    pg, ig, dg = pg[dg >= 0], ig[dg >= 0], dg[dg >= 0]
    nn_all = min(cs.cell_A) / 2 / s  # O to its cation neighbour along an axis: a/2
    if len(pm) and len(pg):
        near = cKDTree(pm).query(pg)[0] < r.min_gap * nn_all
        pg, ig, dg = pg[~near], ig[~near], dg[~near]
    pos = np.concatenate([pm, pg])
    index = np.concatenate([im, ig])
    dist = np.concatenate([dm, dg])
    domain = np.concatenate([np.zeros(len(pm), np.int64), np.ones(len(pg), np.int64)])
    imaging = replace(r.imaging, size_px=n, dose_e_per_A2=(dose, dose))
    images, meta = render_pair(rng, imaging, pos, lambda e, t: cs.z_weight(e)[index] * t, s)
    cation = cs.has_cation()[index]
    rot = wrap_deg(np.where(domain == 0, theta0, theta0 + grain_deg))
    meta.update({"matrix_deg": float(wrap_deg(theta0)), "grain_deg": float(grain_deg),
                 "boundary_point_px": point.tolist(), "boundary_normal": normal.tolist(),
                 "cation_spacing_px": float(min(cs.cell_A) / np.sqrt(2) / s), "material": MATERIAL, "zone": ZONE})
    return DomainImage(images["haadf"], images["abf"], pos[cation].astype(np.float32), domain[cation],
                       rot[cation], dist[cation], meta)
