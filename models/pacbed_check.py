"""The network proposes, the library checks: a pattern re-fitted against the simulated library.

The networks give a geometry (centre, size, rotation) and a reading of thickness and tilt.  The
check fits the pattern with a forward model of the whole library around that geometry:

    I(u) ≈ a · (B_ψ ⊛ S_{t,τ})(u) + c · (B_σ ⊛ B_ψ ⊛ S_{t,τ})(u) + b     (canonical frame, window)

with S the simulated pattern at thickness t and crystal-frame tilt τ (first quadrant; the other
quadrants by mirroring the pattern), B_ψ the detector's point spread and pixel binning (ψ from a
short list), B_σ the wider blur of the inelastically scattered copy (σ = α/4), a the elastic
scale, c the inelastic share and b a uniform background; a, c and b are solved in closed form.
Scoring every library entry for every mirror and ψ costs one matrix product in the library's
principal-component space (`compact_library.py`).  The geometry is then refined by Gauss-Newton
on the best entry, the library scored again there, and thickness and tilt refined off the grid
by one joint linear fit: the pattern as the best entry plus the library's local derivatives along
thickness and both tilt axes (from the neighbouring entries present: held-out or missing grid
points leave one-sided or wider differences), whose covariance gives σ.

Reported beside the estimate:

* ``fit_quality``: the fraction of the pattern's structure beyond the zero disk (1.1 α to the
  window's edge, after the fitted scale, inelastic share and background) that the best library
  pattern leaves unexplained: ~0 for a pattern the library holds, larger with noise, and large for
  a pattern it does not hold (another material, zone or α, an amorphous or damaged specimen)
  -> flag ``model-mismatch`` above ``MISMATCH_FIT``.
* ``thickness_alt_nm`` and ``alt_delta_chi2``: the best entry at least ``ALT_MIN_NM`` from the
  best thickness, and how much worse it fits, in units of the best fit's residual per pixel (the
  noise, when the best fit is good).  Below ``AMBIGUOUS_DELTA``: flag ``ambiguous``.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
from scipy import ndimage
from threadpoolctl import ThreadpoolController

from . import canonical
from .compact_library import WINDOW_ALPHA, CompactLibrary
from .pacbed_analysis import PacbedEstimate, canonical_crop, canonical_crop_valid, crop_window, wrap45

FLIPS = canonical.MIRRORS
PSF_PX = (0.0, 0.8, 1.6, 2.4)  # detector point spread and binning [canonical px] (α = 12.1 px): 0-0.2 α
INELASTIC_ALPHA = 0.25  # σ of the inelastic copy's blur [α]: 1-5 mrad at 13.6 mrad is 0.07-0.37 α
ALT_MIN_NM = 3.0
AMBIGUOUS_DELTA = 25.0  # Δχ² in units of the best residual per pixel (5 "σ")
RADIUS_SEARCH = np.linspace(-0.08, 0.08, 9)  # relative sizes tried around the networks' (90 %: ±6 %)
COMPARE_ALPHA = 2.3  # hypotheses compared over this radius [networks' α]: inside the window at −11 % size
TILT_PRIOR_MRAD = 0.6  # the check refines tilt within this of the networks' reading
HYPOTHESES = 3  # thickness modes refined besides the networks' reading
MISMATCH_FIT = 0.08  # unexplained variance fraction beyond any library pattern with noise
COVERAGE_TARGET = 0.68  # the share of errors within ±1σ a calibration aims for (Gaussian: 68 %)


@dataclass(frozen=True)
class SigmaCalibration:
    """σ = √((κ·σ_fit)² + floor²): the fit's statistical σ misses the library's interpolation and
    model errors, which differ per setting (disk sampling, fringe spacing), so κ is fitted per
    setting on held-out simulations (`calibrate_sigma`) and ships beside the check data
    (``*_check_sigma.json``); the defaults were fitted on 13.6 mrad.  The tilt σ is then
    combined with the networks' (`_combine_tilt`)."""

    thickness_scale: float = 5.0
    thickness_floor_nm: float = 0.5
    tilt_scale: float = 3.0
    tilt_floor_mrad: float = 0.2
    fitted_on: str = "default: 13.6 mrad, 100 held-out patterns"

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "SigmaCalibration":
        try:
            d = json.loads(Path(path).read_text())
            out = cls(**d)
        except (ValueError, TypeError) as exc:
            raise ValueError(f"σ calibration {path} unreadable: {exc}") from None
        values = (out.thickness_scale, out.thickness_floor_nm, out.tilt_scale, out.tilt_floor_mrad)
        if not all(isinstance(v, (int, float)) and math.isfinite(v) and v >= 0 for v in values):
            raise ValueError(f"σ calibration {path}: scales and floors must be finite and ≥ 0, got {values}")
        return out


