"""Column anomaly (seed 002): defect specimens, the error and its standardisation, the shipped
detector on bulk and on strong defects, card refusals, and a tiny training run that resumes."""
from __future__ import annotations

import json
import shutil
from dataclasses import replace

import numpy as np
import pytest

from stemlive.models.cards import ModelMismatch, load_card
from stemlive.models.column_anomaly import (AnomalyDetector, displacement_scores, error_window, group_scores,
                                            image_reference, reconstruction_error, standardise)

pytest.importorskip("abtem")
from stemlive.simulate.defect_images import DEFECT_TYPES, DefectRanges, bulk_ranges, defect_images  # noqa: E402


def ranges(dose=1e5, **kw) -> DefectRanges:
    return DefectRanges(image=bulk_ranges(dose_e_per_A2=(dose, dose), size_px=256), **kw)


def test_defects_are_where_the_truth_says():
    """An emptied Sr column is darker in HAADF than the other Sr columns; an O vacancy shows in
    ABF (less dip) only; defects are apart and inside the field."""
    from stemlive.models.atom_locator import integrate

    d = defect_images(np.random.default_rng(3), ranges(1e7, types=("vacancy_Sr", "vacancy_O"),
                                                        vacancy_remaining=(0.0, 0.0)))
    assert {DEFECT_TYPES[t] for t in d.defect[d.defect >= 0]} == {"vacancy_Sr", "vacancy_O"}
    h = integrate(d.haadf.astype(float), d.sites_px, 1.5)
    a = integrate(d.abf.astype(float), d.sites_px, 1.5)
    clean = (d.defect < 0) & ~d.near
    for t, img, darker in (("vacancy_Sr", h, True), ("vacancy_O", a, False)):
        site = np.flatnonzero(d.defect == DEFECT_TYPES.index(t))
        kind = d.kind[site[0]]
        ref = np.median(img[clean & (d.kind == kind)])
        assert all((img[s] < 0.8 * ref) if darker else (img[s] > ref) for s in site)
    assert d.near.sum() >= 4 * (d.defect >= 0).sum() and not (d.near & (d.defect >= 0)).any()
    bulk = defect_images(np.random.default_rng(3), ranges(1e7, types=()))
    assert (bulk.defect < 0).all() and not bulk.near.any() and bulk.defects == []


def test_error_window_and_validity():
    p = np.zeros((2, 2, 8, 8))
    r = np.zeros_like(p)
    r[0, :, 0, 0] = 2.0  # a corner error
    r[1, :, 3:5, 3:5] = 2.0  # a central one
    valid = np.ones((2, 8, 8), bool)
    plain = reconstruction_error(p, r)
    assert plain == pytest.approx([4 / 64, 16 / 64])
    w = error_window(8, 5.0, 0.3)
    weighted = reconstruction_error(p, r, valid, w)
    assert weighted[1] / weighted[0] > 4 * plain[1] / plain[0]  # the window weighs the centre
    valid[0, 0, 0] = False  # the corner not measured: no error left
    assert reconstruction_error(p, r, valid)[0] == 0
    assert error_window(8, 5.0, None) is None


def test_standardisation_needs_enough_columns():
    e = np.r_[np.random.default_rng(0).normal(1.0, 0.1, 200), 5.0]
    ref = image_reference(e)
    z = standardise(e, ref)
    assert abs(np.median(z)) < 0.05 and 0.8 < np.std(z[:-1]) < 1.2 and z[-1] > 20
    with pytest.raises(ValueError, match="at least 16"):
        image_reference(e[:5])
    with pytest.raises(ValueError, match="no spread"):
        image_reference(np.ones(40))


@pytest.fixture(scope="module")
def detector():
    return AnomalyDetector.shipped()


