"""abTEM simulation of PACBED (and position-resolved CBED) thickness series for one tilt.

One multislice run per tilt yields every thickness through abTEM's exit planes.  The probe is
tilted with ``Probe(tilt=(t0, t1))``, which is the stored tilt convention (DESIGN.md): the zero
disk stays centred, as under specimen mistilt.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np

from .params import PacbedParams, positions_per_cell, wavelength_A
from .resample import centre_crop, resample_pattern


def _is_fft_friendly(n: int) -> bool:
    for p in (2, 3, 5, 7):
        while n % p == 0:
            n //= p
    return n == 1


def grid_points(cell_length: float, reps: int, sampling: float) -> int:
    """Grid points along one axis: a whole number per unit cell, even and FFT-friendly.

    A whole number of pixels per unit cell keeps the sampled potential exactly periodic with
    the lattice, so probe positions one lattice vector apart are equivalent and the probe grid
    keeps the crystal's mirror symmetry (with 51.2 px per cell the average broke 4mm by 0.4 %).
    The sampling may end up to 3 % coarser than asked.
    """
    ideal = cell_length / sampling
    for m in range(max(1, math.floor(ideal * 0.97)), math.ceil(ideal) + 64):
        n = m * reps
        if n % 2 == 0 and _is_fft_friendly(n):
            return n
    raise ValueError(f"no FFT-friendly grid near {ideal:.1f} px per cell")


@dataclass
class Plan:
    """Quantities derived from :class:`PacbedParams` and the crystal; identical in every worker."""

    params: PacbedParams
    reps: tuple[int, int]
    extent: tuple[float, float]  # [Å]
    gpts: tuple[int, int]
    per_repeat: int
    slice_thickness: float  # [Å]
    exit_every: int
    num_slices: int
    exit_index: np.ndarray  # which exit planes are kept
    thickness_nm: np.ndarray
    positions: tuple[int, int]
    origin: np.ndarray  # [Å]
    native_mrad_per_px: tuple[float, float]
    half_px: tuple[int, int]  # native crop half-widths
    mrad_per_px: float  # stored sampling
    pixels: int  # stored size
    tilts: np.ndarray  # (n, 2) all tilts of the grid [mrad]
    sim_tilts: np.ndarray  # (m, 2) tilts that are simulated
    tilt_source: np.ndarray  # (n,) index into sim_tilts
    tilt_ops: np.ndarray  # (n, 2, 2)
    group: list
    axis_directions: tuple[str, str]
    sigmas: dict | None
    cell: tuple[float, float]  # in-plane unit cell [Å]
    columns: list  # [{"frac": [f0, f1], "species": "O+Ti"}, ...] projected atomic columns

    def phonon_seed(self, sim_index: int) -> list[int]:
        """Seed entropy of one simulated tilt: stable whatever the tilt grid is."""
        t0, t1 = self.sim_tilts[sim_index]
        return [self.params.seed, int(round(t0 * 1000)) + 10**6, int(round(t1 * 1000)) + 10**6]


def make_plan(params: PacbedParams) -> Plan:
    from .crystals import rms_displacements, zone_cell
    from .symmetry import IDENTITY, mirror_origin, point_group, reduce_tilts

    params.validate()
    zc = zone_cell(params.material, params.zone)
    a, b = zc.in_plane
    reps = (max(1, round(params.cell_extent_A / a)), max(1, round(params.cell_extent_A / b)))
    extent = (reps[0] * a, reps[1] * b)
    gpts = (grid_points(a, reps[0], params.sampling_A), grid_points(b, reps[1], params.sampling_A))
    per_repeat = max(1, round(zc.repeat_z / 2.0))
    dz = zc.repeat_z / per_repeat
    tmin, tmax, tstep = params.thickness_nm
    exit_every = max(1, round(tstep * 10 / dz))
    n_exits = max(1, math.floor(tmax * 10 / (dz * exit_every) + 0.5))  # last plane within half a step
    num_slices = n_exits * exit_every
    all_t = np.arange(n_exits + 1) * exit_every * dz / 10
    keep = np.flatnonzero((all_t >= tmin - 0.5 * exit_every * dz / 10) & (all_t > 0))
    lam = wavelength_A(params.kv)
    native = (lam / extent[0] * 1e3, lam / extent[1] * 1e3)
    max_angle = params.resolved_max_angle()
    cutoff = min(g / (2 * e) for g, e in zip(gpts, extent)) * lam * 1e3 * 2 / 3  # antialias limit
    if max_angle > cutoff:
        raise ValueError(
            f"stored range ±{max_angle:.1f} mrad exceeds the antialiased limit {cutoff:.1f} mrad; "
            "decrease --sampling-A"
        )
    half = tuple(int(math.ceil(max_angle / n)) for n in native)
    if params.pixels is None:
        if abs(native[0] - native[1]) > 1e-3 * native[0]:
            raise ValueError("non-square supercell: give --pixels so patterns are resampled isotropically")
        pixels, step = 2 * half[0] + 1, native[0]
    else:
        pixels, step = params.pixels, 2 * max_angle / (params.pixels - 1)
    group = point_group(zc.atoms) if params.use_symmetry else [IDENTITY]
    origin = mirror_origin(zc.atoms, group)
    vals = sorted(set(params.tilt_values_mrad) | ({-v for v in params.tilt_values_mrad} if params.tilt_signed else set()))
    tilts = np.array([(t0, t1) for t0 in vals for t1 in vals], float)
    sim_tilts, source, ops = reduce_tilts(tilts, group)
    pos = params.positions or (positions_per_cell(params.alpha_mrad, params.kv, a),
                               positions_per_cell(params.alpha_mrad, params.kv, b))
    sigmas = rms_displacements(zc.atoms) if params.phonon_passes > 0 else None
    return Plan(params, reps, extent, gpts, per_repeat, dz, exit_every, num_slices, keep, all_t[keep],
                tuple(pos), origin, native, half, step, pixels, tilts, sim_tilts, source, np.array(ops),
                group, (zc.axis0_direction, zc.axis1_direction), sigmas, (a, b), projected_columns(zc))


def projected_columns(zc) -> list[dict]:
    """Atomic columns of the zone cell: fractional in-plane position and species."""
    cell = np.array(zc.in_plane)
    cols: dict[tuple, set] = {}
    for sym, pos in zip(zc.atoms.get_chemical_symbols(), zc.atoms.positions):
        f = tuple(np.round(np.mod(pos[:2] / cell, 1.0), 4) % 1.0)
        cols.setdefault(f, set()).add(sym)
    return [{"frac": [float(f[0]), float(f[1])], "species": "+".join(sorted(s))} for f, s in sorted(cols.items())]


class PoolCache:
    """The slice pool of the last plan used in this process (built once per worker, not per tilt)."""

    def __init__(self) -> None:
        self._key: str | None = None
        self._pool = None

    def get(self, plan: Plan):
        from .crystals import zone_cell
        from .phonons import build_pool

        key = plan.params.to_json()
        if key != self._key:
            zc = zone_cell(plan.params.material, plan.params.zone)
            self._pool = build_pool(zc, plan.reps, plan.gpts, plan.per_repeat, plan.params.pool_cells,
                                    plan.sigmas, plan.params.seed)
            self._key = key
        return self._pool


POOLS = PoolCache()


def simulate_tilt(plan: Plan, sim_index: int) -> dict:
    """Simulate the thickness series of one tilt. Returns patterns and what produced them.

    ``patterns`` is (thickness, k0, k1), or (thickness, N0, N1, k0, k1) with ``keep_positions``;
    intensities are fractions of the incident probe per pixel.
    """
    import abtem

    abtem.config.set({"dask.lazy": False})
    pool = POOLS.get(plan)
    p = plan.params
    t0 = time.perf_counter()
    tilt = tuple(float(t) for t in plan.sim_tilts[sim_index])
    probe = abtem.Probe(semiangle_cutoff=p.alpha_mrad, energy=p.kv * 1e3, tilt=tilt,
                        gpts=plan.gpts, extent=plan.extent)
    n0, n1 = plan.positions
    a, b = plan.extent[0] / plan.reps[0], plan.extent[1] / plan.reps[1]
    centre = (plan.gpts[0] // 2, plan.gpts[1] // 2)
    nt = len(plan.exit_index)
    shape = (nt, n0, n1, plan.pixels, plan.pixels) if p.keep_positions else (nt, plan.pixels, plan.pixels)
    acc = np.zeros(shape, np.float64)
    passes = max(1, p.phonon_passes)
    seeds = np.random.SeedSequence(plan.phonon_seed(sim_index))
    for _ in range(passes):
        for i in range(n0):
            rng = np.random.default_rng(seeds.spawn(1)[0]) if plan.sigmas else None
            pot = pool.potential(plan.num_slices, rng, plan.exit_every)
            scan = np.array([(plan.origin[0] + i * a / n0, plan.origin[1] + j * b / n1) for j in range(n1)])
            meas = probe.scan(pot, scan=scan, detectors=abtem.PixelatedDetector(max_angle=None), lazy=False)
            arr = np.asarray(meas.array)[plan.exit_index]  # (nt, n1, g0, g1)
            arr = centre_crop(arr, centre, min(plan.half_px))
            if plan.params.pixels is not None or arr.shape[-1] != plan.pixels:
                arr = resample_pattern(arr, plan.native_mrad_per_px, plan.mrad_per_px, plan.pixels)
            if p.keep_positions:
                acc[:, i] += arr
            else:
                acc += arr.sum(axis=1)
    acc /= passes if p.keep_positions else passes * n0 * n1
    acc = symmetrize(acc, plan, sim_index)
    return {
        "patterns": acc.astype(np.float32),
        "seconds": time.perf_counter() - t0,
        "configurations": passes * n0 if plan.sigmas else 0,
        "seed_entropy": plan.phonon_seed(sim_index),
    }


def stabilizer(plan: Plan, sim_index: int) -> list[np.ndarray]:
    """Operations of the crystal's group that leave this tilt unchanged."""
    t = plan.sim_tilts[sim_index]
    return [g for g in plan.group if np.allclose(g @ t, t, atol=1e-9)]


def symmetrize(acc: np.ndarray, plan: Plan, sim_index: int) -> np.ndarray:
    """Average over the tilt's stabilizer: the ensemble average has that symmetry exactly, so this
    only removes frozen-phonon noise (e.g. 8 operations at zero tilt on [001])."""
    from .symmetry import apply_to_pattern, apply_to_position_grid

    ops = stabilizer(plan, sim_index)
    if len(ops) == 1:
        return acc
    apply = apply_to_position_grid if plan.params.keep_positions else apply_to_pattern
    return sum(apply(acc, g) for g in ops) / len(ops)
