"""PACBED training on a tiny library: sampler geometry, resumable training, export and card."""
import json

import numpy as np
import torch

from stemlive.models import canonical, cards
from stemlive.models.backends import OnnxRuntimeBackend
from stemlive.simulate.library import PacbedLibrary
from stemlive.simulate.pacbed_data import Augment, PacbedSampler
from stemlive.simulate.train_config import TrainConfig
from stemlive.simulate.train_pacbed import train_pacbed

CLEAN = Augment(dose=(1e12, 1e12), shift_px=0, scale=0, rotation_deg=0, shear=0, inelastic_mfp_nm=(1e9, 1e9),
                background=(0, 0), detector_factor=(1.0,), psf_px=(0, 0), gain_sigma=0, dark_counts=(0, 0))


def test_sampler_matches_numpy_canonical_frame_and_signs(quadrant_library):
    lib = PacbedLibrary.load(quadrant_library)
    s = PacbedSampler(lib, holdout_fraction=0.17, seed=3)
    x, lab = s.sample(64, torch.Generator().manual_seed(1), CLEAN, split="heldout", subtract_background=False)
    c = (lib.patterns.shape[-1] - 1) / 2
    for i in range(8):
        t = lab["tilt_mrad"][i].numpy()
        it = int(np.argmin(np.abs(lib.thickness_nm - float(lab["thickness_nm"][i]))))
        raw = lib.pattern(lib.thickness_nm[it], tuple(t))  # negative tilts derived by the mirrors
        ref = canonical.to_canonical(raw, (c, c), lib.alpha_mrad / lib.mrad_per_px)
        got = lab["counts"][i, 0].numpy()
        assert np.abs(got / got.sum() - ref / ref.sum()).sum() < 0.02, t


def test_heldout_orbits_never_train(quadrant_library):
    lib = PacbedLibrary.load(quadrant_library)
    s = PacbedSampler(lib, holdout_fraction=0.17, seed=3)
    assert s.heldout and s.train_cells.any()
    _, lab = s.sample(512, torch.Generator().manual_seed(2), CLEAN)
    held = torch.tensor([[float(s.v0[i]), float(s.v1[j])] for i, j in s.heldout])
    t = lab["tilt_mrad"].abs()
    # every training tilt lies in a cell whose four corners are training tilts
    i = torch.clamp(torch.searchsorted(s.v0, t[:, 0], right=True) - 1, 0, len(s.v0) - 2)
    j = torch.clamp(torch.searchsorted(s.v1, t[:, 1], right=True) - 1, 0, len(s.v1) - 2)
    assert s.train_cells[i, j].all()
    assert not any(torch.allclose(a, h) for a in t for h in held)


def test_training_resumes_exports_and_writes_card(quadrant_library, tmp_path):
    cfg = TrainConfig(steps=40, batch=16, val_every=20, val_samples=32, holdout_fraction=0.17, seed=3, width=4)
    work = tmp_path / "work"
    assert train_pacbed(quadrant_library, tmp_path / "out", "tiny", work, cfg, progress=False, stop_after=20) is None
    meta = json.loads((work / "checkpoint.json").read_text())
    assert meta["step"] == 20 and len(meta["history"]) == 1
    card_path = train_pacbed(quadrant_library, tmp_path / "out", "tiny", work, cfg, progress=False)
    meta = json.loads((work / "checkpoint.json").read_text())
    assert [h["step"] for h in meta["history"]] == [20, 40]  # continued, not restarted
    card = cards.load_card(card_path)
    be = OnnxRuntimeBackend.load(cards.verify(card))
    cards.verify(card, be.metadata())
    out = be(np.random.default_rng(0).normal(size=(3, 1, 64, 64)).astype(np.float32))
    assert set(out) == {"thickness_prob", "tilt0_prob", "tilt1_prob", "background"}
    bins = card.data["training"]["thickness_bins_nm"]
    assert out["thickness_prob"].shape == (3, len(bins)) and np.allclose(out["thickness_prob"].sum(1), 1, atol=1e-5)
    assert out["tilt0_prob"].shape == (3, len(card.data["training"]["tilt_bins_mrad"]))
    assert card.data["training"]["tilt_bins_mrad"][0] == -card.data["training"]["tilt_bins_mrad"][-1] == -2.0
    assert set(card.data["validation"]) == {"2.3e+07", "4.7e+07", "2.3e+08"}
    assert card.data["parity"]["max_relative_difference"] < 1e-3
    assert card.kv == 200 and card.alpha_mrad == 13.6
    assert (tmp_path / "out" / "tiny_training_curves.png").exists()