@dataclass
class CheckOutcome:
    estimate: PacbedEstimate
    fit_quality: float
    thickness_alt_nm: float
    alt_delta_chi2: float
    blur_px: float
    inelastic_share: float = float("nan")


_flip = canonical.mirror
# The check's products are small (≤ 3096 × 768): a second BLAS thread saves nothing on them and,
# when the other core is busy (ingest, the networks), spin-waits: 5-10× slower measured here.
_BLAS = ThreadpoolController()


def _blur_stack(imgs: np.ndarray, sigma: float) -> np.ndarray:
    return ndimage.gaussian_filter(imgs, (0, sigma, sigma), mode="constant") if sigma > 0 else imgs


def fill_tilt_grid(library: CompactLibrary) -> CompactLibrary:
    """The library with every missing point of its regular tilt grid filled in: the mean of the
    linear interpolations along each tilt axis between the nearest entries present (one axis
    where only it has both).  A recorded tilt anywhere then has an entry within half a grid
    step, so the grid search does not trade a tilt error for a thickness error; the local fit
    refines from there."""
    tilts = library.tilt_mrad
    v0, v1 = np.unique(tilts[:, 0]), np.unique(tilts[:, 1])
    index = {(float(a), float(b)): i for i, (a, b) in enumerate(tilts)}
    present = np.array([[(float(a), float(b)) in index for b in v1] for a in v0])
    if present.all():
        return library
    fields = [library.coef.astype(np.float32), library.entry_mean, library.entry_norm]
    new_tilts, new_fields = [], [[] for _ in fields]
    for i, j in zip(*np.nonzero(~present)):
        parts = []
        for ax, (line, pos) in enumerate(((present[:, j], i), (present[i, :], j))):
            lo = np.flatnonzero(line[:pos])
            hi = np.flatnonzero(line[pos + 1:]) + pos + 1
            if lo.size and hi.size:
                lo, hi = int(lo[-1]), int(hi[0])
                vals = v0 if ax == 0 else v1
                w = (vals[pos] - vals[lo]) / (vals[hi] - vals[lo])
                e_lo = index[(float(v0[lo]), float(v1[j]))] if ax == 0 else index[(float(v0[i]), float(v1[lo]))]
                e_hi = index[(float(v0[hi]), float(v1[j]))] if ax == 0 else index[(float(v0[i]), float(v1[hi]))]
                parts.append([(1 - w) * fld[e_lo] + w * fld[e_hi] for fld in fields])
        if not parts:  # a corner with no entry on either side: leave it out
            continue
        new_tilts.append((v0[i], v1[j]))
        for k in range(len(fields)):
            new_fields[k].append(np.mean([part[k] for part in parts], axis=0))
    if not new_tilts:
        return library
    coef, mean, norm = (np.concatenate([fld, np.stack(new)]) for fld, new in zip(fields, new_fields))
    return replace(library, coef=coef, entry_mean=mean, entry_norm=norm,
                   tilt_mrad=np.concatenate([tilts, np.array(new_tilts, float)]),
                   attrs={**library.attrs, "tilts_interpolated": len(new_tilts)})


