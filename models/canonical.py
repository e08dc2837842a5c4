"""The canonical frame every PACBED network reads: the contract between alignment and analysis.

An aligned pattern is resampled onto ``PIXELS``² with the zero-disk centre on the centre pixel,
the disk radius (α) at ``ALPHA_PX`` pixels and the crystal axes along the array axes, then
normalised (square root of intensity over its mean, standardised).  Training (simulate/) and
inference (models/) both use these constants and :func:`normalise`.

A crop of a frame that shows less than the canonical frame has pixels sampled from beyond the
recorded frame: :func:`valid_pixels` says which pixels are real.  :func:`normalise` takes the
intensity unit (the mean) from those only and fills the window's off-frame pixels with the
azimuthal mean of the real ones at the same radius: a featureless continuation that adds neither
structure nor a fake edge, so the networks (trained on whole windows) read the real part as they
would a whole pattern.  Measured on realistic recordings (README): with zeros off the frame, or
with off-frame pixels left out of the standardisation, tilt collapses below ±2.2 α; filled,
thickness and tilt hold down to ±1.4 α.

Rotation follows DESIGN.md: the raw pixel at offset d from the centre shows the aligned pattern
at R(θ)·d, so aligned pixel u samples the raw pattern at centre + R(−θ)·u·(radius / ALPHA_PX).
"""
from __future__ import annotations

import numba
import numpy as np
from scipy import ndimage

PIXELS = 64
HALF_RANGE_ALPHA = 2.6  # the frame spans ±2.6 α
ALPHA_PX = (PIXELS - 1) / 2 / HALF_RANGE_ALPHA  # ≈ 12.1 px


def rotation_matrix(theta_deg: float) -> np.ndarray:
    t = np.deg2rad(theta_deg)
    return np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]])


def sample_grid(center: tuple[float, float], radius_px: float, rotation_deg: float = 0.0) -> np.ndarray:
    """(2, PIXELS, PIXELS) raw-pattern coordinates of the canonical pixels."""
    c = (PIXELS - 1) / 2
    u = np.stack(np.meshgrid(np.arange(PIXELS) - c, np.arange(PIXELS) - c, indexing="ij"))
    m = rotation_matrix(-rotation_deg) * (radius_px / ALPHA_PX)
    xy = np.tensordot(m, u, axes=1)
    return xy + np.asarray(center, float)[:, None, None]


def to_canonical(pattern: np.ndarray, center: tuple[float, float], radius_px: float,
                 rotation_deg: float = 0.0) -> np.ndarray:
    """Resample a raw pattern into the canonical frame (intensity per canonical pixel).

    When the raw disk is larger than the canonical one, the pattern is first smoothed over the
    footprint of a canonical pixel so fine raw sampling does not alias.
    """
    return to_canonical_valid(pattern, center, radius_px, rotation_deg)[0]


