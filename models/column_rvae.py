"""Local symmetry of every atomic column: a rotationally invariant VAE (rVAE, seed 004).

Each located column's patch (HAADF, standardised per image as the finders' input; 3 nearest-
neighbour spacings wide, so the column's nearest and second-nearest neighbours are in it) is
encoded into a rotation angle φ, an offset (dx, dy) and k ≥ 2 latent variables.  The decoder is
an MLP on the patch's *coordinate grid*, turned by φ and shifted by the offset, concatenated
with the latents (the spatial decoder of pyroVED's iVAE / AtomAI's rVAE): the decoder draws
one upright template, and rotation cannot hide in the latents as cheaply as in φ.  So the
angle map shows how each column's neighbourhood is turned, the latent maps what else differs
(Sr against Ti-O columns, a boundary's mixed neighbourhood).

Conventions:

* ``angle_deg``: a positive angle turns the lattice from array axis 0 towards axis 1 (the
  template feature at offset p appears at R(φ)·p + d, R = [[cos, -sin], [sin, cos]] acting on
  (row, col); `simulate.species_images` and `simulate.domain_images` turn lattices the same way).
* The angle is defined modulo the projected lattice's rotational symmetry -- 90° for a cubic
  perovskite along [001] (``SYMMETRY_DEG``) -- and reported in (-45°, 45°].
* Its zero is the learned template's orientation, which training does not fix; the maps are
  therefore given *relative to the image's mean orientation* (circular mean of 4φ over the
  image's columns; ``reference_deg`` holds it).  Differences between columns -- the rotation of
  a grain against its matrix -- are absolute; the angle of one domain is not.
* ``offset_px``: (row, col) shift of the decoded template from the patch centre, image px.

The model is trained per acquisition, on the patches of the image itself (`train_rvae`,
`stemlive train rvae --image IMAGE --out DIR`): checkpoints are npz + JSON through the shared
trainer (no pickle); the encoder (angle, offsets, latents from the means) is exported to ONNX
with a card (task ``column-rvae``) and scored through the project's backends
(`LocalSymmetry`).  Training (pyroVED's priors): N(0, 1) on every latent, φ in radians, the
offset scaled by 0.1 patch half-widths; Gaussian decoder: masked mean squared error over the
patch's inscribed disc (what a turned square patch keeps) + β·KL per pixel.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .backends import load_backend
from .cards import ModelCard, latest_card, verify
from .column_patches import column_spacing, extract_patches

TASK = "column-rvae"
NAME = "column_rvae"
MIN_COLUMNS = 32  # complete patches needed to train on (or to standardise) one image
PATCH_SIZE = 16
PATCH_SPACINGS = 3.0  # patch edge in nearest-neighbour column spacings
PREFILTER = True
SYMMETRY_DEG = 90.0  # [001] of a cubic perovskite: 4-fold
T_PRIOR = 0.1  # offset prior scale [patch half-widths], as pyroVED's t_prior
OUTPUT_NAMES = ("angle_deg", "offset", "latent")
# weight of the self-supervised rotation-consistency term (`equivariance_loss`) against the
# per-pixel ELBO; 0 gives the plain rVAE, which on these images left φ at its prior's mean
# (angle spread < 1° over two domains 15° apart: the rotation went into the latents)
EQUIVARIANCE = 1.0


class TooFewColumns(ValueError):
    """Too few complete column patches to train on or to reference an image's orientation."""


def wrap_deg(angle_deg, period: float = SYMMETRY_DEG) -> np.ndarray:
    """Angles modulo ``period`` in (-period/2, period/2]."""
    a = np.mod(np.asarray(angle_deg, np.float64) + period / 2, period) - period / 2
    return np.where(a == -period / 2, period / 2, a)


def circular_mean_deg(angle_deg, period: float = SYMMETRY_DEG) -> float:
    """Mean of angles defined modulo ``period`` (on the circle of period-fold angles)."""
    a = np.asarray(angle_deg, np.float64)
    a = a[np.isfinite(a)]
    k = 2 * np.pi / period
    return float(np.angle(np.mean(np.exp(1j * k * a))) / k)