class LibraryCheck:
    """Fits patterns against a `CompactLibrary` (one kV and α)."""

    def __init__(self, library: CompactLibrary, psf_px=PSF_PX, inelastic_alpha: float = INELASTIC_ALPHA,
                 rounds: int = 2, gauss_newton_steps: int = 3, analytic: bool = True,
                 sigma: SigmaCalibration = SigmaCalibration()):
        self.lib = library = fill_tilt_grid(library)
        self.sigma = sigma
        self.rounds, self.steps, self.analytic = rounds, gauss_newton_steps, analytic
        self.win = canonical.window_mask(WINDOW_ALPHA)
        self.psf = tuple(float(b) for b in psf_px)
        self.inelastic_px = float(inelastic_alpha * canonical.ALPHA_PX)
        P = canonical.PIXELS
        self.n_win = int(self.win.sum())
        self.coef = library.coef.reshape(-1, library.coef.shape[-1]).astype(np.float32)  # (E, R)
        self.shape = library.coef.shape[:2]
        self.ua, self.ub = [], []  # per ψ: the elastic and inelastic templates of the basis, window px
        grams = []
        imgs = library.basis.reshape(-1, P, P)
        for psi in self.psf:
            a = _blur_stack(imgs, psi)
            b = _blur_stack(a, self.inelastic_px)
            ua, ub = a[:, self.win].astype(np.float32), b[:, self.win].astype(np.float32)
            self.ua.append(ua)
            self.ub.append(ub)
            grams.append(self._entry_grams(ua, ub))
        # the same templates per ψ as one (window px, 2·R) matrix: a crop's projections on them are
        # one (F × M)·(M × 2R) product, several times faster than (R × M)·(M × F) products
        self.proj_t = [np.ascontiguousarray(np.concatenate([ua, ub]).T) for ua, ub in zip(self.ua, self.ub)]
        self.gram = np.stack(grams)  # (Ψ, 3, E): |A−Ā|², |B−B̄|², (A−Ā)·(B−B̄) per entry
        c = (P - 1) / 2
        rr = np.hypot(*np.indices((P, P)) - c)[self.win] / canonical.ALPHA_PX
        self.rr = rr  # window pixels' distance from the centre [α]
        self._templates: dict = {}
        self.outside = rr > 1.1  # window pixels beyond the zero disk

    def _entry_grams(self, ua: np.ndarray, ub: np.ndarray) -> np.ndarray:
        """Each entry's mean-free template norms and overlap inside the window (E values each)."""
        n = self.n_win
        ua64, ub64 = ua.astype(np.float64), ub.astype(np.float64)
        ma, mb = self.coef @ (ua.sum(axis=1) / n), self.coef @ (ub.sum(axis=1) / n)
        out = []
        for x, y, mx, my in ((ua64, ua64, ma, ma), (ub64, ub64, mb, mb), (ua64, ub64, ma, mb)):
            g = (x @ y.T).astype(np.float32)
            out.append(np.einsum("er,er->e", self.coef @ g, self.coef).astype(np.float64) - n * mx * my)
        out[0], out[1] = np.maximum(out[0], 1e-12), np.maximum(out[1], 1e-12)
        return np.stack(out)

    # -- scoring -----------------------------------------------------------------------------
    def _vector(self, crop: np.ndarray) -> tuple[np.ndarray, float]:
        v = crop[self.win].astype(np.float64)
        vt = v - v.mean()
        return vt.astype(np.float32), float(vt @ vt)

    def chi2_all(self, crop: np.ndarray, flips=None, psis=None, entries: np.ndarray | None = None) -> np.ndarray:
        """χ² of the best a, c, b for every (flip, ψ, tilt, thickness): (F, Ψ, T, K); entries not
        in ``entries`` (flat indices into tilt × thickness) are not scored (inf).

        One matrix product for everything: the crop's mirror images projected on all ψ's
        templates of the basis, then the library's coefficients times those."""
        flips = range(len(FLIPS)) if flips is None else flips
        psis = range(len(self.psf)) if psis is None else list(psis)
        vs = [self._vector(_flip(crop, *FLIPS[f])) for f in flips]
        V = np.stack([v for v, _ in vs])  # (F, M)
        n2 = np.array([n for _, n in vs])[:, None]
        R = self.coef.shape[1]
        proj = np.stack([(V @ self.proj_t[p]).reshape(len(vs), 2, R) for p in psis], axis=1)  # (F, Ψ', 2, R)
        rows = slice(None) if entries is None else entries
        coef = self.coef[rows]
        dots = (coef @ proj.reshape(-1, R).T).astype(np.float64).reshape(-1, len(vs), len(psis), 2)  # (E', F, Ψ', 2)
        out = np.full((len(vs), len(psis), self.coef.shape[0]), np.inf)
        for j, p in enumerate(psis):
            aa, bb, ab = self.gram[p][:, rows]
            det = np.maximum(aa * bb - ab**2, 1e-12 * aa * bb)
            pa, pb = dots[:, :, j, 0].T, dots[:, :, j, 1].T
            out[:, j, rows] = n2 - (bb * pa**2 - 2 * ab * pa * pb + aa * pb**2) / det
        return out.reshape(len(vs), len(psis), *self.shape)

    # -- geometry ----------------------------------------------------------------------------
    def refine_geometry(self, pattern: np.ndarray, geom, flip, model: list[np.ndarray], steps: int | None = None,
                        rows: np.ndarray | None = None):
        """Gauss-Newton on (row, col, ln radius, rotation) with the scales and background, the
        templates ``model`` fixed.  The first steps take the crop's derivatives from the raw
        window's gradient sampled on the crop's grid (`_crop_with_derivatives`); the last takes
        them by finite differences, which converge to the χ² minimum of the interpolated crop.
        ``model``: the local model's columns (`columns`), so thickness and tilt move with the
        geometry instead of the geometry absorbing their error.  ``rows``: the window pixels on
        the recorded frame (all when None)."""
        r, c, rad, rot = geom
        fixed = [-m for m in model]
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
            A = np.column_stack(cols + fixed)
            if rows is not None:
                A, base = A[rows], base[rows]
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
        """Re-fit one raw pattern (same units as given to the networks) from the networks' estimate.

        The hypotheses are the few thickness modes that fit best anywhere in a search over the
        disk size, plus the networks' reading; each gets its own geometry refinement and the
        best fit within its band, and the best of those wins (its runner-up says how sure)."""
        return self.outcome(self.fit(pattern, estimate), estimate)

    def fit(self, pattern: np.ndarray, estimate: PacbedEstimate) -> tuple[dict, float, float]:
        """The fit behind `check`: (best hypothesis, runner-up thickness, its Δχ²); `outcome`
        turns it into the reading (cheap: a σ calibration re-reads stored fits)."""
        with _BLAS.limit(limits=1, user_api="blas"):
            return self._fit(pattern, estimate)

    def _fit(self, pattern: np.ndarray, estimate: PacbedEstimate) -> tuple[dict, float, float]:
        start = (*estimate.center_px, estimate.radius_px, estimate.rotation_deg)
        near = self._near_network_tilt(estimate)
        fits = [self._refine(pattern, geom, k, near) for geom, k in self._hypotheses(pattern, start, estimate, near)]
        for fit in fits:
            self._score(fit, start[2])
        fits.sort(key=lambda fit: fit["score"])
        best = fits[0]
        thick = self.lib.thickness_nm
        ki = best["entry"][3]
        alt = [fit for fit in fits[1:] if abs(thick[fit["entry"][3]] - thick[ki]) >= ALT_MIN_NM]
        if alt:
            noise = best["score"] / max(best["pixels"], 1)
            alt_t, delta = float(thick[alt[0]["entry"][3]]), float((alt[0]["score"] - best["score"]) / noise)
        else:
            alt_t, delta = float("nan"), float("inf")
        return best, alt_t, delta

    def _score(self, fit: dict, radius_ref: float) -> None:
        """How well a hypothesis explains the pattern, comparable between hypotheses of other
        disk sizes: the local fit's residual over one region of the raw pattern (``COMPARE_ALPHA``
        of the networks' disk radius) in raw units: a canonical pixel holds s² raw pixels' counts
        and stands for s² raw pixels (s = raw px per canonical px), so Σ_raw r² = Σ_canonical r²/s².
        (Weighting each pixel by its Poisson variance was tried and picked wrong bands more often.)"""
        f, p, ti, ki = fit["entry"]
        v = _flip(fit["crop"], *FLIPS[f])[self.win].astype(np.float64)
        real = _flip(fit["valid"], *FLIPS[f])[self.win]
        fit["local"] = local = self.local_fit(v, p, ti, ki, rows=real)
        inside = (self.rr < COMPARE_ALPHA * radius_ref / fit["geom"][2]) & real
        fit["score"] = float(np.sum(local["resid"][inside] ** 2)) / (fit["geom"][2] / canonical.ALPHA_PX) ** 2
        fit["pixels"] = int(inside.sum())

    def _hypotheses(self, pattern: np.ndarray, geom, estimate: PacbedEstimate,
                    near: np.ndarray | None = None) -> list[tuple[tuple, int]]:
        """(geometry, thickness index) to refine: the lowest local minima of χ² over thickness
        (minimised over tilt, mirror and the disk sizes tried; one ψ), at least ``ALT_MIN_NM``
        apart, each at the size it fitted best, and the networks' thickness at theirs.  Only the
        mirrors ``near`` the networks' tilt are searched, when given."""
        thick = self.lib.thickness_nm
        flips = None if near is None else [f for f in range(len(FLIPS)) if near[f].any()]
        prof, where, geoms = np.full(len(thick), np.inf), np.zeros(len(thick), int), []
        for j, f in enumerate(RADIUS_SEARCH):
            g = (geom[0], geom[1], geom[2] * (1 + f), geom[3])
            geoms.append(g)
            crop = canonical_crop(pattern, g[:2], g[2], g[3])
            chi = self.chi2_all(crop, flips=flips, psis=[1], entries=self._entries(near, None))
            if near is not None:
                chi = np.where(near[flips][:, None, :, None], chi, np.inf)
            here = chi.min(axis=(0, 1, 2))
            better = here < prof
            prof[better], where[better] = here[better], j
        chosen: list[int] = []
        for k in np.argsort(prof):
            near = np.abs(thick - thick[k]) < ALT_MIN_NM
            if prof[k] <= prof[near].min() and all(abs(thick[k] - thick[c]) >= ALT_MIN_NM for c in chosen):
                chosen.append(int(k))
            if len(chosen) == HYPOTHESES:
                break
        if estimate.thickness_nm is not None and np.isfinite(estimate.thickness_nm):
            k = int(np.argmin(np.abs(thick - estimate.thickness_nm)))
            if all(abs(thick[k] - thick[c]) >= ALT_MIN_NM for c in chosen):
                chosen.append(k)
        return [(geoms[where[k]], k) for k in chosen]

    def _entries(self, near: np.ndarray | None, band: np.ndarray | None) -> np.ndarray | None:
        """Flat entry indices for `chi2_all`: the tilts near the networks' (any mirror) × the
        thickness band; None for all."""
        if near is None and band is None:
            return None
        tilts = np.arange(self.shape[0]) if near is None else np.flatnonzero(near.any(axis=0))
        thick = np.arange(self.shape[1]) if band is None else np.flatnonzero(band)
        return (tilts[:, None] * self.shape[1] + thick).ravel()

    def _near_network_tilt(self, estimate: PacbedEstimate) -> np.ndarray | None:
        """(F, T): the (mirror, tilt) entries within ``TILT_PRIOR_MRAD`` (or 3 of their σ, if
        larger) of the networks' crystal tilt on both axes — the networks read tilt well (80 % within 0.25 mrad on held-out data)
        and the library's grid is coarse there, so the check refines their tilt instead of
        searching every tilt; None (no limit) without a reading and its σ, or when nothing lies
        near it."""
        tc, sd = estimate.tilt_crystal_mrad, estimate.tilt_sigma_mrad
        if tc is None or sd is None or not (np.all(np.isfinite(tc)) and np.all(np.isfinite(sd))):
            return None
        reach = max(TILT_PRIOR_MRAD, 3 * float(max(sd)))
        signed = self.lib.tilt_mrad[None, :, :] * np.array(FLIPS, float)[:, None, :]  # (F, T, 2)
        near = (np.abs(signed - np.asarray(tc, float)) <= reach).all(axis=-1)
        return near if near.any() else None

    def _refine(self, pattern: np.ndarray, geom, k0: int, near: np.ndarray | None = None) -> dict:
        """One hypothesis: the best entry within ``ALT_MIN_NM`` of thickness index ``k0`` (and
        among the tilts ``near``, if given), the geometry refined for it, ``rounds`` times; its
        χ² at the final geometry."""
        band = np.abs(self.lib.thickness_nm - self.lib.thickness_nm[k0]) < ALT_MIN_NM
        flips = list(range(len(FLIPS))) if near is None else [f for f in range(len(FLIPS)) if near[f].any()]
        for r in range(self.rounds + 1):
            crop, valid = canonical_crop_valid(pattern, geom[:2], geom[2], geom[3])
            chi = self.chi2_all(crop, flips=flips, entries=self._entries(near, band))
            if near is not None:
                chi = np.where(near[flips][:, None, :, None], chi, np.inf)
            at = np.unravel_index(int(np.argmin(chi)), chi.shape)
            fi, p, ti, ki = (int(i) for i in at)
            f = flips[fi]
            if r == self.rounds:
                break
            real = _flip(valid, *FLIPS[f])[self.win]
            geom = self.refine_geometry(pattern, geom, FLIPS[f], self.columns(p, ti, ki)[0],
                                        rows=None if real.all() else real)
        return {"chi2": float(chi[at]), "entry": (f, p, ti, ki), "geom": geom, "crop": crop, "valid": valid}

    def outcome(self, fitted: tuple[dict, float, float], estimate: PacbedEstimate,
                sigma: SigmaCalibration | None = None) -> CheckOutcome:
        """The checked estimate from `fit`'s result, with this check's σ calibration (or ``sigma``)."""
        best, alt_t, delta = fitted
        cal = self.sigma if sigma is None else sigma
        f, p, ti, ki = best["entry"]
        geom, fit = best["geom"], best["local"]
        thick = self.lib.thickness_nm
        tilt_c, tilt_sig_c = _combine_tilt(fit["tilt"] * np.array(FLIPS[f], float),
                                           np.hypot(cal.tilt_scale * fit["tilt_sigma"], cal.tilt_floor_mrad), estimate)
        rm = canonical.rotation_matrix(-geom[3])  # crystal frame -> detector frame
        tilt_d = rm @ tilt_c
        tilt_sig = np.sqrt(np.diag(rm @ np.diag(tilt_sig_c**2) @ rm.T))
        flags = [x for x in estimate.flags if x not in ("ambiguous", "model-mismatch")]
        t_sig = math.hypot(cal.thickness_scale * fit["thickness_sigma"], cal.thickness_floor_nm)
        if delta < AMBIGUOUS_DELTA or _disagree(fit["thickness"], t_sig, estimate):
            flags.append("ambiguous")
        if fit["fit_quality"] > MISMATCH_FIT:
            flags.append("model-mismatch")
        scale_px = (geom[2] / canonical.ALPHA_PX) ** 2
        lib_mean = float(self.lib.entry_mean[ti, ki]) / max(float(self.lib.entry_norm[ti, ki]), 1e-30)
        a, c, b = fit["a"], fit["c"], fit["b"]
        background = (b - (a + c) * lib_mean) / scale_px  # I = a·Ŝ + c·BŜ + b, Ŝ = (S − mean)/norm
        edge = ki in (0, len(thick) - 1)
        est = replace(estimate, center_px=(float(geom[0]), float(geom[1])), radius_px=float(geom[2]),
                      rotation_deg=float(geom[3]), thickness_nm=float(fit["thickness"]), thickness_sigma_nm=t_sig,
                      tilt_mrad=(float(tilt_d[0]), float(tilt_d[1])),
                      tilt_sigma_mrad=(float(tilt_sig[0]), float(tilt_sig[1])),
                      tilt_crystal_mrad=(float(tilt_c[0]), float(tilt_c[1])), background=background,
                      flags=sorted(set(flags) | ({"thickness-at-range-edge"} if edge else set())),
                      in_range=bool(estimate.in_range and not edge and fit["fit_quality"] <= MISMATCH_FIT))
        return CheckOutcome(est, float(fit["fit_quality"]), alt_t, delta, self.psf[p],
                            float(c / (a + c)) if a + c else float("nan"))

    # -- showing the fit -----------------------------------------------------------------------
    def render(self, pattern: np.ndarray, estimate: PacbedEstimate) -> dict[str, np.ndarray]:
        """The pattern beside the library's best account of it, for a person to compare: the
        canonical crop at the estimate's geometry (``observed``), the forward model fitted there
        at the library entry nearest its thickness and crystal tilt (``model``: a·A + c·B + b with
        the local thickness/tilt terms, best ψ; NaN outside the fitted window), ``residual`` and
        ``valid`` (pixels on the recorded frame), all in the canonical frame (``PIXELS``², crystal
        axes along the array axes, the zero disk ``ALPHA_PX`` in radius).  A few ms: no search,
        so it can be asked for any block the check has read (its geometry and reading suffice)."""
        if estimate.center_px is None or estimate.radius_px is None or estimate.thickness_nm is None \
                or estimate.tilt_crystal_mrad is None:
            raise ValueError("render needs an estimate with centre, size, thickness and crystal tilt")
        with _BLAS.limit(limits=1, user_api="blas"):
            crop, valid = canonical_crop_valid(pattern, estimate.center_px, estimate.radius_px,
                                               estimate.rotation_deg or 0.0)
            tc = np.asarray(estimate.tilt_crystal_mrad, float)
            flip = (1 if tc[0] >= 0 else -1, 1 if tc[1] >= 0 else -1)
            f = FLIPS.index(flip)
            ti = int(np.argmin(np.abs(self.lib.tilt_mrad - np.abs(tc)).max(axis=1)))
            ki = int(np.argmin(np.abs(self.lib.thickness_nm - estimate.thickness_nm)))
            chi = self.chi2_all(crop, flips=[f], entries=np.array([ti * self.shape[1] + ki]))[0, :, ti, ki]
            p = int(np.argmin(chi))
            v = _flip(crop, *flip)[self.win].astype(np.float64)
            real = _flip(valid, *flip)[self.win]
            fit = self.local_fit(v, p, ti, ki, rows=real)
        model = np.full(crop.shape, np.nan)
        model[self.win] = v - fit["resid"]
        model = _flip(model, *flip)  # a mirror is its own inverse
        return {"observed": np.asarray(crop, np.float64), "model": model, "residual": crop - model,
                "valid": valid, "fit_quality": np.float64(fit["fit_quality"])}

    # -- off the grid --------------------------------------------------------------------------
    def _neighbours(self, ti: int, ki: int) -> list[tuple[tuple, tuple, tuple]]:
        """Per axis (thickness, tilt 0, tilt 1): the entries below and above (the entry itself at
        an edge) and the axis' values there and at the entry."""
        thick, tilts = self.lib.thickness_nm, self.lib.tilt_mrad
        lo, hi = max(ki - 1, 0), min(ki + 1, len(thick) - 1)
        out = [((ti, lo), (ti, hi), (float(thick[lo]), float(thick[ki]), float(thick[hi])))]
        for ax in (0, 1):
            below, above = self._tilt_neighbours(ti, ax)
            b, a = (ti if below is None else below), (ti if above is None else above)
            out.append(((b, ki), (a, ki), (float(tilts[b, ax]), float(tilts[ti, ax]), float(tilts[a, ax]))))
        return out

    def columns(self, psi_i: int, ti: int, ki: int) -> tuple[list[np.ndarray], np.ndarray]:
        """The local model's columns around one entry: A₀, ∂A/∂t, ∂A/∂τ₀, ∂A/∂τ₁ (from the
        neighbouring entries present; zero on a one-entry axis), B₀, 1; and each axis' range to
        those neighbours.  The entries' templates come from one product with the basis (the last
        few hundred entries' columns kept: a check asks for the same neighbours again and again)."""
        key = (psi_i, ti, ki)
        if key in self._templates:
            return self._templates[key]
        neighbours = self._neighbours(ti, ki)
        entries = [(ti, ki)] + [e for lo, hi, _ in neighbours for e in (hi, lo)]
        coef = self.coef[[t * self.shape[1] + k for t, k in entries]]
        A = (coef @ self.ua[psi_i]).astype(np.float64)
        B0 = (coef[0] @ self.ub[psi_i]).astype(np.float64)
        cols, lo_hi = [A[0]], []
        for i, (_, _, (x_lo, x0, x_hi)) in enumerate(neighbours):
            step = x_hi - x_lo
            cols.append((A[1 + 2 * i] - A[2 + 2 * i]) / step if step else np.zeros_like(A[0]))
            lo_hi.append((x_lo - x0, x_hi - x0))
        if len(self._templates) > 256:
            self._templates.clear()
        self._templates[key] = out = (cols + [B0, np.ones_like(A[0])], np.array(lo_hi))
        return out

    def local_fit(self, v: np.ndarray, psi_i: int, ti: int, ki: int, rows: np.ndarray | None = None) -> dict:
        """Thickness and tilt off the grid: v ≈ a·(A₀ + Σ δᵢ·∂A/∂xᵢ) + c·B₀ + b, linear in a, a·δᵢ,
        c and b, around the best entry, the derivatives from the neighbouring entries present;
        each δᵢ stays between those neighbours.  σ of δᵢ from the fit's covariance with the
        residual as the noise; only the window pixels ``rows`` (those on the recorded frame)."""
        cols, lo_hi = self.columns(psi_i, ti, ki)
        rows = np.ones(v.size, bool) if rows is None else rows
        X, v_all, v = np.column_stack(cols)[rows], v, v[rows]
        xtx = X.T @ X
        keep = np.abs(np.diag(xtx)) > 0
        sol = np.zeros(X.shape[1])
        inv = np.linalg.pinv(xtx[np.ix_(keep, keep)])
        sol[keep] = inv @ (X[:, keep].T @ v)
        a = float(sol[0]) if abs(sol[0]) > 1e-30 else 1e-30
        delta = np.clip(sol[1:4] / a, lo_hi[:, 0], lo_hi[:, 1])
        resid = np.zeros(v_all.size)
        resid[rows] = v - X @ sol
        noise = max(float(resid @ resid) / max(v.size - int(keep.sum()), 1), 1e-30)
        var = np.zeros(X.shape[1])
        var[keep] = np.diag(inv) * noise
        sig = np.where(lo_hi[:, 1] > lo_hi[:, 0], np.sqrt(np.maximum(var[1:4], 0)) / abs(a), np.nan)
        thick, tilts = self.lib.thickness_nm, self.lib.tilt_mrad
        return {"thickness": float(thick[ki] + delta[0]), "thickness_sigma": float(sig[0]),
                "tilt": tilts[ti] + delta[1:3], "tilt_sigma": sig[1:3],
                "a": a, "c": float(sol[4]), "b": float(sol[5]), "noise": noise, "resid": resid,
                "fit_quality": self._unexplained(v_all, resid, rows)}

    def _unexplained(self, v: np.ndarray, resid: np.ndarray, rows: np.ndarray) -> float:
        """Unexplained fraction of the pattern's structure outside the zero disk (1.1 α to the
        window's edge), where the crystal shows itself; the disk edge, which any library pattern
        reproduces, would hide a mismatch in a whole-window figure."""
        out = self.outside & rows
        vo = v[out] - v[out].mean()
        ro = resid[out] - resid[out].mean()
        return float(ro @ ro) / max(float(vo @ vo), 1e-30)

    def _tilt_neighbours(self, ti: int, ax: int) -> list:
        """The library tilts just below and above ``ti`` along axis ``ax`` (None at the edge)."""
        tilts = self.lib.tilt_mrad
        line = np.flatnonzero(np.isclose(tilts[:, 1 - ax], tilts[ti, 1 - ax]))
        line = line[np.argsort(tilts[line, ax])]
        pos = int(np.flatnonzero(line == ti)[0])
        return [int(line[pos - 1]) if pos > 0 else None, int(line[pos + 1]) if pos < len(line) - 1 else None]


