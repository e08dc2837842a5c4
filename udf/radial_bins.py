"""Per-frame radial bins around the disk centre, and virtual ring detectors read from them.

Recording each frame as radial bins (as abTEM's FlexibleAnnularDetector does) lets the ring
radii be chosen after calibration.  Each bin also records its dipole moment (sum of I times the
unit vector from the centre), which is what a small shift of the centre changes to first order:
when the centre used while recording turns out to be off by δ, a disk of radius R around the
true centre holds C(R) + δ·d(R)/Δr, with C the cumulative radial profile and d the dipole of the
bin at R.  So frames recorded before the centre was calibrated are corrected, not lost.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import numba
import numpy as np
import scipy.sparse as sp

# Default virtual detectors in units of the convergence semi-angle α: BF inside the disk, ABF
# its outer half (light columns, e.g. oxygen, show dark), ADF/HAADF outside (Z contrast).
DEFAULT_RINGS: dict[str, tuple[float, float, str]] = {
    "bf": (0.0, 0.5, "alpha"),
    "abf": (0.5, 1.0, "alpha"),
    "adf": (1.5, 3.0, "alpha"),
    "haadf": (3.0, 4.5, "alpha"),
}


def bright_disk_center(image: np.ndarray) -> tuple[float, float]:
    """Centroid of the pixels brighter than half the disk level: a provisional zero-disk centre.

    A 3×3 median removes hot pixels first, and the disk level is a high percentile, not the
    maximum.
    """
    from scipy.ndimage import median_filter

    img = median_filter(np.asarray(image, np.float64), size=3)
    base = np.median(img)
    level = np.percentile(img, 99.5) - base
    mask = img - base > 0.5 * level
    if level <= 0 or not mask.any():
        return ((img.shape[0] - 1) / 2, (img.shape[1] - 1) / 2)
    rr, cc = np.nonzero(mask)
    return (float(rr.mean()), float(cc.mean()))


def n_bins_for(sig_shape: tuple[int, int], bin_px: float) -> int:
    """Bins enough for any centre inside the frame out to the half diagonal (plus margin)."""
    return int(np.ceil(np.hypot(*sig_shape) / 2 / bin_px)) + 2


def _slice_key(sig_slice):
    return None if sig_slice is None else tuple((s.start, s.stop) for s in sig_slice)


def _slices(key):
    return None if key is None else tuple(slice(a, b) for a, b in key)


@dataclass(frozen=True)
class BinTaps:
    """Where each pixel's intensity goes: two neighbouring bins, linear in radius.

    A pixel whose centre lies at radius r (x = r/Δ − ½ bin widths) adds ``1 − frac`` of its
    intensity to bin ``b = floor(x)`` and ``frac`` to ``b + 1`` (cloud-in-cell), so a bin
    [kΔ, (k+1)Δ) is centred where its contributions are and ring edges are not quantised to
    whole pixels.  ``unit`` is the pixel's direction from the centre (row, col) for the
    dipoles.  Taps beyond the last bin point at ``n_bins`` (a discard column) with weight 0.
    """

    bins: np.ndarray  # (pixels,) int32
    frac: np.ndarray  # (pixels,) float32
    unit: np.ndarray  # (pixels, 2) float32
    n_bins: int


def bin_taps(sig_shape: tuple[int, int], center: tuple[float, float], bin_px: float, n_bins: int,
             sig_slice: tuple[slice, slice] | None = None) -> BinTaps:
    """The taps of every pixel (of ``sig_slice``, flattened), cached per worker process."""
    return _bin_taps(tuple(sig_shape), tuple(float(c) for c in center), float(bin_px), int(n_bins),
                     _slice_key(sig_slice))


@functools.lru_cache(maxsize=8)
def _bin_taps(sig_shape, center, bin_px, n_bins, slice_key) -> BinTaps:
    sig_slice = _slices(slice_key)
    rr, cc = np.indices(sig_shape, dtype=np.float64)
    if sig_slice is not None:
        rr, cc = rr[sig_slice], cc[sig_slice]
    dr, dc = rr.ravel() - center[0], cc.ravel() - center[1]
    r = np.hypot(dr, dc)
    x = np.maximum(r / bin_px - 0.5, 0.0)
    b = np.floor(x).astype(np.int64)
    frac = x - b
    last = b >= n_bins - 1  # the upper tap would fall beyond the last bin
    frac = np.where(last, 0.0, frac)
    b = np.where(b >= n_bins, n_bins, b)  # wholly beyond: the discard column
    with np.errstate(invalid="ignore", divide="ignore"):
        unit = np.stack([np.where(r > 0, dr / r, 0.0), np.where(r > 0, dc / r, 0.0)], axis=-1)
    return BinTaps(b.astype(np.int32), frac.astype(np.float32), unit.astype(np.float32), n_bins)


def bin_matrix(sig_shape: tuple[int, int], center: tuple[float, float], bin_px: float, n_bins: int,
               sig_slice: tuple[slice, slice] | None = None) -> sp.csr_matrix:
    """The taps as a sparse (pixels, 3·n_bins) matrix, cached per worker process: a flattened
    frame times it gives [sum, dipole row, dipole col] per bin -- what the compiled kernel
    (`kernels.radial_profiles`) records, for ring masks and checks."""
    return _bin_matrix(tuple(sig_shape), tuple(float(c) for c in center), float(bin_px), int(n_bins),
                       _slice_key(sig_slice))


@functools.lru_cache(maxsize=8)
def _bin_matrix(sig_shape, center, bin_px, n_bins, slice_key) -> sp.csr_matrix:
    taps = _bin_taps(sig_shape, center, bin_px, n_bins, slice_key)
    npix = len(taps.bins)
    pix = np.concatenate([np.arange(npix)] * 2)
    b = np.concatenate([taps.bins, taps.bins + 1]).astype(np.int64)
    w = np.concatenate([1.0 - taps.frac, taps.frac]).astype(np.float64)
    keep = (b < n_bins) & (w > 0)
    pix, b, w = pix[keep], b[keep], w[keep]
    u = taps.unit[pix].astype(np.float64)
    rows = np.concatenate([pix] * 3)
    cols = np.concatenate([b, n_bins + b, 2 * n_bins + b])
    vals = np.concatenate([w, w * u[:, 0], w * u[:, 1]]).astype(np.float32)
    m = sp.coo_matrix((vals, (rows, cols)), shape=(npix, 3 * n_bins)).tocsr()
    m.sum_duplicates()
    return m


def ring_masks(sig_shape: tuple[int, int], center: tuple[float, float], radii: list[tuple[float, float]],
               bin_px: float, sig_slice: tuple[slice, slice] | None = None) -> np.ndarray:
    """Dense (pixels, n_rings) float32 masks that read exactly what the radial bins would.

    Each mask is the bin matrix's monopole part times the ring's weight per bin (1 inside, the
    covered fraction in an edge bin -- the linear interpolation of `BinnedFrames`), so a frame
    read through the masks and the same frame recorded as bins agree to float precision.
    Cached per worker process, like `bin_matrix`.
    """
    return _ring_masks(tuple(sig_shape), tuple(float(c) for c in center),
                       tuple((float(a), float(b)) for a, b in radii), float(bin_px), _slice_key(sig_slice))


def ring_bin_weights(n_bins: int, inner_px: float, outer_px: float, bin_px: float) -> np.ndarray:
    b = np.arange(n_bins)
    return np.clip(outer_px / bin_px - b, 0, 1) - np.clip(inner_px / bin_px - b, 0, 1)


@functools.lru_cache(maxsize=8)
def _ring_masks(sig_shape, center, radii, bin_px, slice_key) -> np.ndarray:
    nb = n_bins_for(sig_shape, bin_px)
    mono = bin_matrix(sig_shape, center, bin_px, nb, _slices(slice_key))[:, :nb]
    weights = np.stack([ring_bin_weights(nb, lo, hi, bin_px) for lo, hi in radii], axis=1)
    return np.asarray(mono @ weights, np.float32)


def bin_frames(frames: np.ndarray, matrix: sp.csr_matrix) -> tuple[np.ndarray, np.ndarray]:
    """(n, h, w) or (n, pixels) frames -> radial sums (n, n_bins) and dipoles (n, n_bins, 2)."""
    flat = np.asarray(frames, np.float32).reshape(len(frames), -1)
    out = np.asarray(matrix.T @ flat.T).T
    nb = out.shape[1] // 3
    return out[:, :nb], np.stack([out[:, nb:2 * nb], out[:, 2 * nb:]], axis=-1)


@dataclass(frozen=True)
class RingScale:
    """How ring radii given in α or mrad become pixels on this detector."""

    radius_px: float | None = None  # the zero disk's radius (α) in pixels
    mrad_per_px: float | None = None

    def to_px(self, value: float, unit: str) -> float:
        if unit == "px":
            return float(value)
        if unit == "alpha":
            if self.radius_px is None:
                raise ValueError("rings in units of α need the disk radius in pixels (radius_px, or alpha_mrad and mrad_per_px)")
            return float(value) * self.radius_px
        if unit == "mrad":
            if self.mrad_per_px is None:
                raise ValueError("rings in mrad need the detector calibration mrad_per_px")
            return float(value) / self.mrad_per_px
        raise ValueError(f"ring unit must be 'alpha', 'mrad' or 'px', got {unit!r}")


def _cum_at(cum: np.ndarray, per_bin: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Cumulative sum at fractional bin positions x (n, k): linear inside a bin.

    ``cum`` is (n, nb + 1[, 2]) with cum[:, b] the sum of bins < b; ``per_bin`` (n, nb[, 2]).
    """
    nb = per_bin.shape[1]
    k = np.clip(np.floor(x).astype(np.int64), 0, nb)
    frac = np.where(k >= nb, 0.0, np.clip(x - k, 0.0, 1.0))
    rows = np.arange(cum.shape[0])[:, None]
    inside = per_bin[rows, np.minimum(k, nb - 1)]
    if per_bin.ndim > 2:
        frac = frac[..., None]
    return cum[rows, k] + frac * inside


