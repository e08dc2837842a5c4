"""Projected atomic columns of a crystal along its zone axis: the labels of atom finding.

A column is the set of atoms that share one (x, y) position in projection.  Its composition
decides what an image shows: HAADF intensity grows roughly as Σ Z^n (n ≈ 1.6-2) along the
column, so the cation-containing columns are what HAADF finds; ABF shows light columns
(oxygen) too.  Positions are in Å in the oriented cell (x along array axis 0, y along axis 1,
DESIGN.md conventions), and can be tiled over a field of view.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .crystals import ZoneCell

# anions: a column of these alone is not "cation-containing" (the HAADF truth of issue 6)
ANIONS = {"H", "B", "C", "N", "O", "F", "S", "Cl", "Se", "Br", "Te", "I"}


@dataclass(frozen=True)
class ColumnSet:
    positions_A: np.ndarray  # (n, 2) column positions in one cell [Å]
    composition: tuple[dict, ...]  # per column {element: atoms per cell repeat along z}
    cell_A: tuple[float, float]  # in-plane cell (axis 0, axis 1) [Å]
    repeat_A: float  # cell length along the beam [Å]

    def labels(self) -> list[str]:
        """'Sr', 'Ti-O', 'O' ... (elements in a column, heaviest first)."""
        from ase.data import atomic_numbers

        return ["-".join(sorted(c, key=lambda e: -atomic_numbers[e])) for c in self.composition]

    def has_cation(self) -> np.ndarray:
        """Columns holding any cation (metal); pure anion columns (O, S, ...) are False."""
        return np.array([any(e not in ANIONS for e in c) for c in self.composition])

    def relative_weight(self, exponent: float = 1.7) -> np.ndarray:
        """Z-weight of each column over the brightest's: how visible it is in HAADF."""
        w = self.z_weight(exponent)
        return w / w.max()

    def z_weight(self, exponent: float = 1.7) -> np.ndarray:
        """Σ Z^exponent per Å along the beam: the convolution approximation's column weight."""
        from ase.data import atomic_numbers

        return np.array([sum(n * atomic_numbers[e] ** exponent for e, n in c.items()) / self.repeat_A
                         for c in self.composition])

    def tile(self, reps: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        """Positions [Å] and cell-column index of every column in reps[0] × reps[1] cells."""
        i, j = np.meshgrid(np.arange(reps[0]), np.arange(reps[1]), indexing="ij")
        offsets = np.stack([i.ravel() * self.cell_A[0], j.ravel() * self.cell_A[1]], axis=1)
        pos = (offsets[:, None, :] + self.positions_A[None]).reshape(-1, 2)
        index = np.tile(np.arange(len(self.positions_A)), len(offsets))
        return pos, index


def project_columns(zc: ZoneCell, tol_A: float = 0.1) -> ColumnSet:
    """Group the oriented cell's atoms into columns (positions equal within ``tol_A`` in projection)."""
    atoms = zc.atoms
    cell = np.diag(np.asarray(atoms.cell))
    xy = np.mod(atoms.positions[:, :2], cell[:2])
    symbols = atoms.get_chemical_symbols()
    centres: list[np.ndarray] = []
    members: list[dict] = []
    for p, s in zip(xy, symbols):
        for k, c in enumerate(centres):
            d = p - c
            d -= np.round(d / cell[:2]) * cell[:2]  # periodic
            if np.hypot(*d) < tol_A:
                members[k][s] = members[k].get(s, 0) + 1
                break
        else:
            centres.append(p.copy())
            members.append({s: 1})
    order = np.lexsort((np.array(centres)[:, 1], np.array(centres)[:, 0]))
    return ColumnSet(positions_A=np.array(centres)[order], composition=tuple(members[i] for i in order),
                     cell_A=(float(cell[0]), float(cell[1])), repeat_A=float(cell[2]))
