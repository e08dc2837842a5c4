"""Perovskite ABO3 supercells with octahedral rotations set by a Glazer tilt system.

Construction (rigid corner-sharing octahedra, Glazer 1972, Acta Cryst. B28, 3384; Woodward
1997, Acta Cryst. B53, 32):

* Tilt angles (α, β, γ) are rotations about the pseudocubic (pc) axes x, y, z.  Octahedron n
  is turned by the rotation whose rotation vector is ω_n = (s_x α, s_y β, s_z γ) (axis along ω,
  angle |ω|; scipy ``Rotation.from_rotvec``).  This convention is order-free: for a single-axis
  tilt it is exactly the rotation about that axis, for several axes it equals any Euler order to
  first order in the angles, and R(-ω) = R(ω)ᵀ, which makes anti-phase systems exact below.
* Signs: octahedron (i, j, k) of the pc grid (B at (i+½, j+½, k+½)·L) has
  s_x = (-1)^(j+k) · [(-1)^i if the x tilt is '-' else 1], and cyclically for y, z: about any
  axis, neighbours *across* the axis must turn in opposite senses (corner sharing), neighbours
  *along* the axis turn in the same sense ('+', in phase) or the opposite ('-', anti-phase).
  Both patterns repeat after two octahedra, so a 2×2×2 pc supercell (8 octahedra, 40 atoms) is
  the smallest cell that holds every Glazer system.
* Cell: the pc cell shrinks as the cosines of the tilts about the other two axes,
  L_x = 2d cosβ cosγ, L_y = 2d cosα cosγ, L_z = 2d cosα cosβ (Glazer 1972), d the B-O bond.
  B sites stay on the ideal positions, A sites too (the A-site shifts of real GdFeO3-type
  crystals, ~0.3 Å, are not modelled).
* Shared oxygens: the O between B and its neighbour B' along axis a sits on the bisecting plane
  of B-B', displaced perpendicular to B-B' along the mean of the two octahedra's rotated bond
  directions, by √(d² − (L_a/2)²).  Both B-O bonds are exactly d.  For a single tilt axis
  the two octahedra agree exactly: the octahedra are regular and B-O-B = 180° − 2·tilt.  With
  two or three tilt axes, regular octahedra cannot fill an orthogonal pc cell (an a-a-a- crystal
  is really rhombohedral, ~2° off at 15°), so the O-B-O angles depart from 90° by a
  second-order amount, ≈ 0.0165°·(θ/°)²: 0.43° at 5°, 1.7° at 10°, 3.7° at 15° on every axis
  (`octahedron_distortion_deg` measures it).  The rotation fitted to each octahedron's six
  bonds (`realised_angles_deg`, the truth to train on) departs from the set angles by
  ≤ 0.005°·(θ/°)²: 0.3° at 9°, up to 1.3° (a-a-c+, a+b-b-) and 0.4° (a-a-a-) at 15°.
* (110)pc projection needs L_x = L_y (else [1-10] is not normal to [110]); ``square_xy=True``
  sets both to their mean (bonds still exactly d).  Only systems with α ≠ β feel it: a0b-b-
  then distorts by 1.8° at 5°, 5° at 15° (a+b-b- with α = β not at all).

Beam orientation for abTEM comes from `crystals.orient` (beam along +z, abTEM x = array axis 0):
[001]pc has axis 0 = [100]pc, axis 1 = [010]pc; [110]pc has axis 0 = [001]pc, axis 1 = [1-10]pc.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from .crystals import ZoneCell, orient

# Glazer systems required by the octahedra issue, plus the untilted parent.
TILT_SYSTEMS = ("a0a0a0", "a0a0c-", "a0a0c+", "a-a-a-", "a-a-c+", "a0b-b-", "a+b-b-")
MAX_TILT_DEG = 15.0

# Mean B-O bond length [Å] of real compounds (the octahedron edge is fixed by it):
# SrTiO3: a = 3.905 Å cubic (as crystals.SRTIO3_A), d = a/2.
# CaTiO3: mean Ti-O 1.956 Å (Sasaki, Prewitt, Bass & Schulze 1987, Acta Cryst. C43, 1668).
# LaTiO3: mean Ti-O 2.03 Å (Cwik et al. 2003, Phys. Rev. B 68, 060401).
# SrFeO3: a = 3.851 Å cubic (MacChesney, Sherwood & Potter 1965, J. Chem. Phys. 43, 1907).
# CaFeO3: mean Fe-O 1.92 Å at 300 K (Woodward et al. 2000, Phys. Rev. B 62, 844).
# LaFeO3: mean Fe-O 2.005 Å (Marezio & Dernier 1971, Mater. Res. Bull. 6, 23).
# LaAlO3: Al-O 1.896 Å (Hayward et al. 2005, Phys. Rev. B 72, 054110).
# SrAlO3 and CaAlO3 do not exist as perovskites (Al4+ has no oxide); they are refused.
BOND_A = {
    ("Sr", "Ti"): 3.905 / 2, ("Ca", "Ti"): 1.956, ("La", "Ti"): 2.03,
    ("Sr", "Fe"): 3.851 / 2, ("Ca", "Fe"): 1.92, ("La", "Fe"): 2.005,
    ("La", "Al"): 1.896,
}
A_SITES = ("Sr", "Ca", "La")
B_SITES = ("Ti", "Fe", "Al")


@dataclass(frozen=True)
class Glazer:
    """A parsed Glazer symbol: tilt phase per pc axis ('0', '+', '-') and which axes share a letter."""

    symbol: str
    phases: tuple[str, str, str]
    letters: tuple[str, str, str]

    def check_angles(self, angles_deg) -> tuple[float, float, float]:
        """Validate (α, β, γ) [deg] against the system: '0' axes untilted, equal letters equal magnitudes."""
        a = tuple(float(x) for x in angles_deg)
        if len(a) != 3 or not all(np.isfinite(a)):
            raise ValueError(f"angles_deg must be three finite numbers (α, β, γ), got {angles_deg!r}")
        for axis, (phase, x) in enumerate(zip(self.phases, a)):
            if phase == "0" and x != 0:
                raise ValueError(f"{self.symbol}: axis {'xyz'[axis]} is untilted ('0') but its angle is {x}°")
            if phase != "0" and not 0 < abs(x) <= MAX_TILT_DEG:
                raise ValueError(f"{self.symbol}: tilt about {'xyz'[axis]} must be 0 < |angle| ≤ {MAX_TILT_DEG}°, "
                                 f"got {x}°")
        for i in range(3):
            for j in range(i + 1, 3):
                if self.letters[i] == self.letters[j] and abs(abs(a[i]) - abs(a[j])) > 1e-9:
                    raise ValueError(f"{self.symbol}: axes {'xyz'[i]} and {'xyz'[j]} share a letter, so "
                                     f"|angles| must be equal (got {a[i]}° and {a[j]}°)")
        return a  # type: ignore[return-value]


def parse_glazer(symbol: str) -> Glazer:
    """'a-a-c+' -> Glazer(phases=('-', '-', '+'), letters=('a', 'a', 'c'))."""
    m = re.fullmatch(r"([abc])([0+-])([abc])([0+-])([abc])([0+-])", symbol.strip())
    if m is None:
        raise ValueError(f"{symbol!r} is not a Glazer symbol such as 'a-a-c+' "
                         "(three letters a-c, each followed by 0, + or -)")
    letters, phases = m.group(1, 3, 5), m.group(2, 4, 6)
    return Glazer(symbol.strip(), phases, letters)  # type: ignore[arg-type]


def octahedron_signs(system: str | Glazer) -> np.ndarray:
    """(2, 2, 2, 3) signs of (α, β, γ) for octahedron (i, j, k) of the 2×2×2 supercell (module docstring)."""
    g = parse_glazer(system) if isinstance(system, str) else system
    i, j, k = np.indices((2, 2, 2))
    idx = (i, j, k)
    out = np.zeros((2, 2, 2, 3), int)
    for axis in range(3):
        others = sum(idx[b] for b in range(3) if b != axis)
        s = (-1) ** others
        if g.phases[axis] == "-":
            s = s * (-1) ** idx[axis]
        out[..., axis] = s if g.phases[axis] != "0" else 0
    return out


def bond_length_A(a_site: str, b_site: str) -> float:
    """Tabulated mean B-O bond [Å] of the compound A B O3 (sources in the comment above BOND_A)."""
    if a_site not in A_SITES or b_site not in B_SITES:
        raise ValueError(f"A site must be one of {A_SITES} and B site one of {B_SITES}, got {a_site}, {b_site}")
    if (a_site, b_site) not in BOND_A:
        known = ", ".join(f"{a}{b}O3" for a, b in BOND_A)
        raise ValueError(f"{a_site}{b_site}O3 is not a known perovskite; choose one of {known}")
    return BOND_A[(a_site, b_site)]


@dataclass(frozen=True)
class TiltedPerovskite:
    """A 2×2×2 pc supercell; x, y, z along the pc axes.  Per-atom arrays: ``site`` (0 A, 1 B, 2 O),
    ``octahedron`` (flat index i*4+j*2+k of the B site, -1 for A and O)."""

    atoms: object  # ase.Atoms
    system: str
    angles_deg: tuple[float, float, float]
    a_site: str
    b_site: str
    bond_A: float
    signs: np.ndarray  # (2, 2, 2, 3)
    pc_lengths_A: tuple[float, float, float]

    @property
    def formula(self) -> str:
        return f"{self.a_site}{self.b_site}O3"

    def octahedron_angles_deg(self) -> np.ndarray:
        """(2, 2, 2, 3) signed (α, β, γ) of every octahedron [deg]."""
        return self.signs * np.abs(np.asarray(self.angles_deg))


def build(system: str, angles_deg=(0.0, 0.0, 0.0), a_site: str = "Sr", b_site: str = "Ti",
          square_xy: bool = False) -> TiltedPerovskite:
    """The tilted 2×2×2 supercell (construction in the module docstring).

    ``angles_deg`` are the magnitudes (α, β, γ) about x, y, z [deg]; a negative value flips that
    angle's sign pattern (equivalent to moving the origin by one octahedron along a '-' axis).
    """
    from ase import Atoms
    from scipy.spatial.transform import Rotation

    g = parse_glazer(system)
    ang = np.asarray(g.check_angles(angles_deg))
    d = bond_length_A(a_site, b_site)
    t = np.deg2rad(ang)
    c = np.cos(t)
    lengths = 2 * d * np.array([c[1] * c[2], c[0] * c[2], c[0] * c[1]])
    if square_xy:
        lengths[:2] = lengths[:2].mean()
    signs = octahedron_signs(g)
    rot = {ijk: Rotation.from_rotvec(signs[ijk] * t).as_matrix() for ijk in np.ndindex(2, 2, 2)}
    eye = np.eye(3)
    symbols, positions, site, octa = [], [], [], []
    for ijk in np.ndindex(2, 2, 2):
        n = np.asarray(ijk)
        symbols.append(a_site)
        positions.append(n * lengths)
        site.append(0)
        octa.append(-1)
        b = (n + 0.5) * lengths
        symbols.append(b_site)
        positions.append(b)
        site.append(1)
        octa.append(int(np.ravel_multi_index(ijk, (2, 2, 2))))
        for axis in range(3):  # the O towards the +axis neighbour
            nb = tuple((n + eye[axis].astype(int)) % 2)
            u1 = rot[ijk][:, axis]  # this octahedron's rotated bond direction
            u2 = -rot[nb][:, axis]  # the neighbour's bond towards this O
            p = 0.5 * (u1 + u2)
            p[axis] = 0.0  # perpendicular to B-B'
            half = lengths[axis] / 2
            reach = np.sqrt(max(d * d - half * half, 0.0))
            norm = np.linalg.norm(p)
            if norm < 1e-12 and reach > 1e-9:
                raise RuntimeError(f"{system} {tuple(ang)}: no direction for the O between octahedra {ijk} and {nb}")
            offset = p / norm * reach if norm >= 1e-12 else np.zeros(3)
            symbols.append("O")
            positions.append(b + half * eye[axis] + offset)
            site.append(2)
            octa.append(-1)
    atoms = Atoms(symbols, positions=positions, cell=np.diag(2 * lengths), pbc=True)
    atoms.set_array("site", np.array(site))
    atoms.set_array("octahedron", np.array(octa))
    return TiltedPerovskite(atoms=atoms, system=g.symbol, angles_deg=tuple(float(x) for x in ang), a_site=a_site,
                            b_site=b_site, bond_A=d, signs=signs, pc_lengths_A=tuple(float(x) for x in lengths))


def _angle_deg(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Angle between vectors (last axis) [deg], via atan2 (exact near 0° and 180°, unlike arccos)."""
    return np.degrees(np.arctan2(np.linalg.norm(np.cross(a, b), axis=-1), np.sum(a * b, axis=-1)))


