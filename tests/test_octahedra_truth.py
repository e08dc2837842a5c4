"""Per-unit-cell truth in projection: which signs a projection carries, and the angles per B column."""
import numpy as np
import pytest

from stemlive.simulate import octahedra as oc

ANGLES = {"a0a0c-": (0, 0, 9), "a0a0c+": (0, 0, 9), "a-a-a-": (7, 7, 7), "a-a-c+": (8, 8, 5),
          "a0b-b-": (0, 8, 8), "a+b-b-": (6, 9, 9)}


def _letters(flags):
    return "".join("αβγ"[i] for i in range(3) if flags[i])


@pytest.mark.parametrize("key", sorted(oc.SIGNS_IN_PROJECTION))
def test_documented_sign_table(key):
    system, zone = key
    signed, visible = oc.sign_visibility(system, ANGLES[system], zone)
    assert (_letters(signed), _letters(visible)) == oc.SIGNS_IN_PROJECTION[key]


def test_every_required_system_is_tabulated():
    for system in oc.TILT_SYSTEMS[1:]:
        assert (system, "[001]") in oc.SIGNS_IN_PROJECTION and (system, "[110]") in oc.SIGNS_IN_PROJECTION


def test_in_phase_rotation_shows_as_oxygen_displacement_in_001():
    """Independent of the flip test: in a0a0c+ [001] the four O around each B column are turned by
    +γ or −γ (checkerboard), and in a0a0c- each O column is split in two by ±d·sinγ."""
    gamma = 9.0
    for system in ("a0a0c+", "a0a0c-"):
        s = oc.build(system, (0, 0, gamma))
        truth = oc.projected_truth(s, "[001]")
        zc = oc.project(s, "[001]")
        cell = np.diag(np.asarray(zc.atoms.cell))[:2]
        o = np.array(zc.atoms.get_chemical_symbols()) == "O"
        o_xy = zc.atoms.positions[o, :2]
        for p, ang in zip(truth.positions_A, truth.angles_deg):
            d = o_xy - p
            d -= np.round(d / cell) * cell
            r = np.linalg.norm(d, axis=1)
            near = d[(r > 1.0) & (r < 2.5)]  # the four equatorial O columns (apical O sit on the B column)
            turn = np.degrees(np.arctan2(near[:, 1], near[:, 0]))
            off = (turn + 45) % 90 - 45  # angle from the nearest pc axis, counter-clockwise positive
            if system == "a0a0c+":
                assert len(near) == 8  # two layers, turned alike
                assert np.allclose(off, ang[2], atol=1e-6)
            else:
                assert sorted(np.round(off, 6)) == sorted(np.round([-gamma] * 4 + [gamma] * 4, 6))
                assert ang[2] == pytest.approx(gamma)  # magnitude only
        if system == "a0a0c+":
            signs = np.sign(truth.angles_deg[:, 2]).reshape(2, 2)
            assert signs[0, 0] == -signs[0, 1] == -signs[1, 0] == signs[1, 1]


@pytest.mark.parametrize("system", sorted(ANGLES))
@pytest.mark.parametrize("zone", ["[001]", "[110]"])
def test_projected_truth_per_cell(system, zone):
    angles = ANGLES[system]
    s = oc.build(system, angles, square_xy=(zone == "[110]"))
    t = oc.projected_truth(s, zone)
    n_cells = 4 if zone == "[001]" else 8
    assert t.positions_A.shape == (n_cells, 2) and t.angles_deg.shape == (n_cells, 3)
    # every octahedron on a column, equally often (the [110] cell holds two supercells)
    assert sorted(sum(t.octahedra, ())) == sorted(list(range(8)) * (n_cells // 4))
    assert all(len(m) == 2 for m in t.octahedra)  # two octahedra stacked per repeat along the beam
    # B columns on the projected cation lattice: a (pc) apart in [001]; a along [001] and a/√2 along [1-10] in [110]
    rows, cols = (np.unique(np.round(t.positions_A[:, k], 3)) for k in (0, 1))
    assert (len(rows), len(cols)) == ((2, 2) if zone == "[001]" else (2, 4))
    # angles as built, within the documented second-order departure; magnitudes where unsigned
    want = np.abs(np.asarray(angles, float))
    tol = 0.005 * max(angles) ** 2 + (1.3 if system == "a0b-b-" and zone == "[110]" else 0)  # square_xy
    assert np.allclose(np.abs(t.angles_deg), want, atol=tol)
    for axis in range(3):
        if not t.signed[axis]:
            assert np.all(t.angles_deg[:, axis] >= 0)
        elif t.visible[axis]:
            assert set(np.sign(t.angles_deg[:, axis])) == {-1.0, 1.0}  # alternating between cells


def test_flipping_a_visible_sign_changes_the_columns_truth():
    s = oc.build("a-a-c+", (8, 8, 5))
    flipped = oc.build("a-a-c+", (-8, -8, 5))
    a = oc.projected_truth(s, "[110]").angles_deg
    b = oc.projected_truth(flipped, "[110]").angles_deg
    assert np.allclose(a[:, :2], -b[:, :2]) and np.allclose(a[:, 2], b[:, 2])
