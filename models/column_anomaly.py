"""`AnomalyDetector`: how unlike bulk each atomic column looks (point defects, seed 002).

A shipped convolutional VAE (card task ``column-anomaly``), trained on bulk SrTiO3 [001]
patches only, reconstructs each column's two-channel patch -- HAADF and ABF of one scan, each
standardised per image, ABF inverted, exactly the species classifier's input
(`column_species.classifier_input`, `column_patches`, here 2.5 cells wide) -- from its
latent mean.  What the bulk
model cannot reproduce is the anomaly:

* ``error``: the mean squared difference between the patch and its reconstruction over the
  valid pixels of both channels, weighted by a Gaussian window on the column (σ from the card,
  0.2 cell: the patch is 2.5 cells wide so that the column's same-kind neighbours, its
  reference, are in it, but a uniform mean over ~25 columns drowns one column's misfit in the
  others' shot noise -- measured on validation specimens, see `simulate/anomaly_train.py`).
  The reconstruction error, not the VAE's negative
  ELBO: the ELBO's KL term grows with how unusual the *imaging* is (thickness, defocus,
  rotation, dose all move the latent code of perfectly good bulk), and the seed's measure is
  the input-minus-prediction difference too.
* ``score``: the error standardised over the image's own columns, (error − median) / (1.4826 ×
  median absolute deviation).  Shot noise adds its variance to every column's error and that
  variance changes a hundredfold between 10³ and 10⁵ e/Å² (and with sampling and thickness), so
  raw errors of two images are not comparable; nearly every column of an image is bulk, so its
  median and spread are the bulk's.  Needs ≥ ``MIN_COLUMNS`` complete patches in the image, or
  a ``reference`` (centre, scale) from an earlier image of the same acquisition.
* ``flagged``: score above the card's threshold -- the mean + 1.5 standard deviations of the
  scores of bulk columns in held-out validation images, as the seed sets it.  The card also
  holds the scores at 1 % and 3 % false alarms on the same columns (``threshold_at``).

Patches should be centred on the lattice sites (the positions a lattice fit to the located
columns gives, to a few pm): an off-centred column (a ferroelectric Ti displacement of 5-20
pm) is seen against its site, and a centre that follows each column's own fit (~10 pm error)
would hide it.  The network was trained with centres 0.02 Å rms from the site.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .backends import load_backend
from .cards import SHIPPED_DIR, ModelCard, ModelMismatch, find_cards, verify
from .column_patches import column_spacing, extract_patches
from .column_species import classifier_input

TASK = "column-anomaly"
MIN_COLUMNS = 16
MAD_TO_SD = 1.4826  # a normal distribution's sd over its median absolute deviation


@dataclass
class ColumnAnomaly:
    error: np.ndarray  # (n,) per-pixel mean squared reconstruction error of the normalised patch
    score: np.ndarray  # (n,) error standardised over the image's complete patches
    flagged: np.ndarray  # (n,) bool: score above threshold
    threshold: float
    complete: np.ndarray  # (n,) bool: the whole patch lay in measured pixels
    reference: tuple[float, float]  # (centre, scale) the scores were standardised with
    parts: dict = field(default_factory=dict)  # name -> (n,) the measures the score combines


def error_window(size: int, spacings: float, sigma_cells: float | None) -> np.ndarray | None:
    """(size, size) Gaussian weights centred on the column (σ in SrTiO3-like cells of two
    nearest-neighbour spacings; the patch spans ``spacings`` of them): the error then weighs
    the column itself, and its neighbours serve as the reference the VAE reconstructs it from.
    None: uniform weights."""
    if sigma_cells is None:
        return None
    px_per_cell = size / (spacings / 2)
    o = np.arange(size) - (size - 1) / 2
    g = np.exp(-0.5 * (o / (sigma_cells * px_per_cell)) ** 2)
    return np.outer(g, g)


def reconstruction_error(patches: np.ndarray, reconstruction: np.ndarray, valid: np.ndarray | None = None,
                         window: np.ndarray | None = None) -> np.ndarray:
    """(n,) mean over valid pixels (all channels) of (patch − reconstruction)², weighted by
    ``window`` (P, P; None: uniform): how much of the patch the bulk model cannot reproduce.
    ``valid`` (n, P, P); None: every pixel."""
    sq = (np.asarray(patches, np.float64) - np.asarray(reconstruction, np.float64)) ** 2
    w = np.ones(sq.shape[-2:]) if window is None else np.asarray(window, np.float64)
    w = np.broadcast_to(w, (len(sq), *sq.shape[-2:]))
    if valid is not None:
        w = w * np.asarray(valid, bool)
    total = w.sum(axis=(1, 2)) * sq.shape[1]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, (sq * w[:, None]).sum(axis=(1, 2, 3)) / total, np.nan)


def image_reference(error: np.ndarray, use: np.ndarray | None = None,
                    min_columns: int = MIN_COLUMNS) -> tuple[float, float]:
    """(median, 1.4826 × MAD) of the errors of ``use`` columns: one image's bulk level and spread."""
    e = np.asarray(error, np.float64)
    e = e[np.asarray(use, bool)] if use is not None else e
    e = e[np.isfinite(e)]
    if len(e) < min_columns:
        raise ValueError(f"standardising anomaly scores needs at least {min_columns} complete column patches in "
                         f"the image, got {len(e)}; pass reference=(centre, scale) from a larger image of the "
                         "same acquisition")
    centre = float(np.median(e))
    scale = MAD_TO_SD * float(np.median(np.abs(e - centre)))
    if not scale > 0:
        raise ValueError("the column errors have no spread (identical patches?); the scores cannot be standardised")
    return centre, scale