def octahedra_geometry(structure: TiltedPerovskite) -> tuple[np.ndarray, np.ndarray]:
    """B-O bond vectors (8, 6, 3) of every octahedron (minimum image), and the B-O-B angles [deg]
    (8, 3) across the O towards the +x, +y, +z neighbour."""
    atoms = structure.atoms
    cell = np.diag(np.asarray(atoms.cell))
    pos = atoms.positions
    site = atoms.get_array("site")
    b_idx = np.flatnonzero(site == 1)
    o_idx = np.flatnonzero(site == 2)
    bonds = np.zeros((len(b_idx), 6, 3))
    bob = np.zeros((len(b_idx), 3))
    for n, bi in enumerate(b_idx):
        v = pos[o_idx] - pos[bi]
        v -= np.round(v / cell) * cell
        near = np.argsort(np.linalg.norm(v, axis=1))[:6]
        bonds[n] = v[near]
    # B-O-B across the O stored right after B (towards +x, +y, +z); B sites sit on the ideal grid
    lengths = np.asarray(structure.pc_lengths_A)
    for n, bi in enumerate(b_idx):
        for axis in range(3):
            o = pos[bi + 1 + axis]
            a, b = pos[bi] - o, pos[bi] + lengths[axis] * np.eye(3)[axis] - o
            bob[n, axis] = _angle_deg(a, b)
    return bonds, bob