def _disagree(thickness: float, sigma: float, estimate: PacbedEstimate) -> bool:
    """The check and the networks read thicknesses further apart than both σ allow (3σ of the
    two together, and at least ``ALT_MIN_NM``): one of them is wrong, and nothing says which."""
    t, s = estimate.thickness_nm, estimate.thickness_sigma_nm
    if t is None or s is None or not (np.isfinite(t) and np.isfinite(s)):
        return False
    return abs(thickness - t) > max(3 * math.hypot(sigma, s), ALT_MIN_NM)


def _combine_tilt(tilt_c: np.ndarray, sigma_c: np.ndarray, estimate: PacbedEstimate) -> tuple[np.ndarray, np.ndarray]:
    """The check's crystal tilt combined with the networks' reading, inverse-variance weighted:
    two measurements of one tilt with largely independent errors (the library's grid and
    interpolation against the networks' training), better together than either (held-out 13.6
    mrad: ±0.25 mrad for 80 % / 76 % alone, 85 % combined).  The networks' σ is given in the
    detector frame; its mean variance stands for both crystal axes."""
    tc, sd = estimate.tilt_crystal_mrad, estimate.tilt_sigma_mrad
    if tc is None or sd is None or not (np.all(np.isfinite(tc)) and np.all(np.isfinite(sd)) and min(sd) > 0):
        return tilt_c, sigma_c
    var_n = float(np.mean(np.square(sd)))
    w_c, w_n = 1 / sigma_c**2, 1 / var_n
    return (w_c * tilt_c + w_n * np.asarray(tc, float)) / (w_c + w_n), 1 / np.sqrt(w_c + w_n)


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