def split_domains(angle_deg: np.ndarray, iterations: int = 100) -> tuple[np.ndarray, float]:
    """(label 0/1 per column, threshold): two domains by angle, the threshold halfway between
    the two groups' means (1-D 2-means; NaN angles get -1).  Label 1 is the larger angle."""
    a = np.asarray(angle_deg, np.float64)
    ok = np.isfinite(a)
    lab = np.full(len(a), -1)
    if ok.sum() < 2:
        return lab, float("nan")
    v = a[ok]
    t = 0.5 * (np.percentile(v, 5) + np.percentile(v, 95))
    for _ in range(iterations):
        lo, hi = v[v <= t], v[v > t]
        if not len(lo) or not len(hi):
            break
        t_new = 0.5 * (lo.mean() + hi.mean())
        if t_new == t:
            break
        t = t_new
    lab[ok] = (v > t).astype(int)
    return lab, float(t)


def patch_input(image: np.ndarray) -> np.ndarray:
    """What the rVAE sees: the HAADF image standardised per image (the atom finder's input)."""
    from .atom_analysis import network_input

    return network_input(np.asarray(image, np.float64), "haadf")


def column_patches(image: np.ndarray, positions_px: np.ndarray, spacing_px: float | None = None,
                   size: int = PATCH_SIZE, spacings: float = PATCH_SPACINGS):
    """`ColumnPatches` (one channel) around ``positions_px``: ``spacings`` × the column spacing
    wide (measured from the positions unless ``spacing_px`` is given), prefiltered."""
    pos = np.asarray(positions_px, np.float64).reshape(-1, 2)
    if len(pos) < 2 and spacing_px is None:
        raise TooFewColumns(f"local symmetry needs column positions; got {len(pos)}")
    sp = column_spacing(pos) if spacing_px is None else float(spacing_px)
    return extract_patches(patch_input(image), pos, edge_px=spacings * sp, size=size, prefilter=PREFILTER)


def build_rvae(size: int = PATCH_SIZE, latent: int = 2, width: int = 16, hidden: int = 48, channels: int = 1):
    """The rVAE (size divisible by 4).  forward(x) -> (reconstruction, mean, log variance) of the
    (3 + latent) code [φ rad, dx, dy (×T_PRIOR: half-widths), z...]; in eval mode the means decode."""
    import torch
    from torch import nn

    if latent < 2:
        raise ValueError(f"the rVAE needs at least 2 latent variables besides angle and offset, got {latent}")
    if size % 4:
        raise ValueError(f"patch size must be divisible by 4, got {size}")
    code = 3 + latent
    k = size // 4

    class RVAE(nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = nn.Sequential(
                nn.Conv2d(channels, width, 3, padding=1), nn.ReLU(),
                nn.Conv2d(width, 2 * width, 4, stride=2, padding=1), nn.ReLU(),
                nn.Conv2d(2 * width, 2 * width, 4, stride=2, padding=1), nn.ReLU(),
                nn.Flatten(), nn.Linear(2 * width * k * k, 128), nn.ReLU(), nn.Linear(128, 2 * code))
            self.fc_coord = nn.Linear(2, hidden)
            self.fc_latent = nn.Linear(latent, hidden, bias=False)
            self.decoder = nn.Sequential(nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(),
                                         nn.Linear(hidden, hidden), nn.Tanh(), nn.Linear(hidden, channels))
            o = (torch.arange(size, dtype=torch.float32) - (size - 1) / 2) * (2.0 / size)
            gr, gc = torch.meshgrid(o, o, indexing="ij")
            self.register_buffer("grid", torch.stack([gr.reshape(-1), gc.reshape(-1)], 1))  # (P², 2) half-widths
            self.register_buffer("mask", (gr ** 2 + gc ** 2 <= 1.0).reshape(-1).float())

        def encode(self, x):
            mu, logvar = self.encoder(x).chunk(2, dim=1)
            return mu, logvar.clamp(-12, 6)

        def decode(self, phi, shift, z):
            g = self.grid[None] - shift[:, None, :]  # (N, P², 2)
            c, s = torch.cos(phi)[:, None], torch.sin(phi)[:, None]
            turned = torch.stack([c * g[..., 0] + s * g[..., 1], -s * g[..., 0] + c * g[..., 1]], -1)  # R(φ)ᵀ g
            h = self.fc_coord(turned) + self.fc_latent(z)[:, None, :]
            out = self.decoder(h)  # (N, P², C)
            return out.permute(0, 2, 1).reshape(len(z), channels, size, size)

        def forward(self, x):
            mu, logvar = self.encode(x)
            code_ = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar) if self.training else mu
            phi, shift, z = code_[:, 0], code_[:, 1:3] * T_PRIOR, code_[:, 3:]
            return self.decode(phi, shift, z), mu, logvar

    return RVAE()