def test_card_thresholds(detector):
    """v1: the seed's rule; v2 (the default): 3 % of validation bulk, the seed's rule beside it."""
    an = detector.card.data["anomaly"]
    assert an["threshold"] == pytest.approx(an["bulk_mean"] + 1.5 * an["bulk_sd"])
    v2 = an["v2"]
    assert detector.method == "v2" and detector.threshold == pytest.approx(v2["threshold"])
    assert v2["threshold_seed_rule"] == pytest.approx(v2["bulk_mean"] + 1.5 * v2["bulk_sd"])
    assert set(detector.threshold_at) == {0.01, 0.03}
    assert detector.threshold_at[0.01] > detector.threshold_at[0.03] == pytest.approx(detector.threshold)
    assert detector.card.data["training"]["simulator"].endswith("bulk only")


def test_shipped_detector_passes_bulk_and_flags_strong_defects(detector):
    """1e5 e/Å², centres 0.02 Å from the sites: few bulk columns flagged; emptied Sr and Ti
    columns and whole anti-sites all flagged."""
    rng = np.random.default_rng([77, 1])
    r = ranges(1e5, types=("vacancy_Sr", "vacancy_Ti", "antisite_Ti_on_Sr", "antisite_Sr_on_Ti"),
               vacancy_remaining=(0.0, 0.1), antisite_fraction=(0.9, 1.0), sites_per_defect=40)
    flagged_bulk, found = [], []
    for k in range(3):
        d = defect_images(np.random.default_rng([77, k]), r)
        s = d.meta["sampling_A"]
        centres = d.sites_px + rng.normal(0, 0.02 / s, d.sites_px.shape)
        res = detector.score(d.haadf, d.abf, centres, sampling_A=s)
        assert res.score.shape == res.flagged.shape == (len(centres),)
        assert 0 < res.complete.sum() < len(centres)
        clean = res.complete & (d.defect < 0) & ~d.near
        flagged_bulk.append(res.flagged[clean])
        found.append(res.flagged[d.defect >= 0])
    assert np.concatenate(flagged_bulk).mean() < 0.10
    assert np.concatenate(found).mean() >= 0.9 and len(np.concatenate(found)) >= 8
    empty = detector.score(d.haadf, d.abf, np.zeros((0, 2)), sampling_A=s)
    assert len(empty.score) == 0


def test_too_few_columns_is_a_clear_error_unless_a_reference_is_given(detector):
    d = defect_images(np.random.default_rng(5), ranges(1e5, types=()))
    s = d.meta["sampling_A"]
    inner = np.argsort(np.hypot(*(d.sites_px - 128).T))[:5]
    with pytest.raises(ValueError, match="reference"):
        detector.score(d.haadf, d.abf, d.sites_px[inner], sampling_A=s)
    full = detector.score(d.haadf, d.abf, d.sites_px, sampling_A=s)
    groups = detector.sublattices(d.sites_px)
    few = detector.score(d.haadf, d.abf, d.sites_px[inner], sampling_A=s, reference=full.reference,
                         groups=groups[inner])
    assert np.allclose(few.parts["haadf"], full.parts["haadf"][inner], atol=1e-6)
    assert np.isnan(few.parts["displacement"]).all()  # 5 columns: no lattice to measure against
    v1 = detector.score(d.haadf, d.abf, d.sites_px, sampling_A=s, method="v1")
    few1 = detector.score(d.haadf, d.abf, d.sites_px[inner], sampling_A=s, reference=v1.reference, method="v1")
    assert np.allclose(few1.score, v1.score[inner], atol=1e-6)


def test_group_and_displacement_scores():
    rng = np.random.default_rng(0)
    g = np.repeat([0, 1], 200)
    v = np.r_[rng.normal(1, 0.1, 200), rng.normal(5, 2.0, 200)]  # two kinds, different levels and spreads
    z = group_scores(v, g)
    assert abs(np.median(z[:200])) < 0.05 and abs(np.median(z[200:])) < 0.05
    assert 0.8 < z[:200].std() < 1.2 and 0.8 < z[200:].std() < 1.2
    d = rng.normal(0, 0.3, (400, 2))
    d[7] = [3.0, 0.0]  # ten sd off
    sc = displacement_scores(d, g)
    assert sc[7] > 5 and np.mean(sc > 2.0) < 0.04  # Gaussian-equivalent: ~2.3 % of bulk above 2


