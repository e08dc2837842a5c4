"""Train the column-species classifier on simulated SrTiO3 [001] patches; export ONNX + card.

    nice python -m stemlive.simulate.species_train --out models/shipped [--images 400] [--steps 2500]

Patches come from `species_images` (training: seed 0; validation: seed 1; the benchmark uses
neither).  The patches have four channels: the column's HAADF and ABF patches and the median of
its four same-sublattice neighbours' (``--no-reference``: the first two only), so the network
compares a column with its own kind in the same image -- a partly occupied column is dimmer than
its neighbours, whatever the thickness and detector.  The network (`SpeciesNet`) is small --
three 3×3 convolution blocks and a linear head, ~25 k parameters -- so it trains in minutes on
a CPU.  Shipped: ``--balance 0.5 --steps 3500`` (400 specimens, width 16).  Training draws batches with random
90° turns and mirrors (SrTiO3 [001] projects with 4mm symmetry: a turned patch shows the same
column), cross-entropy; validated per dose decade.  Resumable through the shared trainer
(`trainer.fit`, npz checkpoints, no pickle); exported with the PyTorch-vs-ONNX Runtime parity
check and a card (`models/cards.py`).
"""
from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

import numpy as np

from .species_images import CLASSES, MATERIAL, PATCH_SIZE, PATCH_SPACINGS, ZONE, SpeciesRanges, write_patches

TASK = "column-species"
NAME = "column_species_SrTiO3_001"


def build_net(width: int = 16, n_classes: int = len(CLASSES), channels: int = 2, centre: bool = False):
    """Conv(channels→w)-pool, conv(w→2w)-pool, conv(2w→4w), global average, linear: logits.
    ``centre``: the head also reads the average of the central 2×2 features (the column itself:
    the global average alone mixes it with its neighbours)."""
    import torch
    from torch import nn

    def block(a, b):
        return nn.Sequential(nn.Conv2d(a, b, 3, padding=1), nn.BatchNorm2d(b), nn.ReLU())

    class SpeciesNet(nn.Module):
        output_names = ("probabilities",)

        def __init__(self):
            super().__init__()
            self.features = nn.Sequential(block(channels, width), nn.MaxPool2d(2), block(width, 2 * width), nn.MaxPool2d(2),
                                          block(2 * width, 4 * width))
            self.head = nn.Linear((8 if centre else 4) * width, n_classes)

        def logits(self, x: torch.Tensor) -> torch.Tensor:
            f = self.features(x)
            pooled = f.mean(dim=(2, 3))
            if centre:
                h, w = f.shape[2] // 2, f.shape[3] // 2
                pooled = torch.cat([pooled, f[:, :, h - 1:h + 1, w - 1:w + 1].mean(dim=(2, 3))], dim=1)
            return self.head(pooled)

        def forward(self, x: torch.Tensor):
            return (torch.softmax(self.logits(x), dim=1),)

    return SpeciesNet()


def augment(x, g):
    """Random 90° turns and mirrors of a batch (N, C, P, P), one draw per batch."""
    import torch

    k = int(torch.randint(0, 4, (1,), generator=g))
    x = torch.rot90(x, k, dims=(2, 3))
    if bool(torch.randint(0, 2, (1,), generator=g)):
        x = torch.flip(x, dims=(3,))
    return x


def accuracy_by_dose(probs: np.ndarray, y: np.ndarray, dose: np.ndarray) -> dict:
    """{dose decade: {"accuracy": ..., per class: ...}} for the card and the curves."""
    pred = probs.argmax(axis=1)
    out = {}
    for d in range(2, 5):
        m = (dose >= 10 ** d) & (dose < 10 ** (d + 1))
        if not m.any():
            continue
        row = {"accuracy": float((pred[m] == y[m]).mean()), "patches": int(m.sum())}
        for c, name in enumerate(CLASSES):
            mc = m & (y == c)
            row[name] = float((pred[mc] == c).mean()) if mc.any() else None
        out[f"1e{d}-1e{d + 1} e/A2"] = row
    return out


