"""Estimates and spreads from the thickness/tilt classifier's probabilities (numpy, no torch).

The estimate is the probability-weighted mean over the most probable bin and its neighbours
(continuous values between bins, not pulled towards a distant second mode); σ is the spread of
the whole distribution around that estimate, so two competing thicknesses give a large σ.
"""
from __future__ import annotations

import numpy as np

WINDOW_BINS = 2


def estimate(prob: np.ndarray, bins: np.ndarray, window: int = WINDOW_BINS) -> tuple[np.ndarray, np.ndarray]:
    """(estimate, σ) per row of ``prob`` (N, B) over bin centres ``bins`` (B,)."""
    prob = np.asarray(prob, np.float64)
    bins = np.asarray(bins, np.float64)
    top = prob.argmax(axis=1)
    idx = np.arange(len(bins))
    near = np.abs(idx[None, :] - top[:, None]) <= window
    w = prob * near
    est = (w * bins).sum(axis=1) / np.maximum(w.sum(axis=1), 1e-12)
    spread = np.sqrt((prob * (bins[None, :] - est[:, None]) ** 2).sum(axis=1) / np.maximum(prob.sum(axis=1), 1e-12))
    floor = np.median(np.diff(bins)) / np.sqrt(12) if len(bins) > 1 else 0.0
    return est, np.maximum(spread, floor)


def top_classes(prob: np.ndarray, bins: np.ndarray, k: int = 2) -> list[list[tuple[float, float]]]:
    """The k most probable bins and their probabilities per row (the seed's Table 3 view)."""
    order = np.argsort(-prob, axis=1)[:, :k]
    return [[(float(bins[j]), float(prob[i, j])) for j in row] for i, row in enumerate(order)]


def two_hot(values: np.ndarray, bins: np.ndarray) -> np.ndarray:
    """Soft class targets: each value split linearly between its two neighbouring bins."""
    values = np.clip(np.asarray(values, np.float64), bins[0], bins[-1])
    i = np.clip(np.searchsorted(bins, values, side="right") - 1, 0, len(bins) - 2)
    w = (values - bins[i]) / (bins[i + 1] - bins[i])
    out = np.zeros((len(values), len(bins)))
    rows = np.arange(len(values))
    out[rows, i] = 1 - w
    out[rows, i + 1] += w
    return out
