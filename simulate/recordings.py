"""Realistic PACBED recordings with their truth: held-out simulations through an experiment model.

The benchmark set of issue 13 ("Benchmark"): every pattern comes from the held-out simulations of
a library (tilt orbits, hence phonon seeds, that training never saw; the split of
:class:`~stemlive.simulate.pacbed_data.PacbedSampler` with the training's fraction and seed),
at a continuous thickness (linear between the two neighbouring library thicknesses, 0.98 nm
apart) and a held-out tilt with random mirror signs, then recorded as a microscope records it:

    frame 64-1024 px (square or not)  ·  field ±1.4-5 α from the disk centre to the nearest
    frame edge  ·  disk centre anywhere in the central 60 % of the frame  ·  any rotation  ·
    radius in px wherever the field puts it (≥ 5 px; far beyond a ±20 % calibration error)  ·
    inelastic background: a blurred copy (σ 1-5 mrad), 0-30 % scaled with thickness  ·  PSF σ
    0-0.1 α  ·  uniform background 0-20 % of the mean inside ±2.6 α  ·  Poisson at 1e6-1e9
    electrons per pattern  ·  gain 0.5-5 counts/e, dark offset 0-10 % of that mean, read
    noise  ·  exported as float32 (35 %), 16-bit (35 %, scaled into range when it would
    overflow) or 8-bit (30 %, gamma 0.5-1, top 0-30 % clipped)  ·  8 % with a saturated
    zero disk (clipped at 40-90 % of its peak).

Libraries hold ±3 α; beyond the inscribed circle the pattern continues as its own azimuthal
mean, decaying with the power law of its outer rings (a featureless tail: what the networks read,
±2.6 α, is all simulated).  Blurs act on that physical pattern, so frame edges are not dark rims.

Truth follows simulate/heldout_patterns.py and DESIGN.md: ``center_px`` (row, col) and
``radius_px`` in the frame's pixels, ``rotation_deg`` (the pixel at offset d from the centre shows
the crystal-aligned pattern at R(θ)·d), ``tilt_crystal_mrad`` (the library tilt with its mirror
signs) and ``tilt_mrad`` = R(−θ)·tilt_crystal in the detector frame.  Deterministic from ``seed``.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
from scipy import ndimage

from ..models import canonical
from .library import PacbedLibrary

FRAME_PX = (64, 1024)
FIELD_ALPHA = (1.4, 5.0)
CENTRAL = 0.6  # the disk centre lies in the central 60 % of each axis
MIN_RADIUS_PX = 5.0  # a smaller disk is no PACBED recording (the demo's 4.5 px was the complaint)
SQUARE_FRACTION = 0.5
ASPECT = (0.5, 2.0)
PSF_ALPHA = 0.1
INELASTIC_FRACTION = 0.3  # at the library's largest thickness
INELASTIC_SIGMA_MRAD = (1.0, 5.0)
UNIFORM_BACKGROUND = 0.2
OFFSET = 0.1
READ_NOISE_COUNTS = 1.0
GAIN = (0.5, 5.0)
DOSE = (1e6, 1e9)
EXPORTS = (("float32", 0.35), ("uint16", 0.35), ("uint8", 0.30))
GAMMA = (0.5, 1.0)
CLIP_TOP = 0.3  # 8-bit exports clip up to the top 30 % of the range
SATURATED_FRACTION = 0.08
SATURATION_LEVEL = (0.4, 0.9)
WINDOW_ALPHA = canonical.ANALYSIS_WINDOW_ALPHA


@dataclass(frozen=True)
class Experiment:
    """How one recording was made (everything but the specimen)."""

    shape: tuple[int, int]
    center_px: tuple[float, float]
    radius_px: float
    rotation_deg: float
    psf_alpha: float
    inelastic_share: float  # before thickness scaling: fraction at the largest library thickness
    inelastic_sigma_mrad: float
    uniform_background: float  # in units of the mean elastic+inelastic intensity inside ±2.6 α
    offset: float  # dark offset, same units
    gain: float
    dose: float  # electrons in the incident probe
    export: str  # float32 | uint16 | uint8
    gamma: float  # uint8 only (1 otherwise)
    clip_top: float  # uint8: the display range ends this fraction below the peak
    saturation: float  # 0, or the zero disk clipped at this fraction of its peak

    @property
    def field_alpha(self) -> float:
        """±α shown along the shortest direction from the disk centre to the frame's edge pixels."""
        (r, c), (h, w) = self.center_px, self.shape
        return min(r, h - 1 - r, c, w - 1 - c) / self.radius_px


