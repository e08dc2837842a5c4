"""Crystals oriented along a zone axis, as abTEM needs them.

The beam travels along +z; abTEM's x is stored as array axis 0 and y as axis 1 (DESIGN.md,
"Conventions").  For each oriented cell we also record which crystal directions lie along
axis 0 and axis 1, because tilt in the crystal frame is reported along them.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

SRTIO3_A = 3.905  # [Å], cubic perovskite lattice parameter

# Isotropic rms displacements per axis [Å] for frozen phonons at room temperature, from
# B = 8π²<u²> with B(Sr)=0.62, B(Ti)=0.42, B(O)=0.58 Å² (SrTiO3, room temperature).
SRTIO3_SIGMAS = {"Sr": 0.0886, "Ti": 0.0729, "O": 0.0857}
DEFAULT_SIGMA = 0.08  # [Å] used for elements without a tabulated value


@dataclass(frozen=True)
class ZoneCell:
    """One orthogonal repeat of the crystal with the zone axis along z."""

    atoms: "object"  # ase.Atoms; typed loosely so this module imports without ase at type time
    material: str
    zone: tuple[int, int, int]
    axis0_direction: str  # crystal direction along array axis 0, e.g. "[100]"
    axis1_direction: str

    @property
    def in_plane(self) -> tuple[float, float]:
        """Repeat lengths along axis 0 and axis 1 [Å]."""
        cell = np.asarray(self.atoms.cell)
        return float(cell[0, 0]), float(cell[1, 1])

    @property
    def repeat_z(self) -> float:
        """Repeat length along the beam [Å]."""
        return float(np.asarray(self.atoms.cell)[2, 2])


def srtio3():
    """Cubic SrTiO3 (Pm-3m, a = 3.905 Å) with Sr at the origin."""
    from ase.spacegroup import crystal

    return crystal(
        ["Sr", "Ti", "O"],
        basis=[(0, 0, 0), (0.5, 0.5, 0.5), (0.5, 0.5, 0)],
        spacegroup=221,
        cellpar=[SRTIO3_A] * 3 + [90] * 3,
    )


def batio3():
    """BaTiO3 taken cubic (Pm-3m, a = 4.00 Å; the room-temperature tetragonal distortion,
    c/a = 1.01, is below what the atom-finding images resolve)."""
    from ase.spacegroup import crystal

    return crystal(["Ba", "Ti", "O"], basis=[(0, 0, 0), (0.5, 0.5, 0.5), (0.5, 0.5, 0)], spacegroup=221,
                   cellpar=[4.00] * 3 + [90] * 3)


def mgo():
    """Rock-salt MgO (Fm-3m, a = 4.212 Å)."""
    from ase.spacegroup import crystal

    return crystal(["Mg", "O"], basis=[(0, 0, 0), (0.5, 0.5, 0.5)], spacegroup=225, cellpar=[4.212] * 3 + [90] * 3)


def mos2():
    """2H-MoS2 (P6_3/mmc, a = 3.160 Å, c = 12.294 Å): a hexagonal layered (2D) material."""
    from ase.spacegroup import crystal

    return crystal(["Mo", "S"], basis=[(1 / 3, 2 / 3, 0.25), (1 / 3, 2 / 3, 0.621)], spacegroup=194,
                   cellpar=[3.160, 3.160, 12.294, 90, 90, 120])


def mos2_monolayer():
    """One MoS2 layer (1H, a = 3.160 Å, S-S 3.19 Å) in a 20 Å cell: the 2D material as imaged."""
    from ase.build import mx2

    layer = mx2(formula="MoS2", kind="2H", a=3.160, thickness=3.19, vacuum=8.4)
    layer.pbc = True
    return layer


BUILT_IN = {"srtio3": ("SrTiO3", srtio3), "batio3": ("BaTiO3", batio3), "mgo": ("MgO", mgo), "mos2": ("MoS2", mos2),
            "mos2-monolayer": ("MoS2-monolayer", mos2_monolayer)}


def load_crystal(material: str):
    """Built-in name (SrTiO3, BaTiO3, MgO, MoS2, MoS2-monolayer) or a CIF path, as ase.Atoms."""
    if material.lower() in BUILT_IN:
        return BUILT_IN[material.lower()][1]()
    path = Path(material)
    if not path.exists():
        raise FileNotFoundError(
            f"material {material!r} is neither a built-in crystal ({', '.join(n for n, _ in BUILT_IN.values())}) "
            "nor an existing CIF file"
        )
    from ase.io import read

    return read(path)


def parse_zone(text: str) -> tuple[int, int, int]:
    """'[001]', '001', '1,1,0' or '1 -1 0' -> (u, v, w)."""
    t = text.strip().strip("[]")
    if "," in t or " " in t:
        parts = [p for p in t.replace(",", " ").split() if p]
    else:
        parts, i = [], 0
        while i < len(t):
            if t[i] == "-":
                parts.append(t[i : i + 2])
                i += 2
            else:
                parts.append(t[i])
                i += 1
    if len(parts) != 3:
        raise ValueError(f"zone axis {text!r} must have three indices, e.g. [001] or 1,1,0")
    zone = tuple(int(p) for p in parts)
    if zone == (0, 0, 0):
        raise ValueError("zone axis [000] has no direction")
    return zone  # type: ignore[return-value]


def _perpendicular_lattice_vectors(cell: np.ndarray, direction: np.ndarray, max_index: int = 4):
    """Shortest pair of mutually perpendicular lattice vectors perpendicular to ``direction``."""
    rng = range(-max_index, max_index + 1)
    cands = []
    for n in np.array(np.meshgrid(rng, rng, rng, indexing="ij")).reshape(3, -1).T:
        if not n.any():
            continue
        v = n @ cell
        if abs(v @ direction) < 1e-6 * np.linalg.norm(v) * np.linalg.norm(direction):
            cands.append((np.linalg.norm(v), tuple(n), v))
    cands.sort(key=lambda c: (round(c[0], 6), [-x for x in c[1]]))
    for i, (l1, n1, v1) in enumerate(cands):
        for l2, n2, v2 in cands[i + 1 :]:
            if abs(v1 @ v2) < 1e-6 * l1 * l2 and np.cross(v1, v2) @ direction > 0:
                return np.array(n1), np.array(n2)
    raise ValueError("no orthogonal in-plane lattice vectors found for this zone axis (index too high)")


def orient(atoms, zone: tuple[int, int, int], material: str) -> ZoneCell:
    """Build the orthogonal repeat of ``atoms`` with lattice direction ``zone`` along z.

    The in-plane axes are the two shortest mutually perpendicular lattice vectors normal to
    the zone; they define array axes 0 and 1.  Only zones with such a pair are supported
    (all zones of cubic, tetragonal and orthorhombic crystals, and the usual hexagonal ones).
    """
    from ase.build import make_supercell

    cell0 = np.asarray(atoms.cell).copy()
    n3 = np.asarray(zone, int)
    direction = n3 @ cell0
    n1, n2 = _perpendicular_lattice_vectors(cell0, direction)
    transform = np.array([n1, n2, n3])
    if round(abs(np.linalg.det(transform))) == 0:
        raise ValueError(f"zone {zone}: in-plane vectors are not independent")
    sup = make_supercell(atoms, transform, wrap=True)
    lengths = np.linalg.norm(transform @ cell0, axis=1)
    scaled = sup.get_scaled_positions(wrap=True)
    sup.set_cell(np.diag(lengths), scale_atoms=False)
    sup.set_scaled_positions(scaled)
    sup.wrap()

    def label(n):
        g = np.gcd.reduce(np.abs(n[n != 0]))
        return "[" + "".join(f"{'-' if i < 0 else ''}{abs(i)}" for i in n // g) + "]"

    return ZoneCell(atoms=sup, material=material, zone=tuple(int(z) for z in zone),
                    axis0_direction=label(n1), axis1_direction=label(n2))


def zone_cell(material: str, zone: str | tuple[int, int, int]) -> ZoneCell:
    """Load ``material`` and orient it along ``zone``."""
    z = parse_zone(zone) if isinstance(zone, str) else tuple(zone)
    name = BUILT_IN[material.lower()][0] if material.lower() in BUILT_IN else Path(material).stem
    return orient(load_crystal(material), z, name)


def rms_displacements(atoms) -> dict[str, float]:
    """Per-element rms displacement [Å] per axis for the frozen-phonon model."""
    out = {}
    for sym in sorted(set(atoms.get_chemical_symbols())):
        out[sym] = SRTIO3_SIGMAS.get(sym, DEFAULT_SIGMA)
    return out
