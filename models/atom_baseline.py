"""The classical column finder atom finding is measured against (as Atomap does it).

Laplacian-of-Gaussian peaks at the column scale, then each refined by a least-squares 2D
Gaussian (amplitude, centre, width, offset) fitted in a window around it.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage
from scipy.optimize import least_squares

from .atom_locator import Columns, integrate


def log_gaussian_columns(image: np.ndarray, sigma_px: float, threshold_rel: float = 0.15,
                         min_distance_px: int | None = None) -> Columns:
    """Columns of a HAADF-like image (bright columns); ``sigma_px`` ≈ the column's image width."""
    img = np.asarray(image, np.float64)
    response = -ndimage.gaussian_laplace(img, sigma_px) * sigma_px ** 2
    d = min_distance_px or max(1, int(round(sigma_px)))
    peaks = (ndimage.maximum_filter(response, size=2 * d + 1) == response) & \
        (response > threshold_rel * response.max())
    rr, cc = np.nonzero(peaks)
    half = int(np.ceil(2 * sigma_px))
    yy, xx = np.mgrid[-half:half + 1, -half:half + 1]
    pos, amp = [], []
    for r, c in zip(rr, cc):
        if r < half or c < half or r >= img.shape[0] - half or c >= img.shape[1] - half:
            continue
        win = img[r - half:r + half + 1, c - half:c + half + 1]
        p0 = [win.max() - win.min(), 0.0, 0.0, sigma_px, win.min()]

        def resid(p):
            a, dr, dc, s, b = p
            return (a * np.exp(-((yy - dr) ** 2 + (xx - dc) ** 2) / (2 * s * s)) + b - win).ravel()

        fit = least_squares(resid, p0, bounds=([0, -half, -half, 0.3, -np.inf], [np.inf, half, half, 3 * half, np.inf]))
        a, dr, dc, _, _ = fit.x
        if abs(dr) > d or abs(dc) > d:  # the fit ran away from this peak: keep the LoG position
            dr = dc = 0.0
        pos.append((r + dr, c + dc))
        amp.append(a)
    pos = np.array(pos).reshape(-1, 2)
    return Columns(pos, np.array(amp), integrate(img, pos, sigma_px * 1.5))
