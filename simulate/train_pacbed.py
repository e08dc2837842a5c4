"""The thickness/tilt network: its loss, held-out validation and model card (`stemlive train pacbed`).

Validation uses held-out simulations (whole symmetry orbits of simulated tilts, each with its own
phonon seeds) at three fixed doses; the loop, checkpoints and export are in ``trainer.py``.
"""
from __future__ import annotations

from pathlib import Path

import torch

from .library import PacbedLibrary
from .pacbed_data import Augment, PacbedSampler, normalise_torch
from .train_config import TrainConfig
from .trainer import fit, make_card, publish

VAL_DOSES = (2.3e7, 4.7e7, 2.3e8)
TASK = "pacbed-thickness-tilt"


def beta_nll(mu, sigma, target, beta: float = 0.5):
    """Gaussian NLL weighted by σ^(2β) (detached): learns σ without starving the mean."""
    nll = 0.5 * ((target - mu) / sigma) ** 2 + torch.log(sigma)
    return (nll * sigma.detach() ** (2 * beta)).mean()


def predict(model, counts: torch.Tensor, iterations: int) -> dict[str, torch.Tensor]:
    """The analysis on canonical counts: converge the uniform background, then read the outputs."""
    b = torch.zeros(counts.shape[0])
    for _ in range(iterations):
        out = model(normalise_torch(counts, b))
        b = (b + out[4][:, 0]).clamp(min=0)
    t, ts, tilt, tilts, _ = model(normalise_torch(counts, b))
    return {"thickness_nm": t[:, 0], "thickness_sigma_nm": ts[:, 0], "tilt_mrad": tilt,
            "tilt_sigma_mrad": tilts, "background": b}


def evaluate(model, val: list, iterations: int) -> dict:
    """Accuracy on the fixed held-out sets (the seed's Table 2 figures, plus σ calibration)."""
    res = {}
    with torch.no_grad():
        for dose, (counts, lab) in val:
            p = predict(model, counts, iterations)
            dt = (p["thickness_nm"] - lab["thickness_nm"]).abs()
            dtilt = (p["tilt_mrad"] - lab["tilt_mrad"]).abs()
            thick10 = lab["thickness_nm"] >= 10
            both = (dtilt <= 0.25).all(dim=1)
            res[f"{dose:.1e}"] = {
                "thickness_within_1nm": float((dt <= 1).float().mean()),
                "thickness_within_2nm": float((dt <= 2).float().mean()),
                "thickness_mae_nm": float(dt.mean()),
                "tilt_within_0.25mrad_t>=10nm": float(both[thick10].float().mean()) if thick10.any() else None,
                "tilt_mae_mrad": float(dtilt.mean()),
                "thickness_within_1sigma": float((dt <= p["thickness_sigma_nm"]).float().mean()),
                "tilt_within_1sigma": float((dtilt <= p["tilt_sigma_mrad"]).float().mean()),
                "background_mae": float((p["background"] - lab["background_total"]).abs().mean()),
            }
    return res


METRICS = [("thickness_within_1nm", "held-out thickness within ±1 nm"),
           ("tilt_within_0.25mrad_t>=10nm", "held-out tilt within ±0.25 mrad (t ≥ 10 nm)")]


def train_pacbed(library: Path, out_dir: Path, name: str, work_dir: Path, cfg: TrainConfig = TrainConfig(),
                 progress: bool = True, stop_after: int | None = None, aug: Augment | None = None) -> Path | None:
    """Train (resuming if possible), export ``<out_dir>/<name>.onnx`` and its card. Returns the card path.

    ``stop_after`` ends this call after that many new steps (checkpointed), returning None;
    rerunning continues."""
    from ..models.nets import PacbedThicknessTiltNet

    lib = PacbedLibrary.load(library)
    sampler = PacbedSampler(lib, cfg.holdout_fraction, seed=cfg.seed)
    aug = aug or Augment()
    torch.manual_seed(cfg.seed)
    t_mid = float(lib.thickness_nm.mean())
    model = PacbedThicknessTiltNet(width=cfg.width, thickness_scale=t_mid, tilt_scale=float(sampler.v0[-1]))
    val = []
    for dose in VAL_DOSES:  # the same patterns and misalignments at each dose, only the noise differs
        gval = torch.Generator().manual_seed(10_000 + cfg.seed)
        _, lab = sampler.sample(cfg.val_samples, gval, aug, split="heldout", dose=dose, subtract_background=False)
        val.append((dose, (lab.pop("counts"), lab)))

    def loss_fn(out, lab):
        t, ts, tilt, tilts, bg = out
        return (beta_nll(t[:, 0], ts[:, 0], lab["thickness_nm"]) / t_mid
                + beta_nll(tilt, tilts, lab["tilt_mrad"]) + ((bg[:, 0] - lab["background"]) ** 2).mean())

    history, finished = fit(model, lambda g: sampler.sample(cfg.batch, g, aug), loss_fn,
                            lambda: evaluate(model, val, cfg.background_iterations), cfg, work_dir, name,
                            METRICS, progress, stop_after)
    if not finished:
        return None
    card = make_card(
        name=name, task=TASK, library=library, lib=lib, sampler=sampler, cfg=cfg, aug=aug, history=history,
        frame_center="zero-disk centre on the centre pixel; crystal axes along array axes",
        normalisation="sqrt(I/mean(I) - background), then zero mean and unit std per pattern",
        outputs={"thickness_nm": "nm", "thickness_sigma_nm": "nm", "tilt_mrad": "mrad (t0, t1), DESIGN.md",
                 "tilt_sigma_mrad": "mrad", "background": "residual uniform background, units of mean(I)"},
        extra_training={"tilt_mrad": [-float(sampler.v0[-1]), float(sampler.v0[-1])],
                        "dose_electrons": list(aug.dose)})
    counts = val[1][1][0][:16]
    return publish(model, card, out_dir, normalise_torch(counts, torch.zeros(len(counts))), history, METRICS)
