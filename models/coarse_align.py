"""Coarse zero-disk centre and radius of a raw PACBED, before the networks refine them.

Raw recordings vary: frames up to 2048², a disk that fills 80 % of the frame or 5 % of it,
the centre anywhere, 8/16-bit data, linear or display-scaled, hot or saturated pixels.  As in the
seed (Fig. 2) we start from Gaussian fits of the two projections, then sharpen the estimate
from the disk itself:

1. bin large frames to ≤ 512 px and median-filter (hot pixels and isolated saturation vanish);
2. Gaussian fits (with a constant baseline) of the row and column projections give a first
   centre and width;
3. the zero disk is the bright, compact region around it: threshold halfway between the
   background level and the disk plateau, keep the connected component at the centre, fill it;
   its centroid and sqrt(area/π) give centre and radius;
4. tilt makes the intensity inside the disk lopsided, which pulls the centroid (the seed's
   point), so finally the disk *edge* is located: along 90 rays, the steepest drop between 0.6
   and 1.4 radii; a circle fitted to those edge points (outlier rays dropped) is the result.
   Gamma-scaled exports with a saturated disk brighten the overlapping first-order disks so
   much that their outer edge can win: the radius then comes out up to ~20 % large, which the
   alignment network's size range covers.

Precision of a few percent is enough: the alignment network iterates from here.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage, optimize


@dataclass(frozen=True)
class CoarseDisk:
    center_px: tuple[float, float]  # (row, col) in the raw frame, pixel centres at integers
    radius_px: float


def _gauss(x, a, mu, sig, c):
    return a * np.exp(-0.5 * ((x - mu) / sig) ** 2) + c


def _fit_projection(p: np.ndarray) -> tuple[float, float]:
    x = np.arange(len(p), dtype=float)
    c0 = float(np.percentile(p, 10))
    w = np.clip(p - c0, 0, None)
    mu0 = float((w * x).sum() / max(w.sum(), 1e-12))
    sig0 = float(np.sqrt((w * (x - mu0) ** 2).sum() / max(w.sum(), 1e-12))) or len(p) / 8
    try:
        (a, mu, sig, c), _ = optimize.curve_fit(_gauss, x, p, p0=(float(p.max() - c0), mu0, sig0, c0), maxfev=2000)
        if not (0 <= mu < len(p)) or not np.isfinite(sig):
            raise RuntimeError
        return float(mu), abs(float(sig))
    except (RuntimeError, optimize.OptimizeWarning):
        return mu0, sig0


def _fit_circle(y: np.ndarray, x: np.ndarray) -> tuple[float, float, float]:
    """Algebraic (Kåsa) least-squares circle through the points."""
    a = np.column_stack([2 * y, 2 * x, np.ones_like(y)])
    (cy, cx, k), *_ = np.linalg.lstsq(a, y**2 + x**2, rcond=None)
    return float(cy), float(cx), float(np.sqrt(max(k + cy**2 + cx**2, 1e-12)))


def _edge_circle(arr: np.ndarray, center: tuple[float, float], radius: float, rays: int = 90):
    """Refine (centre, radius) from the steepest radial drop along rays (the disk edge)."""
    sm = ndimage.gaussian_filter(arr, max(0.7, radius / 40))
    ang = np.linspace(0, 2 * np.pi, rays, endpoint=False)
    rad = np.linspace(0.6 * radius, 1.4 * radius, max(24, int(0.8 * radius * 2)))
    ys = center[0] + np.sin(ang)[:, None] * rad[None, :]
    xs = center[1] + np.cos(ang)[:, None] * rad[None, :]
    prof = ndimage.map_coordinates(sm, [ys, xs], order=1, mode="nearest")
    drop = -np.diff(prof, axis=1)
    k = np.argmax(drop, axis=1)
    edge_r = 0.5 * (rad[k] + rad[k + 1])
    inside = (ys[:, 0] >= 0) & (ys[:, 0] < arr.shape[0]) & (xs[:, 0] >= 0) & (xs[:, 0] < arr.shape[1])
    y = center[0] + np.sin(ang) * edge_r
    x = center[1] + np.cos(ang) * edge_r
    keep = inside & (drop[np.arange(rays), k] > 0)
    on_frame = (y >= 1) & (y <= arr.shape[0] - 2) & (x >= 1) & (x <= arr.shape[1] - 2)
    keep &= on_frame
    if keep.sum() < 8:
        return center[0], center[1], radius
    cy, cx, cr = _fit_circle(y[keep], x[keep])
    res = np.abs(np.hypot(y - cy, x - cx) - cr)
    mad = np.median(res[keep]) + 1e-9
    keep &= res < 3 * mad + 0.5
    if keep.sum() >= 8:
        cy, cx, cr = _fit_circle(y[keep], x[keep])
    if not (0.5 * radius < cr < 1.5 * radius) or np.hypot(cy - center[0], cx - center[1]) > 0.5 * radius:
        return center[0], center[1], radius
    return cy, cx, cr


MIN_PATTERN_PX = 16  # smaller frames cannot hold a zero disk the networks could measure


def validate_pattern(pattern: np.ndarray) -> np.ndarray:
    """A 2D float64 array or a clear error naming the problem."""
    arr = np.asarray(pattern)
    if arr.ndim != 2:
        raise ValueError(f"a pattern must be 2D (H×W), got shape {arr.shape}")
    if arr.size == 0 or min(arr.shape) < MIN_PATTERN_PX:
        raise ValueError(f"pattern of shape {arr.shape} is too small to contain a zero disk "
                         f"(need ≥ {MIN_PATTERN_PX}×{MIN_PATTERN_PX})")
    arr = arr.astype(np.float64)
    if not np.all(np.isfinite(arr)):
        raise ValueError("pattern contains NaN or infinite values")
    intensity_scale(arr)
    return arr


def intensity_scale(arr: np.ndarray) -> float:
    """The pattern's largest |value|, by which it is divided before anything goes to float32 (so
    neither 1e39 nor 1e-40 counts overflow or vanish), or a ValueError when the pattern holds no
    usable intensity.  ``arr``: finite float64."""
    peak = float(np.abs(arr).max())
    if peak == 0 or arr.max() == arr.min():
        raise ValueError(f"pattern is constant (every pixel {arr.flat[0]:g}: an empty frame?)")
    total = float((arr / peak).sum())
    if total <= 0:
        raise ValueError(f"pattern's total intensity is ≤ 0 ({total * peak:.3g}): a diffraction pattern counts "
                         "electrons, so this looks negated or over-subtracted; give the recorded intensities")
    return peak


def scaled_stack(stack: np.ndarray, chunk_px: int = 1 << 22) -> tuple[np.ndarray, np.ndarray, list[str | None]]:
    """(N, H, W) patterns divided by their :func:`intensity_scale` in float64, then float32.

    Returns (scaled float32 stack, the scales (N,), an error or None per pattern); a bad pattern
    (non-finite, constant, total ≤ 0) is left as zeros and does not affect the others.  Works in
    chunks of ``chunk_px`` pixels so a long stack needs no full float64 copy.
    """
    n = len(stack)
    out = np.zeros(stack.shape, np.float32)
    scales = np.ones(n)
    errors: list[str | None] = [None] * n
    step = max(1, chunk_px // max(1, stack[0].size))
    for a in range(0, n, step):
        c = np.array(stack[a:a + step], np.float64)
        ok = np.isfinite(c).all(axis=(1, 2))
        c[~ok] = 0.0
        peak = np.abs(c).max(axis=(1, 2))
        ok &= c.max(axis=(1, 2)) > c.min(axis=(1, 2))
        c[ok] /= peak[ok][:, None, None]
        ok &= c.sum(axis=(1, 2)) > 0
        out[a:a + step][ok] = c[ok]
        scales[a:a + step][ok] = peak[ok]
        for k in np.flatnonzero(~ok):
            errors[a + k] = _problem(stack[a + k])
    return out, scales, errors


def _problem(pattern: np.ndarray) -> str:
    """Why :func:`validate_pattern` refuses ``pattern`` (called only for refused ones)."""
    try:
        validate_pattern(pattern)
    except ValueError as exc:
        return str(exc)
    return "pattern holds no usable intensity"


def coarse_disk(pattern: np.ndarray) -> CoarseDisk:
    """Coarse zero-disk centre and radius of a raw pattern (any size, dtype and scaling)."""
    arr = validate_pattern(pattern)
    binning = int(np.ceil(max(arr.shape) / 512))
    if binning > 1:
        h, w = (arr.shape[0] // binning) * binning, (arr.shape[1] // binning) * binning
        arr = arr[:h, :w].reshape(h // binning, binning, w // binning, binning).mean(axis=(1, 3))
    arr = ndimage.median_filter(arr, size=3)
    r0, _ = _fit_projection(arr.sum(axis=1))
    c0, _ = _fit_projection(arr.sum(axis=0))
    lo = float(np.percentile(arr, 5))
    # the disk plateau: a high percentile of the pixels near the first centre
    yy, xx = np.indices(arr.shape)
    near = np.hypot(yy - r0, xx - c0) < max(3.0, 0.02 * max(arr.shape))
    hi = float(np.percentile(arr[near], 50)) if near.any() else float(arr.max())
    hi = max(hi, float(np.percentile(arr, 99.5)) * 0.5)
    mask = ndimage.binary_opening(arr > lo + 0.5 * (hi - lo), iterations=1)
    labels, n = ndimage.label(mask)
    if n == 0:
        raise ValueError("no zero disk found (pattern has no bright compact region)")
    seed = labels[int(round(np.clip(r0, 0, arr.shape[0] - 1))), int(round(np.clip(c0, 0, arr.shape[1] - 1)))]
    if seed == 0:  # first guess fell outside the disk: take the largest component
        seed = int(np.argmax(ndimage.sum(mask, labels, index=np.arange(1, n + 1)))) + 1
    disk = ndimage.binary_fill_holes(labels == seed)
    r, c = ndimage.center_of_mass(disk)
    radius = float(np.sqrt(disk.sum() / np.pi))
    for _ in range(2):
        r, c, radius = _edge_circle(arr, (r, c), radius)
    # binned pixel (i) covers raw pixels [i*b, (i+1)*b): its centre is at i*b + (b-1)/2
    off = (binning - 1) / 2
    return CoarseDisk((r * binning + off, c * binning + off), radius * binning)


def coarse_disks_fast(stack: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Vectorised coarse centre and radius for a stack of equal-sized frames (N, H, W).

    Threshold halfway between the 5th and 99.5th percentile of each frame, then the centroid
    and sqrt(area/π) of the bright pixels: ~50 µs per 64² frame, precise to a few pixels and
    ~20 %, which is inside the alignment network's range.  Returns (centres (N, 2), radii (N,),
    plausible (N,) bool); implausible frames go to :func:`coarse_disk`.
    """
    arr = np.asarray(stack, np.float32)
    n, h, w = arr.shape
    b = int(np.ceil(max(h, w) / 128))
    if b > 1:
        arr = arr[:, :h // b * b, :w // b * b].reshape(n, h // b, b, w // b, b).mean(axis=(2, 4))
    flat = arr.reshape(n, -1)
    lo, hi = np.percentile(flat, [5, 99.5], axis=1)
    mask = (flat > (lo + 0.5 * (hi - lo))[:, None]).reshape(arr.shape)
    area = mask.sum(axis=(1, 2)).astype(float)
    yy, xx = np.arange(arr.shape[1], dtype=float), np.arange(arr.shape[2], dtype=float)
    with np.errstate(invalid="ignore", divide="ignore"):
        cy = (mask.sum(axis=2) * yy).sum(axis=1) / area
        cx = (mask.sum(axis=1) * xx).sum(axis=1) / area
    off = (b - 1) / 2
    centres = np.stack([cy * b + off, cx * b + off], axis=1)
    radii = np.sqrt(area / np.pi) * b
    plausible = (hi > lo) & (radii >= 2) & (area < 0.5 * mask[0].size) & np.isfinite(centres).all(axis=1)
    return centres, radii, plausible
