"""Point symmetry of a zone-axis crystal, used to derive tilted patterns from simulated ones.

A mirror plane that contains the beam direction maps a crystal tilted by ``t`` onto one tilted
by ``g·t`` and the diffraction pattern by the same operation ``g`` (about the zero-disk centre),
so a pattern at a derived tilt costs an array flip instead of a simulation.  We only use
operations that keep z fixed (2D signed permutations acting on x, y), checked on the actual
3D structure, so screw axes and glides along the beam -- which would not hold at the exit
surface -- are never used.
"""
from __future__ import annotations

from itertools import product

import numpy as np

IDENTITY = np.eye(2, dtype=int)


def _signed_permutations(square: bool) -> list[np.ndarray]:
    ops = []
    for swap, s0, s1 in product((False, True), (1, -1), (1, -1)):
        if swap and not square:
            continue
        m = np.array([[0, s0], [s1, 0]]) if swap else np.array([[s0, 0], [0, s1]])
        ops.append(m)
    return ops


def _invariant(atoms, op: np.ndarray, shift: np.ndarray, tol: float) -> bool:
    """Whether r -> op·r + shift (in plane, z kept) maps every atom onto one of the same species."""
    cell = np.diag(np.asarray(atoms.cell))
    pos = atoms.positions
    sym = np.array(atoms.get_chemical_symbols())
    moved = pos.copy()
    moved[:, :2] = pos[:, :2] @ op.T + shift
    d = moved[:, None, :] - pos[None, :, :]
    d -= np.round(d / cell) * cell
    dist = np.where(sym[:, None] == sym[None, :], np.linalg.norm(d, axis=-1), np.inf)
    return bool(np.all(dist.min(axis=1) < tol))


def _symmetry_shift(atoms, op: np.ndarray, tol: float) -> np.ndarray | None:
    """In-plane translation t with op·r + t a symmetry of ``atoms``, or None."""
    pos = atoms.positions
    sym = np.array(atoms.get_chemical_symbols())
    for j in np.flatnonzero(sym == sym[0]):
        t = pos[j, :2] - op @ pos[0, :2]
        if _invariant(atoms, op, t, tol):
            return t
    return None


def point_group(atoms, tol: float = 1e-3) -> list[np.ndarray]:
    """The 2D signed-permutation operations (z kept) under which ``atoms`` is invariant."""
    a, b = np.diag(np.asarray(atoms.cell))[:2]
    square = abs(a - b) < 1e-6
    return [op for op in _signed_permutations(square) if _symmetry_shift(atoms, op, tol) is not None]


def mirror_origin(atoms, group: list[np.ndarray], tol: float = 1e-3) -> np.ndarray:
    """An in-plane point o [Å] fixed by every operation of ``group`` (r -> op·(r - o) + o), so a probe
    grid starting there maps onto itself and position-resolved patterns can be derived."""
    cell = np.diag(np.asarray(atoms.cell))[:2]
    cands = [p[:2] for p in atoms.positions] + [np.array(h) * cell for h in product((0, 0.5), repeat=2)]
    for o in cands:
        if all(_invariant(atoms, op, o - op @ o, tol) for op in group):
            return np.asarray(o, float)
    raise ValueError("no common mirror origin found for this crystal's point group")


def apply_to_pattern(pattern: np.ndarray, op: np.ndarray) -> np.ndarray:
    """Pattern of the tilt ``op·t`` from the pattern of tilt ``t``.

    The last two axes are (k0, k1) with the zero beam at the centre pixel (odd sizes), so
    ``new[k] = old[op⁻¹ k]`` is a flip and/or transpose about the centre.
    """
    if pattern.shape[-1] % 2 == 0 or pattern.shape[-2] % 2 == 0:
        raise ValueError("symmetry derivation needs odd pattern sizes (zero beam on the centre pixel)")
    inv = np.round(np.linalg.inv(op)).astype(int)
    if inv[0, 0] == 0:  # swap
        arr = np.swapaxes(pattern, -1, -2)
        s_for_axis0, s_for_axis1 = inv[1, 0], inv[0, 1]
    else:
        arr = pattern
        s_for_axis0, s_for_axis1 = inv[0, 0], inv[1, 1]
    if s_for_axis0 < 0:
        arr = np.flip(arr, axis=-2)
    if s_for_axis1 < 0:
        arr = np.flip(arr, axis=-1)
    return np.ascontiguousarray(arr)


def apply_to_position_grid(arr: np.ndarray, op: np.ndarray) -> np.ndarray:
    """Per-position patterns (..., N0, N1, k0, k1) of the tilt ``op·t`` from those of ``t``: each
    pattern is mapped by ``op`` and moves from probe position p to op·p (the grid of N0×N1
    positions per cell starts on the mirror origin, so op·p is again a grid point)."""
    mapped = apply_to_pattern(arr, op)
    n0, n1 = arr.shape[-4:-2]
    if n0 != n1 and op[0, 0] == 0:
        raise ValueError("a diagonal mirror needs a square probe grid")
    idx = np.indices((n0, n1)).reshape(2, -1).T
    moved = np.mod(idx @ op.T, (n0, n1))
    out = np.empty_like(mapped)
    out[..., moved[:, 0], moved[:, 1], :, :] = mapped[..., idx[:, 0], idx[:, 1], :, :]
    return out


def reduce_tilts(tilts: np.ndarray, group: list[np.ndarray], decimals: int = 6):
    """Split ``tilts`` (n, 2) into the ones to simulate and, for each tilt, (source index, op).

    Returns ``(unique, source, ops)``: ``unique`` the tilts to simulate, ``source[i]`` the index
    into ``unique`` and ``ops[i]`` the operation with ``tilts[i] = ops[i] @ unique[source[i]]``.
    Canonical representative: the orbit member that sorts largest, so (t0 ≥ t1 ≥ 0) on 4mm.
    """
    unique: list[tuple[float, float]] = []
    index: dict[tuple[float, float], int] = {}
    source = np.empty(len(tilts), int)
    ops = []
    for i, t in enumerate(np.asarray(tilts, float)):
        orbit = [(tuple(np.round(g @ t, decimals)), g) for g in group]
        canon, _ = max(orbit, key=lambda o: o[0])
        # op taking the canonical tilt to t: g_c maps t -> canon, so t = g_c^-1 canon
        g_c = next(g for tt, g in orbit if tt == canon)
        g = np.round(np.linalg.inv(g_c)).astype(int)
        if canon not in index:
            index[canon] = len(unique)
            unique.append(canon)
        source[i] = index[canon]
        ops.append(g)
    return np.array(unique, float).reshape(-1, 2), source, ops
