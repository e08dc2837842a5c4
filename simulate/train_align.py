"""The alignment network: zero-disk centre, size and rotation from a crop (`stemlive train pacbed`).

Trained on crops made from a deliberately wrong estimate (centre off by up to 5 canonical px,
size by ±20 %, rotation anywhere in ±45°), with raw-recording effects (saturation, hot pixels,
gamma-scaled 8-bit exports) on top of the thickness/tilt augmentations.  At analysis time it is
applied iteratively, re-cropping the raw pattern with each improved estimate (seed Fig. 2).
Validation: held-out simulations, large misalignment ("first step") and small ("converging").
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from ..models import canonical
from .library import PacbedLibrary
from .pacbed_data import ALIGN_AUGMENT, PacbedSampler, sample_heldout
from .train_config import TrainConfig
from .trainer import fit, make_card, publish

TASK = "pacbed-align"
VAL_DOSE = 4.7e7
METRICS = [("center_within_0.05alpha", "centre within 0.05 α"), ("size_within_1pct", "size within ±1 %"),
           ("rotation_within_1deg", "rotation within ±1°")]


def rotation_from_4(r4: torch.Tensor) -> torch.Tensor:
    """θ in (−45°, 45°] from (cos 4θ, sin 4θ)."""
    return torch.rad2deg(torch.atan2(r4[:, 1], r4[:, 0]) / 4)


def wrap45(deg: torch.Tensor) -> torch.Tensor:
    return (deg + 45) % 90 - 45


def evaluate(model, val: list) -> dict:
    res = {}
    for label, (x, lab) in val:
        c, lr, r4 = model(x)
        dc = (c - lab["center_offset_px"]).norm(dim=1) / canonical.ALPHA_PX
        ds = (torch.exp(lr[:, 0]) / lab["radius_ratio"] - 1).abs()
        dr = wrap45(rotation_from_4(r4) - lab["rotation_deg"]).abs()
        res[label] = {
            "center_within_0.05alpha": float((dc <= 0.05).float().mean()),
            "center_within_0.1alpha": float((dc <= 0.1).float().mean()),
            "center_median_alpha": float(dc.median()),
            "size_within_1pct": float((ds <= 0.01).float().mean()),
            "size_within_2pct": float((ds <= 0.02).float().mean()),
            "rotation_within_1deg": float((dr <= 1).float().mean()),
            "rotation_within_2deg": float((dr <= 2).float().mean()),
        }
    return res


def train_align(library: Path, out_dir: Path, name: str, work_dir: Path, cfg: TrainConfig = TrainConfig(),
                progress: bool = True, stop_after: int | None = None) -> Path | None:
    """Train (resuming), export ``<out_dir>/<name>.onnx`` + card; None while unfinished."""
    from ..models.nets import PacbedAlignNet

    lib = PacbedLibrary.load(library)
    sampler = PacbedSampler(lib, cfg.holdout_fraction, seed=cfg.seed)
    aug = ALIGN_AUGMENT
    torch.manual_seed(cfg.seed)
    model = PacbedAlignNet(width=cfg.width)
    val = []
    for k, (label, a) in enumerate((("first step", aug),
                                    ("converging", replace(aug, shift_px=0.5, scale=0.02, rotation_deg=2.0)))):
        seed = 20_000 + 10 * cfg.seed + k
        x, lab = sample_heldout(sampler, cfg.val_samples, seed, a, dose=VAL_DOSE, subtract_background=False,
                                window_alpha=canonical.ALIGN_WINDOW_ALPHA)
        lab.pop("counts")
        val.append((label, (x, lab)))

    def loss_fn(out, lab):
        c, lr, r4 = out
        th = torch.deg2rad(4 * lab["rotation_deg"])
        target4 = torch.stack([torch.cos(th), torch.sin(th)], dim=1)
        return (((c - lab["center_offset_px"]) / canonical.ALPHA_PX * 10) ** 2).mean() \
            + ((lr[:, 0] - torch.log(lab["radius_ratio"])) * 30).pow(2).mean() \
            + ((r4 - target4) * 10).pow(2).mean()

    def sample(g):
        return sampler.sample(cfg.batch, g, aug, subtract_background=False, window_alpha=canonical.ALIGN_WINDOW_ALPHA)

    history, finished = fit(model, sample, loss_fn, lambda: evaluate(model, val), cfg, work_dir, name, METRICS,
                            progress, stop_after)
    if not finished:
        return None
    card = make_card(
        name=name, task=TASK, library=library, lib=lib, sampler=sampler, cfg=cfg, aug=aug, history=history,
        frame_center="crop centred on the current centre estimate, scaled by the current radius",
        normalisation="sqrt(I/mean(I)), then zero mean and unit std per pattern, inside the window",
        window_alpha=canonical.ALIGN_WINDOW_ALPHA,
        outputs={"center_offset_px": "true centre in the crop, canonical px from its centre pixel (row, col)",
                 "log_radius_ratio": "ln(true radius / ALPHA_PX)",
                 "rotation_4": "(cos 4θ, sin 4θ), θ per DESIGN.md modulo 90°"})
    return publish(model, card, out_dir, val[0][1][0][:16], history, METRICS)


__all__ = ["train_align", "rotation_from_4", "wrap45"]