def _frame_and_centre(rng: np.random.Generator, field: float) -> tuple[tuple[int, int], tuple[float, float], float]:
    """A frame shape and disk centre at which ``field`` α to the nearest edge gives a disk of at
    least MIN_RADIUS_PX (redrawn until it does; the field keeps its distribution)."""
    lo, hi = np.log(FRAME_PX[0]), np.log(FRAME_PX[1])
    half = CENTRAL / 2
    while True:
        h = int(round(np.exp(rng.uniform(lo, hi))))
        aspect = 1.0 if rng.random() < SQUARE_FRACTION else float(np.exp(rng.uniform(*np.log(ASPECT))))
        w = int(np.clip(round(h * aspect), *FRAME_PX))
        r = (h - 1) * rng.uniform(0.5 - half, 0.5 + half)
        c = (w - 1) * rng.uniform(0.5 - half, 0.5 + half)
        radius = min(r, h - 1 - r, c, w - 1 - c) / field
        if radius >= MIN_RADIUS_PX:
            return (h, w), (float(r), float(c)), float(radius)


def draw_experiment(rng: np.random.Generator, field_alpha: tuple[float, float] = FIELD_ALPHA) -> Experiment:
    """One recording's geometry, detector and export, drawn from the ranges above (``field_alpha``
    other than the default: e.g. to measure where the analysis stops reading)."""
    field = rng.uniform(*field_alpha)
    shape, centre, radius = _frame_and_centre(rng, field)
    kinds, probs = zip(*EXPORTS)
    export = str(rng.choice(kinds, p=probs))
    return Experiment(
        shape=shape, center_px=centre, radius_px=radius, rotation_deg=float(45 - rng.uniform(0, 90)),
        psf_alpha=rng.uniform(0, PSF_ALPHA), inelastic_share=rng.uniform(0, INELASTIC_FRACTION),
        inelastic_sigma_mrad=rng.uniform(*INELASTIC_SIGMA_MRAD), uniform_background=rng.uniform(0, UNIFORM_BACKGROUND),
        offset=rng.uniform(0, OFFSET), gain=float(np.exp(rng.uniform(*np.log(GAIN)))),
        dose=float(np.exp(rng.uniform(*np.log(DOSE)))), export=export,
        gamma=rng.uniform(*GAMMA) if export == "uint8" else 1.0,
        clip_top=rng.uniform(0, CLIP_TOP) if export == "uint8" else 0.0,
        saturation=rng.uniform(*SATURATION_LEVEL) if rng.random() < SATURATED_FRACTION else 0.0)


# -- the physical pattern ---------------------------------------------------------------------------
def _extended(pattern: np.ndarray, half: int) -> np.ndarray:
    """The library pattern on a (2·half+1)² canvas centred on its centre pixel: inside its
    inscribed circle the simulation, beyond it the azimuthal mean decaying as the outer rings do."""
    k = pattern.shape[0]
    if pattern.shape != (k, k) or k % 2 == 0:
        raise ValueError(f"library patterns must be square with an odd side (zero beam on the centre pixel), "
                         f"got {pattern.shape}")
    c = k // 2
    half = max(half, c)
    yy, xx = np.indices((k, k)) - c
    rho = np.hypot(yy, xx)
    r1, r2, r3 = 0.7 * c, 0.85 * c, c - 0.5
    m1 = float(pattern[(rho >= r1) & (rho < r2)].mean())
    m2 = float(pattern[(rho >= r2) & (rho < r3)].mean())
    mid1, mid2 = 0.5 * (r1 + r2), 0.5 * (r2 + r3)
    power = float(np.clip(np.log(max(m1, 1e-30) / max(m2, 1e-30)) / np.log(mid2 / mid1), 1.0, 8.0))
    n = 2 * half + 1
    yy, xx = np.indices((n, n)) - half
    rho = np.hypot(yy, xx)
    tail = max(m2, 0.0) * (np.maximum(rho, 1.0) / mid2) ** -power
    weight = np.clip((r3 - rho) / 3.0, 0.0, 1.0)  # the simulation fades into the tail over 3 px
    canvas = np.zeros((n, n))
    canvas[half - c:half + c + 1, half - c:half + c + 1] = pattern
    return weight * canvas + (1 - weight) * tail


def _reach_alpha(shape: tuple[int, int], center: tuple[float, float], radius_px: float) -> float:
    """The farthest frame corner from the disk centre, in α."""
    corners = [(y, x) for y in (0, shape[0] - 1) for x in (0, shape[1] - 1)]
    return max(math.hypot(y - center[0], x - center[1]) for y, x in corners) / radius_px


