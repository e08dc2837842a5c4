"""The column locator and its scoring."""
import numpy as np
import pytest

from stemlive.models.atom_locator import locate, match


def gaussians(shape, positions, sigma=1.2, heights=None):
    rr, cc = np.indices(shape, dtype=float)
    out = np.zeros(shape)
    for k, (r, c) in enumerate(positions):
        out += (1.0 if heights is None else heights[k]) * np.exp(-((rr - r) ** 2 + (cc - c) ** 2) / (2 * sigma ** 2))
    return out


def test_locate_subpixel_and_confidence():
    rng = np.random.default_rng(0)
    truth = np.array([[r, c] for r in np.arange(6, 60, 8.0) for c in np.arange(6, 60, 8.0)])
    truth += rng.uniform(-0.5, 0.5, truth.shape)
    heights = rng.uniform(0.5, 1.0, len(truth))
    h = gaussians((64, 64), truth, heights=heights)
    cols = locate(h, image=h, threshold=0.3)
    s = match(cols.positions_px, truth, radius=1.0)
    assert s.recall == 1.0 and s.precision == 1.0 and s.rmse < 0.02  # exact for Gaussian peaks
    assert np.allclose(np.sort(cols.confidence), np.sort(heights), rtol=0.01)  # interpolated peak height
    assert (cols.intensity > 0).all()


def test_match_scores():
    truth = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    found = np.array([[0.1, 0.0], [10.0, 0.3], [30.0, 30.0], [0.2, 0.1]])
    s = match(found, truth, radius=0.5)
    assert s.matched == 2 and s.precision == pytest.approx(0.5) and s.recall == pytest.approx(2 / 3)
    assert s.rmse == pytest.approx(np.sqrt((0.1 ** 2 + 0.3 ** 2) / 2))
    assert match(np.empty((0, 2)), truth, 1.0).recall == 0.0


def test_baseline_finds_columns_of_a_simulated_image():
    pytest.importorskip("abtem")
    from stemlive.models.atom_baseline import log_gaussian_columns
    from stemlive.simulate.atom_images import ImageRanges, random_image

    r = ImageRanges(structures=(("SrTiO3", "[001]"),), size_px=128, sampling_A=(0.15, 0.15),
                    dose_e_per_A2=(1e5, 1e5), jitter_px=(0, 0), drift=(0, 0), vacancy_fraction=(0, 0))
    img, truth = random_image(np.random.default_rng(5), r)
    found = log_gaussian_columns(img, sigma_px=0.4 / 0.15)  # ~ the column image width
    edge = ((truth.positions_px > 6) & (truth.positions_px < 121)).all(axis=1)
    cations = truth.positions_px[truth.cation & edge]
    inner = found.positions_px[((found.positions_px > 6) & (found.positions_px < 121)).all(axis=1)]
    s = match(inner, cations, radius=0.5 / 0.15)  # within 0.5 Å
    assert s.recall > 0.95 and s.precision > 0.9 and s.rmse * 0.15 < 0.1  # Å


def test_train_atoms_tiny(tmp_path):
    """A few steps on a few images: the loop runs, resumes, exports an ONNX whose output the
    locator reads (not a useful model: the shipped one is trained for thousands of steps)."""
    pytest.importorskip("torch")
    pytest.importorskip("abtem")
    import json

    import onnxruntime as ort

    from stemlive.simulate.atom_images import ImageRanges, write_images
    from stemlive.models.atom_analysis import normalise
    from stemlive.simulate.train_atoms import heatmap, train_atoms

    imgs = write_images(tmp_path / "imgs.h5", 4, seed=2, ranges=ImageRanges(size_px=128), progress=False)
    card_path = train_atoms(imgs, tmp_path / "out", tmp_path / "work", steps=4, batch=2, width=4, holdout=0.25,
                            val_every=2, progress=False)
    card = json.loads(card_path.read_text())
    assert card["task"] == "atoms-haadf" and card["parity"]["max_relative_difference"] < 1e-3
    assert all("f1" in v and "rmse_pm" in v for v in card["validation"].values())
    sess = ort.InferenceSession(str(card_path.with_suffix(".onnx")), providers=["CPUExecutionProvider"])
    out = sess.run(None, {"x": normalise(np.random.default_rng(0).random((1, 1, 64, 96)))})[0]
    assert out.shape == (1, 1, 64, 96) and 0 <= out.min() and out.max() <= 1  # any multiple of 8
    h = heatmap((32, 32), np.array([[10.3, 20.7]]))
    assert h.max() == pytest.approx(np.exp(-(0.3 ** 2 + 0.3 ** 2) / (2 * 1.5 ** 2)), rel=1e-5)
    assert np.unravel_index(h.argmax(), h.shape) == (10, 21)


def test_match_inside_ignores_the_border_for_both_sides():
    from stemlive.models.atom_locator import match_inside

    truth = np.array([[10.0, 10.0], [20.0, 20.0], [1.0, 15.0], [18.0, 28.6]])  # the last two on the border
    found = np.array([[10.1, 10.0], [0.4, 15.0], [29.5, 5.0], [15.0, 15.0]])  # border-hugging, border FP, inner FP
    m = match_inside(found, truth, radius=1.0, shape=(30, 30), border=2.0)
    assert m.truth_inside.tolist() == [True, True, False, False]
    assert m.score.matched == 1 and m.false_positives == 1  # (29.5, 5) is on the border: not counted
    assert m.score.precision == 0.5 and m.score.recall == 0.5
