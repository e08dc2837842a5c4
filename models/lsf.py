"""The least-squares baseline (seed Eq. 1) and the hybrid (network first, then LSF nearby).

χ² = Σ (I − a·S − b)² over the canonical frame, minimised over the intensity scale a (the seed's)
and a uniform background b (inelastic scattering), then over the library pattern S and the
pattern's geometry.  With mean-subtracted, unit-norm library vectors Ŝ the minimum over a and b
is |Ĩ|² − (Ĩ·Ŝ)², so a whole library is searched with one matrix product.  The search is
coarse to fine:

1. coarse disk (as the networks get it), then a grid of rotations (−45..45°, 3° steps) × sizes
   (±15 %) × the four mirror flips (the sign of each tilt component) on 32² crops against every
   second library thickness;
2. at 64², coordinate-wise refinement of shift, size and rotation against the library near the
   best match (±5 nm, ±1 mrad);
3. the full library at the refined geometry; sub-grid estimates and σ from a parabola through
   χ² at the best point and its neighbours (χ² scaled so the best fit has χ²/dof = 1, σ where
   Δχ² = 1).

The library holds only t0, t1 ≥ 0: a flipped crop matches the mirrored tilt.  The hybrid starts
from the networks' geometry and searches ±3 nm and ±1 mrad around their estimate (seed Sec. 4).
"""
from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import numpy as np

from . import canonical
from .coarse_align import coarse_disk, intensity_scale, validate_pattern
from .pacbed_analysis import PacbedEstimate, canonical_crop, wrap45

ROTATIONS = np.arange(-45.0, 45.0, 3.0)
SCALES = np.array([0.85, 0.9, 0.95, 1.0, 1.05, 1.1, 1.15])
FLIPS = canonical.MIRRORS


_flip = canonical.mirror


def _unit(v: np.ndarray) -> np.ndarray:
    v = v - v.mean(axis=-1, keepdims=True)
    return v / np.maximum(np.linalg.norm(v, axis=-1, keepdims=True), 1e-12)