def calibrate_sigma(check: LibraryCheck, fits: list, estimates: list[PacbedEstimate], true_thickness: np.ndarray,
                    true_tilt_mrad: np.ndarray, fitted_on: str, target: float = COVERAGE_TARGET) -> SigmaCalibration:
    """κ for thickness and for tilt such that ``target`` of the errors lie within ±1σ (tilt: both
    detector-frame components counted, as the benchmarks do), the floors kept; by bisection on
    stored fits (`LibraryCheck.fit`) of patterns with known truth, never the benchmark's own."""
    base = check.sigma

    def coverage(**change) -> tuple[float, float]:
        cal = replace(base, **change)
        t_hit, a_hit = [], []
        for fitted, est, t, tilt in zip(fits, estimates, true_thickness, true_tilt_mrad):
            e = check.outcome(fitted, est, cal).estimate
            t_hit.append(abs(e.thickness_nm - t) <= e.thickness_sigma_nm)
            a_hit.extend(np.abs(np.subtract(e.tilt_mrad, tilt)) <= np.asarray(e.tilt_sigma_mrad))
        return float(np.mean(t_hit)), float(np.mean(a_hit))

    def solve(key: str, which: int) -> float:
        lo, hi = 0.0, 50.0
        for _ in range(30):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if coverage(**{key: mid})[which] < target else (lo, mid)
        return round(hi, 3)

    return replace(base, thickness_scale=solve("thickness_scale", 0), tilt_scale=solve("tilt_scale", 1),
                   fitted_on=fitted_on)