def realised_angles_deg(structure: TiltedPerovskite) -> np.ndarray:
    """(2, 2, 2, 3) rotation vector [deg] of each octahedron fitted to its six B-O bonds (Kabsch,
    scipy ``Rotation.align_vectors``): the tilts the structure really has (module docstring)."""
    from scipy.spatial.transform import Rotation

    bonds, _ = octahedra_geometry(structure)
    out = np.zeros((8, 3))
    for n, v in enumerate(bonds):
        ideal = np.round(v / np.linalg.norm(v, axis=1, keepdims=True)) * structure.bond_A  # nearest ±d e_i (≤ 15°)
        rot, _ = Rotation.align_vectors(v, ideal)
        out[n] = np.degrees(rot.as_rotvec())
    return out.reshape(2, 2, 2, 3)


def octahedron_distortion_deg(structure: TiltedPerovskite) -> float:
    """Largest departure of an O-B-O angle from 90° or 180° [deg] (0 for regular octahedra)."""
    bonds, _ = octahedra_geometry(structure)
    worst = 0.0
    for v in bonds:
        i, j = np.triu_indices(6, 1)
        ang = _angle_deg(v[i], v[j])
        worst = max(worst, float(np.max(np.minimum(np.abs(ang - 90), np.abs(ang - 180)))))
    return worst


