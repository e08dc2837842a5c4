"""Column positions from a map of "column here" (the network's output) or from the image itself.

`locate` finds the local maxima of a heatmap above a threshold, refines each to sub-pixel
precision by a parabola fitted through the 3×3 neighbourhood of the maximum (separately per
axis, on the log of the map where it is positive -- exact for a Gaussian peak), and reports the
peak height as the confidence and the image's integrated intensity around it.  `match` scores
found columns against the truth (precision, recall, F1 within a radius, position RMSE).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree


@dataclass
class Columns:
    positions_px: np.ndarray  # (n, 2) row, col; pixel centres at integer indices
    confidence: np.ndarray  # (n,)
    intensity: np.ndarray  # (n,) image sum within the integration radius


def _parabola(m1: np.ndarray, m0: np.ndarray, p1: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Vertex offset and the rise of the vertex above m0 for a parabola through (-1, 0, +1)."""
    den = m1 - 2 * m0 + p1
    with np.errstate(divide="ignore", invalid="ignore"):
        off = np.where(den < 0, 0.5 * (m1 - p1) / den, 0.0)
    off = np.clip(off, -0.5, 0.5)
    return off, 0.25 * (p1 - m1) * off


def locate(heatmap: np.ndarray, image: np.ndarray | None = None, threshold: float = 0.3,
           min_distance_px: int = 2, radius_px: float = 2.0) -> Columns:
    """Sub-pixel local maxima of ``heatmap`` above ``threshold``."""
    h = np.asarray(heatmap, np.float64)
    size = 2 * min_distance_px + 1
    peaks = (ndimage.maximum_filter(h, size=size, mode="nearest") == h) & (h > threshold)
    r, c = np.nonzero(peaks)
    inner = (r > 0) & (r < h.shape[0] - 1) & (c > 0) & (c < h.shape[1] - 1)
    r, c = r[inner], c[inner]
    logh = np.log(np.clip(h, 1e-6, None))  # a Gaussian peak is a parabola in log
    dr, rise_r = _parabola(logh[r - 1, c], logh[r, c], logh[r + 1, c])
    dc, rise_c = _parabola(logh[r, c - 1], logh[r, c], logh[r, c + 1])
    pos = np.stack([r + dr, c + dc], axis=1)
    conf = np.exp(logh[r, c] + rise_r + rise_c)  # the interpolated peak height
    if image is None:
        inten = np.full(len(r), np.nan)
    else:
        inten = integrate(np.asarray(image, np.float64), pos, radius_px)
    return Columns(pos, conf, inten)


def integrate(image: np.ndarray, positions: np.ndarray, radius_px: float) -> np.ndarray:
    """Sum of the image within ``radius_px`` of each position."""
    rr = int(np.ceil(radius_px))
    off = np.array([(a, b) for a in range(-rr, rr + 1) for b in range(-rr, rr + 1)])
    out = np.zeros(len(positions))
    base = np.round(positions).astype(int)
    for a, b in off:
        rows, cols = base[:, 0] + a, base[:, 1] + b
        ok = (rows >= 0) & (rows < image.shape[0]) & (cols >= 0) & (cols < image.shape[1])
        d = np.hypot(rows - positions[:, 0], cols - positions[:, 1])
        ok &= d <= radius_px
        out[ok] += image[rows[ok], cols[ok]]
    return out


@dataclass
class Score:
    precision: float
    recall: float
    f1: float
    rmse: float  # in the units of the positions given, over matched pairs
    matched: int


def match_pairs(found: np.ndarray, truth: np.ndarray, radius: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One-to-one matching, closest pairs first, within ``radius``: (found index, truth index, distance)."""
    found, truth = np.asarray(found, float).reshape(-1, 2), np.asarray(truth, float).reshape(-1, 2)
    if len(found) == 0 or len(truth) == 0:
        return np.zeros(0, int), np.zeros(0, int), np.zeros(0)
    d, j = cKDTree(truth).query(found, k=min(4, len(truth)), distance_upper_bound=radius)
    d, j = d.reshape(len(found), -1), j.reshape(len(found), -1)
    pairs = sorted((d[i, k], i, j[i, k]) for i in range(len(found)) for k in range(d.shape[1]) if np.isfinite(d[i, k]))
    used_f, used_t, out = set(), set(), []
    for dist, i, t in pairs:
        if i in used_f or t in used_t:
            continue
        used_f.add(i)
        used_t.add(t)
        out.append((i, t, dist))
    if not out:
        return np.zeros(0, int), np.zeros(0, int), np.zeros(0)
    i, t, dist = (np.array(v) for v in zip(*out))
    return i.astype(int), t.astype(int), dist.astype(float)


def match(found: np.ndarray, truth: np.ndarray, radius: float) -> Score:
    """One-to-one matching (closest pairs first) within ``radius``; scores and RMSE."""
    nf, nt = len(np.asarray(found).reshape(-1, 2)), len(np.asarray(truth).reshape(-1, 2))
    if nf == 0 or nt == 0:
        return Score(0.0 if nf else 1.0, 0.0 if nt else 1.0, 0.0, float("nan"), 0)
    _, _, dists = match_pairs(found, truth, radius)
    m = len(dists)
    p, r = m / nf, m / nt
    f1 = 2 * p * r / (p + r) if p + r else 0.0
    return Score(p, r, f1, float(np.sqrt(np.mean(np.square(dists)))) if m else float("nan"), m)


@dataclass
class InsideMatch:
    score: Score
    found_index: np.ndarray  # matched pairs that count (truth inside)
    truth_index: np.ndarray
    false_positives: int  # unmatched found columns inside
    truth_inside: np.ndarray  # (n_truth,) bool


def match_inside(found: np.ndarray, truth: np.ndarray, radius: float, shape: tuple[int, int],
                 border: float = 2.0) -> InsideMatch:
    """`match` scored away from the image border, without penalising either side at the border.

    All columns are matched; a true column counts only when it lies ``border`` px inside the
    image, an unmatched found column only when it does."""
    found, truth = np.asarray(found, float).reshape(-1, 2), np.asarray(truth, float).reshape(-1, 2)

    def inside(p):
        return ((p >= border) & (p <= np.asarray(shape) - 1 - border)).all(axis=1)

    fi, ti, d = match_pairs(found, truth, radius)
    unmatched = np.ones(len(found), bool)
    unmatched[fi] = False
    t_in = inside(truth)
    keep = t_in[ti] if len(ti) else np.zeros(0, bool)
    fi, ti, d = fi[keep], ti[keep], d[keep]
    fp = int((unmatched & inside(found)).sum())
    m, n_truth = len(d), int(t_in.sum())
    p = m / (m + fp) if m + fp else (1.0 if n_truth == 0 else 0.0)
    r = m / n_truth if n_truth else 1.0
    f1 = 2 * p * r / (p + r) if p + r else 0.0
    score = Score(p, r, f1, float(np.sqrt(np.mean(d ** 2))) if m else float("nan"), m)
    return InsideMatch(score, fi, ti, fp, t_in)