def to_detector(canvas: np.ndarray, alpha_px: float, shape: tuple[int, int], center: tuple[float, float],
                radius_px: float, rotation_deg: float) -> np.ndarray:
    """A crystal-aligned pattern (per library pixel, centred on the canvas's centre pixel) as the
    detector sees it: per detector pixel, the pixel at offset d from ``center`` showing the
    canvas at R(θ)·d (DESIGN.md), α at ``radius_px``.  Coarser detector pixels average (a
    Gaussian over their footprint) rather than alias."""
    zoom = radius_px / alpha_px  # detector px per library px
    src = np.asarray(canvas, np.float64)
    if zoom < 1:
        src = ndimage.gaussian_filter(src, 0.42 / zoom, mode="constant")
    h = (src.shape[0] - 1) / 2
    t = math.radians(rotation_deg)
    dy = (np.arange(shape[0], dtype=float) - center[0])[:, None]
    dx = (np.arange(shape[1], dtype=float) - center[1])[None, :]
    sy = h + (math.cos(t) * dy - math.sin(t) * dx) / zoom
    sx = h + (math.sin(t) * dy + math.cos(t) * dx) / zoom
    return ndimage.map_coordinates(src, [sy, sx], order=1, mode="constant") / zoom**2


def _window_mean(canvas: np.ndarray, alpha_px: float) -> float:
    """Mean canvas intensity inside ±2.6 α (the unit the analysis normalises by), per library px."""
    h = canvas.shape[0] // 2
    yy, xx = np.indices(canvas.shape) - h
    return float(canvas[np.hypot(yy, xx) <= WINDOW_ALPHA * alpha_px].mean())


def physical_pattern(pattern: np.ndarray, alpha_px: float, exp: Experiment, thickness_fraction: float,
                     alpha_mrad: float) -> np.ndarray:
    """The pattern reaching the detector, in fractions of the probe per library pixel, on a
    canvas large enough for the whole frame: elastic + inelastic blurred copy (its share scaled by
    ``thickness_fraction``, the thickness over the library's largest), then the PSF."""
    blur_alpha = exp.inelastic_sigma_mrad / alpha_mrad
    reach = _reach_alpha(exp.shape, exp.center_px, exp.radius_px) + 3 * max(blur_alpha, exp.psf_alpha) + 0.2
    canvas = _extended(pattern, int(math.ceil(reach * alpha_px)) + 2)
    f = exp.inelastic_share * thickness_fraction
    if f > 0:
        canvas = (1 - f) * canvas + f * ndimage.gaussian_filter(canvas, blur_alpha * alpha_px, mode="constant")
    if exp.psf_alpha * alpha_px > 0.05:
        canvas = ndimage.gaussian_filter(canvas, exp.psf_alpha * alpha_px, mode="constant")
    return canvas


def record(pattern: np.ndarray, alpha_px: float, exp: Experiment, rng: np.random.Generator,
           thickness_fraction: float = 1.0, alpha_mrad: float = 13.6) -> tuple[np.ndarray, float]:
    """(the exported frame, the uniform part of it in units of its mean inside ±2.6 α (NaN for
    8-bit gamma exports, where no uniform part survives)) of one crystal-aligned library pattern
    (fraction of the probe per pixel, zero beam on the centre pixel)."""
    canvas = physical_pattern(pattern, alpha_px, exp, thickness_fraction, alpha_mrad)
    zoom = exp.radius_px / alpha_px
    mean_e = exp.dose * _window_mean(canvas, alpha_px) / zoom**2  # electrons per detector px in the window
    electrons = exp.dose * to_detector(canvas, alpha_px, exp.shape, exp.center_px, exp.radius_px, exp.rotation_deg)
    electrons = rng.poisson(np.clip(electrons, 0, None) + exp.uniform_background * mean_e).astype(np.float64)
    offset = exp.offset * exp.gain * mean_e
    raw = exp.gain * electrons + offset + rng.normal(0, READ_NOISE_COUNTS, exp.shape)
    uniform = (exp.uniform_background * exp.gain * mean_e + offset) / (exp.gain * mean_e * (1 + exp.uniform_background) + offset)
    if exp.saturation:
        raw = np.minimum(raw, exp.saturation * raw.max())
    return export(raw, exp, rng, offset), (float("nan") if exp.export == "uint8" else float(uniform))


def export(raw: np.ndarray, exp: Experiment, rng: np.random.Generator, offset: float) -> np.ndarray:
    """The recorded counts as the file holds them."""
    if exp.export == "float32":
        return raw.astype(np.float32)
    if exp.export == "uint16":
        peak = float(raw.max())
        scale = 65535 * rng.uniform(0.25, 1.0) / peak if peak > 65535 else 1.0  # a summed stack scaled to fit
        return np.round(np.clip(raw * scale, 0, 65535)).astype(np.uint16)
    lo = rng.uniform(0, 1) * offset
    hi = lo + (float(raw.max()) - lo) * (1 - exp.clip_top)
    shown = np.clip((raw - lo) / max(hi - lo, 1e-12), 0, 1) ** exp.gamma
    return np.round(255 * shown).astype(np.uint8)


