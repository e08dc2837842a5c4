"""Raw PACBED pattern → zero-disk centre, size, rotation, thickness, tilt (the seed's Figs. 1-2).

    coarse disk (projections, edge circle)  →  alignment network, iterated: re-crop the raw
    pattern into the canonical frame with each improved (centre, radius, rotation) until it
    stops moving  →  thickness/tilt network, iterated on the uniform background it reports
    (the seed's converged background subtraction)  →  estimates with σ from the class
    probabilities, flags, and the tilt in both the detector and the crystal frame.

Crops carry which of their pixels lie on the recorded frame (canonical.valid_pixels); every
normalisation uses those only.  A frame that shows less than the thickness/tilt network was
trained to read (``min_field_alpha`` from the disk centre to the nearest edge) gets the flag
``partial-field``, its geometry, and no thickness or tilt (NaN), never a guess.

Everything runs batched through one inference backend per network (ONNX Runtime on the CPU,
TensorRT on a GPU).  A pattern that cannot be analysed keeps its place with an ``error``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import canonical
from .backends import load_backend
from .cards import SHIPPED_DIR, ModelCard, find_cards, select, verify
from .coarse_align import (MIN_PATTERN_PX, coarse_disk, coarse_disks_fast, intensity_scale, scaled_stack,
                           validate_pattern)
from .pacbed_estimate import estimate, top_classes

ALIGN_TASK, THICKNESS_TILT_TASK = "pacbed-align", "pacbed-thickness-tilt"
# every flag an estimate can carry (stores keep them as bits in this order)
FLAGS = ("vacuum", "not-on-zone", "thickness-at-range-edge", "low-confidence", "saturated", "partial-field")
RAW_FLAGS = ("vacuum", "saturated")  # read from the raw frame, not from the thickness/tilt network


@dataclass
class PacbedEstimate:
    """One pattern's result; field names and units are OUT.json's (DESIGN.md conventions)."""

    center_px: tuple[float, float] | None = None
    radius_px: float | None = None
    rotation_deg: float | None = None
    thickness_nm: float | None = None
    thickness_sigma_nm: float | None = None
    tilt_mrad: tuple[float, float] | None = None
    tilt_sigma_mrad: tuple[float, float] | None = None
    tilt_crystal_mrad: tuple[float, float] | None = None
    background: float | None = None
    in_range: bool | None = None
    flags: list[str] = field(default_factory=list)
    thickness_classes: list[tuple[float, float]] | None = None  # (nm, probability), most probable first
    error: str | None = None

    def to_json(self) -> dict:
        """Plain JSON values: tuples as lists, NaN (no estimate, e.g. ``partial-field``) as None."""
        d = {k: _plain(getattr(self, k)) for k in self.__dataclass_fields__}
        if self.error is None:
            d.pop("error")
        return d


def _plain(v):
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def crop_window(pattern: np.ndarray, center: tuple[float, float], radius: float) -> tuple[np.ndarray, tuple[float, float], float]:
    """The part of a raw frame the canonical frame can see, binned when the disk is large.

    Returns (window, centre in the window, radius in window pixels).  Binning by the whole
    number of raw pixels per canonical pixel keeps large frames cheap and avoids aliasing.
    """
    reach = int(math.ceil(canonical.HALF_RANGE_ALPHA * math.sqrt(2) * radius * 1.3)) + 2
    r0, c0 = int(round(center[0])), int(round(center[1]))
    top, left = max(r0 - reach, 0), max(c0 - reach, 0)
    win = pattern[top:r0 + reach + 1, left:c0 + reach + 1]
    cen = (center[0] - top, center[1] - left)
    b = int(radius / canonical.ALPHA_PX)
    if b >= 2:
        h, w = (win.shape[0] // b) * b, (win.shape[1] // b) * b
        win = win[:h, :w].reshape(h // b, b, w // b, b).mean(axis=(1, 3)) * b * b
        off = (b - 1) / 2
        cen = ((cen[0] - off) / b, (cen[1] - off) / b)
        radius = radius / b
    return win, cen, radius


def _checked_disk(arr: np.ndarray):
    """:func:`coarse_disk`, refusing a disk too small for the networks."""
    d = coarse_disk(arr)
    if d.radius_px < 2:
        raise ValueError(f"zero disk too small to analyse (radius {d.radius_px:.1f} px)")
    return d


def canonical_crop(pattern: np.ndarray, center, radius: float, rotation: float) -> np.ndarray:
    win, cen, rad = crop_window(pattern, center, radius)
    return canonical.to_canonical(win, cen, rad, rotation)


def canonical_crop_valid(pattern: np.ndarray, center, radius: float, rotation: float) -> tuple[np.ndarray, np.ndarray]:
    """:func:`canonical_crop` and which of its pixels lie on the recorded frame."""
    win, cen, rad = crop_window(pattern, center, radius)
    return canonical.to_canonical_valid(win, cen, rad, rotation)


def field_alpha(shape: tuple[int, ...], center, radius: float) -> float:
    """±α the frame shows along the shortest direction from the disk centre to its edge pixels."""
    (r, c), (h, w) = center, shape[-2:]
    return min(r, h - 1 - r, c, w - 1 - c) / radius


def wrap45(deg: float) -> float:
    """Into (−45°, 45°]: the [001] pattern repeats every 90°."""
    return -((-deg + 45) % 90 - 45)


def _rotate(v: np.ndarray, theta_deg: float) -> np.ndarray:
    return canonical.rotation_matrix(theta_deg) @ v


class PacbedAnalyzer:
    """The two networks of one acquisition setting (kV, α) behind one backend."""

    def __init__(self, align_card: ModelCard, thickness_tilt_card: ModelCard | None, backend: str = "auto",
                 align_iterations: int = 3, threads: int | None = None, background_iterations: int = 1,
                 min_field_alpha: float | None = None, align_tolerance: tuple[float, float, float] | None = None):
        """``thickness_tilt_card`` None gives an alignment-only analyser (:meth:`align_patterns`).
        ``min_field_alpha``: below it a frame is ``partial-field`` (default: the card's
        ``training.min_field_alpha``, else :data:`MIN_FIELD_ALPHA`; 0 reads every frame)."""
        self.cards = [c for c in (align_card, thickness_tilt_card) if c is not None]
        self.align_iterations = align_iterations
        # a pattern stops iterating once a step moves it less than this (centre in radii, radius
        # ratio, rotation in degrees): the network's own step-to-step jitter
        self.align_tolerance = ALIGN_TOLERANCE if align_tolerance is None else tuple(align_tolerance)
        self.align = self._load(align_card, backend, threads)
        self.align_window = float(align_card.data["input"]["window_alpha"])
        if thickness_tilt_card is None:
            return
        self.thickness_tilt = self._load(thickness_tilt_card, backend, threads)
        self.analysis_window = float(thickness_tilt_card.data["input"]["window_alpha"])
        t = thickness_tilt_card.data["training"]
        self.thickness_bins = np.asarray(t["thickness_bins_nm"])
        self.tilt_bins = np.asarray(t["tilt_bins_mrad"])
        self.tilt_max = float(t["tilt_mrad"][1])
        self.min_field_alpha = float(t.get("min_field_alpha", MIN_FIELD_ALPHA) if min_field_alpha is None
                                     else min_field_alpha)
        # one step of the background head: measured on held-out simulations, the residual it
        # predicts is good to ~0.06 of the mean, so further steps wander (README, issue 3)
        self.background_iterations = background_iterations

    @staticmethod
    def _load(card: ModelCard, backend: str, threads: int | None):
        """The card's network behind ``backend``, checked against the card twice: the file's
        sha256 before loading, the card id and input contract in its metadata after (on every
        backend, TensorRT included).  TensorRT takes the default engine settings for this task
        unless `stemlive export engines` recorded others."""
        verify(card)
        b = load_backend(card.onnx_path, backend, threads=threads)
        verify(card, b.metadata())
        return b

    @classmethod
    def for_acquisition(cls, kv: float, alpha_mrad: float, models_dir: str | Path = SHIPPED_DIR,
                        backend: str = "auto", **kw) -> "PacbedAnalyzer":
        """The shipped (or ``models_dir``'s) networks for this kV and convergence angle, or a
        ValueError listing the models available."""
        cards = find_cards(models_dir)
        return cls(select(cards, ALIGN_TASK, kv, alpha_mrad), select(cards, THICKNESS_TILT_TASK, kv, alpha_mrad),
                   backend, **kw)

    # -- stages ------------------------------------------------------------------------------
    @staticmethod
    def _crops(patterns, states, which) -> tuple[np.ndarray, np.ndarray]:
        """Canonical crops of ``patterns[i]`` at ``states[i]`` for i in ``which`` and their real
        pixels: one interpolation call for a stack of equal frames with small disks, else one per
        pattern."""
        st = np.array([states[i] for i in which], float).reshape(-1, 4)
        if isinstance(patterns, np.ndarray) and np.all(st[:, 2] < 1.5 * canonical.ALPHA_PX):
            sel = patterns if len(which) == len(patterns) and np.array_equal(which, np.arange(len(patterns))) \
                else patterns[which]
            return canonical.to_canonical_batch_valid(sel, st[:, :2], st[:, 2], st[:, 3])
        pairs = [canonical_crop_valid(patterns[i], s[:2], s[2], s[3]) for i, s in zip(which, st)]
        return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])

    def _align(self, patterns, states: list[list[float]]) -> None:
        """Iterate the alignment network on every pattern's (row, col, radius, rotation)."""
        active = list(range(len(patterns)))
        for _ in range(self.align_iterations):
            if not active:
                break
            crops, valid = self._crops(patterns, states, active)
            out = self.align(canonical.normalise(crops, 0.0, self.align_window, valid)[:, None])
            still = []
            for k, i in enumerate(active):
                r, c, rad, rot = states[i]
                u = out["center_offset_px"][k].astype(float)
                d_raw = _rotate(u, -rot) * (rad / canonical.ALPHA_PX)
                ratio = float(np.exp(out["log_radius_ratio"][k, 0]))
                d_rot = math.degrees(math.atan2(out["rotation_4"][k, 1], out["rotation_4"][k, 0])) / 4
                states[i] = [r + d_raw[0], c + d_raw[1], rad * ratio, wrap45(rot + d_rot)]
                tol_c, tol_r, tol_rot = self.align_tolerance
                if np.hypot(*d_raw) > tol_c * rad or abs(ratio - 1) > tol_r or abs(d_rot) > tol_rot:
                    still.append(i)
            active = still

    def read_crops(self, crops: np.ndarray, valid: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """Thickness/tilt network outputs for aligned canonical crops (``valid``: their real
        pixels, default all), background converged."""
        b = np.zeros(len(crops), np.float32)
        for _ in range(self.background_iterations):
            out = self.thickness_tilt(canonical.normalise(crops, b, self.analysis_window, valid)[:, None])
            b = np.clip(b + out["background"][:, 0], 0, None)
        out = self.thickness_tilt(canonical.normalise(crops, b, self.analysis_window, valid)[:, None])
        out["background_units_of_mean"] = b
        return out

    def align_patterns(self, patterns) -> list[tuple[float, float, float, float] | str]:
        """(row, col, radius, rotation) per pattern, or the reason it cannot be aligned."""
        results: list = []
        good, arrays, states, _ = self._coarse(patterns, results)
        self._align(arrays, states)
        for i, s in zip(good, states):
            results[i] = tuple(s)
        return [r.error if isinstance(r, PacbedEstimate) else r for r in results]

    def _coarse(self, patterns, results: list):
        """Validate, scale and coarsely locate every pattern.

        Each pattern is divided by its largest |value| in float64 before it becomes float32, so
        the intensity scale of the input never matters (1e39 would overflow float32, 1e-40 would
        vanish in the networks' normalisation).  Returns (indices of the good ones, their scaled
        arrays (a stack when the input is one), their (row, col, radius, rotation) states, the
        scales that undo the division)."""
        if isinstance(patterns, np.ndarray) and patterns.ndim == 3 and len(patterns) \
                and min(patterns.shape[1:]) >= MIN_PATTERN_PX:
            return self._coarse_stack(patterns, results)
        good, arrays, states, scales = [], [], [], []
        for p in patterns:
            try:
                arr = validate_pattern(p)
                scale = intensity_scale(arr)
                arr = (arr / scale).astype(np.float32)
                d = _checked_disk(arr)
            except ValueError as exc:
                results.append(PacbedEstimate(error=str(exc)))
                continue
            good.append(len(results))
            arrays.append(arr)
            states.append([d.center_px[0], d.center_px[1], d.radius_px, 0.0])
            scales.append(scale)
            results.append(PacbedEstimate())
        return good, arrays, states, scales

    def _coarse_stack(self, patterns: np.ndarray, results: list):
        """:meth:`_coarse` for an (N, H, W) stack: vectorised scaling and disk finding; a frame the
        fast finder finds implausible goes to :func:`coarse_disk`, a bad frame keeps its place
        with its error and the others go on."""
        stack, scales, errors = scaled_stack(patterns)
        results.extend(PacbedEstimate(error=e) for e in errors)
        good = [i for i, e in enumerate(errors) if e is None]
        if not good:
            return [], stack[:0], [], []
        everything = len(good) == len(stack)
        centres, radii, ok = coarse_disks_fast(stack if everything else stack[good])
        keep, states = [], []
        for k, i in enumerate(good):
            if ok[k]:
                keep.append(i)
                states.append([*centres[k], radii[k], 0.0])
                continue
            try:
                d = _checked_disk(stack[i])
            except ValueError as exc:
                results[i] = PacbedEstimate(error=str(exc))
                continue
            keep.append(i)
            states.append([d.center_px[0], d.center_px[1], d.radius_px, 0.0])
        arrays = stack if len(keep) == len(stack) else stack[keep]  # no copy of a clean stack
        return keep, arrays, states, [float(scales[i]) for i in keep]

    # -- the whole analysis ------------------------------------------------------------------
    def analyze(self, patterns) -> list[PacbedEstimate]:
        """Analyse raw patterns (an (N, H, W) array or a list of 2D arrays of any size)."""
        results: list[PacbedEstimate] = []
        good, arrays, states, scales = self._coarse(patterns, results)
        if not good:
            return results
        coarse = [list(st) for st in states]  # a plain disk (vacuum) is better located by these
        self._align(arrays, states)
        crops, valid = self._crops(arrays, states, list(range(len(states))))
        means = canonical.window_means(crops, self.analysis_window, valid)  # the networks' unit
        out = self.read_crops(crops, valid)
        th, th_sig = estimate(out["thickness_prob"], self.thickness_bins)
        t0, s0 = estimate(out["tilt0_prob"], self.tilt_bins)
        t1, s1 = estimate(out["tilt1_prob"], self.tilt_bins)
        classes = top_classes(out["thickness_prob"], self.thickness_bins, k=2)
        raw = raw_flags(arrays, [c[:2] for c in coarse], [c[2] for c in coarse])
        for k, i in enumerate(good):
            r, c, rad, rot = states[k]
            tilt_c = np.array([t0[k], t1[k]])
            rm = canonical.rotation_matrix(-rot)  # crystal frame -> detector frame
            tilt_d = rm @ tilt_c
            cov = rm @ np.diag([s0[k] ** 2, s1[k] ** 2]) @ rm.T
            scale = (rad / canonical.ALPHA_PX) ** 2  # raw pixels per canonical pixel of the crops
            flags = self._flags(raw[k], out, k)
            if "vacuum" in flags:  # nothing for the alignment network to lock on to
                r, c, rad = coarse[k][:3]
            if field_alpha(arrays[k].shape, (r, c), rad) < self.min_field_alpha:
                results[i] = partial_field(r, c, rad, rot, flags)
                continue
            in_range = (self.thickness_bins[0] - 0.5 <= th[k] <= self.thickness_bins[-1] + 0.5
                        and np.all(np.abs(tilt_c) <= self.tilt_max) and not
                        ({"vacuum", "not-on-zone", "thickness-at-range-edge"} & set(flags)))
            results[i] = PacbedEstimate(
                center_px=(float(r), float(c)), radius_px=float(rad), rotation_deg=float(rot),
                thickness_nm=float(th[k]), thickness_sigma_nm=float(th_sig[k]),
                tilt_mrad=(float(tilt_d[0]), float(tilt_d[1])),
                tilt_sigma_mrad=(float(np.sqrt(cov[0, 0])), float(np.sqrt(cov[1, 1]))),
                tilt_crystal_mrad=(float(tilt_c[0]), float(tilt_c[1])),
                background=float(out["background_units_of_mean"][k] * means[k] / scale * scales[k]),
                in_range=bool(in_range), flags=flags, thickness_classes=classes[k])
        return results

    def _flags(self, raw: tuple[bool, bool], out: dict, k: int) -> list[str]:
        """Flag names of pattern ``k``: ``raw`` = (vacuum, saturated) from :func:`raw_flags`, the
        others from the thickness/tilt network's outputs."""
        vacuum, saturated = raw
        flags = ["vacuum"] if vacuum else []
        tp = out["thickness_prob"][k]
        if tp.argmax() in (0, len(tp) - 1):
            flags.append("thickness-at-range-edge")
        for ax in ("tilt0_prob", "tilt1_prob"):
            if out[ax][k].argmax() in (0, len(self.tilt_bins) - 1):
                flags.append("not-on-zone")
                break
        if tp.max() < LOW_CONFIDENCE:
            flags.append("low-confidence")
        if saturated:
            flags.append("saturated")
        return flags


def raw_flags(arrays, centers: np.ndarray, radii: np.ndarray) -> list[tuple[bool, bool]]:
    """(vacuum, saturated) per frame, read from the raw frame around its coarse disk: a stack of
    equal frames in one array operation, other inputs frame by frame."""
    centers, radii = np.asarray(centers, float).reshape(-1, 2), np.asarray(radii, float)
    if isinstance(arrays, np.ndarray) and arrays.ndim == 3:
        return _raw_flags(arrays, centers, radii)
    return [_raw_flags(a[None], centers[k:k + 1], radii[k:k + 1])[0] for k, a in enumerate(arrays)]


def _raw_flags(arr: np.ndarray, centers: np.ndarray, radii: np.ndarray) -> list[tuple[bool, bool]]:
    n, h, w = arr.shape
    yy, xx = np.arange(h)[None, :, None], np.arange(w)[None, None, :]
    rel = np.hypot(yy - centers[:, 0, None, None], xx - centers[:, 1, None, None]) / radii[:, None, None]
    arr = np.asarray(arr)

    def mean_where(mask):
        return (np.where(mask, arr, 0).sum(axis=(1, 2), dtype=np.float64), mask.sum(axis=(1, 2)))

    s_disk, n_disk = mean_where(rel < 0.9)
    s_far, n_far = mean_where(rel > 2.2)
    s_ring, n_ring = mean_where((rel > 1.1) & (rel < 1.6))
    with np.errstate(invalid="ignore", divide="ignore"):
        disk = s_disk / n_disk
        ring_mean = s_ring / n_ring
        far = np.where(n_far > 20, s_far / np.maximum(n_far, 1), np.percentile(arr.reshape(n, -1), 1, axis=1))
    ring = ring_mean - far
    vacuum = (disk > far) & (ring / (disk - far) < VACUUM_RING_FRACTION)
    peak = arr.reshape(n, -1).max(axis=1)
    saturated = (arr >= peak[:, None, None]).sum(axis=(1, 2)) > np.maximum(4, 0.2 * math.pi * radii ** 2)
    return [(bool(v), bool(t)) for v, t in zip(vacuum, saturated)]


def partial_field(r: float, c: float, rad: float, rot: float, flags: list[str]) -> PacbedEstimate:
    """The estimate of a frame that shows too little: geometry, no thickness or tilt (NaN)."""
    nan2 = (math.nan, math.nan)
    return PacbedEstimate(
        center_px=(float(r), float(c)), radius_px=float(rad), rotation_deg=float(rot), thickness_nm=math.nan,
        thickness_sigma_nm=math.nan, tilt_mrad=nan2, tilt_sigma_mrad=nan2, tilt_crystal_mrad=nan2,
        background=math.nan, in_range=False, flags=["partial-field"] + [f for f in flags if f in RAW_FLAGS])


# just outside the zero disk (1.1-1.6 α) a specimen's Bragg disks shine: SrTiO3 [001] at 1 nm puts
# 0.8-0.9 % of the disk's brightness there (200 kV, 13.6 and 19.1 mrad libraries); vacuum ~0
VACUUM_RING_FRACTION = 0.004
LOW_CONFIDENCE = 0.15  # most probable thickness bin below this: no bin stands out
# The shipped networks were trained on whole ±2.6 α windows; off-frame pixels are filled radially
# (canonical.normalise).  Measured on realistic recordings at 13.6 mrad (benchmarks/
# pacbed_accuracy.py --set recordings --by-field [--field 1.0 1.6], README): thickness within
# 2 nm 62-78 % and tilt within 0.5 mrad 92-100 % in every bin from ±1.4 to ±5 α; below, thickness
# 65, 53, 38, 38 % and tilt 85, 73, 61, 49 % in the 0.1 α bins from ±1.4 down to ±1.0 α.  A card
# may state its own (training.min_field_alpha).
MIN_FIELD_ALPHA = 1.4
# Alignment steps smaller than the network's own jitter change nothing measurable: on 256
# held-out 13.6 mrad patterns (benchmarks/pacbed_speed.py's set) consecutive steps 2 -> 3 still
# move the centre by 0.17 px median (0.5 px 90th percentile, radius ~7 px) and the radius by
# ~1 %, while centre, size, rotation, thickness and tilt scores are the same after 1, 2 or 3
# steps within the set's noise.  So a pattern whose step is below (10 % of the radius, 3 %,
# 1°) is done: 52 % of that set take the third step (all did with the earlier 2 %, 0.2 %, 0.1°),
# scores unchanged within ±1.5 points.
ALIGN_TOLERANCE = (0.05, 0.03, 1.0)