def rvae_loss(out, x, beta: float = 1.0, mask=None):
    """Mean squared error over ``mask`` (the inscribed disc; None: every pixel) + β × KL(q ‖ N(0, 1))
    per masked pixel."""
    import torch

    recon, mu, logvar = out
    m = torch.ones(x.shape[-2] * x.shape[-1]) if mask is None else mask
    m = m.reshape(1, 1, x.shape[-2], x.shape[-1])
    npx = m.sum() * x.shape[1]
    mse = torch.mean(torch.sum((recon - x) ** 2 * m, dim=(1, 2, 3)) / npx)
    kl = -0.5 * torch.mean(torch.sum(1 + logvar - mu ** 2 - logvar.exp(), dim=1)) / npx
    return mse + beta * kl


def equivariance_loss(phi_rad, alpha_rad, period_deg: float = SYMMETRY_DEG):
    """1 − cos(k·((φ₁ + α₁) − (φ₂ + α₂))), k = 360°/period, over pairs of views of the same columns
    (first half of the batch against the second): a column turned by α must come out at φ − α,
    modulo the lattice symmetry."""
    import torch

    k = 360.0 / period_deg
    a = phi_rad + alpha_rad
    h = len(a) // 2
    return torch.mean(1 - torch.cos(k * (a[:h] - a[h:2 * h])))


def encoder_export(model):
    """The encoder alone, outputs (angle_deg, offset [half-widths], latent) from the means: what
    ONNX carries and the backends run."""
    from torch import nn

    class Encoder(nn.Module):
        output_names = OUTPUT_NAMES

        def __init__(self):
            super().__init__()
            self.net = model.encoder

        def forward(self, x):
            mu, _ = self.net(x).chunk(2, dim=1)
            return mu[:, 0] * (180.0 / float(np.pi)), mu[:, 1:3] * T_PRIOR, mu[:, 3:]

    e = Encoder()
    e.eval()
    return e


class RotatedPatches:
    """Patches of one image cut at any angle: the training data of the per-image rVAE.

    Every step draws columns and turns each one's sampling grid by a random angle α (uniform
    over the symmetry period), so the patches show the lattice at every orientation, not only
    the one or two of the image: explaining that spread costs the decoder nothing through φ
    and much through two latents, which is what makes φ carry the rotation."""

    def __init__(self, image: np.ndarray, positions_px: np.ndarray, spacing_px: float | None = None,
                 size: int = PATCH_SIZE, spacings: float = PATCH_SPACINGS):
        from scipy import ndimage

        from .column_patches import patch_offsets

        p = column_patches(image, positions_px, spacing_px, size, spacings)
        ok = p.complete
        if ok.sum() < MIN_COLUMNS:
            raise TooFewColumns(f"training the rVAE on one image needs at least {MIN_COLUMNS} complete column "
                                f"patches, got {int(ok.sum())} of {len(p)} columns; use a larger field of view "
                                "(or more scan blocks)")
        self.size, self.edge_px = size, p.edge_px
        self.centres = p.centres_px[ok]
        self.fixed = p.patches[ok]  # (m, 1, P, P) at α = 0: validation and the parity batch
        img = patch_input(image)
        step = p.edge_px / size
        self.image = ndimage.gaussian_filter(img, 0.4 * step, mode="nearest") if PREFILTER and step > 1 else img
        self.offsets = patch_offsets(p.edge_px, size).reshape(-1, 2)  # (P², 2)

    def __len__(self) -> int:
        return len(self.centres)

    def sample(self, idx: np.ndarray, alpha_rad: np.ndarray) -> np.ndarray:
        """(len(idx), 1, P, P): column ``idx`` with its grid turned by α (pixel o shows c + R(α)·o;
        a lattice at θ in the image appears at θ − α in the patch)."""
        from scipy import ndimage

        c, s = np.cos(alpha_rad)[:, None], np.sin(alpha_rad)[:, None]
        o0, o1 = self.offsets[None, :, 0], self.offsets[None, :, 1]
        rows = self.centres[idx, 0:1] + c * o0 - s * o1
        cols = self.centres[idx, 1:2] + s * o0 + c * o1
        v = ndimage.map_coordinates(self.image, np.stack([rows.ravel(), cols.ravel()]), order=1, mode="nearest")
        return v.reshape(len(idx), 1, self.size, self.size).astype(np.float32)


