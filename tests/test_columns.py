"""Projected columns: the labels atom finding is trained and scored on."""
import numpy as np
import pytest

pytest.importorskip("ase")

from stemlive.simulate.columns import project_columns
from stemlive.simulate.crystals import SRTIO3_A, zone_cell


def test_srtio3_001_columns():
    cs = project_columns(zone_cell("SrTiO3", "[001]"))
    labels = dict(zip(map(tuple, np.round(cs.positions_A / SRTIO3_A, 3)), cs.labels()))
    assert labels == {(0.0, 0.0): "Sr", (0.0, 0.5): "O", (0.5, 0.0): "O", (0.5, 0.5): "Ti-O"}
    assert cs.has_cation().tolist() == [lab != "O" for lab in cs.labels()]
    w = dict(zip(cs.labels(), cs.z_weight(2.0)))
    assert w["Sr"] == pytest.approx(38 ** 2 / SRTIO3_A) and w["Ti-O"] == pytest.approx((22 ** 2 + 8 ** 2) / SRTIO3_A)


def test_srtio3_110_columns():
    cs = project_columns(zone_cell("SrTiO3", "[110]"))
    # [110]: mixed Sr-O, pure Ti and pure O (two atoms per repeat) columns, as in the literature
    assert sorted(cs.labels()) == ["O", "O", "Sr-O", "Sr-O", "Ti", "Ti"]
    assert cs.repeat_A == pytest.approx(SRTIO3_A * np.sqrt(2))
    assert cs.cell_A == pytest.approx((SRTIO3_A, SRTIO3_A * np.sqrt(2)))
    # every atom of the repeat is in exactly one column
    atoms = zone_cell("SrTiO3", "[110]").atoms
    assert sum(sum(c.values()) for c in cs.composition) == len(atoms)


def test_tiling():
    cs = project_columns(zone_cell("SrTiO3", "[001]"))
    pos, idx = cs.tile((3, 2))
    assert pos.shape == (4 * 6, 2) and idx.max() == 3
    assert pos[:, 0].max() == pytest.approx(2.5 * SRTIO3_A) and pos[:, 1].max() == pytest.approx(1.5 * SRTIO3_A)


def test_convolution_image_peaks_on_columns_and_scale_with_z():
    pytest.importorskip("abtem")
    from stemlive.simulate.convolution_image import convolution_image, probe_intensity

    cs = project_columns(zone_cell("SrTiO3", "[001]"))
    reps, sampling = (4, 4), SRTIO3_A / 20  # 20 px per cell: whole pixels per cell
    probe = probe_intensity(200, 21.4, sampling, 4 * SRTIO3_A)
    img, pos = convolution_image(cs, reps, sampling, probe, exponent=2.0)
    assert img.shape == (80, 80) and probe.shape == (80, 80)
    labels = cs.labels() * 16
    peak = {lab: [] for lab in set(labels)}
    for (r, c), lab in zip(pos, labels):
        i, j = int(round(r)) % 80, int(round(c)) % 80
        window = img[np.ix_([(i + k) % 80 for k in (-1, 0, 1)], [(j + k) % 80 for k in (-1, 0, 1)])]
        assert window[1, 1] == window.max()  # the image peaks on the column
        peak[lab].append(img[i, j])
    # Sr (Z 38) brighter than Ti-O (22, 8) brighter than O (8)
    assert np.mean(peak["Sr"]) > np.mean(peak["Ti-O"]) > np.mean(peak["O"])
    assert img.sum() == pytest.approx(16 * cs.z_weight(2.0).sum(), rel=1e-6)  # the probe is normalised


@pytest.mark.parametrize("material, zone, labels", [
    ("BaTiO3", "[001]", ["Ba", "O", "O", "Ti-O"]),
    ("MgO", "[001]", ["Mg-O"] * 4),
    ("MgO", "[110]", ["Mg"] * 4 + ["O"] * 4),
    ("MoS2", "[001]", ["Mo-S"] * 4),  # 2H stacking: each Mo sits over the other layer's S
    ("MoS2-monolayer", "[001]", ["Mo", "Mo", "S", "S"]),
])
def test_other_structures(material, zone, labels):
    cs = project_columns(zone_cell(material, zone))
    assert sorted(cs.labels()) == labels
    cations = dict(zip(cs.labels(), cs.has_cation()))
    assert all(cations[lab] == (lab not in ("O", "S")) for lab in labels)


def test_random_images_reproducible_with_truth(tmp_path):
    pytest.importorskip("abtem")
    import h5py

    from stemlive.simulate.atom_images import ImageRanges, random_image, write_images

    r = ImageRanges(size_px=96, dose_e_per_A2=(1e5, 1e5), jitter_px=(0, 0), drift=(0, 0), vacancy_fraction=(0, 0),
                    background=(0, 0))
    img, truth = random_image(np.random.default_rng(3), r)
    img2, truth2 = random_image(np.random.default_rng(3), r)
    np.testing.assert_array_equal(img, img2)
    assert img.shape == (96, 96) and (truth.positions_px >= -0.5).all() and (truth.positions_px <= 95.5).all()
    # at high dose, cation columns sit on local maxima of the (smoothed) image
    from scipy import ndimage

    smooth = ndimage.gaussian_filter(img, 1.0)
    peaks = ndimage.maximum_filter(smooth, size=3) == smooth
    hit = [peaks[max(0, int(round(r0)) - 1):int(round(r0)) + 2, max(0, int(round(c0)) - 1):int(round(c0)) + 2].any()
           for (r0, c0), cat in zip(truth.positions_px, truth.cation) if cat and 2 < r0 < 93 and 2 < c0 < 93]
    assert np.mean(hit) > 0.9
    out = write_images(tmp_path / "imgs.h5", 3, seed=1, ranges=r, progress=False)
    with h5py.File(out, "r") as f:
        assert f["done"][()].all() and f["images"].shape == (3, 96, 96) and len(f["positions_px"]) == 3
    write_images(out, 3, seed=1, ranges=r, progress=False)  # complete: nothing to do, same file
    with pytest.raises(FileExistsError):
        write_images(out, 4, seed=1, ranges=r, progress=False)


def test_contrast_calibration_recovers_known_weights():
    """A convolution image with known weights is fitted back; the exponent inverts Σ Zⁿ."""
    from stemlive.simulate.contrast_calibration import column_kernels, fit_image, implied_exponent, ring_images
    from stemlive.simulate.scan_cli import SHIPPED_LIBRARY

    _, attrs = ring_images(SHIPPED_LIBRARY, 40.8, 61.3)
    types, k = column_kernels(attrs, 8, 0.2)
    n = 1.7
    z = {"Sr": 38.0 ** n, "O+Ti": 22.0 ** n + 8.0 ** n, "O": 8.0 ** n}
    image = sum(z[t] * k[i] for i, t in enumerate(types)) + 5.0
    fit = fit_image(image, attrs, 10.0)
    assert fit.sigma_A == pytest.approx(0.2, abs=0.03) and fit.r > 0.9999
    assert fit.exponent == pytest.approx(n, abs=0.01)
    assert fit.weights["O"] / fit.weights["Sr"] == pytest.approx(z["O"] / z["Sr"], rel=0.02)
    assert implied_exponent({"Sr": 1.0, "O+Ti": (22 ** 2 + 8 ** 2) / 38 ** 2}) == pytest.approx(2.0, abs=1e-6)