ZONES = {"[001]": (0, 0, 1), "[110]": (1, 1, 0)}


def project(structure: TiltedPerovskite, zone: str) -> ZoneCell:
    """The supercell oriented for abTEM along [001]pc or [110]pc (beam +z, abTEM x = array axis 0)."""
    if zone not in ZONES:
        raise ValueError(f"zone {zone!r}: choose one of {tuple(ZONES)} (pseudocubic)")
    lx, ly, _ = structure.pc_lengths_A
    if zone == "[110]" and abs(lx - ly) > 1e-9:
        raise ValueError(f"[110]pc needs equal pc lengths along x and y (got {lx:.4f}, {ly:.4f} Å); "
                         "build the structure with square_xy=True")
    return orient(structure.atoms, ZONES[zone], f"{structure.formula} {structure.system}")


def tilted_zone_cell(system: str, angles_deg, zone: str, a_site: str = "Sr", b_site: str = "Ti") -> ZoneCell:
    """Build and project in one step (square_xy where the zone needs it)."""
    s = build(system, angles_deg, a_site, b_site, square_xy=(zone == "[110]"))
    return project(s, zone)


# ---------------------------------------------------------------------------------------------
# Per-unit-cell truth in projection
#
# What the projected positions carry (`sign_visibility`, all angles positive; tests check it):
#
#   system    [001]pc: signs / magnitudes    [110]pc: signs / magnitudes
#   a0a0c-    -   / γ                         -   / γ
#   a0a0c+    γ   / γ                         -   / γ
#   a-a-a-    -   / αβγ                       αβ  / αβγ
#   a-a-c+    γ   / αβγ                       αβ  / αβγ
#   a0b-b-    -   / βγ                        βγ  / βγ
#   a+b-b-    -   / αβγ                       βγ  / αβγ
#
# Why: a sign shows where the octahedra stacked along the beam all turn alike about an axis with
# a component along the beam (in-phase about z in [001]; α+β, the [110] component, in [110] for
# a-a-); anti-phase stacking about the beam ('-' in [001]) splits each O column symmetrically
# (magnitude only), and rotations about in-plane axes mostly move O along the beam.  In [110],
# γ alone (a0a0c±, about the in-plane [001]) shows no sign: flipping it mirrors the projection
# onto itself; next to an equal β (a0b-b-, a+b-b-) the flip is no longer a symmetry and both
# signs show.  Signs also depend on relative signs: a-a-a- with α = −β has no [110] component, and
# then no sign shows at all.  Magnitudes: every tilt moves some O in-plane, so all show, but
# those about in-plane axes only through O-column broadening (~d·sinθ spread), which ABF
# resolves far less well than a displacement.
# ---------------------------------------------------------------------------------------------