class BinnedFrames:
    """Frames recorded as radial bins (+ dipoles), read out as the intensity inside any radius.

    Without a shift: the cumulative radial profile, linear inside a bin.  With one (the
    calibrated centre minus the recording centre, per frame): each frame is modelled by its
    monopole and dipole per bin, ρ(r, φ) = (m(r) + 2 d(r)·û(φ)) / 2π, and integrated over the
    shifted disk, whose edge lies at r(φ) = δ·û + sqrt(R² − |δ|² + (δ·û)²).  The integrand is
    periodic and smooth in φ: 16 angles give the accuracy of 64 (measured).  Cumulative sums
    and readings at a radius are computed once and shared by rings with a common edge.
    """

    def __init__(self, radial: np.ndarray, dipole: np.ndarray, bin_px: float, shift: np.ndarray | None = None,
                 n_phi: int = 16):
        self.n = radial.shape[0]
        self.bin_px = bin_px
        self.radial = radial.astype(np.float64)
        self.cum_m = np.concatenate([np.zeros((self.n, 1)), np.cumsum(self.radial, axis=1)], axis=1)
        self.shift = None if shift is None or not np.any(shift) else np.asarray(shift, np.float64)
        if self.shift is not None:
            self.dipole = dipole.astype(np.float64)
            self.cum_d = np.concatenate([np.zeros((self.n, 1, 2)), np.cumsum(self.dipole, axis=1)], axis=1)
            phi = (np.arange(n_phi) + 0.5) * 2 * np.pi / n_phi
            self.u = np.stack([np.cos(phi), np.sin(phi)], axis=-1)  # (φ, 2) in (row, col)
        self._inside: dict[float, np.ndarray] = {}

    def inside(self, radius_px: float) -> np.ndarray:
        """Intensity inside ``radius_px`` of the (shifted) centre, per frame."""
        radius_px = float(radius_px)
        if radius_px not in self._inside:
            self._inside[radius_px] = self._compute(radius_px)
        return self._inside[radius_px]

    def _compute(self, radius_px: float) -> np.ndarray:
        if radius_px <= 0:
            return np.zeros(self.n, np.float64)
        if self.shift is None:
            return _cum_at(self.cum_m, self.radial, np.full((self.n, 1), radius_px / self.bin_px))[:, 0]
        out = np.empty((self.n, 1))
        _inside_at(self.cum_m, self.radial, self.cum_d, self.dipole, self.shift, self.u, self.bin_px,
                   np.array([radius_px]), out)
        return out[:, 0]

    def profile(self, n_bins: int | None = None) -> np.ndarray:
        """Per-frame sums in the bins [k·Δ, (k+1)·Δ) around the (shifted) centre, (n, n_bins)
        float32: the recorded bins where unshifted, else differences of :meth:`inside` at the
        bin edges (the same recentring as the rings, compiled)."""
        nb = self.radial.shape[1] if n_bins is None else int(n_bins)
        if self.shift is None:
            return self.radial[:, :nb].astype(np.float32)
        edges = np.arange(nb + 1) * self.bin_px
        inside = np.empty((self.n, nb + 1))
        _inside_at(self.cum_m, self.radial, self.cum_d, self.dipole, self.shift, self.u, self.bin_px, edges, inside)
        return np.diff(inside, axis=1).astype(np.float32)

    def ring(self, inner_px: float, outer_px: float) -> np.ndarray:
        if outer_px <= inner_px:
            raise ValueError(f"ring outer radius {outer_px} px must exceed its inner radius {inner_px} px")
        return self.inside(outer_px) - self.inside(inner_px)


