"""The training loop shared by the PACBED networks: resumable, validated, exported with a card.

Checkpoints are numpy ``.npz`` (model and optimiser tensors) plus JSON (step, history, settings):
no pickle.  A run continues from its checkpoint when restarted with the same work directory.
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..models.cards import write_metadata
from .train_config import TrainConfig


def save_checkpoint(path: Path, model, opt, step: int, history: list, cfg: TrainConfig) -> None:
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


def load_checkpoint(path: Path, model, opt) -> tuple[int, list]:
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


def plot_curves(history: list, png: Path, metrics: list[tuple[str, str]]) -> None:
    """Training loss and, per validation group (e.g. dose), the named metrics over steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not history:
        return
    steps = [h["step"] for h in history]
    fig, ax = plt.subplots(1, 1 + len(metrics), figsize=(4.5 * (1 + len(metrics)), 4), constrained_layout=True,
                           squeeze=False)
    ax = ax[0]
    ax[0].plot(steps, [h["loss"] for h in history])
    ax[0].set_yscale("symlog", linthresh=1e-2)  # a Gaussian NLL goes negative once σ is small
    ax[0].set(title="training loss", xlabel="step")
    for a, (key, title) in zip(ax[1:], metrics):
        for group in history[-1]["val"]:
            a.plot(steps, [h["val"][group].get(key) or np.nan for h in history], label=str(group))
        a.set(title=title, xlabel="step")
        a.legend(fontsize=8)
    fig.savefig(png, dpi=80)
    plt.close(fig)


def static_output_dims(onnx_path: Path, shapes: dict[str, tuple[int, ...]], dynamic: dict[int, str]) -> None:
    """Declare every output axis that is not dynamic with its size (``shapes``: one sample's outputs).

    The exporter names an axis it cannot prove constant (e.g. a slice of a layer's output) with a
    symbol; TensorRT then cannot size that output's buffer from the input shape alone."""
    import onnx

    model = onnx.load(str(onnx_path))
    for out in model.graph.output:
        dims = out.type.tensor_type.shape.dim
        for i, d in enumerate(dims):
            if i not in dynamic and i < len(shapes[out.name]):
                d.Clear()
                d.dim_value = int(shapes[out.name][i])
    onnx.save(model, str(onnx_path))


def export(model, onnx_path: Path, card: dict, parity_batch: torch.Tensor, tol: float = 1e-3,
           spatial: bool = False) -> dict:
    """ONNX export (dynamic batch -- and image size with ``spatial`` -- opset 17), card metadata,
    PyTorch-vs-ONNX-Runtime parity check."""
    import onnxruntime as ort

    names = list(model.output_names)
    tmp = onnx_path.with_name(onnx_path.name + ".tmp")
    model.eval()
    axes = {0: "N", 2: "H", 3: "W"} if spatial else {0: "N"}
    torch.onnx.export(model, parity_batch[:1], str(tmp), input_names=["x"], output_names=names,
                      dynamic_axes={"x": axes, **{n: axes for n in names}}, opset_version=17,
                      dynamo=False)
    model.eval()
    with torch.no_grad():
        shapes = {n: tuple(o.shape) for n, o in zip(names, model(parity_batch[:1]))}
    static_output_dims(tmp, shapes, axes)
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


def fit(model, sample: Callable[[torch.Generator], tuple], loss_fn: Callable, evaluate: Callable[[], dict],
        cfg: TrainConfig, work_dir: Path, name: str, metrics: list[tuple[str, str]], progress: bool = True,
        stop_after: int | None = None) -> tuple[list, bool]:
    """Run (or continue) training. Returns (history, finished)."""
    from tqdm.auto import tqdm

    torch.set_num_threads(cfg.threads)
    work_dir.mkdir(parents=True, exist_ok=True)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    ckpt = work_dir / "checkpoint"
    start, history = load_checkpoint(ckpt, model, opt)
    g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + start)
    t0 = time.perf_counter() - (history[-1]["seconds"] if history else 0.0)
    losses: list[float] = []
    end = cfg.steps if stop_after is None else min(cfg.steps, start + stop_after)
    bar = tqdm(total=cfg.steps, initial=start, desc=f"train {name}", unit="step", disable=not progress)
    model.train()
    for step in range(start, end):
        lr = cfg.lr * 0.5 * (1 + math.cos(math.pi * step / cfg.steps))
        for grp in opt.param_groups:
            grp["lr"] = lr
        x, lab = sample(g)
        loss = loss_fn(model(x), lab)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        bar.update()
        if (step + 1) % cfg.val_every == 0 or step + 1 == cfg.steps:
            model.eval()
            with torch.no_grad():
                val = evaluate()
            model.train()
            history.append({"step": step + 1, "loss": float(np.mean(losses)), "val": val,
                            "seconds": time.perf_counter() - t0})
            losses = []
            save_checkpoint(ckpt, model, opt, step + 1, history, cfg)
            plot_curves(history, work_dir / "training_curves.png", metrics)
    bar.close()
    if end < cfg.steps and end % cfg.val_every:
        save_checkpoint(ckpt, model, opt, end, history, cfg)
    model.eval()
    return history, end >= cfg.steps


def make_card(*, name: str, task: str, library: Path, lib, sampler, cfg: TrainConfig, aug, history: list,
              frame_center: str, normalisation: str, outputs: dict, window_alpha: float,
              extra_training: dict | None = None) -> dict:
    """The model card (DESIGN.md "Model artefact") of a network trained on ``library``."""
    from ..models import canonical
    from ..models.cards import sha256_of

    training = {
        "material": lib.attrs["material"], "zone": lib.attrs["zone"], "kv": lib.kv, "alpha_mrad": lib.alpha_mrad,
        "thickness_nm": [float(lib.thickness_nm[0]), float(lib.thickness_nm[-1])],
        "library": Path(library).name, "library_sha256": sha256_of(library),
        "simulator": lib.attrs["simulator"], "simulator_version": lib.attrs["simulator_version"],
        "samples_seen": cfg.steps * cfg.batch, "held_out_orbits": sampler.held_orbits,
        "augmentation": asdict(aug), "config": asdict(cfg), "training_seconds": history[-1]["seconds"],
        **(extra_training or {}),
    }
    return {
        "id": f"{name}-{sha256_of(library)[:8]}-s{cfg.steps}",
        "task": task,
        "onnx_file": f"{name}.onnx",
        "input": {"name": "x", "shape": [1, canonical.PIXELS, canonical.PIXELS],
                  "frame": {"pixels": canonical.PIXELS, "alpha_px": canonical.ALPHA_PX,
                            "half_range_alpha": canonical.HALF_RANGE_ALPHA, "center": frame_center},
                  "normalisation": normalisation, "window_alpha": window_alpha},
        "outputs": outputs,
        "training": training,
        "validation": history[-1]["val"],
    }


def publish(model, card: dict, out_dir: Path, parity_x: torch.Tensor, history: list,
            metrics: list[tuple[str, str]], spatial: bool = False) -> Path:
    """Export ``<out_dir>/<name>.onnx`` with the parity check, write the card and the curves."""
    from ..models.cards import sha256_of

    out_dir.mkdir(parents=True, exist_ok=True)
    onnx_path = out_dir / card["onnx_file"]
    card["parity"] = export(model, onnx_path, card, parity_x, spatial=spatial)
    card["onnx_sha256"] = sha256_of(onnx_path)
    card_path = onnx_path.with_suffix(".json")
    card_path.write_text(json.dumps(card, indent=2))
    plot_curves(history, onnx_path.with_name(onnx_path.stem + "_training_curves.png"), metrics)
    return card_path
