"""The per-image rVAE (models/column_rvae.py): training, resuming, ONNX parity, the angle map, refusals."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from stemlive.models import column_rvae as cr  # noqa: E402
from stemlive.simulate.domain_images import DomainRanges, domain_image  # noqa: E402


@pytest.fixture(scope="module")
def small():
    """A small two-domain image at high dose (grain turned 20°)."""
    return domain_image(np.random.default_rng(3), DomainRanges(size_px=160), grain_deg=20.0, dose_e_per_A2=1e5)


@pytest.fixture(scope="module")
def trained(small, tmp_path_factory):
    out = tmp_path_factory.mktemp("rvae")
    card = cr.train_rvae(small.haadf, small.sites_px, out, steps=600, batch=64, progress=False)
    return out, card


def test_wrap_and_split():
    assert np.allclose(cr.wrap_deg([-45, 45, 50, -50, 134]), [45, 45, -40, 40, 44])
    assert abs(abs(cr.circular_mean_deg([44, -44])) - 45) < 1e-6  # 2° apart across the ±45° seam
    lab, t = cr.split_domains(np.r_[np.zeros(20), np.full(10, 10.0)] + 0.1 * np.arange(30) % 1)
    assert 3 < t < 8 and lab[:20].sum() == 0 and lab[20:].all()


def test_training_moves_loss_down_and_resumes(small, tmp_path):
    work = tmp_path / "work"
    assert cr.train_rvae(small.haadf, small.sites_px, tmp_path, work, steps=120, batch=32, progress=False,
                         stop_after=80) is None
    meta = json.loads((work / "checkpoint.json").read_text())
    assert meta["step"] == 80
    card = cr.train_rvae(small.haadf, small.sites_px, tmp_path, work, steps=120, batch=32, progress=False)
    hist = json.loads((work / "checkpoint.json").read_text())["history"]
    assert hist[-1]["step"] == 120 and len(hist) == 8  # continued from step 80, not restarted
    assert hist[-1]["loss"] < hist[0]["loss"]
    assert card is not None and (tmp_path / "column_rvae_training_curves.png").exists()
    assert (work / "checkpoint.npz").exists()  # npz, no pickle


def test_onnx_encoder_matches_torch(small, trained):
    out, card = trained
    c = json.loads(Path(card).read_text())
    assert c["task"] == cr.TASK and c["parity"]["max_relative_difference"] < 1e-3
    sym = cr.LocalSymmetry.from_dir(out)
    p = cr.column_patches(small.haadf, small.sites_px)
    x = p.patches[p.complete][:16]
    got = sym.encode(x)
    model = cr.build_rvae(latent=2)
    assert set(got) == set(cr.OUTPUT_NAMES) and got["latent"].shape == (16, 2)
    # the ONNX angles are the encoder means in degrees, as the torch encoder gives them
    z = np.load(out / "work" / "checkpoint.npz", allow_pickle=False)
    model.load_state_dict({k[6:]: torch.from_numpy(z[k]) for k in z.files if k.startswith("model/")})
    with torch.no_grad():
        a, o, lat = cr.encoder_export(model)(torch.from_numpy(x))
    assert np.allclose(got["angle_deg"], a.numpy(), atol=1e-3)
    assert np.allclose(got["latent"], lat.numpy(), atol=1e-4)


def test_angle_map_separates_domains(small, trained):
    out, _ = trained
    sym = cr.LocalSymmetry.from_dir(out).analyse(small.haadf, small.sites_px)
    ok = sym.complete
    assert ok.sum() >= cr.MIN_COLUMNS
    means = [cr.circular_mean_deg(sym.angle_deg[ok & (small.domain == k)]) for k in (0, 1)]
    assert abs(abs(means[1] - means[0]) - 20.0) < 3.0, means
    lab, _ = cr.split_domains(sym.angle_deg)
    agree = np.mean(lab[ok] == small.domain[ok])
    assert max(agree, 1 - agree) > 0.9


def test_bad_inputs(small, tmp_path):
    with pytest.raises(cr.TooFewColumns, match="at least 32 complete column patches"):
        cr.train_rvae(small.haadf, small.sites_px[:10], tmp_path, progress=False)
    with pytest.raises(FileNotFoundError, match="no column-rvae model in"):
        cr.LocalSymmetry.from_dir(tmp_path)
    with pytest.raises(FileNotFoundError, match="train one with `stemlive train rvae"):
        cr.LocalSymmetry.from_dir(tmp_path / "missing")
    with pytest.raises(ValueError, match="at least 2 latent"):
        cr.build_rvae(latent=1)
