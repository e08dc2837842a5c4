import numpy as np
import pytest

from stemlive.simulate.crystals import parse_zone, srtio3, zone_cell
from stemlive.simulate.symmetry import apply_to_pattern, mirror_origin, point_group, reduce_tilts


@pytest.mark.parametrize("text,zone", [("[001]", (0, 0, 1)), ("110", (1, 1, 0)), ("1,-1,0", (1, -1, 0)),
                                       ("[1-10]", (1, -1, 0))])
def test_parse_zone(text, zone):
    assert parse_zone(text) == zone


@pytest.mark.parametrize("bad", ["[00]", "[000]", "abc"])
def test_parse_zone_rejects(bad):
    with pytest.raises(ValueError):
        parse_zone(bad)


def test_srtio3_001_cell_and_axes():
    zc = zone_cell("SrTiO3", "[001]")
    assert zc.in_plane == pytest.approx((3.905, 3.905))
    assert zc.repeat_z == pytest.approx(3.905)
    assert (zc.axis0_direction, zc.axis1_direction) == ("[100]", "[010]")
    assert zc.atoms.get_chemical_formula() == "O3SrTi"


def test_srtio3_110_cell():
    zc = zone_cell("SrTiO3", "110")
    a = 3.905
    assert sorted(zc.in_plane) == pytest.approx(sorted([a, a * np.sqrt(2)]))
    assert zc.repeat_z == pytest.approx(a * np.sqrt(2))
    assert len(zc.atoms) == 10


def test_cif_file_round_trip(tmp_path):
    from ase.io import write

    cif = tmp_path / "sto.cif"
    write(cif, srtio3())
    zc = zone_cell(str(cif), "[001]")
    assert zc.material == "sto"
    assert zc.in_plane == pytest.approx((3.905, 3.905))


def test_missing_material_is_a_clear_error():
    with pytest.raises(FileNotFoundError, match="neither a built-in"):
        zone_cell("no_such.cif", "[001]")


def test_point_groups():
    assert len(point_group(zone_cell("SrTiO3", "001").atoms)) == 8  # 4mm
    assert len(point_group(zone_cell("SrTiO3", "110").atoms)) == 4  # 2mm
    zc = zone_cell("SrTiO3", "001")
    assert np.allclose(mirror_origin(zc.atoms, point_group(zc.atoms)), 0)


def test_reduce_tilts_seed_grid():
    g = point_group(zone_cell("SrTiO3", "001").atoms)
    v = [0, 0.25, 0.5, 0.75, 1, 1.5, 2, 2.5, 3, 3.5, 4]
    tilts = np.array([(a, b) for a in v for b in v], float)
    unique, source, ops = reduce_tilts(tilts, g)
    assert len(unique) == 66  # the octant t0 ≥ t1 ≥ 0
    assert np.all(unique[:, 0] >= unique[:, 1])
    for t, s, op in zip(tilts, source, ops):
        assert np.allclose(op @ unique[s], t)


def test_apply_to_pattern_moves_features_with_the_tilt():
    pat = np.zeros((5, 5))
    pat[3, 2] = 1.0  # a feature at offset (+1, 0) from the centre
    assert apply_to_pattern(pat, np.diag([-1, 1]))[1, 2] == 1.0  # mirror of axis 0 -> (-1, 0)
    assert apply_to_pattern(pat, np.array([[0, 1], [1, 0]]))[2, 3] == 1.0  # diagonal -> (0, +1)
    rot = np.array([[0, -1], [1, 0]])  # +90°: (1, 0) -> (0, 1)
    assert apply_to_pattern(pat, rot)[2, 3] == 1.0
    with pytest.raises(ValueError, match="odd"):
        apply_to_pattern(np.zeros((4, 4)), rot)
