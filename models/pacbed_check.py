"""The network proposes, the library checks: a pattern re-fitted against the simulated library.

The networks give a geometry (centre, size, rotation) and a reading of thickness and tilt.  The
check fits the pattern with a forward model of the whole library around that geometry:

    I(u) ≈ a · (B_σ ⊛ S_{t,τ})(u) + b          in the canonical frame, inside the analysis window

with S the simulated pattern at thickness t and crystal-frame tilt τ (first quadrant; the other
quadrants by mirroring the pattern), B_σ a Gaussian blur (detector PSF and inelastic smearing,
σ from a short list), a the intensity scale and b a uniform background, both solved in closed
form.  Scoring every library entry costs one product in the library's principal-component space
(`compact_library.py`); the geometry is then refined by Gauss-Newton on the best entry (centre,
size and rotation, with a and b), and the library scored again at the refined geometry.  Thickness
and tilt come from a parabola through χ² around the best entry.

Reported beside the estimate:

* ``fit_quality``: the fraction of the pattern's structure beyond the zero disk (1.1 α to the
  window's edge, after scale and background) that the best library pattern leaves unexplained:
  ~0 for a pattern the library holds, larger with noise, and large for a pattern it does not hold
  (another material, zone or α, an amorphous or damaged specimen) -> flag ``model-mismatch``
  above ``MISMATCH_FIT``.
* ``thickness_alt_nm`` and ``alt_delta_chi2``: the best entry at least ``ALT_MIN_NM`` from the
  best thickness, and how much worse it fits, in units of the best fit's residual per pixel (the
  noise, when the best fit is good).  Below ``AMBIGUOUS_DELTA``: flag ``ambiguous``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
from scipy import ndimage

from . import canonical
from .compact_library import WINDOW_ALPHA, CompactLibrary
from .pacbed_analysis import PacbedEstimate, canonical_crop, wrap45

FLIPS = ((1, 1), (-1, 1), (1, -1), (-1, -1))  # (sign of t0, sign of t1) in the crystal frame
BLURS_PX = (0.0, 0.8, 1.6, 2.4)  # canonical px (α = 12.1 px): 0-0.2 α
ALT_MIN_NM = 3.0
AMBIGUOUS_DELTA = 25.0  # Δχ² in units of the best residual per pixel (5 "σ")
MISMATCH_FIT = 0.08  # unexplained variance fraction beyond any library pattern with noise


@dataclass
class CheckOutcome:
    estimate: PacbedEstimate
    fit_quality: float
    thickness_alt_nm: float
    alt_delta_chi2: float
    blur_px: float


def _flip(x: np.ndarray, s0: int, s1: int) -> np.ndarray:
    if s0 < 0:
        x = x[..., ::-1, :]
    if s1 < 0:
        x = x[..., :, ::-1]
    return x


class LibraryCheck:
    """Fits patterns against a `CompactLibrary` (one kV and α)."""

    def __init__(self, library: CompactLibrary, blurs_px=BLURS_PX, rounds: int = 3, gauss_newton_steps: int = 3):
        self.lib = library
        self.rounds, self.steps = rounds, gauss_newton_steps
        self.win = canonical.window_mask(WINDOW_ALPHA)
        self.blurs = tuple(float(b) for b in blurs_px)
        P = canonical.PIXELS
        n_win = int(self.win.sum())
        coef = library.coef.reshape(-1, library.coef.shape[-1]).astype(np.float32)  # (E, R)
        self.coef = coef
        self.ub, self.norm2 = [], []
        for sigma in self.blurs:
            imgs = library.basis.reshape(-1, P, P)
            if sigma > 0:
                imgs = ndimage.gaussian_filter(imgs, (0, sigma, sigma), mode="constant")
            ub = imgs[:, self.win].astype(np.float32)  # (R, M): blurred basis, inside the window
            gram = ub.astype(np.float64) @ ub.T.astype(np.float64)
            mean = coef @ (ub.sum(axis=1) / n_win)  # each blurred entry's mean in the window
            sq = np.einsum("er,rs,es->e", coef, gram.astype(np.float32), coef)
            self.ub.append(ub)
            self.norm2.append(np.maximum(sq - n_win * mean**2, 1e-12))  # |BŜ − mean|²
        self.shape = library.coef.shape[:2]
        c = (P - 1) / 2
        rr = np.hypot(*np.indices((P, P)) - c)[self.win] / canonical.ALPHA_PX
        self.outside = rr > 1.1  # window pixels beyond the zero disk (units of α)

    # -- scoring -----------------------------------------------------------------------------
    def _vector(self, crop: np.ndarray) -> tuple[np.ndarray, float]:
        v = crop[self.win].astype(np.float64)
        vt = v - v.mean()
        return vt.astype(np.float32), float(vt @ vt)

    def chi2_all(self, crop: np.ndarray) -> np.ndarray:
        """χ² of the best a, b for every (flip, blur, tilt, thickness): (F, B, T, K)."""
        out = np.empty((len(FLIPS), len(self.blurs), *self.shape), np.float64)
        for f, flip in enumerate(FLIPS):
            vt, n2 = self._vector(_flip(crop, *flip))
            for b, (ub, norm2) in enumerate(zip(self.ub, self.norm2)):
                dots = self.coef @ (ub @ vt)
                out[f, b] = (n2 - dots.astype(np.float64) ** 2 / norm2).reshape(self.shape)
        return out

    def model(self, flip_i: int, blur_i: int, ti: int, ki: int) -> np.ndarray:
        """The blurred library pattern (unit scale, window pixels) of one entry."""
        return self.coef[ti * self.shape[1] + ki] @ self.ub[blur_i]

    # -- geometry ----------------------------------------------------------------------------
    def refine_geometry(self, pattern: np.ndarray, geom, flip, m: np.ndarray, steps: int | None = None):
        """Gauss-Newton on (row, col, ln radius, rotation) with scale and background, the model
        ``m`` fixed: each step linearises the crop by finite differences (4 extra crops)."""
        r, c, rad, rot = geom
        ones = np.ones_like(m)
        for _ in range(steps or self.steps):
            px = rad / canonical.ALPHA_PX  # raw px per canonical px
            h = (0.25 * px, 0.25 * px, 0.005, 0.25)
            base = self._crop(pattern, (r, c, rad, rot), flip)
            cols = []
            for k, dk in enumerate(h):
                g = [r, c, math.log(rad), rot]
                g[k] += dk
                cols.append((self._crop(pattern, (g[0], g[1], math.exp(g[2]), g[3]), flip) - base) / dk)
            A = np.column_stack(cols + [-m, -ones])
            x, *_ = np.linalg.lstsq(A, -base, rcond=None)
            d = np.clip(x[:4], [-2 * px, -2 * px, -0.05, -2.0], [2 * px, 2 * px, 0.05, 2.0])
            r, c, rad, rot = r + d[0], c + d[1], rad * math.exp(d[2]), wrap45(rot + d[3])
        return (r, c, rad, rot)

    def _crop(self, pattern, geom, flip) -> np.ndarray:
        r, c, rad, rot = geom
        return _flip(canonical_crop(pattern, (r, c), rad, rot), *flip)[self.win].astype(np.float64)

    # -- the check ---------------------------------------------------------------------------
    def check(self, pattern: np.ndarray, estimate: PacbedEstimate) -> CheckOutcome:
        """Re-fit one raw pattern (same units as given to the networks) from the networks' estimate."""
        geom = (*estimate.center_px, estimate.radius_px, estimate.rotation_deg)
        for _ in range(self.rounds):  # best entry at this geometry, then the geometry for that entry
            crop = canonical_crop(pattern, geom[:2], geom[2], geom[3])
            chi = self.chi2_all(crop)
            f, b, ti, ki = np.unravel_index(int(np.argmin(chi)), chi.shape)
            geom = self.refine_geometry(pattern, geom, FLIPS[f], self.model(f, b, ti, ki))
        crop = canonical_crop(pattern, geom[:2], geom[2], geom[3])
        chi = self.chi2_all(crop)
        f, b, ti, ki = np.unravel_index(int(np.argmin(chi)), chi.shape)
        return self._outcome(crop, chi, (f, b, ti, ki), geom, estimate)

    def _outcome(self, crop, chi, best, geom, estimate: PacbedEstimate) -> CheckOutcome:
        f, b, ti, ki = best
        vt, n2 = self._vector(_flip(crop, *FLIPS[f]))
        dof = vt.size - 2
        best_chi = float(chi[best])
        noise = max(best_chi / dof, 1e-30)
        thick = self.lib.thickness_nm
        t, t_sig = _parabola_axis(chi[f, b, ti, :] / noise, thick, ki)
        tilt, tilt_sig = np.empty(2), np.empty(2)
        for ax in (0, 1):
            tilt[ax], tilt_sig[ax] = self._tilt_axis(chi[f, b, :, ki] / noise, ti, ax)
        tilt_c = tilt * np.array(FLIPS[f], float)
        tilt_d = canonical.rotation_matrix(-geom[3]) @ tilt_c
        far = np.abs(thick - thick[ki]) >= ALT_MIN_NM
        alt_chi = chi[..., far].min(axis=(0, 1, 2)) if far.any() else np.array([np.inf])
        ka = int(np.argmin(alt_chi))
        alt_t = float(thick[far][ka]) if far.any() else float("nan")
        delta = float((alt_chi[ka] - best_chi) / noise) if far.any() else float("inf")
        fit = self._fit_quality(_flip(crop, *FLIPS[f]), self.model(f, b, ti, ki))
        flags = [x for x in estimate.flags if x not in ("ambiguous", "model-mismatch")]
        if delta < AMBIGUOUS_DELTA:
            flags.append("ambiguous")
        if fit > MISMATCH_FIT:
            flags.append("model-mismatch")
        # the background in the input's units: I = a·BŜ + b in the canonical crop
        m = self.model(f, b, ti, ki)
        v = _flip(crop, *FLIPS[f])[self.win].astype(np.float64)
        a = float((v - v.mean()) @ (m - m.mean())) / max(float((m - m.mean()) @ (m - m.mean())), 1e-30)
        lib_mean = float(self.lib.entry_mean[ti, ki]) / max(float(self.lib.entry_norm[ti, ki]), 1e-30)
        scale_px = (geom[2] / canonical.ALPHA_PX) ** 2
        background = (float(v.mean()) - a * (float(m.mean()) + lib_mean)) / scale_px
        edge = ki in (0, len(thick) - 1)
        est = replace(estimate, center_px=(float(geom[0]), float(geom[1])), radius_px=float(geom[2]),
                      rotation_deg=float(geom[3]), thickness_nm=float(t), thickness_sigma_nm=float(t_sig),
                      tilt_mrad=(float(tilt_d[0]), float(tilt_d[1])),
                      tilt_sigma_mrad=(float(tilt_sig[0]), float(tilt_sig[1])),
                      tilt_crystal_mrad=(float(tilt_c[0]), float(tilt_c[1])), background=background,
                      flags=sorted(set(flags) | ({"thickness-at-range-edge"} if edge else set())),
                      in_range=bool(estimate.in_range and not edge and fit <= MISMATCH_FIT))
        return CheckOutcome(est, float(fit), alt_t, delta, self.blurs[b])

    def _fit_quality(self, crop: np.ndarray, m: np.ndarray) -> float:
        """Unexplained fraction of the pattern's structure outside the zero disk (1.1 α to the
        window's edge), where the crystal shows itself; the disk edge, which any library pattern
        reproduces, would hide a mismatch in a whole-window figure."""
        v = crop[self.win].astype(np.float64)
        A = np.column_stack([m, np.ones_like(m)])
        coef, *_ = np.linalg.lstsq(A, v, rcond=None)
        resid = v - A @ coef
        out = self.outside
        vo = v[out] - v[out].mean()
        return float(resid[out] @ resid[out]) / max(float(vo @ vo), 1e-30)

    def _tilt_axis(self, chi_t: np.ndarray, ti: int, ax: int) -> tuple[float, float]:
        tilts = self.lib.tilt_mrad
        line = np.flatnonzero(np.isclose(tilts[:, 1 - ax], tilts[ti, 1 - ax]))
        line = line[np.argsort(tilts[line, ax])]
        pos = int(np.flatnonzero(line == ti)[0])
        return _parabola_axis(chi_t[line], tilts[line, ax], pos)


def _parabola_axis(chi: np.ndarray, grid: np.ndarray, i: int) -> tuple[float, float]:
    """Sub-grid minimum and σ (Δχ² = 1) from a parabola through χ² at i and its neighbours."""
    step = float(np.median(np.diff(grid))) if len(grid) > 1 else 1.0
    if not 0 < i < len(grid) - 1:
        return float(grid[i]), step
    y_m, y_0, y_p = chi[i - 1:i + 2]
    curv = y_m - 2 * y_0 + y_p
    if not np.isfinite(curv) or curv <= 0:
        return float(grid[i]), step
    h = 0.5 * (grid[i + 1] - grid[i - 1])
    off = float(np.clip(0.5 * (y_m - y_p) / curv, -0.5, 0.5))
    return float(grid[i] + off * h), float(h * math.sqrt(2 / curv))