def _bin2(x: np.ndarray) -> np.ndarray:
    s = x.shape
    return x.reshape(s[:-2] + (s[-2] // 2, 2, s[-1] // 2, 2)).mean(axis=(-3, -1))


def _parabola(y_m: float, y_0: float, y_p: float) -> tuple[float, float]:
    """Vertex offset (in steps) and curvature of a parabola through three equally spaced points."""
    curv = y_m - 2 * y_0 + y_p
    if curv <= 0:
        return 0.0, 0.0
    return float(np.clip(0.5 * (y_m - y_p) / curv, -0.5, 0.5)), float(curv)


class LsfAnalyzer:
    """Least-squares library search on raw patterns (first-quadrant library, canonical frame)."""

    def __init__(self, library, kv: float, alpha_mrad: float):
        from ..simulate.library import PacbedLibrary  # numpy/h5py only

        lib = library if isinstance(library, PacbedLibrary) else PacbedLibrary.load(library)
        if abs(lib.kv - kv) > 1.0 or abs(lib.alpha_mrad - alpha_mrad) > 0.03 * lib.alpha_mrad:
            raise ValueError(f"library is for {lib.kv:g} kV, {lib.alpha_mrad:g} mrad; the patterns are "
                             f"{kv:g} kV, {alpha_mrad:g} mrad")
        quad = np.flatnonzero((lib.tilt_mrad >= 0).all(axis=1))
        self.tilts = lib.tilt_mrad[quad].astype(float)  # (T, 2)
        self.thickness = np.asarray(lib.thickness_nm, float)  # (K,)
        k = lib.patterns.shape[-1]
        c = ((k - 1) / 2, (k - 1) / 2)
        alpha_px = lib.alpha_mrad / lib.mrad_per_px
        T, K, P = len(quad), len(self.thickness), canonical.PIXELS
        fine = np.empty((T, K, P, P), np.float32)
        for i, q in enumerate(quad):
            fine[i] = canonical.to_canonical_stack(lib.patterns[q], np.tile(c, (K, 1)), np.full(K, alpha_px),
                                                   np.zeros(K)) if alpha_px < 1.5 * canonical.ALPHA_PX else \
                np.stack([canonical.to_canonical(p, c, alpha_px) for p in lib.patterns[q]])
        flat = fine.reshape(T, K, P * P)
        self.lib_mean = flat.mean(axis=-1)  # to turn the fitted scale back into a background level
        self.lib_norm = np.linalg.norm(flat - self.lib_mean[..., None], axis=-1)
        self.fine = _unit(flat)  # (T, K, P²)
        self.coarse = _unit(_bin2(fine[:, ::2]).reshape(T, -1, (P // 2) ** 2))  # every 2nd thickness
        self.name = getattr(lib, "path", None)

    @classmethod
    def from_file(cls, path: str | Path, kv: float, alpha_mrad: float) -> "LsfAnalyzer":
        return cls(Path(path), kv, alpha_mrad)

    # -- matching ------------------------------------------------------------------------
    @staticmethod
    def _score(crops: np.ndarray, lib: np.ndarray) -> np.ndarray:
        """(Ĩ·Ŝ)² / |Ĩ|² for every crop and library entry: 1 − χ²/|Ĩ|² (higher is better)."""
        v = crops.reshape(len(crops), -1).astype(np.float32)
        v = v - v.mean(axis=1, keepdims=True)
        n2 = np.maximum((v**2).sum(axis=1), 1e-12)
        dots = v @ lib.reshape(-1, lib.shape[-1]).T
        return (dots**2 / n2[:, None]).reshape((len(crops),) + lib.shape[:-1])

    def _crops(self, arr, geoms, flips) -> np.ndarray:
        out = []
        for r, c, rad, rot in geoms:
            x = canonical_crop(arr, (r, c), rad, rot)
            out.extend(_flip(x, *f) for f in flips)
        return np.stack(out)

    def _best_geometry(self, arr, geoms, flip, mask) -> tuple:
        """The geometry whose crop best matches any library entry inside ``mask``."""
        s = self._score(self._crops(arr, geoms, [flip]), self.fine[mask])  # only the masked entries
        return geoms[int(np.argmax(s.max(axis=1)))]

    def _near_mask(self, tilt_c: np.ndarray, thickness: float, dt: float, dtilt: float) -> np.ndarray:
        ok_tilt = (np.abs(self.tilts - np.abs(tilt_c)[None]) <= dtilt + 1e-9).all(axis=1)
        ok_t = np.abs(self.thickness - thickness) <= dt + 1e-9
        return ok_tilt[:, None] & ok_t[None, :]

    def _refine_geometry(self, arr, geom, flip, mask) -> tuple:
        """Coordinate-wise refinement of shift, size and rotation against the masked library,
        halving the steps (0.5 → 0.125 canonical px, 1 → 0.25 %, 1 → 0.25°).  A small shift
        looks like a small tilt, so the steps must get finer than the tilt signal."""
        r, c, rad, rot = geom
        for k in (1.0, 0.5, 0.25):
            step = 0.5 * k * rad / canonical.ALPHA_PX  # raw px
            shifts = [(r + dr * step, c + dc * step, rad, rot) for dr in (-1, 0, 1) for dc in (-1, 0, 1)]
            r, c, rad, rot = self._best_geometry(arr, shifts, flip, mask)
            sizes = [(r, c, rad * (1 + f * 0.01 * k), rot) for f in (-2, -1, 0, 1, 2)]
            r, c, rad, rot = self._best_geometry(arr, sizes, flip, mask)
            rots = [(r, c, rad, wrap45(rot + d * k)) for d in (-1.0, -0.5, 0.0, 0.5, 1.0)]
            r, c, rad, rot = self._best_geometry(arr, rots, flip, mask)
        return (r, c, rad, rot)

    def _search(self, arr, geom, flips):
        """Best (flip, tilt index, thickness index) for one geometry over the fine library."""
        s = self._score(self._crops(arr, [geom], flips), self.fine)
        f, ti, ki = np.unravel_index(int(np.argmax(s)), s.shape)
        return flips[f], ti, ki

    def _finish(self, arr, geom, flip, mask) -> PacbedEstimate:
        r, c, rad, rot = geom
        crop = _flip(canonical_crop(arr, (r, c), rad, rot), *flip)
        v = crop.reshape(-1).astype(np.float64)
        vt = v - v.mean()
        n2 = float((vt**2).sum())
        dots = self.fine.reshape(-1, v.size) @ vt.astype(np.float32)
        chi = (n2 - dots.astype(np.float64) ** 2).reshape(self.fine.shape[:2])  # χ² per (tilt, thickness)
        chi = np.where(mask, chi, np.inf)
        ti, ki = np.unravel_index(int(np.argmin(chi)), chi.shape)
        dof = v.size - 2
        norm = max(chi[ti, ki], 1e-12) / dof  # χ²/dof = 1 at the best fit
        # thickness: parabola along the thickness axis
        t = self.thickness[ki]
        t_sig = float(np.median(np.diff(self.thickness)))
        if 0 < ki < len(self.thickness) - 1 and np.isfinite(chi[ti, ki - 1:ki + 2]).all():
            off, curv = _parabola(*(chi[ti, ki - 1:ki + 2] / norm))
            step = self.thickness[ki + 1] - self.thickness[ki]
            t = t + off * step
            if curv > 0:
                t_sig = float(step * math.sqrt(2 / curv))
        tilt = self.tilts[ti].copy()
        tilt_sig = np.empty(2)
        for ax in (0, 1):  # neighbours along each tilt axis on the grid
            other = 1 - ax
            line = np.flatnonzero(np.isclose(self.tilts[:, other], self.tilts[ti, other]))
            vals = self.tilts[line, ax]
            order = np.argsort(vals)
            line, vals = line[order], vals[order]
            pos = int(np.flatnonzero(line == ti)[0])
            tilt_sig[ax] = 0.25
            if 0 < pos < len(line) - 1 and np.isfinite(chi[line[pos - 1:pos + 2], ki]).all():
                h = 0.5 * (vals[pos + 1] - vals[pos - 1])
                off, curv = _parabola(*(chi[line[pos - 1:pos + 2], ki] / norm))
                tilt[ax] += off * h
                if curv > 0:
                    tilt_sig[ax] = h * math.sqrt(2 / curv)
        tilt_c = tilt * np.array(flip, float)
        tilt_d = canonical.rotation_matrix(-rot) @ tilt_c
        # I ≈ a·S + b: a from the projection on Ŝ, b from the means
        a = float(vt @ self.fine[ti, ki].astype(np.float64)) / max(float(self.lib_norm[ti, ki]), 1e-12)
        scale_px = (rad / canonical.ALPHA_PX) ** 2  # raw pixels per canonical pixel
        background = (float(v.mean()) - a * float(self.lib_mean[ti, ki])) / scale_px
        edge = ki in (0, len(self.thickness) - 1)
        return PacbedEstimate(
            center_px=(float(r), float(c)), radius_px=float(rad), rotation_deg=float(rot),
            thickness_nm=float(t), thickness_sigma_nm=float(t_sig),
            tilt_mrad=(float(tilt_d[0]), float(tilt_d[1])), tilt_sigma_mrad=(float(tilt_sig[0]), float(tilt_sig[1])),
            tilt_crystal_mrad=(float(tilt_c[0]), float(tilt_c[1])), background=background,
            in_range=not edge, flags=["thickness-at-range-edge"] if edge else [])

    # -- public ------------------------------------------------------------------------------
    def analyze_one(self, pattern: np.ndarray) -> PacbedEstimate:
        arr, scale = _scaled(pattern)
        return _unscaled(self._analyze_scaled(arr), scale)

    def _analyze_scaled(self, arr: np.ndarray) -> PacbedEstimate:
        d = coarse_disk(arr)
        geoms = [(d.center_px[0], d.center_px[1], d.radius_px * s, float(rot)) for rot in ROTATIONS for s in SCALES]
        crops = _bin2(self._crops(arr, geoms, [(1, 1)]))
        s = self._score(np.stack([_flip(x, *f) for x in crops for f in FLIPS]), self.coarse)
        idx = np.unravel_index(int(np.argmax(s)), s.shape)
        g, f = divmod(idx[0], len(FLIPS))
        geom, flip = geoms[g], FLIPS[f]
        ti, t = self.tilts[idx[1]], self.thickness[::2][idx[2]]
        for _ in range(2):  # geometry near the current match, then the whole library again
            geom = self._refine_geometry(arr, geom, flip, self._near_mask(ti, t, 5.0, 1.0))
            flip, i, k = self._search(arr, geom, FLIPS)
            ti, t = self.tilts[i], self.thickness[k]
        return self._finish(arr, geom, flip, np.ones(self.fine.shape[:2], bool))

    def analyze(self, patterns) -> list[PacbedEstimate]:
        out = []
        for p in patterns:
            try:
                out.append(self.analyze_one(p))
            except ValueError as exc:
                out.append(PacbedEstimate(error=str(exc)))
        return out

    def refine(self, patterns, estimates: list[PacbedEstimate], dt_nm: float = 3.0,
               dtilt_mrad: float = 1.0) -> list[PacbedEstimate]:
        """The hybrid: LSF within ±dt_nm and ±dtilt_mrad of each network estimate."""
        out = []
        for p, e in zip(patterns, estimates):
            if e.error:
                out.append(e)
                continue
            try:
                arr, scale = _scaled(p)
            except ValueError as exc:
                out.append(replace(e, error=str(exc)))
                continue
            tilt_c = np.asarray(e.tilt_crystal_mrad)
            flip = (1 if tilt_c[0] >= 0 else -1, 1 if tilt_c[1] >= 0 else -1)
            mask = self._near_mask(tilt_c, e.thickness_nm, dt_nm, dtilt_mrad)
            if not mask.any():
                out.append(replace(e, flags=e.flags + ["hybrid-outside-library"]))
                continue
            geom = self._refine_geometry(arr, (*e.center_px, e.radius_px, e.rotation_deg), flip, mask)
            r = _unscaled(self._finish(arr, geom, flip, mask), scale)
            out.append(replace(r, flags=sorted(set(e.flags) | set(r.flags)), in_range=e.in_range and r.in_range,
                               thickness_classes=e.thickness_classes))
        return out


def _scaled(pattern: np.ndarray) -> tuple[np.ndarray, float]:
    """The pattern divided by its intensity scale in float64, as float32 (no overflow, no
    underflow whatever the export's units), and that scale."""
    arr = validate_pattern(pattern)
    scale = intensity_scale(arr)
    return (arr / scale).astype(np.float32), scale


def _unscaled(est: PacbedEstimate, scale: float) -> PacbedEstimate:
    """Back to the input's units (only the background carries them)."""
    return est if est.background is None else replace(est, background=float(est.background) * scale)
