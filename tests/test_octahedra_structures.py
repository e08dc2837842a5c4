"""Tilted perovskite supercells: rigid-octahedron geometry, Glazer phase patterns, projections."""
import numpy as np
import pytest

from stemlive.simulate import octahedra as oc
from stemlive.simulate.crystals import srtio3, zone_cell

CASES = [("a0a0c-", (0, 0, 12)), ("a0a0c+", (0, 0, 12)), ("a-a-a-", (8, 8, 8)), ("a-a-c+", (9, 9, 6)),
         ("a0b-b-", (0, 10, 10)), ("a+b-b-", (7, 11, 11))]


def _measured_rotvecs_deg(s: oc.TiltedPerovskite) -> np.ndarray:
    """Rotation vector of each octahedron fitted to its six B-O bonds, (8, 3) [deg]."""
    return oc.realised_angles_deg(s).reshape(8, 3)


def _same_sites(a, b, tol=1e-6):
    """Two ase.Atoms with the same orthogonal cell hold the same atoms (any order, modulo the cell)."""
    cell = np.diag(np.asarray(a.cell))
    assert np.allclose(cell, np.diag(np.asarray(b.cell)), atol=tol)
    assert sorted(a.get_chemical_symbols()) == sorted(b.get_chemical_symbols())
    for sym in set(a.get_chemical_symbols()):
        pa = a.positions[np.array(a.get_chemical_symbols()) == sym]
        pb = b.positions[np.array(b.get_chemical_symbols()) == sym]
        d = pa[:, None] - pb[None]
        d -= np.round(d / cell) * cell
        dist = np.linalg.norm(d, axis=2)
        assert dist.min(axis=1).max() < tol and dist.min(axis=0).max() < tol, sym


@pytest.mark.parametrize("system, angles", CASES)
@pytest.mark.parametrize("compound", [("Sr", "Ti"), ("Ca", "Fe"), ("La", "Al")])
def test_bonds_constant_and_counts(system, angles, compound):
    s = oc.build(system, angles, *compound)
    bonds, _ = oc.octahedra_geometry(s)
    assert np.allclose(np.linalg.norm(bonds, axis=2), oc.BOND_A[compound], atol=1e-9)
    sym = s.atoms.get_chemical_symbols()
    assert (len(sym), sym.count(compound[0]), sym.count(compound[1]), sym.count("O")) == (40, 8, 8, 24)
    # no two atoms closer than 2.2 Å (the shortest distance is the B-O bond, ~1.9 Å, then O-O ≥ 2.5 Å)
    dist = s.atoms.get_all_distances(mic=True) + np.eye(40) * 99
    assert dist.min() > 0.95 * oc.BOND_A[compound]
    o = np.array(sym) == "O"
    assert dist[np.ix_(o, o)].min() > 2.2


@pytest.mark.parametrize("system", ["a0a0c-", "a0a0c+"])
@pytest.mark.parametrize("gamma", [0.5, 6.0, 15.0])
def test_single_axis_regular_octahedra_and_bob_angle(system, gamma):
    s = oc.build(system, (0, 0, gamma))
    assert oc.octahedron_distortion_deg(s) < 1e-9  # O-B-O exactly 90° / 180°
    _, bob = oc.octahedra_geometry(s)
    assert np.allclose(bob[:, :2], 180 - 2 * gamma, atol=1e-9)
    assert np.allclose(bob[:, 2], 180.0, atol=1e-9)
    rv = _measured_rotvecs_deg(s)
    assert np.allclose(rv[:, 2], s.octahedron_angles_deg().reshape(8, 3)[:, 2], atol=1e-9)
    assert np.allclose(s.pc_lengths_A, 2 * s.bond_A * np.array([np.cos(np.radians(gamma))] * 2 + [1.0]))