# the table above, as tested: (system, zone) -> (signed, visible magnitudes)
SIGNS_IN_PROJECTION = {
    ("a0a0c-", "[001]"): ("", "γ"), ("a0a0c+", "[001]"): ("γ", "γ"), ("a-a-a-", "[001]"): ("", "αβγ"),
    ("a-a-c+", "[001]"): ("γ", "αβγ"), ("a0b-b-", "[001]"): ("", "βγ"), ("a+b-b-", "[001]"): ("", "αβγ"),
    ("a0a0c-", "[110]"): ("", "γ"), ("a0a0c+", "[110]"): ("", "γ"), ("a-a-a-", "[110]"): ("αβ", "αβγ"),
    ("a-a-c+", "[110]"): ("αβ", "αβγ"), ("a0b-b-", "[110]"): ("βγ", "βγ"), ("a+b-b-", "[110]"): ("βγ", "αβγ"),
}


@dataclass(frozen=True)
class ProjectedTruth:
    """Tilts per projected unit cell, one cell per B column (the cation lattice a network is
    registered on).  Positions are in the oriented cell [Å], (axis 0, axis 1)."""

    zone: str
    system: str
    positions_A: np.ndarray  # (n, 2) B-column positions
    angles_deg: np.ndarray  # (n, 3) (α, β, γ): signed where ``signed``, else magnitudes
    octahedra: tuple[tuple[int, ...], ...]  # octahedron indices stacked along each column
    signed: tuple[bool, bool, bool]  # does the projection carry the sign of α, β, γ?
    visible: tuple[bool, bool, bool]  # does it carry the magnitude at all?
    cell_A: tuple[float, float]


def _projected_sites(zc: ZoneCell) -> dict[str, np.ndarray]:
    """In-plane positions per element, wrapped into the cell."""
    cell = np.diag(np.asarray(zc.atoms.cell))[:2]
    xy = np.mod(zc.atoms.positions[:, :2], cell)
    sym = np.array(zc.atoms.get_chemical_symbols())
    return {s: xy[sym == s] for s in set(sym)}


def _same_projection(a: ZoneCell, b: ZoneCell, tol_A: float = 1e-3) -> bool:
    """Equal multisets of projected positions per element (no translation allowed: the network
    sees each column's surroundings in the fixed image frame)."""
    cell = np.diag(np.asarray(a.atoms.cell))[:2]
    if not np.allclose(cell, np.diag(np.asarray(b.atoms.cell))[:2], atol=1e-9):
        return False
    pa, pb = _projected_sites(a), _projected_sites(b)
    if pa.keys() != pb.keys():
        return False
    for s in pa:
        if len(pa[s]) != len(pb[s]):
            return False
        d = pa[s][:, None] - pb[s][None]
        d -= np.round(d / cell) * cell
        dist = np.linalg.norm(d, axis=2)
        # multiset: greedy one-to-one matching within tol
        used = np.zeros(len(pb[s]), bool)
        for row in dist:
            free = np.flatnonzero(~used & (row < tol_A))
            if free.size == 0:
                return False
            used[free[0]] = True
    return True


