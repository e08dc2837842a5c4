"""`AtomFinder`: atomic columns in a HAADF or ABF image with a shipped atom network.

The network was trained on a range of column spacings (in pixels) and of samplings (Å per
pixel), both on its card.  An image outside that range is resampled (bilinear, a plain
coordinate map, so positions map back exactly) into it first: with the sampling given, the
card's sampling range decides; without it, the nearest-neighbour column spacing is read from
the image's autocorrelation, and an image with no evident lattice is refused rather than
guessed at.  Then: normalise as in training (ABF inverted), reflect-pad to the multiple the
network needs, run it (in overlapping tiles for large images), locate the columns (sub-pixel,
confidence, integrated intensity of the input image) and map them back to the input's pixel
grid (pixel centres at integer indices, DESIGN.md).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from scipy import ndimage

from .atom_locator import Columns, integrate, locate
from .backends import load_backend
from .cards import SHIPPED_DIR, ModelCard, find_cards, verify

CONTRASTS = ("haadf", "abf")
TILE = 512  # network tile edge for large images
TILE_OVERLAP = 32  # context each tile sees beyond the part of it that is kept
# columns closer than this in the image are resampled apart first: the network locates them
# about twice as precisely at 8 px than at 5 px (demo scan, 0.49 Å/px: 6.2 -> 3.2 pm RMSE)
PREFERRED_SPACING_PX = 8.0
MAX_ZOOM = 3.0


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
    """TensorRT settings for the atom networks: free image size, small batches (whole images)."""
    from .backends.tensorrt import EngineSettings

    return replace(base or EngineSettings(), min_batch=1, opt_batch=1, max_batch=4)


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


@dataclass
class FoundColumns(Columns):
    zoom: float = 1.0  # the image was resampled by this factor for the network
    spacing_px: float | None = None  # the measured column spacing, when it was measured


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
        verify(card)
        options = {"threads": threads}
        if backend in ("auto", "tensorrt"):
            options["settings"] = atom_engine_settings()
        self.backend = load_backend(card.onnx_path, backend, **options)
        if hasattr(self.backend, "metadata"):
            verify(card, self.backend.metadata())

    @classmethod
    def shipped(cls, contrast: str = "haadf", models_dir: str | Path = SHIPPED_DIR, **kw) -> "AtomFinder":
        """The atom network for ``contrast`` in ``models_dir``, or a clear error naming what is there."""
        task = atom_task(contrast)
        cards = find_cards(models_dir, task)
        if not cards:
            have = sorted({c.task for c in find_cards(models_dir)})
            raise FileNotFoundError(f"no {task} model in {models_dir} (it holds: {', '.join(have) or 'nothing'}); "
                                    f"train one with `stemlive train atoms`")
        return cls(cards[-1], **kw)

    # -- scale ---------------------------------------------------------------------------------
    def zoom_for(self, image: np.ndarray, sampling_A: float | None) -> tuple[float, float | None]:
        """The resampling factor that brings the image into the trained range (and closely
        spaced columns apart), and the column spacing [px] measured from the image (None if none)."""
        spacing = column_spacing_px(image)
        if sampling_A is not None:
            if not sampling_A > 0:
                raise ValueError(f"sampling must be positive, got {sampling_A} Å/px")
            lo, hi = self.sampling_range
            zoom = sampling_A / float(np.clip(sampling_A, lo, hi))
            if spacing is not None and spacing * zoom < PREFERRED_SPACING_PX:
                zoom = min(PREFERRED_SPACING_PX / spacing, MAX_ZOOM, sampling_A / lo)
            return zoom, spacing
        if spacing is None:
            raise LatticeScaleUnknown(
                "no lattice evident in the image's autocorrelation, so its scale cannot be estimated; "
                "give the sampling (--sampling-A-per-px)")
        lo, hi = self.spacing_range
        target = float(np.clip(spacing, max(lo, PREFERRED_SPACING_PX), hi))
        return min(target / spacing, MAX_ZOOM), spacing

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
    def find(self, image: np.ndarray, sampling_A: float | None = None) -> FoundColumns:
        """Columns of a 2D image; positions in the input's pixels."""
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
        work = resample(image, zoom)
        heat = self.heatmap(work)
        min_distance = max(1, int(round(0.4 * self.spacing_range[0])))
        found = locate(heat, None, self.threshold, min_distance_px=min_distance)
        pos = found.positions_px / zoom
        return FoundColumns(pos, found.confidence, integrate(image, pos, integration_radius(pos)), zoom=zoom, spacing_px=spacing)


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