@pytest.mark.parametrize("system, angles", CASES)
def test_octahedra_turn_as_set(system, angles):
    """The fitted rotation of every octahedron has the imposed signs; magnitudes within the
    documented second-order distortion."""
    s = oc.build(system, angles)
    want = s.octahedron_angles_deg().reshape(8, 3)
    got = _measured_rotvecs_deg(s)
    assert np.all(np.sign(got[want != 0]) == np.sign(want[want != 0]))
    assert np.abs(got - want).max() <= 0.005 * max(angles) ** 2  # second order (module docstring)
    theta = max(angles)
    assert oc.octahedron_distortion_deg(s) <= 0.0175 * theta ** 2 + 1e-9


def test_phase_patterns_of_neighbours():
    """'+': octahedra stacked along the axis turn alike, '-': opposite; across the axis always opposite."""
    for system, axis in (("a0a0c+", 2), ("a0a0c-", 2), ("a+b-b-", 0), ("a+b-b-", 1), ("a-a-c+", 2)):
        phase = oc.parse_glazer(system).phases[axis]
        angles = {"a0a0c+": (0, 0, 8), "a0a0c-": (0, 0, 8), "a+b-b-": (6, 9, 9), "a-a-c+": (7, 7, 9)}[system]
        rv = _measured_rotvecs_deg(oc.build(system, angles)).reshape(2, 2, 2, 3)[..., axis]
        along = np.roll(rv, 1, axis=axis)
        assert np.all(np.sign(rv) == (1 if phase == "+" else -1) * np.sign(along)), (system, axis)
        for other in {0, 1, 2} - {axis}:
            assert np.all(np.sign(rv) == -np.sign(np.roll(rv, 1, axis=other))), (system, axis, other)


def test_cell_shrinks_as_cosines():
    s = oc.build("a+b-b-", (5, 12, 12), "La", "Fe")
    c = np.cos(np.radians([5, 12, 12]))
    assert np.allclose(s.pc_lengths_A, 2 * 2.005 * np.array([c[1] * c[2], c[0] * c[2], c[0] * c[1]]))


def test_untilted_equals_cubic_srtio3():
    s = oc.build("a0a0a0")
    _same_sites(s.atoms, srtio3() * (2, 2, 2))
    for zone in ("[001]", "[110]"):
        zc = oc.project(oc.build("a0a0a0", square_xy=True), zone)
        ref = zone_cell("srtio3", zone)
        assert (zc.axis0_direction, zc.axis1_direction) == (ref.axis0_direction, ref.axis1_direction)
        _same_sites(zc.atoms, ref.atoms * (2, 2, 2))


@pytest.mark.parametrize("system, angles", CASES)
def test_projections(system, angles):
    for zone, n_atoms in (("[001]", 40), ("[110]", 80)):
        zc = oc.tilted_zone_cell(system, angles, zone)
        cell = np.asarray(zc.atoms.cell)
        assert np.allclose(cell, np.diag(np.diag(cell)))  # orthogonal, as abTEM needs
        assert len(zc.atoms) == n_atoms
        assert zc.atoms.get_all_distances(mic=True)[np.triu_indices(n_atoms, 1)].min() > 1.7
        pos = zc.atoms.get_scaled_positions()
        assert pos.min() >= -1e-9 and pos.max() < 1 + 1e-9


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="Glazer symbol"):
        oc.build("a-b+")
    with pytest.raises(ValueError, match="untilted"):
        oc.build("a0a0c-", (3, 0, 5))
    with pytest.raises(ValueError, match="share a letter"):
        oc.build("a-a-a-", (3, 4, 5))
    with pytest.raises(ValueError, match="≤ 15"):
        oc.build("a0a0c+", (0, 0, 20))
    with pytest.raises(ValueError, match="not a known perovskite"):
        oc.build("a0a0c+", (0, 0, 5), "Sr", "Al")
    with pytest.raises(ValueError, match="square_xy"):
        oc.project(oc.build("a0b-b-", (0, 5, 5)), "[110]")
    with pytest.raises(ValueError, match="choose one of"):
        oc.project(oc.build("a0a0a0"), "[111]")
