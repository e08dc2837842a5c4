"""Species training data and the species classifier's input path."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from stemlive.models.atom_locator import integrate
from stemlive.models.column_species import classifier_input

pytest.importorskip("abtem")
from stemlive.simulate.species_images import CLASSES, PATCH_SIZE, SpeciesRanges, labelled_patches, species_images  # noqa: E402


def clean(**kw):
    """A noise-light specimen with the probe and background fixed, for checking labels."""
    return replace(SpeciesRanges(), dose_e_per_A2=(1e7, 1e7), background=(0.0, 0.0), sampling_A=(0.15, 0.15),
                   size_px=96, **kw)


def test_site_labels_match_what_the_images_show():
    sp = species_images(np.random.default_rng(5), clean(defect_fraction=(0.1, 0.1)))
    counts = np.bincount(sp.label, minlength=len(CLASSES))
    assert counts[CLASSES.index("O")] > counts[CLASSES.index("Sr")] > 0 and counts[CLASSES.index("vacant")] > 0
    inner = ((sp.sites_px > 4) & (sp.sites_px < 91)).all(axis=1)
    h = integrate(sp.haadf.astype(float), sp.sites_px, 2.0)
    a = integrate(sp.abf.astype(float), sp.sites_px, 2.0)

    def median(values, name):
        m = inner & (sp.label == CLASSES.index(name))
        return np.median(values[m])

    # HAADF: Sr (Z 38) > Ti-O > O > an emptied site; ABF dips at every occupied column (O included)
    assert median(h, "Sr") > median(h, "Ti-O") > median(h, "O") > median(h, "vacant")
    assert median(a, "O") < median(a, "vacant")


def test_labelled_patches_are_complete_two_channel_cells():
    x, y, meta = labelled_patches(np.random.default_rng(6), clean())
    assert x.shape == (len(y), 2, PATCH_SIZE, PATCH_SIZE) and x.dtype == np.float32
    assert np.isfinite(x).all()
    assert meta["edge_px"] == pytest.approx(3.905 / 0.15, rel=0.02)  # one cell: two O-cation spacings


def test_classifier_input_standardises_and_keeps_unmeasured():
    rng = np.random.default_rng(0)
    haadf, abf = rng.poisson(50, (32, 32)).astype(float), rng.poisson(500, (32, 32)).astype(float)
    abf[0, :4] = np.nan
    x = classifier_input(haadf, abf)
    assert x.shape == (2, 32, 32)
    assert abs(np.nanmean(x[0])) < 1e-5 and np.isnan(x[1, 0, :4]).all() and np.isfinite(x[1, 1:]).all()
    with pytest.raises(ValueError, match="same H×W"):
        classifier_input(haadf, abf[:16])


def test_shipped_classifier_tells_the_species_of_a_clean_specimen():
    """High dose, sites displaced as the finder would: the cation/oxygen columns right, and
    patches at the image edge flagged."""
    from stemlive.models.column_species import SpeciesClassifier

    clf = SpeciesClassifier.shipped()
    assert clf.classes == CLASSES
    r = replace(SpeciesRanges(), dose_e_per_A2=(1e5, 1e5), defect_fraction=(0.05, 0.05))
    sp = species_images(np.random.default_rng([21, 0]), r)
    s = sp.meta["sampling_A"]
    centres = sp.sites_px + np.random.default_rng(1).normal(0, 0.1 / s, sp.sites_px.shape)
    res = clf.classify(sp.haadf, sp.abf, centres, sampling_A=s)
    assert res.probabilities.shape == (len(centres), len(CLASSES))
    assert np.allclose(res.probabilities.sum(axis=1), 1, atol=1e-4)
    ok = res.complete
    assert 0 < ok.sum() < len(ok)  # some sites lie within half a cell of the edge
    species = ok & (sp.label <= CLASSES.index("O"))
    assert (res.label[species] == sp.label[species]).mean() > 0.9
    assert res.names()[0] in CLASSES
    empty = clf.classify(sp.haadf, sp.abf, np.zeros((0, 2)), sampling_A=s)
    assert len(empty.label) == 0


def test_write_patches_resumes_and_refuses_other_settings(tmp_path):
    from stemlive.simulate.species_images import write_patches

    r = replace(SpeciesRanges(), size_px=64)
    out = write_patches(tmp_path / "p.npz", 2, seed=3, ranges=r, progress=False)
    with np.load(out, allow_pickle=False) as z:
        x, y, dose = z["x"], z["y"], z["dose"]
    assert x.shape[1:] == (2, PATCH_SIZE, PATCH_SIZE) and len(x) == len(y) == len(dose) > 0
    again = write_patches(tmp_path / "p.npz", 2, seed=3, ranges=r, progress=False)  # from the parts
    with np.load(again, allow_pickle=False) as z:
        assert np.array_equal(z["x"], x)
    with pytest.raises(FileExistsError, match="other settings"):
        write_patches(tmp_path / "p.npz", 3, seed=3, ranges=r, progress=False)


def test_neighbour_positions_are_the_same_sublattice_one_cell_away():
    """A rotated SrTiO3 [001] lattice of all columns: every column's four neighbours are columns of
    its own kind one cell away; a neighbour missing from the context is put where the lattice says."""
    from stemlive.models.column_species import neighbour_positions

    sp = species_images(np.random.default_rng(7), clean(defect_fraction=(0.0, 0.0)))
    cell = 3.905 / 0.15
    inner = ((sp.sites_px > cell + 2) & (sp.sites_px < 96 - cell - 2)).all(axis=1)
    pos = sp.sites_px[inner]
    nb = neighbour_positions(pos, sp.sites_px, cell)
    assert nb.shape == (len(pos), 4, 2)
    d = np.linalg.norm(nb - pos[:, None], axis=2)
    assert np.allclose(d, cell, rtol=0.02)
    # each neighbour is a located site of the same kind
    from scipy.spatial import cKDTree

    dist, idx = cKDTree(sp.sites_px).query(nb.reshape(-1, 2))
    assert dist.max() < 1e-3
    assert (sp.label[idx].reshape(-1, 4) == sp.label[inner][:, None]).all()
    # drop one site from the context: its neighbours still get a position there, from the lattice
    gone = np.flatnonzero(inner)[0]
    ctx = np.delete(sp.sites_px, gone, axis=0)
    nb2 = neighbour_positions(sp.sites_px[inner], ctx, cell)
    assert np.abs(nb2 - nb).max() < 0.05 * cell
    assert neighbour_positions(pos[:1], pos[:1], cell) is None  # no pair: no lattice


def test_reference_channels_tell_a_partial_column_from_its_neighbours():
    """The four-channel patches: a column's own patches, then its neighbours' median -- dimmer than
    the reference where the column is partly occupied, as bright where it is full."""
    from stemlive.models.column_species import species_patches

    r = clean(defect_fraction=(0.1, 0.1), occupancy=(0.4, 0.5))
    sp = species_images(np.random.default_rng(8), r)
    stack = classifier_input(sp.haadf, sp.abf)
    edge = 3.905 / 0.15
    p = species_patches(stack, sp.sites_px, edge, PATCH_SIZE, True)
    assert p.patches.shape == (len(sp.sites_px), 4, PATCH_SIZE, PATCH_SIZE) and np.isfinite(p.patches).all()
    ok = p.complete
    c = slice(PATCH_SIZE // 2 - 2, PATCH_SIZE // 2 + 2)
    diff = (p.patches[:, 1, c, c] - p.patches[:, 3, c, c]).mean(axis=(1, 2))  # ABF: every column dips
    full = ok & (sp.label <= CLASSES.index("O"))
    part = ok & (sp.label == CLASSES.index("partial"))
    assert part.sum() > 3
    assert np.median(diff[part]) < np.median(diff[full]) - 0.3
    two = species_patches(stack, sp.sites_px, edge, PATCH_SIZE, False)
    assert two.patches.shape[1] == 2 and np.array_equal(two.patches, p.patches[:, :2])
