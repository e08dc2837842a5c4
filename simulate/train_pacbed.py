"""`stemlive train pacbed`: train the thickness/tilt network on a library, export ONNX + card.

Resumable: the model and optimiser state are checkpointed (numpy .npz + JSON, no pickle) in the
work directory every ``val_every`` steps, together with the validation history; rerunning the
same command continues from the last checkpoint.  Validation uses held-out simulations (whole
symmetry orbits of simulated tilts, each with its own phonon seeds) at three fixed doses.
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from ..models import canonical
from ..models.cards import sha256_of, write_metadata
from .library import PacbedLibrary
from .pacbed_data import Augment, PacbedSampler, normalise_torch
from .train_config import TrainConfig

VAL_DOSES = (2.3e7, 4.7e7, 2.3e8)
TASK = "pacbed-thickness-tilt"


def _save_checkpoint(path: Path, model, opt, step: int, history: list, cfg: TrainConfig) -> None:
    arrays = {f"model/{k}": v.detach().cpu().numpy() for k, v in model.state_dict().items()}
    opt_state = opt.state_dict()
    for pid, st in opt_state["state"].items():
        for k, v in st.items():
            arrays[f"opt/{pid}/{k}"] = v.detach().cpu().numpy() if torch.is_tensor(v) else np.asarray(v)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path.with_suffix(".npz"))
    meta = {"step": step, "history": history, "config": asdict(cfg), "param_groups": opt_state["param_groups"]}
    tmpj = path.with_name(path.name + ".tmp.json")
    tmpj.write_text(json.dumps(meta))
    os.replace(tmpj, path.with_suffix(".json"))


def _load_checkpoint(path: Path, model, opt) -> tuple[int, list]:
    if not path.with_suffix(".json").exists():
        return 0, []
    meta = json.loads(path.with_suffix(".json").read_text())
    with np.load(path.with_suffix(".npz"), allow_pickle=False) as z:
        model.load_state_dict({k[6:]: torch.from_numpy(z[k]) for k in z.files if k.startswith("model/")})
        state: dict = {}
        for k in z.files:
            if k.startswith("opt/"):
                _, pid, name = k.split("/", 2)
                state.setdefault(int(pid), {})[name] = torch.from_numpy(z[k])
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    return int(meta["step"]), meta["history"]


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
    model.eval()
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
    model.train()
    return res


def plot_curves(history: list, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not history:
        return
    steps = [h["step"] for h in history]
    fig, ax = plt.subplots(1, 3, figsize=(14, 4), constrained_layout=True)
    ax[0].semilogy(steps, [h["loss"] for h in history])
    ax[0].set(title="training loss (β-NLL)", xlabel="step")
    for dose in history[-1]["val"]:
        ax[1].plot(steps, [h["val"][dose]["thickness_within_1nm"] for h in history], label=f"±1 nm @ {dose} e")
        ax[2].plot(steps, [h["val"][dose]["tilt_within_0.25mrad_t>=10nm"] or np.nan for h in history],
                   label=f"±0.25 mrad @ {dose} e")
    ax[1].set(title="held-out thickness within ±1 nm", xlabel="step", ylim=(0, 1))
    ax[2].set(title="held-out tilt within ±0.25 mrad (t ≥ 10 nm)", xlabel="step", ylim=(0, 1))
    ax[1].legend(), ax[2].legend()
    fig.savefig(png, dpi=80)
    plt.close(fig)


class _Export(torch.nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        t, ts, tilt, tilts, bg = self.net(x)
        return t, ts, tilt, tilts, bg


def export(model, onnx_path: Path, card: dict, parity_batch: torch.Tensor, tol: float = 1e-3) -> dict:
    """ONNX export (dynamic batch, opset 17), metadata, and a PyTorch-vs-ONNX-Runtime parity check."""
    import onnxruntime as ort

    from ..models.nets import PacbedThicknessTiltNet

    names = list(PacbedThicknessTiltNet.output_names)
    tmp = onnx_path.with_name(onnx_path.name + ".tmp")
    wrapper = _Export(model).eval()  # a fresh wrapper is in training mode, and export restores its mode
    torch.onnx.export(wrapper, parity_batch[:1], str(tmp), input_names=["x"], output_names=names,
                      dynamic_axes={"x": {0: "N"}, **{n: {0: "N"} for n in names}}, opset_version=17,
                      dynamo=False)
    model.eval()
    write_metadata(tmp, card)
    sess = ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
    got = sess.run(names, {"x": parity_batch.numpy()})
    with torch.no_grad():
        ref = [o.numpy() for o in model(parity_batch)]
    err = max(float(np.max(np.abs(a - b) / (np.abs(b) + 1))) for a, b in zip(got, ref))
    if err > tol:
        raise RuntimeError(f"ONNX export of {onnx_path.name} differs from PyTorch by {err:.2e} (> {tol})")
    os.replace(tmp, onnx_path)
    return {"max_relative_difference": err, "tolerance": tol}


def train_pacbed(library: Path, out_dir: Path, name: str, work_dir: Path, cfg: TrainConfig = TrainConfig(),
                 progress: bool = True, stop_after: int | None = None) -> Path | None:
    """Train (resuming if possible), export ``<out_dir>/<name>.onnx`` and its card. Returns the card path.

    ``stop_after`` ends this call after that many new steps (checkpointed at the next validation
    point), returning None; rerunning continues."""
    from tqdm.auto import tqdm

    from ..models.nets import PacbedThicknessTiltNet

    torch.set_num_threads(cfg.threads)
    work_dir.mkdir(parents=True, exist_ok=True)
    lib = PacbedLibrary.load(library)
    sampler = PacbedSampler(lib, cfg.holdout_fraction, seed=cfg.seed)
    aug = Augment()
    torch.manual_seed(cfg.seed)
    t_mid = float(lib.thickness_nm.mean())
    model = PacbedThicknessTiltNet(width=cfg.width, thickness_scale=t_mid, tilt_scale=float(sampler.v0[-1]))
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    ckpt = work_dir / "checkpoint"
    start, history = _load_checkpoint(ckpt, model, opt)
    gval = torch.Generator().manual_seed(10_000 + cfg.seed)
    val = []
    for dose in VAL_DOSES:
        _, lab = sampler.sample(cfg.val_samples, gval, aug, split="heldout", dose=dose, subtract_background=False)
        val.append((dose, (lab.pop("counts"), lab)))
    g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + start)
    t0 = time.perf_counter()
    losses = []
    bar = tqdm(total=cfg.steps, initial=start, desc=f"train {name}", unit="step", disable=not progress)
    end = cfg.steps if stop_after is None else min(cfg.steps, start + stop_after)
    for step in range(start, end):
        lr = cfg.lr * 0.5 * (1 + math.cos(math.pi * step / cfg.steps))
        for grp in opt.param_groups:
            grp["lr"] = lr
        x, lab = sampler.sample(cfg.batch, g, aug)
        t, ts, tilt, tilts, bg = model(x)
        loss = (beta_nll(t[:, 0], ts[:, 0], lab["thickness_nm"]) / t_mid
                + beta_nll(tilt, tilts, lab["tilt_mrad"])
                + ((bg[:, 0] - lab["background"]) ** 2).mean())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        bar.update()
        if (step + 1) % cfg.val_every == 0 or step + 1 == cfg.steps:
            metrics = evaluate(model, val, cfg.background_iterations)
            history.append({"step": step + 1, "loss": float(np.mean(losses)), "val": metrics,
                            "seconds": time.perf_counter() - t0})
            losses = []
            _save_checkpoint(ckpt, model, opt, step + 1, history, cfg)
            plot_curves(history, work_dir / "training_curves.png")
            bar.set_postfix(t1nm=f"{metrics[f'{VAL_DOSES[1]:.1e}']['thickness_within_1nm']:.3f}")
    bar.close()
    if end < cfg.steps:
        if end % cfg.val_every:
            _save_checkpoint(ckpt, model, opt, end, history, cfg)
        return None
    out_dir.mkdir(parents=True, exist_ok=True)
    card = {
        "id": f"{name}-{sha256_of(library)[:8]}-s{cfg.steps}",
        "task": TASK,
        "onnx_file": f"{name}.onnx",
        "input": {"name": "x", "shape": [1, canonical.PIXELS, canonical.PIXELS],
                  "frame": {"pixels": canonical.PIXELS, "alpha_px": canonical.ALPHA_PX,
                            "half_range_alpha": canonical.HALF_RANGE_ALPHA,
                            "center": "zero-disk centre on the centre pixel; crystal axes along array axes"},
                  "normalisation": "sqrt(I/mean(I) - background), then zero mean and unit std per pattern"},
        "outputs": {"thickness_nm": "nm", "thickness_sigma_nm": "nm", "tilt_mrad": "mrad (t0, t1), DESIGN.md",
                    "tilt_sigma_mrad": "mrad", "background": "residual uniform background, units of mean(I)"},
        "training": {
            "material": lib.attrs["material"], "zone": lib.attrs["zone"], "kv": lib.kv, "alpha_mrad": lib.alpha_mrad,
            "thickness_nm": [float(lib.thickness_nm[0]), float(lib.thickness_nm[-1])],
            "tilt_mrad": [-float(sampler.v0[-1]), float(sampler.v0[-1])], "dose_electrons": list(aug.dose),
            "library": Path(library).name, "library_sha256": sha256_of(library),
            "simulator": lib.attrs["simulator"], "simulator_version": lib.attrs["simulator_version"],
            "samples_seen": cfg.steps * cfg.batch, "held_out_orbits": sampler.held_orbits,
            "augmentation": asdict(aug), "config": asdict(cfg),
        },
        "validation": history[-1]["val"] if history else {},
    }
    counts = val[1][1][0][:16]
    parity = export(model, out_dir / f"{name}.onnx", card, normalise_torch(counts, torch.zeros(len(counts))))
    card["parity"] = parity
    card["onnx_sha256"] = sha256_of(out_dir / f"{name}.onnx")
    (out_dir / f"{name}.json").write_text(json.dumps(card, indent=2))
    plot_curves(history, out_dir / f"{name}_training_curves.png")
    return out_dir / f"{name}.json"