def test_alignment_labels_say_where_the_disk_is():
    """Re-crop with the labelled centre/radius/rotation: the aligned view is the library pattern
    at the library tilt (and the opposite rotation sign is clearly worse)."""
    from stemlive.simulate.pacbed_data import ALIGN_AUGMENT
    from stemlive.simulate.scan_cli import SHIPPED_LIBRARY

    lib = PacbedLibrary.load(SHIPPED_LIBRARY)  # thick patterns with strong features
    s = PacbedSampler(lib, holdout_fraction=0.17, seed=1)
    aug = Augment(**{**ALIGN_AUGMENT.__dict__, **{k: getattr(CLEAN, k) for k in (
        "dose", "inelastic_mfp_nm", "background", "detector_factor", "psf_px", "gain_sigma", "dark_counts")},
        "saturate_prob": 0.0, "display_prob": 0.0, "hot_pixels": 0, "shear": 0.0})
    _, lab = s.sample(64, torch.Generator().manual_seed(5), aug, split="heldout", subtract_background=False)
    c = (canonical.PIXELS - 1) / 2
    kc = (lib.patterns.shape[-1] - 1) / 2
    checked = 0
    for i in range(64):
        th = float(lab["rotation_deg"][i])
        if abs(th) < 10 or float(lab["thickness_nm"][i]) < 25:
            continue
        crop = lab["counts"][i, 0].numpy()
        centre = tuple(c + lab["center_offset_px"][i].numpy())
        radius = canonical.ALPHA_PX * float(lab["radius_ratio"][i])
        t_lib = canonical.rotation_matrix(th) @ lab["tilt_mrad"][i].numpy()  # back to the library frame
        ref = canonical.to_canonical(lib.pattern(float(lab["thickness_nm"][i]), tuple(np.round(t_lib, 6))),
                                     (kc, kc), lib.alpha_mrad / lib.mrad_per_px)
        m = np.hypot(*(np.indices(ref.shape) - c)) < 2.0 * canonical.ALPHA_PX

        def err(angle):
            redo = canonical.to_canonical(crop, centre, radius, angle)
            return np.abs(redo / redo[m].sum() - ref / ref[m].sum())[m].sum()

        good, wrong = err(th), err(-th)
        assert good < 0.06 and good < 0.5 * wrong, (i, th, good, wrong)
        checked += 1
    assert checked >= 5


def test_alignment_training_exports_a_card(quadrant_library, tmp_path):
    from stemlive.simulate.train_align import train_align

    cfg = TrainConfig(steps=20, batch=16, val_every=10, val_samples=32, holdout_fraction=0.17, seed=3, width=4)
    card = cards.load_card(train_align(quadrant_library, tmp_path / "out", "align", tmp_path / "w", cfg,
                                       progress=False))
    assert card.task == "pacbed-align"
    be = OnnxRuntimeBackend.load(cards.verify(card))
    out = be(np.zeros((2, 1, 64, 64), np.float32))
    assert out["center_offset_px"].shape == (2, 2) and out["rotation_4"].shape == (2, 2)
    assert set(card.data["validation"]) == {"first step", "converging"}


def test_partial_field_training_input_matches_inference():
    """Crops cut by a frame edge: the torch twin fills and normalises as `canonical.normalise`
    does at inference; an all-real window gives exactly the whole-window input."""
    from stemlive.simulate.pacbed_data import frame_valid_torch, normalise_torch

    g = torch.Generator().manual_seed(0)
    valid = frame_valid_torch(16, g, Augment(field_prob=1.0), torch.randn(16, 2, generator=g))
    counts = torch.rand(16, 1, 64, 64, generator=g) * 100 + 5
    b = torch.rand(16, generator=g) * 0.1
    win = torch.from_numpy(canonical.window_mask(canonical.ANALYSIS_WINDOW_ALPHA))
    assert (~valid & win).any(dim=(-1, -2)).all()  # every crop is cut inside the window
    xt = normalise_torch(counts, b, valid=valid).numpy()[:, 0]
    xn = canonical.normalise(counts.numpy()[:, 0], b.numpy(), valid=valid.numpy()[:, 0])
    assert np.abs(xt - xn).max() < 5e-3
    whole = normalise_torch(counts, b, valid=torch.ones_like(valid))
    assert torch.allclose(whole, normalise_torch(counts, b), atol=1e-5)


def test_frame_edges_show_the_drawn_field():
    """The nearest off-frame pixel lies at the drawn field (±1 canonical px), never nearer; with
    field_prob 0 nothing is cut."""
    from stemlive.simulate.pacbed_data import frame_valid_torch

    aug = Augment(field_prob=1.0, field_alpha=(1.4, 1.8))
    centre = torch.zeros(64, 2)
    valid = frame_valid_torch(64, torch.Generator().manual_seed(1), aug, centre)[:, 0]
    r = torch.from_numpy(np.hypot(*(np.indices((64, 64)) - 31.5))).float() / canonical.ALPHA_PX
    nearest = torch.where(~valid, r, torch.full_like(r, 99.0)).amin(dim=(-1, -2))
    assert (nearest >= 1.4 - 1 / canonical.ALPHA_PX).all() and (nearest <= 1.8 + 1 / canonical.ALPHA_PX).all()
    none = frame_valid_torch(8, torch.Generator().manual_seed(1), Augment(field_prob=0.0), torch.zeros(8, 2))
    assert none.all()


def test_sampler_draws_partial_fields_with_their_masks(quadrant_library):
    sampler = PacbedSampler(PacbedLibrary.load(quadrant_library), 0.0)
    x, lab = sampler.sample(32, torch.Generator().manual_seed(2), Augment(field_prob=0.5))
    assert lab["valid"].shape == (32, 1, 64, 64) and torch.isfinite(x).all()
    cut = (~lab["valid"]).any(dim=(-1, -2, -3))
    assert 0 < int(cut.sum()) < 32