def sign_visibility(system: str, angles_deg, zone: str, a_site: str = "Sr",
                    b_site: str = "Ti") -> tuple[tuple[bool, bool, bool], tuple[bool, bool, bool]]:
    """Which tilt signs and magnitudes a projection carries.

    The sign of angle X is recoverable iff no combination of sign flips that includes X leaves
    the projected structure unchanged (flips that change nothing form a group; X is determined
    iff every member keeps X).  A magnitude is visible iff halving it changes the projection.
    This is geometry only: what the atoms' projected positions allow, not how strongly an ABF
    image shows it.
    """
    ang = np.asarray(angles_deg, float)
    ref = tilted_zone_cell(system, ang, zone, a_site, b_site)
    signed = [True, True, True]
    for flips in np.ndindex(2, 2, 2):
        f = np.where(np.asarray(flips) == 1, -1.0, 1.0)
        if np.all(f == 1) or np.all(f[ang != 0] == 1):
            continue
        if _same_projection(ref, tilted_zone_cell(system, ang * f, zone, a_site, b_site)):
            for axis in range(3):
                if f[axis] < 0:
                    signed[axis] = False
    visible = []
    g = parse_glazer(system)
    for axis in range(3):
        if ang[axis] == 0:
            signed[axis] = False
            visible.append(False)
            continue
        # halving one angle of a letter-tied pair is not allowed: halve the tied ones together
        tied = [b for b in range(3) if g.letters[b] == g.letters[axis]]
        half = ang.copy()
        half[tied] /= 2
        visible.append(not _same_projection(ref, tilted_zone_cell(system, half, zone, a_site, b_site)))
    return tuple(signed), tuple(visible)  # type: ignore[return-value]


def projected_truth(structure: TiltedPerovskite, zone: str, tol_A: float = 0.1) -> ProjectedTruth:
    """The (α, β, γ) of every projected unit cell (B column) of ``structure`` along ``zone``.

    Angles are the realised ones (`realised_angles_deg`) averaged over the octahedra stacked along
    the column; where the projection carries no sign (`sign_visibility`) the magnitude is given.
    """
    zc = project(structure, zone)
    atoms = zc.atoms
    cell = np.diag(np.asarray(atoms.cell))[:2]
    b = np.flatnonzero(atoms.get_array("site") == 1)
    xy = np.mod(atoms.positions[b, :2], cell)
    octa = atoms.get_array("octahedron")[b]
    centres: list[np.ndarray] = []
    members: list[list[int]] = []
    for p, o in zip(xy, octa):
        for k, c in enumerate(centres):
            d = p - c
            d -= np.round(d / cell) * cell
            if np.hypot(*d) < tol_A:
                members[k].append(int(o))
                break
        else:
            centres.append(p)
            members.append([int(o)])
    order = np.lexsort((np.array(centres)[:, 1], np.array(centres)[:, 0]))
    realised = realised_angles_deg(structure).reshape(8, 3)
    signed, visible = sign_visibility(structure.system, structure.angles_deg, zone, structure.a_site, structure.b_site)
    angles = np.zeros((len(order), 3))
    for n, k in enumerate(order):
        r = realised[members[k]]
        for axis in range(3):
            if signed[axis]:
                if np.ptp(np.sign(np.round(r[:, axis], 9))) != 0:
                    raise RuntimeError(f"{structure.system} {zone}: sign of axis {axis} said visible but the "
                                       f"octahedra of a column disagree ({r[:, axis]})")
                angles[n, axis] = r[:, axis].mean()
            else:
                angles[n, axis] = np.abs(r[:, axis]).mean()
    return ProjectedTruth(zone=zone, system=structure.system, positions_A=np.array(centres)[order],
                          angles_deg=angles, octahedra=tuple(tuple(sorted(members[k])) for k in order),
                          signed=signed, visible=visible, cell_A=(float(cell[0]), float(cell[1])))