def test_v2_finds_a_displaced_ti_column_and_measures_it(detector):
    """1e5 e/Å², Ti displaced 15-20 pm: flagged, its displacement measured to a few pm."""
    r = ranges(1e5, types=("Ti_displaced",), displacement_pm=(15.0, 20.0), sites_per_defect=60)
    found, err = [], []
    for k in range(2):
        d = defect_images(np.random.default_rng([81, k]), r)
        s = d.meta["sampling_A"]
        c = d.sites_px + np.random.default_rng([81, k, 1]).normal(0, 0.02 / s, d.sites_px.shape)
        res = detector.score(d.haadf, d.abf, c, sampling_A=s)
        for df in d.defects:
            if res.complete[df["site"]]:
                found.append(res.flagged[df["site"]])
                err.append(res.parts["displacement_pm"][df["site"]] - df["value"])
    assert len(found) >= 3 and np.mean(found) == 1.0
    assert np.abs(err).max() < 6.0


def shipped_copy(tmp_path):
    card = AnomalyDetector.shipped().card
    shutil.copy(card.path, tmp_path / card.path.name)
    shutil.copy(card.onnx_path, tmp_path / card.onnx_path.name)
    return tmp_path / card.path.name, tmp_path / card.onnx_path.name


def test_modified_or_missing_model_file_is_refused(tmp_path):
    card_path, onnx_path = shipped_copy(tmp_path)
    raw = bytearray(onnx_path.read_bytes())
    raw[-10] ^= 0xFF
    onnx_path.write_bytes(bytes(raw))
    with pytest.raises(ModelMismatch, match="does not match its card"):
        AnomalyDetector(load_card(card_path))
    onnx_path.unlink()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        AnomalyDetector(load_card(card_path))
    with pytest.raises(FileNotFoundError, match="train one"):
        AnomalyDetector.shipped(tmp_path / "nothing")


def test_card_without_threshold_or_of_another_task_is_refused(tmp_path):
    card_path, _ = shipped_copy(tmp_path)
    data = json.loads(card_path.read_text())
    del data["anomaly"]
    card_path.write_text(json.dumps(data))
    with pytest.raises(ModelMismatch, match="threshold"):
        AnomalyDetector(load_card(card_path))
    data["task"] = "column-species"
    card_path.write_text(json.dumps(data))
    with pytest.raises(ModelMismatch, match="not 'column-anomaly'"):
        AnomalyDetector(load_card(card_path))


def test_tiny_training_resumes_and_exports_a_loadable_detector(tmp_path):
    pytest.importorskip("torch")
    from stemlive.simulate.anomaly_train import train_anomaly

    kw = dict(n_images=2, n_val_images=2, steps=6, batch=8, latent=4, width=4, train_size_px=128,
              val_size_px=160, progress=False)
    assert train_anomaly(tmp_path / "out", tmp_path / "work", stop_after=3, **kw) is None
    ckpt = json.loads((tmp_path / "work" / "checkpoint.json").read_text())
    assert ckpt["step"] == 3 and not (tmp_path / "out").exists()
    card_path = train_anomaly(tmp_path / "out", tmp_path / "work", **kw)
    ckpt = json.loads((tmp_path / "work" / "checkpoint.json").read_text())
    assert ckpt["step"] == 6 and [h["step"] for h in ckpt["history"]] == list(range(1, 7))  # continued
    det = AnomalyDetector(load_card(card_path))
    assert np.isfinite(det.threshold) and det.card.data["training"]["config"]["latent"] == 4
    assert (tmp_path / "out" / "column_anomaly_SrTiO3_001_training_curves.png").exists()
