"""Frozen phonons from a pool of displaced slices ("frozen lattice variants").

Building a fresh abTEM potential for every configuration of a 120 nm crystal costs about as
much as propagating the probe through it.  Because the Einstein model displaces every atom
independently, the slices of one configuration are independent draws too; so we build a pool
of ``pool_cells`` displaced unit-cell repeats once (one abTEM ``FrozenPhonons`` draw) and
assemble each configuration by picking, for every repeat along the beam, a random repeat of
the pool (as Dr. Probe does with its slice variants).  Slices keep their place in the repeat,
so the layer sequence is always the crystal's.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class SlicePool:
    """Pool of potential slices; ``array[k * per_repeat + j]`` is slice j of pool repeat k."""

    array: np.ndarray  # (pool_cells * per_repeat, gx, gy) float32
    per_repeat: int
    slice_thickness: float  # [Å]
    extent: tuple[float, float]  # [Å]

    @property
    def pool_cells(self) -> int:
        return self.array.shape[0] // self.per_repeat

    def configuration(self, num_slices: int, rng: np.random.Generator) -> np.ndarray:
        """Slice indices of one random configuration of ``num_slices`` slices."""
        repeats = -(-num_slices // self.per_repeat)
        pick = rng.integers(0, self.pool_cells, size=repeats)
        idx = (pick[:, None] * self.per_repeat + np.arange(self.per_repeat)[None, :]).ravel()
        return idx[:num_slices]

    def potential(self, num_slices: int, rng: np.random.Generator | None, exit_every: int):
        """abTEM ``PotentialArray`` of one configuration (``rng=None``: pool repeat 0 throughout)."""
        from abtem.potentials.iam import PotentialArray

        if rng is None:
            idx = np.arange(num_slices) % self.per_repeat
        else:
            idx = self.configuration(num_slices, rng)
        return PotentialArray(
            self.array[idx], slice_thickness=self.slice_thickness, extent=self.extent, exit_planes=exit_every
        )


def layer_offset(z: np.ndarray, repeat: float, per_repeat: int, samples: int = 200) -> float:
    """Shift along z [Å] that puts atomic layers as far as possible from slice boundaries."""
    dz = repeat / per_repeat
    best, best_d = 0.0, -1.0
    for off in np.linspace(0, dz, samples, endpoint=False):
        frac = np.mod(z + off, dz) / dz
        d = np.min(np.minimum(frac, 1 - frac))
        if d > best_d:
            best, best_d = off, d
    return float(best)


def build_pool(
    zone_cell, reps: tuple[int, int], gpts: tuple[int, int], per_repeat: int, pool_cells: int,
    sigmas: dict[str, float] | None, seed: int,
) -> SlicePool:
    """Build the slice pool with abTEM (``sigmas=None``: static lattice, one repeat)."""
    import abtem

    atoms = zone_cell.atoms.copy()
    repeat = zone_cell.repeat_z
    atoms.positions[:, 2] += layer_offset(atoms.positions[:, 2], repeat, per_repeat)
    atoms.wrap()
    n_cells = pool_cells if sigmas else 1
    crystal = atoms * (reps[0], reps[1], n_cells)
    source = abtem.FrozenPhonons(crystal, num_configs=1, sigmas=sigmas, seed=seed) if sigmas else crystal
    pot = abtem.Potential(source, gpts=gpts, slice_thickness=repeat / per_repeat, projection="infinite")
    arr = np.asarray(pot.build(lazy=False).array, dtype=np.float32)
    if arr.ndim == 4:
        arr = arr[0]
    return SlicePool(array=arr, per_repeat=per_repeat, slice_thickness=repeat / per_repeat,
                     extent=tuple(float(e) for e in pot.extent))
