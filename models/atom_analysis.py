"""`AtomFinder`: atomic columns in a HAADF or ABF image with a shipped atom network.

The network was trained on a range of column spacings (in pixels) and of samplings (Å per
pixel), both on its card.  An image outside that range is resampled (bilinear, a plain
coordinate map, so positions map back exactly) into it first: with the sampling given, the
card's sampling range decides; without it, the nearest-neighbour column spacing is read from
the image's autocorrelation, and an image with no evident lattice is refused rather than
guessed at.  Then: normalise as in training (ABF inverted), reflect-pad to the multiple the
network needs, run it (in overlapping tiles for large images), locate the columns (sub-pixel,
confidence, integrated intensity of the input image), drop the peaks that are not columns
(`column_filter`: contrast above the noise, separation, confidence floor) and map them back to
the input's pixel grid (pixel centres at integer indices, DESIGN.md).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from scipy import ndimage

from .atom_locator import Columns, integrate, locate
from .column_filter import SCREENS, Scales, screen_columns
from .backends import load_backend
from .cards import SHIPPED_DIR, ModelCard, latest_card, verify

CONTRASTS = ("haadf", "abf")
TILE = 512  # network tile edge for large images
TILE_OVERLAP = 32  # context each tile sees beyond the part of it that is kept
# columns closer than this in the image are resampled apart first: the network locates them
# about twice as precisely at 8 px than at 5 px (demo scan, 0.49 Å/px: 6.2 -> 3.2 pm RMSE)
PREFERRED_SPACING_PX = 8.0
MAX_ZOOM = 3.0
# the network runs on the resampled image: beyond this it needs GBs and minutes, and a sampling
# that asks for it is almost always a unit slip (nm or pm for Å)
MAX_WORK_PX = 8192 * 8192
MIN_WORK_SIDE = 8
# strongest spatial frequency (3×3 bins summed, in units of the white-noise floor) that shot noise
# alone reaches: ≤ 43 in 2·10⁴ noise images of 8²-512² px (Poisson 0.05-100 counts/px, Gaussian,
# with and without a ramp); held-out HAADF images score ≥ 80 at 10² e/Å².  ABF images that score
# below it (most at 10², some at 10³ e/Å²) get the network's F1 by chance: the same as on a copy
# of the image with its pixels shuffled (benchmarks/atom_accuracy.py images, 0.1-0.25 both ways)
NOISE_PEAK = 50.0
GAMMA9_MEDIAN = 8.669  # median of a sum of 9 unit exponentials: a white-noise 3×3 bin sum


def normalise(x: np.ndarray) -> np.ndarray:
    """Per image: zero mean, unit standard deviation (the networks' input contract, training and
    inference alike: contrast and background vary between microscopes)."""
    x = np.asarray(x, np.float32)
    m = x.mean(axis=(-2, -1), keepdims=True)
    s = x.std(axis=(-2, -1), keepdims=True)
    return (x - m) / np.maximum(s, 1e-6)


def network_input(image: np.ndarray, contrast: str) -> np.ndarray:
    """What the network sees: the image normalised, ABF inverted (columns bright in both)."""
    x = normalise(image)
    return -x if contrast == "abf" else x


class LatticeScaleUnknown(ValueError):
    """The image shows no lattice whose spacing could be measured, and no sampling was given."""


def atom_task(contrast: str) -> str:
    if contrast not in CONTRASTS:
        raise ValueError(f"contrast {contrast!r}: choose one of {', '.join(CONTRASTS)}")
    return f"atoms-{contrast}"


def atom_engine_settings(base=None):
    """TensorRT settings for the atom networks (``base``'s precision and workspace kept): whole
    images one at a time (up to 4 in a batch); any edge from :data:`MIN_WORK_SIDE` (the smallest
    image the finder runs) to 2·:data:`TILE`, tuned for :data:`TILE`, the edge large images are
    tiled at -- every input :meth:`AtomFinder.heatmap` makes lies inside this profile."""
    from .backends.tensorrt import EngineSettings

    return replace(base or EngineSettings(), min_batch=1, opt_batch=1, max_batch=4,
                   min_edge=MIN_WORK_SIDE, opt_edge=TILE, max_edge=2 * TILE)


def column_spacing_px(image: np.ndarray, smooth_px: float = 1.0, min_height: float = 0.2) -> float | None:
    """Nearest-neighbour column spacing [px] from the autocorrelation of the image, or None.

    The autocorrelation of a lattice image has a peak at every vector between columns; the
    nearest off-centre peak higher than ``min_height`` of the centre (after smoothing away shot
    noise, which only adds to the centre) is the spacing.  None: no such peak (no lattice).
    """
    x = ndimage.gaussian_filter(np.asarray(image, np.float64), smooth_px)
    x = x - x.mean()
    if not np.any(x):
        return None
    h, w = x.shape
    f = np.fft.rfft2(x, s=(2 * h, 2 * w))  # zero-padded: no wrap-around
    ac = np.fft.fftshift(np.fft.irfft2(np.abs(f) ** 2, s=(2 * h, 2 * w)))
    ac /= ac[h, w]
    rr, cc = np.indices(ac.shape)
    r = np.hypot(rr - h, cc - w)
    overlap = (h - np.abs(rr - h)) * (w - np.abs(cc - w)) / (h * w)  # unbiased: fewer pairs at long lags
    ac = np.where(overlap > 0.5, ac / np.maximum(overlap, 1e-9), 0.0)
    peaks = (ndimage.maximum_filter(ac, size=5) == ac) & (ac > min_height) & (r >= 2)
    if not peaks.any():
        return None
    return float(r[peaks].min())


def structure_score(image: np.ndarray) -> float:
    """How far the image's strongest spatial frequency stands above white noise.

    Shot noise is white: each frequency's power is exponential around one flat floor.  Columns,
    a lattice or any other structure put power into a few frequencies (and their neighbours:
    finite images leak), far above it.  Returns the largest sum of power over 3×3 neighbouring
    frequencies in units of the floor (estimated from the median of those sums, which holds up
    even for tiny or nearly empty images); pure noise stays below :data:`NOISE_PEAK`.  A fitted
    plane is removed first so uneven illumination does not count as structure.
    """
    x = np.asarray(image, np.float64)
    rr, cc = np.indices(x.shape, dtype=np.float64)
    a = np.column_stack([rr.ravel(), cc.ravel(), np.ones(x.size)])
    coef, *_ = np.linalg.lstsq(a, x.ravel(), rcond=None)
    x = x - (a @ coef).reshape(x.shape)
    p = np.abs(np.fft.fft2(x)) ** 2
    p[0, 0] = np.median(p)
    s3 = ndimage.uniform_filter(p, 3, mode="wrap") * 9
    floor = float(np.median(s3)) / GAMMA9_MEDIAN  # steadier than the median of p itself
    if floor <= 0:
        return float("inf") if s3.max() > 0 else 0.0
    return float(s3.max() / floor)


@dataclass
class FoundColumns(Columns):
    zoom: float = 1.0  # the image was resampled by this factor for the network
    spacing_px: float | None = None  # the measured column spacing, when it was measured
    note: str | None = None  # why no columns were looked for (e.g. the image is noise only)
    contrast_z: np.ndarray | None = None  # (n,) each column's contrast in noise units (column_filter)
    rejected: int = 0  # peaks of the network the column screen took for no column


class AtomFinder:
    """One atom network (HAADF or ABF) behind an inference backend."""

    def __init__(self, card: ModelCard, backend: str = "auto", threads: int | None = None, threshold: float = 0.3):
        self.card = card
        self.contrast = card.data.get("contrast", card.task.split("-", 1)[-1])
        inp = card.data["input"]
        self.multiple = int(inp["multiple_of"])
        self.sampling_range = tuple(float(v) for v in inp["sampling_A_per_px"])
        self.spacing_range = tuple(float(v) for v in inp["column_spacing_px"])
        self.threshold = float(card.data.get("threshold", threshold))
        self.screen = SCREENS.get(self.contrast)  # None: every peak above the threshold is a column
        verify(card)
        options = {"threads": threads}
        if backend in ("auto", "tensorrt"):
            options["settings"] = atom_engine_settings()
        self.backend = load_backend(card.onnx_path, backend, **options)
        verify(card, self.backend.metadata())  # every backend: the card id and contract in the file

    @classmethod
    def shipped(cls, contrast: str = "haadf", models_dir: str | Path = SHIPPED_DIR, **kw) -> "AtomFinder":
        """The atom network for ``contrast`` in ``models_dir``, or a clear error naming what is there."""
        return cls(latest_card(models_dir, atom_task(contrast), "`stemlive train atoms`"), **kw)

    # -- scale ---------------------------------------------------------------------------------
    def zoom_for(self, image: np.ndarray, sampling_A: float | None) -> tuple[float, float | None]:
        """The resampling factor that brings the image into the trained range (and closely
        spaced columns apart), and the column spacing [px] measured from the image (None if none)."""
        spacing = column_spacing_px(image)
        if sampling_A is not None:
            check_sampling(sampling_A)
            lo, hi = self.sampling_range
            zoom = sampling_A / float(np.clip(sampling_A, lo, hi))
            if spacing is not None and spacing * zoom < PREFERRED_SPACING_PX:
                zoom = min(PREFERRED_SPACING_PX / spacing, MAX_ZOOM, sampling_A / lo)
            self._check_work_size(image.shape, zoom, sampling_A)
            return zoom, spacing
        if spacing is None:
            raise LatticeScaleUnknown(
                "no lattice evident in the image's autocorrelation, so its scale cannot be estimated; "
                "give the sampling (--sampling-A-per-px)")
        lo, hi = self.spacing_range
        target = float(np.clip(spacing, max(lo, PREFERRED_SPACING_PX), hi))
        return min(target / spacing, MAX_ZOOM), spacing

    def _check_work_size(self, shape: tuple[int, int], zoom: float, sampling_A: float) -> None:
        """Refuse a sampling that would resample the image to an absurd size (a unit slip, most
        likely), naming the trained range and the size it would take."""
        lo, hi = self.sampling_range
        side = [(n - 1) * zoom + 1 for n in shape]
        if side[0] * side[1] <= MAX_WORK_PX and min(side) >= MIN_WORK_SIDE:
            return
        raise ValueError(
            f"sampling {sampling_A:g} Å/px is outside the network's trained range {lo:.2f}-{hi:.2f} Å/px: "
            f"the {shape[0]}×{shape[1]} image would be resampled ×{zoom:.3g} to {_px(side[0])}×{_px(side[1])} px "
            f"(allowed: {MIN_WORK_SIDE} px to {MAX_WORK_PX / 1e6:.0f} megapixels); is the sampling in Å per pixel?")

    # -- network ---------------------------------------------------------------------------------
    def heatmap(self, image: np.ndarray) -> np.ndarray:
        """The network's "column here" map for an image already at a trained scale."""
        x = network_input(image, self.contrast)
        h, w = x.shape
        if h <= TILE and w <= TILE:
            return self._run(x)
        out = np.zeros((h, w), np.float32)
        step = TILE - 2 * TILE_OVERLAP
        for r0 in range(0, h, step):
            for c0 in range(0, w, step):
                a0, b0 = max(0, r0 - TILE_OVERLAP), max(0, c0 - TILE_OVERLAP)
                a1, b1 = min(h, r0 + step + TILE_OVERLAP), min(w, c0 + step + TILE_OVERLAP)
                tile = self._run(x[a0:a1, b0:b1])
                r1, c1 = min(h, r0 + step), min(w, c0 + step)
                out[r0:r1, c0:c1] = tile[r0 - a0:r1 - a0, c0 - b0:c1 - b0]
        return out

    def _run(self, x: np.ndarray) -> np.ndarray:
        h, w = x.shape
        ph, pw = -h % self.multiple, -w % self.multiple
        pad = ((ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2))
        xp = np.pad(x, pad, mode="reflect" if min(h, w) > max(ph, pw) else "edge")
        y = self.backend(xp[None, None])["columns"][0, 0]
        return y[pad[0][0]:pad[0][0] + h, pad[1][0]:pad[1][0] + w]

    # -- the whole finder ----------------------------------------------------------------------
    def find(self, image: np.ndarray, sampling_A: float | None = None, *,
             require_structure: bool = False, screen: bool = True) -> FoundColumns:
        """Columns of a 2D image; positions in the input's pixels.

        ``require_structure``: return no columns (and a ``note``) when the image is
        indistinguishable from shot noise (:func:`structure_score`).  The network answers "column
        here" somewhere in any image, noise included, so for a whole image this is what a
        microscopist expects: no columns, not a lattice of guesses.  A block window of a
        low-dose scan is too small to tell its lattice from noise, so the live path leaves it off.

        ``screen``: drop the network's peaks that are not columns (`column_filter`: contrast
        above the noise, no two columns closer than 0.9 Å, the confidence floor); False gives
        every peak above the threshold, as the network alone finds them.
        """
        image = np.asarray(image)
        if image.ndim != 2:
            raise ValueError(f"expected one image (H×W), got shape {image.shape}")
        if image.dtype.kind not in "biuf":
            raise ValueError(f"image data of type {image.dtype} is not numeric")
        bad = int((~np.isfinite(image)).sum()) if image.dtype.kind == "f" else 0
        if bad:
            raise ValueError(f"the image has {bad} NaN or infinite pixels")
        if min(image.shape) < 8:
            raise ValueError(f"the image ({image.shape[0]}×{image.shape[1]}) is too small to find columns in")
        image = image.astype(np.float64)
        zoom, spacing = self.zoom_for(image, sampling_A)
        if require_structure and spacing is None:
            score = structure_score(image)
            if score < NOISE_PEAK:
                return FoundColumns(np.zeros((0, 2)), np.zeros(0), np.zeros(0), zoom=zoom, note=(
                    f"the image shows no structure above its noise (strongest spatial frequency {score:.0f}× "
                    f"the noise floor; shot noise alone stays below {NOISE_PEAK:.0f}): no columns to locate"))
        work = resample(image, zoom)
        heat = self.heatmap(work)
        min_distance = max(1, int(round(0.4 * self.spacing_range[0])))
        found = locate(heat, None, self.threshold, min_distance_px=min_distance)
        pos, conf = found.positions_px / zoom, found.confidence
        z, rejected = None, 0
        if screen and self.screen is not None and len(pos) and (sampling_A is not None or spacing is not None):
            rule = replace(self.screen, min_confidence=max(self.threshold, self.screen.min_confidence))
            scales = (Scales.from_sampling(sampling_A, rule) if sampling_A is not None
                      else Scales.from_spacing(spacing, rule))
            keep, z = screen_columns(network_input(image, self.contrast), pos, conf, scales, rule)
            pos, conf, z, rejected = pos[keep], conf[keep], z[keep], int((~keep).sum())
        return FoundColumns(pos, conf, integrate(image, pos, integration_radius(pos)), zoom=zoom, spacing_px=spacing,
                            contrast_z=z, rejected=rejected)


def _px(n: float) -> str:
    return f"{n:.0f}" if n < 1e7 else f"{n:.2g}"


def check_sampling(sampling_A: float) -> None:
    """A pixel size must be a finite positive number of Å."""
    if not (np.isfinite(sampling_A) and sampling_A > 0):
        raise ValueError(f"sampling must be a finite positive number of Å per pixel, got {sampling_A}")


def integration_radius(positions: np.ndarray) -> float:
    """A third of the median nearest-neighbour distance: a column's intensity without its neighbours'."""
    if len(positions) < 3:
        return 2.0
    from scipy.spatial import cKDTree

    nn = cKDTree(positions).query(positions, k=2)[0][:, 1]
    return max(1.0, float(np.median(nn)) / 3)


def resample(image: np.ndarray, zoom: float) -> np.ndarray:
    """Bilinear resampling by ``zoom``: output pixel i sits at input coordinate i / zoom."""
    if abs(zoom - 1.0) < 1e-6:
        return image
    shape = tuple(int(np.floor((n - 1) * zoom)) + 1 for n in image.shape)
    coords = np.indices(shape, dtype=np.float64) / zoom
    return ndimage.map_coordinates(image, coords, order=1, mode="nearest")