# -- the held-out set ---------------------------------------------------------------------------
class HeldoutSource:
    """Noise-free held-out patterns of a library at continuous thickness (the networks' split)."""

    def __init__(self, library: str | Path | PacbedLibrary, holdout_fraction: float = 0.1, sampler_seed: int = 0):
        from .pacbed_data import PacbedSampler  # torch: only the split is taken from it

        lib = library if isinstance(library, PacbedLibrary) else PacbedLibrary.load(library)
        sampler = PacbedSampler(lib, holdout_fraction, seed=sampler_seed)
        self.patterns = sampler.patterns.numpy()  # (n0, n1, nt, K, K), first quadrant
        self.tilts = [(float(sampler.v0[i]), float(sampler.v1[j]), i, j) for i, j in sampler.heldout]
        self.thickness = np.asarray(lib.thickness_nm, float)
        self.alpha_px = lib.alpha_mrad / lib.mrad_per_px
        self.alpha_mrad = lib.alpha_mrad

    def draw(self, rng: np.random.Generator) -> tuple[np.ndarray, float, np.ndarray]:
        """(pattern, thickness nm, crystal-frame tilt (mirror signs applied))."""
        t0, t1, i, j = self.tilts[int(rng.integers(len(self.tilts)))]
        th = rng.uniform(self.thickness[0], self.thickness[-1])
        k = int(np.clip(np.searchsorted(self.thickness, th, side="right") - 1, 0, len(self.thickness) - 2))
        w = (th - self.thickness[k]) / (self.thickness[k + 1] - self.thickness[k])
        p = (1 - w) * self.patterns[i, j, k] + w * self.patterns[i, j, k + 1]
        s0, s1 = (-1 if rng.random() < 0.5 else 1), (-1 if rng.random() < 0.5 else 1)
        return canonical.mirror(p, s0, s1), float(th), np.array([s0 * t0, s1 * t1])


def iter_recordings(library: str | Path | PacbedLibrary | HeldoutSource, n: int, seed: int = 0,
                    field_alpha: tuple[float, float] = FIELD_ALPHA, **kw) -> Iterator[tuple[np.ndarray, dict]]:
    """(frame, truth of that frame) for ``n`` recordings, one at a time (frames reach 1024²);
    ``kw`` go to :class:`HeldoutSource`."""
    src = library if isinstance(library, HeldoutSource) else HeldoutSource(library, **kw)
    for i in range(n):
        rng = np.random.default_rng([seed, i])  # recording i does not depend on n
        pattern, th, tilt_c = src.draw(rng)
        exp = draw_experiment(rng, field_alpha)
        frame, uniform = record(pattern, src.alpha_px, exp, rng, th / src.thickness[-1], src.alpha_mrad)
        tilt_d = canonical.rotation_matrix(-exp.rotation_deg) @ tilt_c
        truth = {"center_px": np.array(exp.center_px), "radius_px": exp.radius_px, "rotation_deg": exp.rotation_deg,
                 "thickness_nm": th, "tilt_mrad": tilt_d, "tilt_crystal_mrad": tilt_c,
                 "background_units_of_mean": uniform, "field_alpha": exp.field_alpha,
                 **{k: v for k, v in asdict(exp).items() if k not in ("center_px", "radius_px", "rotation_deg")}}
        yield frame, truth


def stack_truth(rows: list[dict]) -> dict[str, np.ndarray]:
    """Per-recording truth dicts as arrays, one per key (heldout_patterns.py's keys and more)."""
    return {k: np.array([r[k] for r in rows]) for k in rows[0]} if rows else {}


def realistic_recordings(library: str | Path | PacbedLibrary | HeldoutSource, n: int, seed: int = 0, max_bytes: int = 2 << 30,
                         **kw) -> tuple[list[np.ndarray], dict[str, np.ndarray]]:
    """(frames, truth) for ``n`` recordings held in memory; refuses to hold more than ``max_bytes``
    (use :func:`iter_recordings` for larger sets)."""
    frames, rows, total = [], [], 0
    for frame, truth in iter_recordings(library, n, seed, **kw):
        total += frame.nbytes
        if total > max_bytes:
            raise MemoryError(f"{n} recordings need more than {max_bytes / 2**30:.1f} GiB; iterate with iter_recordings")
        frames.append(frame)
        rows.append(truth)
    return frames, stack_truth(rows)