def to_canonical_valid(pattern: np.ndarray, center: tuple[float, float], radius_px: float,
                       rotation_deg: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """:func:`to_canonical` and its real pixels (:func:`valid_pixels`), from one sampling grid."""
    scale = radius_px / ALPHA_PX
    src = np.asarray(pattern, np.float32)
    if scale > 1.5:
        src = ndimage.gaussian_filter(src, 0.42 * scale)
    grid = sample_grid(center, radius_px, rotation_deg)
    out = ndimage.map_coordinates(src, grid, order=1, mode="constant")
    return out.astype(np.float32) * np.float32(scale**2), _on_frame(grid, src.shape)


def valid_pixels(frame_shape: tuple[int, ...], center: tuple[float, float], radius_px: float,
                 rotation_deg: float = 0.0) -> np.ndarray:
    """(PIXELS, PIXELS) bool: the canonical pixels sampled on the recorded frame, i.e. between its
    outermost pixel centres (beyond them :func:`to_canonical` returns 0, which is no measurement)."""
    return _on_frame(sample_grid(center, radius_px, rotation_deg), frame_shape)


def _on_frame(yx: np.ndarray, frame_shape: tuple[int, ...]) -> np.ndarray:
    """Which (row, col) sample points (2, ...) lie between the frame's outermost pixel centres."""
    h, w = frame_shape[-2:]
    return (yx[0] >= 0) & (yx[0] <= h - 1) & (yx[1] >= 0) & (yx[1] <= w - 1)


def to_canonical_stack(stack: np.ndarray, centers: np.ndarray, radii: np.ndarray,
                       rotations: np.ndarray) -> np.ndarray:
    """:func:`to_canonical` for a stack of equal-sized frames in one interpolation call
    (only for disks small enough that no smoothing is needed: radius < 1.5 ALPHA_PX)."""
    return to_canonical_stack_valid(stack, centers, radii, rotations)[0]


def to_canonical_stack_valid(stack: np.ndarray, centers: np.ndarray, radii: np.ndarray,
                             rotations: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """:func:`to_canonical_stack` and each crop's real pixels, from the same sampling grids."""
    n = len(stack)
    grids = np.stack([sample_grid(c, r, t) for c, r, t in zip(centers, radii, rotations)], axis=1)  # (2,N,P,P)
    idx = np.broadcast_to(np.arange(n, dtype=float)[:, None, None], grids.shape[1:])
    out = ndimage.map_coordinates(np.asarray(stack, np.float32), [idx, grids[0], grids[1]], order=1, mode="constant")
    scaled = out * (np.asarray(radii, np.float32) / np.float32(ALPHA_PX))[:, None, None] ** 2
    return scaled, _on_frame(grids, np.shape(stack))


def sample_grids(centers: np.ndarray, radii: np.ndarray, rotations: np.ndarray) -> np.ndarray:
    """(2, N, PIXELS, PIXELS): :func:`sample_grid` for N crops in one array operation."""
    c = (PIXELS - 1) / 2
    u = np.stack(np.meshgrid(np.arange(PIXELS) - c, np.arange(PIXELS) - c, indexing="ij"))  # (2, P, P)
    t = np.deg2rad(-np.asarray(rotations, float))
    s = np.asarray(radii, float) / ALPHA_PX
    cos, sin = np.cos(t) * s, np.sin(t) * s
    rows = cos[:, None, None] * u[0] - sin[:, None, None] * u[1]
    cols = sin[:, None, None] * u[0] + cos[:, None, None] * u[1]
    centers = np.asarray(centers, float).reshape(-1, 2)
    return np.stack([rows + centers[:, 0, None, None], cols + centers[:, 1, None, None]])


def bilinear_stack(stack: np.ndarray, grids: np.ndarray) -> np.ndarray:
    """Frame i of ``stack`` (N, H, W) sampled at ``grids[:, i]`` (2, N, ...), linearly: what
    ``ndimage.map_coordinates(order=1, mode="constant")`` gives (0 beyond the outermost pixel
    centres), in one compiled loop instead of its generic per-point one (~10× faster)."""
    stack = np.ascontiguousarray(stack, np.float32)
    rows = np.ascontiguousarray(grids[0], np.float64).reshape(len(stack), -1)
    cols = np.ascontiguousarray(grids[1], np.float64).reshape(len(stack), -1)
    out = np.empty(rows.shape, np.float32)
    _bilinear(stack, rows, cols, out)
    return out.reshape(grids.shape[1:])


@numba.njit(nogil=True, cache=True)
def _bilinear(stack, rows, cols, out):
    n, h, w = stack.shape
    for i in range(n):
        for k in range(rows.shape[1]):
            r, c = rows[i, k], cols[i, k]
            if r < 0 or r > h - 1 or c < 0 or c > w - 1:
                out[i, k] = 0.0
                continue
            r0 = min(int(r), max(h - 2, 0))
            c0 = min(int(c), max(w - 2, 0))
            fr, fc = r - r0, c - c0
            r1, c1 = min(r0 + 1, h - 1), min(c0 + 1, w - 1)
            top = stack[i, r0, c0] * (1 - fc) + stack[i, r0, c1] * fc
            bottom = stack[i, r1, c0] * (1 - fc) + stack[i, r1, c1] * fc
            out[i, k] = top * (1 - fr) + bottom * fr


def to_canonical_batch_valid(stack: np.ndarray, centers: np.ndarray, radii: np.ndarray,
                             rotations: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """:func:`to_canonical_stack_valid` as one batched operation: all sampling grids at once
    (:func:`sample_grids`) and one gather interpolation (:func:`bilinear_stack`); the same crops
    to float rounding.  Frames whose disk is larger than 1.5 canonical disks are smoothed first,
    each with its own width, as :func:`to_canonical_valid` does."""
    radii = np.asarray(radii, float)
    scale = radii / ALPHA_PX
    src = np.asarray(stack, np.float32)
    big = np.flatnonzero(scale > 1.5)
    if len(big):
        src = src.copy()
        for i in big:
            src[i] = ndimage.gaussian_filter(src[i], 0.42 * scale[i])
    grids = sample_grids(centers, radii, rotations)
    out = bilinear_stack(src, grids) * (scale.astype(np.float32) ** 2)[:, None, None]
    return out, _on_frame(grids, np.shape(stack))


MIRRORS = ((1, 1), (-1, 1), (1, -1), (-1, -1))  # (sign of t0, sign of t1): the crystal's mirrors on [001]


def mirror(x: np.ndarray, s0: int, s1: int) -> np.ndarray:
    """A canonical crop mirrored along axis 0 (``s0`` < 0) and/or axis 1: the pattern of the
    tilt with those components' signs flipped, on a zone with these mirrors."""
    if s0 < 0:
        x = x[..., ::-1, :]
    if s1 < 0:
        x = x[..., :, ::-1]
    return x


def window_mask(radius_alpha: float) -> np.ndarray:
    """The disk of canonical pixels within ``radius_alpha`` α of the centre.

    Networks see only this disk: outside it a training crop could show the edge of the simulated
    library, whose position gives away the true centre and size (a cue real patterns lack)."""
    c = (PIXELS - 1) / 2
    yy, xx = np.indices((PIXELS, PIXELS))
    return np.hypot(yy - c, xx - c) <= radius_alpha * ALPHA_PX


ALIGN_WINDOW_ALPHA = 2.0  # alignment crops may be 20 % too large and 5 px off: stays inside ±3 α libraries
ANALYSIS_WINDOW_ALPHA = 2.6  # aligned crops: the whole inscribed disk


def normalise(canonical: np.ndarray, background: float | np.ndarray = 0.0,
              window_alpha: float = ANALYSIS_WINDOW_ALPHA, valid: np.ndarray | None = None) -> np.ndarray:
    """Network input from canonical intensities: subtract a uniform background (in units of the
    mean inside the window), take sqrt(I / mean) (stabilises shot noise), standardise inside the
    window, zero outside it.  ``valid`` (broadcastable to ``canonical``, from :func:`valid_pixels`)
    marks the real pixels: the mean comes from those, the window's others are filled radially
    (module docstring); a crop whose window is all real gets exactly the input the networks were
    trained on (bit for bit)."""
    x = np.asarray(canonical, np.float32)
    m = window_mask(window_alpha)
    b = np.broadcast_to(np.asarray(background, np.float32), x.shape[:-2])
    if valid is None:
        return _normalise_full(x, b, m)
    use = m & np.broadcast_to(valid, x.shape)
    full = use.sum(axis=(-2, -1)) == m.sum()
    if np.all(full):
        return _normalise_full(x, b, m)
    out = np.empty_like(x)
    out[full] = _normalise_full(x[full], b[full], m)
    out[~full] = _normalise_valid(x[~full], b[~full], use[~full], m)
    return out


def _normalise_full(x: np.ndarray, b: np.ndarray, m: np.ndarray) -> np.ndarray:
    """:func:`normalise` of crops whose window is all real (``b``: one background per crop)."""
    mean = x[..., m].mean(axis=-1)[..., None, None]
    return _standardise(x / np.maximum(mean, 1e-12) - b[..., None, None], m)


def _standardise(x: np.ndarray, m: np.ndarray) -> np.ndarray:
    """sqrt of intensities in units of their mean, standardised inside the window ``m``."""
    x = np.sqrt(np.clip(x, 0, None))
    inside = x[..., m]
    mu = inside.mean(axis=-1)[..., None, None]
    sd = np.maximum(inside.std(axis=-1), 1e-6)[..., None, None]
    return np.where(m, (x - mu) / sd, 0).astype(np.float32)


def _window_mean(x: np.ndarray, use: np.ndarray) -> np.ndarray:
    """Mean over the last two axes of the pixels in ``use`` (float32; 0 where there are none)."""
    n = np.maximum(use.sum(axis=(-2, -1)), 1).astype(np.float32)
    return (np.where(use, x, 0).sum(axis=(-2, -1), dtype=np.float32) / n)[..., None, None]


def window_means(canonical: np.ndarray, window_alpha: float = ANALYSIS_WINDOW_ALPHA,
                 valid: np.ndarray | None = None) -> np.ndarray:
    """Mean intensity inside the window per crop (N,), over real pixels only: the networks' unit."""
    x = np.asarray(canonical, np.float32)
    m = window_mask(window_alpha)
    if valid is None:
        return x[..., m].mean(axis=-1)
    use = m & np.broadcast_to(valid, x.shape)
    full = use.sum(axis=(-2, -1)) == m.sum()
    return np.where(full, x[..., m].mean(axis=-1), _window_mean(x, use)[..., 0, 0])


def _normalise_valid(x: np.ndarray, b: np.ndarray, use: np.ndarray, m: np.ndarray) -> np.ndarray:
    """:func:`normalise` of crops whose window ``m`` is partly off the frame (``use``: the real
    pixels in it): unit from the real pixels, the others filled radially, then as a whole crop."""
    y = x / np.maximum(_window_mean(x, use), 1e-12) - b[..., None, None]
    return _standardise(fill_radially(y, use), m)


_RING = np.rint(np.hypot(*(np.indices((PIXELS, PIXELS)) - (PIXELS - 1) / 2))).astype(np.intp)


def fill_radially(y: np.ndarray, use: np.ndarray) -> np.ndarray:
    """``y`` (N, P, P) with every pixel outside ``use`` replaced by the mean of the ``use`` pixels
    on its ring (1 px wide, around the frame centre); a ring without any takes the nearest ring
    inside it that has some (then outside)."""
    n, rings = len(y), int(_RING.max()) + 1
    idx = (np.arange(n)[:, None, None] * rings + _RING)[use]
    total = np.bincount(idx, y[use].astype(np.float64), minlength=n * rings).reshape(n, rings)
    count = np.bincount(idx, minlength=n * rings).reshape(n, rings)
    prof = np.empty((n, rings))
    for i in range(n):
        have = np.flatnonzero(count[i])
        if not len(have):
            prof[i] = 0.0
            continue
        inner = have[np.clip(np.searchsorted(have, np.arange(rings), side="right") - 1, 0, None)]
        prof[i] = total[i, inner] / count[i, inner]
    return np.where(use, y, prof[:, _RING].astype(np.float32))
