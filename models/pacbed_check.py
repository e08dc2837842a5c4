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
from .pacbed_analysis import PacbedEstimate, canonical_crop, crop_window, wrap45

FLIPS = canonical.MIRRORS
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


_flip = canonical.mirror


class LibraryCheck:
    """Fits patterns against a `CompactLibrary` (one kV and α)."""

    def __init__(self, library: CompactLibrary, blurs_px=BLURS_PX, rounds: int = 3, gauss_newton_steps: int = 3,
                 analytic: bool = True):
        self.lib = library
        self.rounds, self.steps, self.analytic = rounds, gauss_newton_steps, analytic
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
        self.norm2 = np.stack(self.norm2)  # (B, E)
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
        """χ² of the best a, b for every (flip, blur, tilt, thickness): (F, B, T, K).

        One matrix product for everything: the crop's mirror images projected on each blurred
        basis, (R, B·F), then the library's coefficients times that."""
        vs = [self._vector(_flip(crop, *flip)) for flip in FLIPS]
        V = np.stack([v for v, _ in vs], axis=1)  # (M, F)
        n2 = np.array([n for _, n in vs])
        proj = np.concatenate([ub @ V for ub in self.ub], axis=1)  # (R, B·F), blur-major
        dots = (self.coef @ proj).astype(np.float64).reshape(-1, len(self.blurs), len(FLIPS))  # (E, B, F)
        chi = n2[None, None, :] - dots**2 / self.norm2.T[:, :, None]
        return chi.transpose(2, 1, 0).reshape(len(FLIPS), len(self.blurs), *self.shape)

    def chi2_one(self, crop: np.ndarray, f: int, b: int) -> np.ndarray:
        """χ² of every (tilt, thickness) for one mirror and one blur: (T, K)."""
        vt, n2 = self._vector(_flip(crop, *FLIPS[f]))
        dots = (self.coef @ (self.ub[b] @ vt)).astype(np.float64)
        return (n2 - dots**2 / self.norm2[b]).reshape(self.shape)

    def model(self, flip_i: int, blur_i: int, ti: int, ki: int) -> np.ndarray:
        """The blurred library pattern (unit scale, window pixels) of one entry."""
        return self.coef[ti * self.shape[1] + ki] @ self.ub[blur_i]

    # -- geometry ----------------------------------------------------------------------------
    def refine_geometry(self, pattern: np.ndarray, geom, flip, m: np.ndarray, steps: int | None = None):
        """Gauss-Newton on (row, col, ln radius, rotation) with scale and background, the model
        ``m`` fixed.  The first steps take the crop's derivatives from the raw window's gradient
        sampled on the crop's grid (`_crop_with_derivatives`); the last takes them by finite
        differences, which converge to the χ² minimum of the interpolated crop itself."""
        r, c, rad, rot = geom
        ones = np.ones_like(m)
        n = steps or self.steps
        for step in range(n):
            s = rad / canonical.ALPHA_PX  # raw px per canonical px
            if step < n - 1 and self.analytic:
                v, derivs = _crop_with_derivatives(pattern, (r, c, rad, rot))
                base = _flip(v, *flip)[self.win]
                cols = [_flip(d, *flip)[self.win] for d in derivs]
            else:
                base = self._crop(pattern, (r, c, rad, rot), flip)
                cols = self._finite_derivatives(pattern, (r, c, rad, rot), flip, base)
            A = np.column_stack(cols + [-m, -ones])
            x, *_ = np.linalg.lstsq(A, -base, rcond=None)
            d = np.clip(x[:4], [-2 * s, -2 * s, -0.05, -2.0], [2 * s, 2 * s, 0.05, 2.0])
            r, c, rad, rot = r + d[0], c + d[1], rad * math.exp(d[2]), wrap45(rot + d[3])
        return (r, c, rad, rot)

    def _finite_derivatives(self, pattern, geom, flip, base) -> list[np.ndarray]:
        r, c, rad, rot = geom
        px = rad / canonical.ALPHA_PX
        cols = []
        for k, dk in enumerate((0.25 * px, 0.25 * px, 0.005, 0.25)):
            g = [r, c, math.log(rad), rot]
            g[k] += dk
            cols.append((self._crop(pattern, (g[0], g[1], math.exp(g[2]), g[3]), flip) - base) / dk)
        return cols

    def _crop(self, pattern, geom, flip) -> np.ndarray:
        r, c, rad, rot = geom
        return _flip(canonical_crop(pattern, (r, c), rad, rot), *flip)[self.win].astype(np.float64)

    # -- the check ---------------------------------------------------------------------------
    def check(self, pattern: np.ndarray, estimate: PacbedEstimate) -> CheckOutcome:
        """Re-fit one raw pattern (same units as given to the networks) from the networks' estimate."""
        geom = (*estimate.center_px, estimate.radius_px, estimate.rotation_deg)
        crop = canonical_crop(pattern, geom[:2], geom[2], geom[3])
        f, b, ti, ki = np.unravel_index(int(np.argmin(self.chi2_all(crop))), (len(FLIPS), len(self.blurs), *self.shape))
        for _ in range(self.rounds):  # the geometry for the best entry, then the best entry there
            geom = self.refine_geometry(pattern, geom, FLIPS[f], self.model(f, b, ti, ki))
            crop = canonical_crop(pattern, geom[:2], geom[2], geom[3])
            f, b, ti, ki = np.unravel_index(int(np.argmin(self.chi2_all(crop))),
                                            (len(FLIPS), len(self.blurs), *self.shape))
        chi = self.chi2_all(crop)  # everything again at the final geometry: best, runner-up, σ
        f, b, ti, ki = np.unravel_index(int(np.argmin(chi)), chi.shape)
        return self._outcome(crop, chi, (f, b, ti, ki), geom, estimate)

    def _outcome(self, crop, chi, best, geom, estimate: PacbedEstimate) -> CheckOutcome:
        f, b, ti, ki = best
        vt, n2 = self._vector(_flip(crop, *FLIPS[f]))
        dof = vt.size - 2
        best_chi = float(chi[best])
        noise = max(best_chi / dof, 1e-30)
        thick = self.lib.thickness_nm
        v = _flip(crop, *FLIPS[f])[self.win].astype(np.float64)
        here = self.model(f, b, ti, ki).astype(np.float64)
        t, t_sig = self._between(v, here, noise, [(ti, k) for k in (ki - 1, ki + 1)], thick[ki],
                                 [thick[k] if 0 <= k < len(thick) else None for k in (ki - 1, ki + 1)], f, b)
        tilt, tilt_sig = np.empty(2), np.empty(2)
        for ax in (0, 1):
            nbrs = self._tilt_neighbours(ti, ax)
            tilt[ax], tilt_sig[ax] = self._between(
                v, here, noise, [(j, ki) for j in nbrs], self.lib.tilt_mrad[ti, ax],
                [self.lib.tilt_mrad[j, ax] if j is not None else None for j in nbrs], f, b)
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

    def _tilt_neighbours(self, ti: int, ax: int) -> list:
        """The library tilts just below and above ``ti`` along axis ``ax`` (None at the edge)."""
        tilts = self.lib.tilt_mrad
        line = np.flatnonzero(np.isclose(tilts[:, 1 - ax], tilts[ti, 1 - ax]))
        line = line[np.argsort(tilts[line, ax])]
        pos = int(np.flatnonzero(line == ti)[0])
        return [int(line[pos - 1]) if pos > 0 else None, int(line[pos + 1]) if pos < len(line) - 1 else None]

    def _between(self, v, here, noise, entries, x0, xs, f, b) -> tuple[float, float]:
        """Sub-grid value along one library axis: the pattern is taken as the linear interpolation
        between the best entry and a neighbour, v ≈ a·(m₀ + w·(m₁ − m₀)) + c, solved exactly (the
        fit is linear in a, a·w and c) on each side; σ where χ² rises by the noise (Δχ² = 1)."""
        best = (float(x0), float(np.median(np.abs(np.diff([x for x in xs if x is not None] + [x0])))) or 1.0)
        best_res = np.inf
        for (j, k), x1 in zip(entries, xs):
            if x1 is None or not (0 <= j < self.shape[0] and 0 <= k < self.shape[1]):
                continue
            d = self.model(f, b, j, k).astype(np.float64) - here
            A = np.column_stack([here, d, np.ones_like(here)])
            sol, *_ = np.linalg.lstsq(A, v, rcond=None)
            a, aw = sol[0], sol[1]
            if abs(a) < 1e-30:
                continue
            w = aw / a
            if not 0 <= w <= 1:
                continue
            res = float(np.sum((v - A @ sol) ** 2))
            if res < best_res:
                # σ of w: the noise over the part of d the other unknowns cannot absorb, scaled by a
                q, _ = np.linalg.qr(np.column_stack([here, np.ones_like(here)]))
                d_perp = d - q @ (q.T @ d)
                sig_w = math.sqrt(noise) / max(abs(a) * float(np.linalg.norm(d_perp)), 1e-30)
                best_res = res
                best = (float(x0 + w * (x1 - x0)), float(abs(x1 - x0) * sig_w))
        return best


