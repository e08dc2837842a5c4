"""Training the atom-finding network on simulated images (`stemlive train atoms`).

Images and column truth come from `stemlive simulate images` (HDF5).  Training draws random
crops with random 90° rotations and flips (the positions follow), normalises each crop to zero
mean and unit spread (contrast and background vary between microscopes), and regresses a map
with a Gaussian of ``TARGET_SIGMA_PX`` on every column of the truth: the cation-containing
columns for HAADF images, every column (oxygen included) for ABF, whose images are fed
inverted so that columns are bright in both.
Validation: precision, recall and F1 within 0.5 Å and RMSE of the located columns on held-out
images.  Resumable through the shared trainer (`trainer.fit`).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..models.atom_analysis import network_input  # the input contract, shared with the finder

CROP = 128
TARGET_SIGMA_PX = 1.5


@dataclass
class AtomData:
    images: np.ndarray  # (n, H, W) float32
    positions: list  # per image (k, 2) px: the truth of this contrast only
    sampling_A: np.ndarray  # (n,)
    dose: np.ndarray  # (n,) e/Å²
    contrast: str  # "haadf" or "abf"

    @classmethod
    def load(cls, path: Path) -> "AtomData":
        import h5py

        with h5py.File(path, "r") as f:
            done = f["done"][()]
            if not done.any():
                raise ValueError(f"{path} holds no finished images; run `stemlive simulate images` first")
            idx = np.flatnonzero(done)
            contrast = json.loads(f.attrs["spec"])["ranges"].get("contrast", "haadf")
            images = f["images"][idx]
            which = "cation" if contrast == "haadf" else "visible"
            pos = [f["positions_px"][str(k)][()][f[which][str(k)][()]] for k in idx]
            meta = [json.loads(f["meta"].attrs[str(k)]) for k in idx]
        return cls(images, pos, np.array([m["sampling_A"] for m in meta]),
                   np.array([m["dose_e_per_A2"] for m in meta]), contrast)


def trained_spacing_range(positions: list) -> tuple[float, float]:
    """2nd-98th percentile of the median nearest-neighbour distance per image: the column spacing
    (in pixels) the network was trained on, which the finder checks an image against."""
    from scipy.spatial import cKDTree

    med = [float(np.median(cKDTree(p).query(p, k=2)[0][:, 1])) for p in positions if len(p) > 2]
    return float(np.percentile(med, 2)), float(np.percentile(med, 98))


def choose_threshold(heatmap, data: "AtomData", indices, thresholds=np.arange(0.15, 0.66, 0.05)) -> tuple[float, float]:
    """The locator threshold with the best mean F1 (within 0.5 Å) on held-out images, and that F1.

    ``heatmap(image) -> map`` is the trained network (PyTorch or the exported ONNX)."""
    from ..models.atom_locator import locate, match

    maps = [(heatmap(data.images[k]), k) for k in indices]
    best = (0.3, -1.0)
    for t in thresholds:
        f1 = np.mean([match(locate(m, threshold=float(t)).positions_px, data.positions[k][
            (data.positions[k] < np.array(m.shape) - 0.5).all(axis=1)], 0.5 / data.sampling_A[k]).f1
            for m, k in maps])
        if f1 > best[1]:
            best = (round(float(t), 2), float(f1))
    return best


def heatmap(shape: tuple[int, int], positions: np.ndarray, sigma: float = TARGET_SIGMA_PX) -> np.ndarray:
    """The training target: max over columns of a unit Gaussian at each position."""
    out = np.zeros(shape, np.float32)
    rr = np.arange(shape[0])[:, None]
    cc = np.arange(shape[1])[None, :]
    half = int(np.ceil(3 * sigma))
    for r, c in positions:
        r0, c0 = int(round(r)), int(round(c))
        rs = slice(max(0, r0 - half), min(shape[0], r0 + half + 1))
        cs = slice(max(0, c0 - half), min(shape[1], c0 + half + 1))
        g = np.exp(-((rr[rs] - r) ** 2 + (cc[:, cs] - c) ** 2) / (2 * sigma ** 2))
        out[rs, cs] = np.maximum(out[rs, cs], g)
    return out


def random_crop(data: AtomData, k: int, rng: np.random.Generator, crop: int = CROP):
    """A crop of image k, turned by a random multiple of 90° and maybe mirrored, with its truth."""
    img = data.images[k]
    h, w = img.shape
    r0, c0 = rng.integers(0, h - crop + 1), rng.integers(0, w - crop + 1)
    x = img[r0:r0 + crop, c0:c0 + crop]
    p = data.positions[k] - [r0, c0]
    p = p[((p > -0.5) & (p < crop - 0.5)).all(axis=1)]
    for _ in range(int(rng.integers(4))):  # rot90 counter-clockwise: (r, c) -> (crop-1-c, r)
        x = np.rot90(x)
        p = np.stack([crop - 1 - p[:, 1], p[:, 0]], axis=1)
    if rng.random() < 0.5:
        x = x[:, ::-1]
        p = np.stack([p[:, 0], crop - 1 - p[:, 1]], axis=1)
    return np.ascontiguousarray(x), p


def train_atoms(images: Path, out_dir: Path, work_dir: Path, name: str = "atoms_haadf", steps: int = 3000,
                batch: int = 16, width: int = 16, holdout: float = 0.05, val_every: int = 500, seed: int = 0,
                progress: bool = True) -> Path:
    from ..models.atom_locator import locate, match
    from ..models.nets import AtomUNet
    from .train_config import TrainConfig
    from .trainer import fit, publish

    data = AtomData.load(images)
    n = len(data.images)
    n_val = max(1, int(round(holdout * n)))
    val_idx, train_idx = np.arange(n - n_val, n), np.arange(n - n_val)  # held out: whole images
    if len(train_idx) == 0:
        raise ValueError(f"{images}: {n} images are too few to hold {n_val} out")
    cfg = TrainConfig(steps=steps, batch=batch, lr=2e-3, width=width, val_every=val_every, seed=seed)
    torch.manual_seed(seed)
    model = AtomUNet(width=width)

    def sample(g: torch.Generator):
        rng = np.random.default_rng(int(torch.randint(0, 2 ** 31 - 1, (1,), generator=g)))
        xs, ys = [], []
        for k in rng.choice(train_idx, batch):
            x, p = random_crop(data, int(k), rng)
            xs.append(network_input(x, data.contrast))
            ys.append(heatmap(x.shape, p))
        return torch.from_numpy(np.stack(xs)[:, None]), torch.from_numpy(np.stack(ys)[:, None])

    def loss_fn(out, target):
        pred = out[0]
        w = 1.0 + 4.0 * target  # columns are a small part of the image: weigh them up
        return (w * (pred - target) ** 2).mean()

    chosen = {"threshold": 0.3}  # during training; tuned on the held-out images at the end

    def evaluate() -> dict:
        scores = []
        for k in val_idx:
            img = data.images[k]
            h, wd = (s - s % 8 for s in img.shape)
            x = torch.from_numpy(network_input(img[:h, :wd], data.contrast)[None, None])
            pred = model(x)[0][0, 0].detach().numpy()
            found = locate(pred, img[:h, :wd], threshold=chosen["threshold"])
            truth = data.positions[k]
            truth = truth[(truth[:, 0] < h - 0.5) & (truth[:, 1] < wd - 0.5)]
            s = match(found.positions_px, truth, radius=0.5 / data.sampling_A[k])
            scores.append((s.precision, s.recall, s.f1, s.rmse * data.sampling_A[k] * 100))
        a = np.array(scores)
        decade = np.floor(np.log10(data.dose[val_idx])).astype(int)
        out = {}
        for d in sorted(set(decade.tolist())):  # per dose decade, as the benchmark reports them
            m = decade == d
            out[f"1e{d}-1e{d + 1} e/A2"] = {"precision": float(a[m, 0].mean()), "recall": float(a[m, 1].mean()),
                                            "f1": float(a[m, 2].mean()), "rmse_pm": float(np.nanmean(a[m, 3])),
                                            "images": int(m.sum())}
        return out

    metrics = [("f1", "F1 within 0.5 Å (held-out images)"), ("rmse_pm", "RMSE [pm]")]
    history, finished = fit(model, sample, loss_fn, evaluate, cfg, work_dir, name, metrics, progress=progress)
    if not finished:
        raise RuntimeError("training stopped early")
    model.eval()

    def predict(img):
        h, wd = (s - s % 8 for s in img.shape)
        with torch.no_grad():
            return model(torch.from_numpy(network_input(img[:h, :wd], data.contrast)[None, None]))[0][0, 0].numpy()

    chosen["threshold"], _ = choose_threshold(predict, data, val_idx)
    card = {
        "id": f"{name}-s{steps}", "threshold": chosen["threshold"], "task": f"atoms-{data.contrast}",
        "contrast": data.contrast,
        "onnx_file": f"{name}.onnx",
        "input": {"name": "x", "shape": [1, "H", "W"], "multiple_of": 2 ** model.depth,
                  "normalisation": "per image: zero mean, unit standard deviation"
                                   + ("; ABF inverted (columns bright)" if data.contrast == "abf" else ""),
                  "sampling_A_per_px": [float(data.sampling_A.min()), float(data.sampling_A.max())],
                  "column_spacing_px": list(trained_spacing_range(data.positions))},
        "outputs": {"columns": f"map in [0, 1], a Gaussian (sigma {TARGET_SIGMA_PX} px) on every "
                               + ("cation-containing column" if data.contrast == "haadf" else "column, oxygen included")},
        "training": {"images": str(Path(images).name), "n_images": int(n), "held_out_images": int(n_val),
                     "config": {"steps": steps, "batch": batch, "width": width, "crop": CROP},
                     "training_seconds": history[-1]["seconds"]},
        "validation": evaluate(),  # at the chosen threshold
    }
    parity = torch.from_numpy(network_input(data.images[val_idx[0]][:CROP, :CROP], data.contrast)[None, None])
    return publish(model, card, out_dir, parity, history, metrics, spatial=True)
