"""The shipped atom finder: scale handling, the CLI's CSV contract, block stitching (each column once)."""
from __future__ import annotations

import numpy as np
import pytest

from stemlive.live.cli import main
from stemlive.models.atom_analysis import AtomFinder, column_spacing_px, resample
from stemlive.models.atom_locator import match_inside
from stemlive.models.atom_regions import AtomStitcher
from stemlive.models.atoms_cli import read_csv
from stemlive.udf.block_grid import BlockGrid

pytest.importorskip("abtem")
from stemlive.simulate.atom_images import ImageRanges, random_image  # noqa: E402


def lattice(shape=(96, 96), spacing=7.0, sigma=1.2, offset=(3.3, 2.6)):
    rr, cc = np.indices(shape, dtype=float)
    img = np.zeros(shape)
    for r0 in np.arange(offset[0], shape[0], spacing):
        for c0 in np.arange(offset[1], shape[1], spacing):
            img += np.exp(-((rr - r0) ** 2 + (cc - c0) ** 2) / (2 * sigma ** 2))
    return img


def srtio3(dose=1e4, size=192, sampling=0.15, seed=3, contrast="haadf"):
    r = ImageRanges(structures=(("SrTiO3", "[001]"),), size_px=size, sampling_A=(sampling, sampling),
                    dose_e_per_A2=(dose, dose), contrast=contrast, interface_probability=0.0, vacancy_fraction=(0, 0))
    return random_image(np.random.default_rng(seed), r)


def inner(p, n, border=2):
    return p[((p >= border) & (p <= n - 1 - border)).all(axis=1)]


def score(found, truth, n, radius):
    """Scored 2 px inside the image (columns on the border count for neither side)."""
    return match_inside(found, truth, radius, (n, n)).score


@pytest.fixture(scope="module")
def finder():
    return AtomFinder.shipped("haadf", backend="onnxruntime")


def test_column_spacing_from_the_autocorrelation():
    assert column_spacing_px(lattice(spacing=7.0)) == pytest.approx(7.0, abs=0.5)
    assert column_spacing_px(lattice(spacing=11.0)) == pytest.approx(11.0, abs=0.5)
    noise = np.random.default_rng(0).poisson(5.0, (96, 96)).astype(float)
    assert column_spacing_px(noise) is None  # no lattice: the finder must say it cannot tell the scale


def test_resample_maps_positions_back_exactly():
    """Output pixel i of a resampling by z sits at input coordinate i / z (exact for a plane)."""
    rr, cc = np.indices((40, 50), dtype=float)
    plane = 3.0 * rr - 2.0 * cc + 1.0
    for zoom in (2.0, 1.37, 0.7):
        out = resample(plane, zoom)
        ri, ci = np.indices(out.shape, dtype=float)
        np.testing.assert_allclose(out, 3.0 * ri / zoom - 2.0 * ci / zoom + 1.0, atol=1e-9)
        assert out.shape == tuple(int(np.floor((n - 1) * zoom)) + 1 for n in plane.shape)


def test_shipped_haadf_model_finds_srtio3_columns(finder):
    img, truth = srtio3()
    for sampling in (0.15, None):  # given, or measured from the image
        found = finder.find(img, sampling)
        s = score(found.positions_px, truth.target("haadf"), img.shape[0], 0.5 / 0.15)
        assert s.f1 > 0.97 and s.rmse * 0.15 < 0.1, (sampling, s)  # Å (the benchmark measures accuracy)
    assert found.spacing_px == pytest.approx(2.76 / 0.15, rel=0.1)  # Sr to Ti-O, in pixels


def test_finder_refuses_bad_images(finder):
    with pytest.raises(ValueError, match="NaN"):
        finder.find(np.full((64, 64), np.nan))
    with pytest.raises(ValueError, match="one image"):
        finder.find(np.zeros((2, 64, 64)))
    with pytest.raises(ValueError, match="no lattice"):
        finder.find(np.random.default_rng(1).poisson(3.0, (64, 64)).astype(float))


def test_atoms_find_cli_writes_the_csv(tmp_path, capsys):
    img, truth = srtio3(size=128)
    np.save(tmp_path / "img.npy", img)
    assert main(["atoms", "find", str(tmp_path / "img.npy"), "--out", str(tmp_path / "a.csv"),
                 "--sampling-A-per-px", "0.15", "--backend", "onnxruntime"]) == 0
    header = (tmp_path / "a.csv").read_text().splitlines()[0]
    assert header == "row_px,col_px,confidence,intensity,row_A,col_A"
    t = read_csv(tmp_path / "a.csv")
    np.testing.assert_allclose(t["row_A"], t["row_px"] * 0.15, atol=1e-3)
    assert (t["confidence"] > 0).all() and (t["intensity"] > 0).all()
    s = score(np.stack([t["row_px"], t["col_px"]], 1), truth.target("haadf"), 128, 0.5 / 0.15)
    assert s.f1 > 0.95
    # without the sampling: no Å columns; an image without a lattice is refused, nothing written
    assert main(["atoms", "find", str(tmp_path / "img.npy"), "--out", str(tmp_path / "b.csv")]) == 0
    assert (tmp_path / "b.csv").read_text().splitlines()[0] == "row_px,col_px,confidence,intensity"
    np.save(tmp_path / "noise.npy", np.random.default_rng(2).poisson(4.0, (64, 64)).astype(np.float32))
    assert main(["atoms", "find", str(tmp_path / "noise.npy"), "--out", str(tmp_path / "c.csv")]) == 2
    assert "no lattice" in capsys.readouterr().err and not (tmp_path / "c.csv").exists()
    # a model directory without an ABF network: a clear error naming what is there
    assert main(["atoms", "find", str(tmp_path / "img.npy"), "--out", str(tmp_path / "d.csv"), "--contrast", "abf",
                 "--models", str(tmp_path)]) == 2
    assert "no atoms-abf model" in capsys.readouterr().err


@pytest.mark.parametrize("order", ["rows", "random"])
def test_stitched_blocks_find_each_column_once(finder, order):
    """Blocks analysed in any order give the columns of the whole image, none twice."""
    img, truth = srtio3(size=96, sampling=0.3, seed=11)
    grid = BlockGrid(img.shape, (16, 16))
    st = AtomStitcher(finder, grid, sampling_A=0.3, margin_px=16)
    blocks = [(i, j) for i in range(grid.shape[0]) for j in range(grid.shape[1])]
    if order == "random":
        blocks = [blocks[k] for k in np.random.default_rng(0).permutation(len(blocks))]
    have = np.zeros(img.shape, bool)
    parts = []
    for i, j in blocks:  # blocks complete one by one; analyse whatever became ready
        have[grid.scan_slices(i, j)] = True
        parts.append(st.analyse(img, st.ready(have)))
    assert st.analysed.all()
    pos = np.concatenate([p.positions_px for p in parts])
    d = np.linalg.norm(pos[:, None] - pos[None], axis=-1) + np.eye(len(pos)) * 99
    assert d.min() > 2.0  # no column twice
    whole = finder.find(img, 0.3).positions_px
    s = score(pos, whole, 96, radius=0.5)
    assert s.f1 > 0.98 and s.rmse < 0.1
    s = score(pos, truth.target("haadf"), 96, radius=0.5 / 0.3)
    assert s.f1 > 0.97
    owner = np.concatenate([p.block for p in parts])
    assert set(map(tuple, owner)) <= set(blocks)