def ring_signal(radial: np.ndarray, dipole: np.ndarray, inner_px: float, outer_px: float, bin_px: float,
                shift: np.ndarray | None = None) -> np.ndarray:
    """Per-frame intensity in the ring [inner, outer) around (centre used + shift)."""
    return BinnedFrames(radial, dipole, bin_px, shift).ring(inner_px, outer_px)


@numba.njit(cache=True, nogil=True)
def _inside_at(cum_m, radial, cum_d, dipole, shift, u, bin_px, radii, out):
    """`BinnedFrames.inside` of every frame at every radius in ``radii`` (one compiled loop)."""
    n, nb = radial.shape
    nphi = u.shape[0]
    for i in range(n):
        d2 = shift[i, 0] ** 2 + shift[i, 1] ** 2
        for j in range(len(radii)):
            r = radii[j]
            if r <= 0:
                out[i, j] = 0.0
                continue
            acc = 0.0
            for f in range(nphi):
                du = shift[i, 0] * u[f, 0] + shift[i, 1] * u[f, 1]
                edge = du + np.sqrt(max(r * r - d2 + du * du, 0.0))
                x = edge / bin_px
                k = min(max(int(np.floor(x)), 0), nb)
                frac = 0.0 if k >= nb else min(max(x - k, 0.0), 1.0)
                b = min(k, nb - 1)
                mono = cum_m[i, k] + frac * radial[i, b]
                d0 = cum_d[i, k, 0] + frac * dipole[i, b, 0]
                d1 = cum_d[i, k, 1] + frac * dipole[i, b, 1]
                acc += mono + 2 * (d0 * u[f, 0] + d1 * u[f, 1])
            out[i, j] = acc / nphi