def train_rvae(image: np.ndarray, positions_px: np.ndarray, out_dir: Path, work_dir: Path | None = None, *,
               spacing_px: float | None = None, steps: int = 1500, batch: int = 64, latent: int = 2,
               width: int = 16, hidden: int = 48, beta: float = 1.0, lr: float = 2e-3, rotate: bool = True,
               equivariance: float = EQUIVARIANCE,
               threads: int = 1, seed: int = 0, progress: bool = True, stop_after: int | None = None,
               source: dict | None = None) -> Path | None:
    """Train (or continue) the rVAE on the columns of one HAADF ``image``, then export the encoder
    ONNX + card into ``out_dir``.  None when ``stop_after`` ended the run early (run again with the
    same ``work_dir`` to continue).  ``rotate``: turn each training patch by a random angle
    (`RotatedPatches`).  ``source``: what the image is (card)."""
    import torch

    from ..simulate.train_config import TrainConfig
    from ..simulate.trainer import fit, publish

    data = RotatedPatches(image, positions_px, spacing_px)
    x = data.fixed
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    out_dir = Path(out_dir)
    work_dir = Path(work_dir) if work_dir is not None else out_dir / "work"
    size = x.shape[-1]
    model = build_rvae(size, latent, width, hidden, x.shape[1])
    xt = torch.from_numpy(x)
    cfg = TrainConfig(steps=steps, batch=batch, lr=lr, weight_decay=1e-4, width=width,
                      val_every=max(1, min(250, steps // 8)), threads=threads, seed=seed)

    period = np.deg2rad(SYMMETRY_DEG)

    def sample(g):
        idx = torch.randint(0, len(xt), (batch // 2 if rotate else batch,), generator=g).numpy()
        if not rotate:
            return xt[idx], (xt[idx], None)
        idx = np.concatenate([idx, idx])  # two views of each column at independent angles
        alpha = torch.rand(len(idx), generator=g, dtype=torch.float64).numpy() * period
        xb = torch.from_numpy(data.sample(idx, alpha))
        return xb, (xb, torch.from_numpy(alpha).float())

    def loss_fn(out, lab):
        xb, alpha = lab
        loss = rvae_loss(out, xb, beta, model.mask)
        if alpha is None or not equivariance:
            return loss
        return loss + equivariance * equivariance_loss(out[1][:, 0], alpha)

    def evaluate() -> dict:
        with torch.no_grad():
            rec, mu, _ = zip(*(model(xt[i:i + 1024]) for i in range(0, len(xt), 1024)))
            rec, mu = torch.cat(rec), torch.cat(mu)
            m = model.mask.reshape(1, 1, size, size)
            mse = float((((rec - xt) ** 2) * m).sum() / (m.sum() * len(xt) * x.shape[1]))
        ang = wrap_deg(np.rad2deg(mu[:, 0].numpy()))
        rel = wrap_deg(ang - circular_mean_deg(ang))
        return {"image": {"mse": mse, "angle_sd_deg": float(np.std(rel))}}

    metrics = [("mse", "reconstruction MSE (disc, from the means)"), ("angle_sd_deg", "column angle spread [deg]")]
    history, finished = fit(model, sample, loss_fn, evaluate, cfg, work_dir, NAME,
                            metrics, progress=progress, stop_after=stop_after)
    if not finished:
        return None
    model.eval()
    enc = encoder_export(model)
    digest = __import__("hashlib").sha256(x.tobytes()).hexdigest()[:8]
    src = dict(source or {})
    card = {
        "id": f"{NAME}-{digest}-s{steps}-l{latent}", "task": TASK, "onnx_file": f"{NAME}.onnx",
        "input": {"name": "x", "shape": [x.shape[1], size, size], "patch_spacings": PATCH_SPACINGS,
                  "prefilter": PREFILTER,
                  "normalisation": "HAADF image standardised per image (zero mean, unit sd); patch centred on the "
                                   "column (bilinear), edge = patch_spacings x median nearest-neighbour spacing"},
        "outputs": {"angle_deg": "(N,) encoder mean of the rotation, degrees, not wrapped: wrap modulo "
                                 "symmetry_deg; zero = the learned template's orientation",
                    "offset": "(N, 2) (row, col) shift of the template from the patch centre, in patch half-widths",
                    "latent": f"(N, {latent}) latent means"},
        "symmetry_deg": SYMMETRY_DEG,
        "angle_convention": "positive: the lattice turned from array axis 0 towards axis 1; maps relative to the "
                            "image's circular-mean orientation, in (-45, 45]",
        "training": {"per_acquisition": True, "rotation_augmentation": rotate, "material": src.get("material"), "zone": src.get("zone"),
                     "kv": src.get("kv"), "alpha_mrad": src.get("alpha_mrad"), "source": src,
                     "n_patches": int(len(x)),
                     "config": {"steps": steps, "batch": batch, "latent": latent, "width": width, "hidden": hidden,
                                "beta": beta, "lr": lr, "threads": threads, "seed": seed, "t_prior": T_PRIOR,
                                "priors": "N(0,1) on angle (rad), offset/t_prior, latents",
                                "equivariance": equivariance if rotate else 0.0},
                     "training_seconds": history[-1]["seconds"]},
        "validation": history[-1]["val"],
    }
    return publish(enc, card, out_dir, xt[:8].clone(), history, metrics)


@dataclass
class ColumnSymmetry:
    angle_deg: np.ndarray  # (n,) relative to reference_deg, in (-45, 45]; NaN where the patch was incomplete
    raw_angle_deg: np.ndarray  # (n,) the encoder's angle, wrapped to (-45, 45] (zero: the template's)
    offset_px: np.ndarray  # (n, 2) template shift from the column position [image px]
    latent: np.ndarray  # (n, k)
    complete: np.ndarray  # (n,) bool
    reference_deg: float  # the image's circular-mean raw angle


class LocalSymmetry:
    """A trained rVAE encoder (card task ``column-rvae``) behind an inference backend."""

    def __init__(self, card: ModelCard, backend: str = "onnxruntime", threads: int | None = None):
        if card.task != TASK:
            raise ValueError(f"{card.path.name} is a {card.task!r} model, not {TASK!r}")
        self.card = card
        verify(card)
        self.backend = load_backend(card.onnx_path, backend, threads=threads)
        verify(card, self.backend.metadata())
        inp = card.data["input"]
        self.size = int(inp["shape"][-1])
        self.spacings = float(inp["patch_spacings"])
        self.period = float(card.data.get("symmetry_deg", SYMMETRY_DEG))

    @classmethod
    def from_dir(cls, directory: str | Path, **kw) -> "LocalSymmetry":
        """The rVAE in ``directory`` (written by `stemlive train rvae`), or an error naming what is there."""
        directory = Path(directory)
        if not directory.is_dir():
            raise FileNotFoundError(f"no rVAE model: {directory} is not a directory; train one with "
                                    f"`stemlive train rvae --image IMAGE --out {directory}`")
        return cls(latest_card(directory, TASK, f"`stemlive train rvae --image IMAGE --out {directory}`"), **kw)

    def encode(self, patches: np.ndarray, batch: int = 4096) -> dict:
        """Raw encoder outputs of (n, C, P, P) patches."""
        x = np.asarray(patches, np.float32)
        outs = [self.backend(x[i:i + batch]) for i in range(0, len(x), batch)]
        return {k: np.concatenate([o[k] for o in outs]) for k in OUTPUT_NAMES}

    def analyse(self, image: np.ndarray, positions_px: np.ndarray, spacing_px: float | None = None,
                reference_deg: float | None = None) -> ColumnSymmetry:
        """Angle, offset and latent of every column at ``positions_px`` in the HAADF ``image``.
        ``reference_deg``: the zero of the map (None: this image's circular-mean orientation)."""
        pos = np.asarray(positions_px, np.float64).reshape(-1, 2)
        p = column_patches(image, pos, spacing_px, self.size, self.spacings)
        ok = p.complete
        if reference_deg is None and ok.sum() < MIN_COLUMNS:
            raise TooFewColumns(f"the angle map's reference needs at least {MIN_COLUMNS} complete column patches, "
                                f"got {int(ok.sum())}; pass reference_deg from a larger image of the acquisition")
        out = self.encode(p.patches[ok]) if ok.any() else {k: np.zeros((0,)) for k in OUTPUT_NAMES}
        n = len(pos)
        k = int(self.card.data["training"]["config"]["latent"])
        raw = np.full(n, np.nan)
        raw[ok] = wrap_deg(out["angle_deg"], self.period)
        ref = circular_mean_deg(raw[ok], self.period) if reference_deg is None else float(reference_deg)
        off = np.full((n, 2), np.nan)
        off[ok] = np.asarray(out["offset"]).reshape(-1, 2) * p.edge_px / 2
        lat = np.full((n, k), np.nan)
        lat[ok] = np.asarray(out["latent"]).reshape(-1, k)
        return ColumnSymmetry(wrap_deg(raw - ref, self.period), raw, off, lat, ok, ref)


def read_positions(path: Path) -> np.ndarray:
    """(n, 2) row, col from an .npy (no pickle) or a CSV with ``row`` and ``col`` columns
    (`stemlive atoms find`'s CSV; other columns ignored)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"positions file {path} does not exist")
    if path.suffix.lower() == ".npy":
        pos = np.load(path, allow_pickle=False)
    else:
        import csv

        with open(path, newline="") as fh:
            rows = list(csv.DictReader(fh))
        keys = {k.strip().lower(): k for k in (rows[0].keys() if rows else [])}
        rk = next((keys[k] for k in ("row", "row_px", "y_px") if k in keys), None)
        ck = next((keys[k] for k in ("col", "col_px", "x_px") if k in keys), None)
        if rk is None or ck is None:
            raise ValueError(f"{path}: a CSV of positions needs 'row' and 'col' columns, found {list(keys)}")
        pos = np.array([[float(r[rk]), float(r[ck])] for r in rows])
    pos = np.asarray(pos, np.float64)
    if pos.ndim != 2 or pos.shape[1] != 2:
        raise ValueError(f"{path}: positions must be (n, 2) row, col; got shape {pos.shape}")
    return pos


def plot_maps(image: np.ndarray, positions_px: np.ndarray, sym: ColumnSymmetry, png: Path,
              truth_deg: np.ndarray | None = None) -> None:
    """The image with every column coloured by its angle (and by the truth when given)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("rVAE angle [deg]", sym.angle_deg)] + ([("truth [deg]", truth_deg)] if truth_deg is not None else [])
    panels += [(f"latent {i}", sym.latent[:, i]) for i in range(min(2, sym.latent.shape[1]))]
    fig, ax = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4.2), constrained_layout=True, squeeze=False)
    lim = float(np.nanmax(np.abs(sym.angle_deg))) if np.isfinite(sym.angle_deg).any() else 45.0
    for a, (title, v) in zip(ax[0], panels):
        a.imshow(image, cmap="gray")
        kw = {"cmap": "coolwarm", "vmin": -lim, "vmax": lim} if "deg" in title else {"cmap": "viridis"}
        sc = a.scatter(positions_px[:, 1], positions_px[:, 0], c=v, s=14, **kw)
        fig.colorbar(sc, ax=a, shrink=0.8)
        a.set(title=title, xticks=[], yticks=[])
    fig.savefig(png, dpi=90)
    plt.close(fig)


def run_cli(args) -> int:
    """`stemlive train rvae --image IMAGE --out DIR`: train on the image's columns, export, write the maps."""
    import time

    from .readers import read_patterns

    stack = read_patterns(args.image)
    if len(stack) != 1:
        raise ValueError(f"{args.image} holds {len(stack)} images; `stemlive train rvae` takes one HAADF image")
    image = np.asarray(stack[0], np.float64)
    if args.positions is not None:
        pos = read_positions(args.positions)
        how = f"positions from {args.positions.name}"
    else:
        from .atom_analysis import AtomFinder

        pos = AtomFinder.shipped("haadf", backend="onnxruntime", threads=args.threads).find(
            image, args.sampling_A_per_px).positions_px
        how = "columns located by the shipped HAADF atom finder"
    if len(pos) < MIN_COLUMNS:
        raise TooFewColumns(f"{args.image}: {len(pos)} columns ({how}); the rVAE needs at least {MIN_COLUMNS}")
    p = column_patches(image, pos)
    print(f"{len(pos)} columns ({how}), {int(p.complete.sum())} complete patches, edge {p.edge_px:.1f} px")
    t0 = time.perf_counter()
    card = train_rvae(image, pos, args.out, args.work, steps=args.steps, latent=args.latent,
                      threads=args.threads, source={"image": str(args.image), "positions": how})
    print(f"trained in {time.perf_counter() - t0:.0f} s; model card: {card}")
    sym = LocalSymmetry.from_dir(args.out, threads=args.threads).analyse(image, pos)
    maps = Path(args.out) / "column_rvae_maps.npz"
    np.savez(maps, positions_px=pos, angle_deg=sym.angle_deg, raw_angle_deg=sym.raw_angle_deg,
             offset_px=sym.offset_px, latent=sym.latent, complete=sym.complete, reference_deg=sym.reference_deg)
    plot_maps(image, pos, sym, Path(args.out) / "column_rvae_maps.png")
    print(f"maps: {maps} (angles relative to the image's mean orientation {sym.reference_deg:+.1f} deg; "
          f"training curves: {Path(args.out) / (NAME + '_training_curves.png')})")
    return 0