def standardise(error: np.ndarray, reference: tuple[float, float]) -> np.ndarray:
    centre, scale = reference
    return (np.asarray(error, np.float64) - centre) / scale


class AnomalyDetector:
    """The bulk VAE behind an inference backend, with its card's threshold."""

    def __init__(self, card: ModelCard, backend: str = "onnxruntime", threads: int | None = None):
        self.card = card
        if card.task != TASK:
            raise ModelMismatch(f"{card.path.name} is a {card.task!r} model, not {TASK!r}")
        verify(card)
        inp = card.data["input"]
        self.size = int(inp["shape"][-1])
        self.edge_A = float(inp["patch_edge_A"])
        self.spacings = float(inp["patch_spacings"])
        self.prefilter = bool(inp.get("prefilter", False))
        an = card.data.get("anomaly")
        if not isinstance(an, dict) or not np.isfinite(an.get("threshold", np.nan)):
            raise ModelMismatch(f"model card {card.path} holds no anomaly threshold ('anomaly': {{'threshold': ...}})")
        self.threshold = float(an["threshold"])
        self.threshold_at = {float(k): float(v) for k, v in an.get("threshold_at_false_alarm", {}).items()}
        self.window = error_window(self.size, self.spacings, an.get("window_sigma_cells"))
        self.backend = load_backend(card.onnx_path, backend, threads=threads)
        verify(card, self.backend.metadata())
        if "reconstruction" not in self.backend.output_names:
            raise ModelMismatch(f"{card.onnx_path} has no 'reconstruction' output (outputs: "
                                f"{', '.join(self.backend.output_names)})")

    @classmethod
    def shipped(cls, models_dir: str | Path = SHIPPED_DIR, **kw) -> "AnomalyDetector":
        cards = find_cards(models_dir, TASK)
        if not cards:
            raise FileNotFoundError(f"no {TASK} model in {models_dir}; train one with `stemlive train anomaly`")
        return cls(cards[-1], **kw)

    def edge_px(self, positions_px: np.ndarray, sampling_A: float | None) -> float:
        if sampling_A is not None:
            if not (np.isfinite(sampling_A) and sampling_A > 0):
                raise ValueError(f"sampling must be a finite positive number of Å per pixel, got {sampling_A}")
            return self.edge_A / sampling_A
        return self.spacings * column_spacing(positions_px)

    def reconstruct(self, patches: np.ndarray, batch: int = 1024) -> np.ndarray:
        """The bulk model's reconstruction of (n, 2, P, P) normalised patches."""
        x = np.ascontiguousarray(patches, np.float32)
        if len(x) == 0:
            return x.copy()
        return np.concatenate([self.backend(x[i:i + batch])["reconstruction"] for i in range(0, len(x), batch)])

    def score(self, haadf: np.ndarray, abf: np.ndarray, positions_px: np.ndarray, sampling_A: float | None = None,
              reference: tuple[float, float] | None = None, threshold: float | None = None,
              groups: np.ndarray | None = None) -> ColumnAnomaly:
        """Anomaly of every column at ``positions_px`` (row, col) of the HAADF/ABF pair.

        ``threshold``: a score to flag above (default: the card's mean + 1.5 sd of bulk;
        ``self.threshold_at[0.03]`` holds the 3 %-false-alarm one)."""
        pos = np.asarray(positions_px, np.float64).reshape(-1, 2)
        thr = self.threshold if threshold is None else float(threshold)
        if len(pos) == 0:
            z = np.zeros(0)
            return ColumnAnomaly(z, z, np.zeros(0, bool), thr, np.zeros(0, bool), reference or (np.nan, np.nan))
        x = classifier_input(haadf, abf)
        p = extract_patches(x, pos, edge_px=self.edge_px(pos, sampling_A), size=self.size, prefilter=self.prefilter)
        err = reconstruction_error(p.patches, self.reconstruct(p.patches), p.valid, self.window)
        if reference is None:
            reference = image_reference(err, p.complete)
        score = standardise(err, reference)
        return ColumnAnomaly(err, score, score > thr, thr, p.complete, reference)