def train_species(out_dir: Path, work_dir: Path, n_images: int = 400, n_val_images: int = 48, steps: int = 2500,
                  batch: int = 128, width: int = 16, threads: int = 1, balance: float = 1.0,
                  reference: bool = True, centre: bool = False, progress: bool = True,
                  sampling_A: tuple[float, float] | None = None) -> Path:
    import torch

    from .train_config import TrainConfig
    from .trainer import fit, publish

    ranges = SpeciesRanges() if sampling_A is None else replace(SpeciesRanges(), sampling_A=tuple(sampling_A))
    work_dir.mkdir(parents=True, exist_ok=True)
    geometry = {"reference": True} if reference else {}
    train = np.load(write_patches(work_dir / "train.npz", n_images, seed=0, ranges=ranges, progress=progress, **geometry))
    val = np.load(write_patches(work_dir / "val.npz", n_val_images, seed=1, ranges=ranges, progress=progress, **geometry))
    channels = 4 if reference else 2
    xt, yt = torch.from_numpy(train["x"]), torch.from_numpy(train["y"])
    xv, yv, dv = torch.from_numpy(val["x"]), val["y"], val["dose"]
    # class-balanced batches (balance 1: the rare classes, vacant and partial, as often as the
    # others; 0.5: halfway in log, between that and the natural frequencies; 0: natural)
    weights = torch.from_numpy(np.bincount(train["y"], minlength=len(CLASSES))[train["y"]] ** -float(balance))
    model = build_net(width, channels=channels, centre=centre)
    cfg = TrainConfig(steps=steps, batch=batch, lr=3e-3, weight_decay=1e-4, width=width, val_every=max(100, steps // 10),
                      threads=threads)

    def sample(g):
        idx = torch.multinomial(weights, batch, replacement=True, generator=g)
        return augment(xt[idx], g), yt[idx]

    def loss_fn(out, target):
        return torch.nn.functional.nll_loss(torch.log(out[0].clamp_min(1e-8)), target)

    def evaluate() -> dict:
        with torch.no_grad():
            probs = torch.cat([model(xv[i:i + 4096])[0] for i in range(0, len(xv), 4096)]).numpy()
        return accuracy_by_dose(probs, yv, dv)

    metrics = [("accuracy", "accuracy (held-out specimens)")]
    history, finished = fit(model, sample, loss_fn, evaluate, cfg, work_dir, NAME, metrics, progress=progress)
    if not finished:
        raise RuntimeError("training stopped early")
    import abtem

    cell_A = 3.905  # SrTiO3 [001]: the patch is one cell (two nearest-neighbour spacings)
    card = {
        "id": f"{NAME}-n{n_images}-s{steps}" + ("-ref" if reference else ""), "task": TASK, "classes": list(CLASSES), "onnx_file": f"{NAME}.onnx",
        "input": {"name": "x", "shape": [channels, PATCH_SIZE, PATCH_SIZE], "patch_edge_A": cell_A,
                  "patch_spacings": PATCH_SPACINGS,
                  **({"neighbour_A": cell_A, "neighbour_spacings": 2.0} if reference else {}),
                  "normalisation": "channel 0 HAADF, channel 1 ABF, each per image zero mean and unit standard "
                                   "deviation, ABF inverted; patches centred on the column, bilinear"
                                   + ("; channels 2, 3: the pixelwise median of the HAADF and ABF patches of the "
                                      "column's four same-sublattice neighbours one cell away (column_species."
                                      "species_patches)" if reference else "")},
        "outputs": {"probabilities": f"(N, {len(CLASSES)}) softmax over {', '.join(CLASSES)}"},
        "training": {"material": MATERIAL, "zone": ZONE, "kv": ranges.kv,
                     "alpha_mrad": list(ranges.alpha_mrad), "thickness_nm": list(ranges.thickness_nm),
                     "dose_e_per_A2": list(ranges.dose_e_per_A2), "sampling_A_per_px": list(ranges.sampling_A),
                     "simulator": "convolution approximation calibrated on multislice (simulate/species_images.py)",
                     "simulator_version": f"abTEM {abtem.__version__} probe",
                     "n_images": n_images, "n_patches": int(len(yt)), "held_out_images": n_val_images,
                     "position_error_A": ranges.position_error_A,
                     "config": {"steps": steps, "batch": batch, "width": width, "class_balance": balance,
                                "centre_head": centre},
                     "training_seconds": history[-1]["seconds"]},
        "validation": history[-1]["val"],
    }
    return publish(model, card, out_dir, xv[:8].clone(), history, metrics)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="directory for the ONNX file and its card")
    ap.add_argument("--work", type=Path, default=Path(".bench-cache/species_training"), help="patches and checkpoints (resumable)")
    ap.add_argument("--images", type=int, default=400, help="training specimens (~130 patches each)")
    ap.add_argument("--steps", type=int, default=2500)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--balance", type=float, default=1.0,
                    help="class balance of the batches: 1 every class equally often, 0 as simulated")
    ap.add_argument("--threads", type=int, default=1,
                    help="PyTorch threads (1: on a busy 2-core machine two threads spin-wait, 8× slower)")
    ap.add_argument("--no-reference", dest="reference", action="store_false",
                    help="two channels only (no neighbour reference): the classifier before the reference")
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--sampling-A", type=float, nargs=2, default=None, metavar=("LO", "HI"),
                    help="scan steps [Å/px] the specimens are drawn from (log-uniform; default the image "
                         "model's 0.1-0.3)")
    ap.add_argument("--centre", action="store_true",
                    help="the head also reads the central features (measured: better on the simulated benchmark, "
                         "worse on the multislice replay scan of tests/test_live.py; not shipped)")
    args = ap.parse_args(argv)
    path = train_species(args.out, args.work, n_images=args.images, steps=args.steps, batch=args.batch,
                         threads=args.threads, balance=args.balance,
                         reference=args.reference, width=args.width, centre=args.centre,
                         sampling_A=tuple(args.sampling_A) if args.sampling_A else None)
    print(f"card: {path}")


if __name__ == "__main__":
    main()
