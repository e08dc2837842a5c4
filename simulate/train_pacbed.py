"""The thickness/tilt network: its loss, held-out validation and model card (`stemlive train pacbed`).

Validation uses held-out simulations (whole symmetry orbits of simulated tilts, each with its own
phonon seeds) at three fixed doses; the loop, checkpoints and export are in ``trainer.py``.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..models import canonical
from ..models.pacbed_estimate import estimate
from .library import PacbedLibrary
from .pacbed_data import Augment, PacbedSampler, normalise_torch, sample_heldout
from .train_config import TrainConfig
from .trainer import fit, make_card, publish

VAL_DOSES = (2.3e7, 4.7e7, 2.3e8)
TASK = "pacbed-thickness-tilt"


TILT_BIN_MRAD = 0.25


def two_hot_torch(values: torch.Tensor, bins: torch.Tensor) -> torch.Tensor:
    """Torch twin of :func:`stemlive.models.pacbed_estimate.two_hot` (soft class targets)."""
    v = values.clamp(float(bins[0]), float(bins[-1]))
    i = (torch.searchsorted(bins, v, right=True) - 1).clamp(0, len(bins) - 2)
    w = (v - bins[i]) / (bins[i + 1] - bins[i])
    out = torch.zeros(len(v), len(bins))
    out.scatter_(1, i[:, None], (1 - w)[:, None])
    out.scatter_add_(1, (i + 1)[:, None], w[:, None])
    return out


def soft_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return -(target * torch.log_softmax(logits, dim=1)).sum(dim=1).mean()


def predict(model, counts: torch.Tensor, iterations: int, valid: torch.Tensor | None = None) -> dict:
    """The analysis on canonical counts (``valid``: their real pixels, for crops of frames that
    show less than the window): converge the uniform background, then read the outputs."""
    b = torch.zeros(counts.shape[0])
    for _ in range(iterations):
        out = model(normalise_torch(counts, b, valid=valid))
        b = (b + out[3][:, 0]).clamp(min=0)
    t, a0, a1, _ = model(normalise_torch(counts, b, valid=valid))
    return {"thickness_prob": t.softmax(1).numpy(), "tilt0_prob": a0.softmax(1).numpy(),
            "tilt1_prob": a1.softmax(1).numpy(), "background": b.numpy()}


def evaluate(model, val: list, iterations: int, thickness_bins: np.ndarray, tilt_bins: np.ndarray) -> dict:
    """Accuracy on the fixed held-out sets (the seed's Table 2 figures, plus σ calibration)."""
    res = {}
    with torch.no_grad():
        for dose, (counts, lab) in val:
            p = predict(model, counts, iterations, lab.get("valid"))
            th, th_sig = estimate(p["thickness_prob"], thickness_bins)
            per_axis = [estimate(p[f"tilt{i}_prob"], tilt_bins) for i in (0, 1)]
            tilt = np.stack([e for e, _ in per_axis], axis=1)
            tilt_sig = np.stack([sg for _, sg in per_axis], axis=1)
            dt = np.abs(th - lab["thickness_nm"].numpy())
            dtilt = np.abs(tilt - lab["tilt_mrad"].numpy())
            thick10 = lab["thickness_nm"].numpy() >= 10
            both = (dtilt <= 0.25).all(axis=1)
            res[f"{dose:.1e}"] = {
                "thickness_within_1nm": float((dt <= 1).mean()),
                "thickness_within_2nm": float((dt <= 2).mean()),
                "thickness_mae_nm": float(dt.mean()),
                "tilt_within_0.25mrad_t>=10nm": float(both[thick10].mean()) if thick10.any() else None,
                "tilt_mae_mrad": float(dtilt.mean()),
                "thickness_within_1sigma": float((dt <= th_sig).mean()),
                "tilt_within_1sigma": float((dtilt <= tilt_sig).mean()),
                "background_mae": float(np.abs(p["background"] - lab["background_total"].numpy()).mean()),
            }
    return res


METRICS = [("thickness_within_1nm", "held-out thickness within ±1 nm"),
           ("tilt_within_0.25mrad_t>=10nm", "held-out tilt within ±0.25 mrad (t ≥ 10 nm)")]


def train_pacbed(library: Path, out_dir: Path, name: str, work_dir: Path, cfg: TrainConfig = TrainConfig(),
                 progress: bool = True, stop_after: int | None = None, aug: Augment | None = None) -> Path | None:
    """Train (resuming if possible), export ``<out_dir>/<name>.onnx`` and its card. Returns the card path.

    ``stop_after`` ends this call after that many new steps (checkpointed), returning None;
    rerunning continues."""
    from ..models.nets import PacbedThicknessTiltNet, PacbedThicknessTiltProbabilities

    lib = PacbedLibrary.load(library)
    sampler = PacbedSampler(lib, cfg.holdout_fraction, seed=cfg.seed)
    aug = aug or Augment()
    torch.manual_seed(cfg.seed)
    thickness_bins = np.asarray(lib.thickness_nm, np.float64)
    vmax = float(max(sampler.v0[-1], sampler.v1[-1]))
    n_half = int(round(vmax / TILT_BIN_MRAD))
    tilt_bins = np.arange(-n_half, n_half + 1) * TILT_BIN_MRAD
    tb_t, tilt_t = torch.tensor(thickness_bins, dtype=torch.float32), torch.tensor(tilt_bins, dtype=torch.float32)
    model = PacbedThicknessTiltNet(width=cfg.width, n_thickness=len(thickness_bins), n_tilt=len(tilt_bins))
    val = []
    for dose in VAL_DOSES:  # the same patterns and misalignments at each dose, only the noise differs
        _, lab = sample_heldout(sampler, cfg.val_samples, 10_000 + cfg.seed, aug, dose=dose,
                                subtract_background=False)
        val.append((dose, (lab.pop("counts"), lab)))

    def loss_fn(out, lab):
        t, a0, a1, bg = out
        return (soft_cross_entropy(t, two_hot_torch(lab["thickness_nm"], tb_t))
                + soft_cross_entropy(a0, two_hot_torch(lab["tilt_mrad"][:, 0], tilt_t))
                + soft_cross_entropy(a1, two_hot_torch(lab["tilt_mrad"][:, 1], tilt_t))
                + 10 * ((bg[:, 0] - lab["background"]) ** 2).mean())

    history, finished = fit(model, lambda g: sampler.sample(cfg.batch, g, aug), loss_fn,
                            lambda: evaluate(model, val, cfg.background_iterations, thickness_bins, tilt_bins), cfg, work_dir, name,
                            METRICS, progress, stop_after)
    if not finished:
        return None
    card = make_card(
        name=name, task=TASK, library=library, lib=lib, sampler=sampler, cfg=cfg, aug=aug, history=history,
        frame_center="zero-disk centre on the centre pixel; crystal axes along array axes",
        normalisation="sqrt(I/mean(I) - background), then zero mean and unit std per pattern, inside the window",
        window_alpha=canonical.ANALYSIS_WINDOW_ALPHA,
        outputs={"thickness_prob": "probability per thickness bin (bins: training.thickness_bins_nm)",
                 "tilt0_prob": "probability per t0 bin (bins: training.tilt_bins_mrad), DESIGN.md axes",
                 "tilt1_prob": "probability per t1 bin (bins: training.tilt_bins_mrad)",
                 "background": "residual uniform background, units of mean(I)"},
        extra_training={"tilt_mrad": [-vmax, vmax], "thickness_bins_nm": thickness_bins.tolist(),
                        "tilt_bins_mrad": tilt_bins.tolist(), "background_iterations": cfg.background_iterations,
                        "dose_electrons": list(aug.dose)})
    counts = val[1][1][0][:16]
    return publish(PacbedThicknessTiltProbabilities(model), card, out_dir,
                   normalise_torch(counts, torch.zeros(len(counts))), history, METRICS)