def _crop_with_derivatives(pattern: np.ndarray, geom) -> tuple[np.ndarray, list[np.ndarray]]:
    """The canonical crop (as `canonical_crop`) and its derivatives with respect to the centre
    (raw px), ln radius and rotation (degrees), from the raw window's gradient sampled on the
    same grid: x = c + s·R(−θ)·u, so ∂x/∂ln s = x − c and ∂x/∂θ = (o₁, −o₀) for o = x − c; the
    crop carries the factor s², whence the 2v."""
    r, c, rad, rot = geom
    win, cen, rad_w = crop_window(pattern, (r, c), rad)
    binning = rad / rad_w
    scale = rad_w / canonical.ALPHA_PX
    src = np.asarray(win, np.float32)
    if scale > 1.5:
        src = ndimage.gaussian_filter(src, 0.42 * scale)
    grid = canonical.sample_grid(cen, rad_w, rot)
    k = np.float32(scale**2)
    v = ndimage.map_coordinates(src, grid, order=1, mode="constant").astype(np.float64) * k
    g0 = ndimage.map_coordinates(np.gradient(src, axis=0), grid, order=1, mode="constant").astype(np.float64) * k
    g1 = ndimage.map_coordinates(np.gradient(src, axis=1), grid, order=1, mode="constant").astype(np.float64) * k
    o0, o1 = grid[0] - cen[0], grid[1] - cen[1]
    return v, [g0 / binning, g1 / binning, 2 * v + g0 * o0 + g1 * o1, (g0 * o1 - g1 * o0) * (math.pi / 180)]


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
