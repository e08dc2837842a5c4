"""Column patches: the sub-image around every located column, the input of per-column analyses.

Species, point-defect anomaly and local-symmetry networks all look at one column with its
neighbours.  A patch is centred on the column's sub-pixel position (bilinear sampling, so the
column sits exactly at the patch centre), spans ``edge_px`` image pixels -- set from the
measured column spacing, e.g. two nearest-neighbour spacings, one SrTiO3 [001] cell when every
column (oxygen included) was found -- and is resampled to a fixed ``size`` so that images of
any sampling give the networks the same patch.  Pixels beyond the image (the scan edge) or not
yet measured (NaN in a live virtual image) are marked invalid in ``valid`` and filled with the
nearest measured value (zero if none is), so a network sees no artificial step and a caller
knows which patches to trust.

Works on one image (H, W) or on a stack of co-registered images (C, H, W), e.g. the virtual
HAADF and ABF images of one scan: patches come out (n, C, size, size).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree

DEFAULT_SIZE = 24  # patch pixels per side
DEFAULT_SPACINGS = 2.0  # patch edge in nearest-neighbour column spacings


@dataclass
class ColumnPatches:
    patches: np.ndarray  # (n, C, size, size) float32
    valid: np.ndarray  # (n, size, size) bool: inside the image and measured
    centres_px: np.ndarray  # (n, 2) the columns' positions in the image (row, col)
    edge_px: float  # the patch edge in image pixels
    size: int

    def __len__(self) -> int:
        return len(self.patches)

    @property
    def complete(self) -> np.ndarray:
        """(n,) bool: patches whose every pixel was measured."""
        return self.valid.all(axis=(1, 2))

    @property
    def image_px_per_patch_px(self) -> float:
        return self.edge_px / self.size


def column_spacing(positions_px: np.ndarray) -> float:
    """Median nearest-neighbour distance between the columns [px]: the scale of the lattice."""
    pos = np.asarray(positions_px, np.float64).reshape(-1, 2)
    if len(pos) < 2:
        raise ValueError(f"the column spacing needs at least 2 columns, got {len(pos)}; give edge_px instead")
    return float(np.median(cKDTree(pos).query(pos, k=2)[0][:, 1]))


def patch_edge_px(edge_A: float, spacings: float, positions_px: np.ndarray, sampling_A: float | None) -> float:
    """A patch's edge in pixels: ``edge_A`` at a known sampling, else ``spacings`` column spacings
    measured from the positions (a model's card says both, so its patches cover the same crystal)."""
    if sampling_A is not None:
        if not (np.isfinite(sampling_A) and sampling_A > 0):
            raise ValueError(f"sampling must be a finite positive number of Å per pixel, got {sampling_A}")
        return edge_A / sampling_A
    return spacings * column_spacing(positions_px)


def patch_offsets(edge_px: float, size: int) -> np.ndarray:
    """(size, size, 2) offsets [image px] of the patch pixels from its centre: pixel centres of
    an edge_px-wide square split into size × size, symmetric about the column."""
    step = edge_px / size
    o = (np.arange(size) - (size - 1) / 2) * step
    return np.stack(np.meshgrid(o, o, indexing="ij"), axis=-1)


def extract_patches(image: np.ndarray, positions_px: np.ndarray, edge_px: float | None = None,
                    size: int = DEFAULT_SIZE, spacings: float = DEFAULT_SPACINGS,
                    prefilter: bool = False) -> ColumnPatches:
    """Patches around ``positions_px`` (row, col; pixel centres at integer indices) of ``image``.

    ``edge_px``: the patch edge in image pixels; None: ``spacings`` × the columns' median
    nearest-neighbour distance (:func:`column_spacing`).  ``prefilter``: when a patch pixel
    spans more than one image pixel, smooth the image first (Gaussian, σ = 0.4 patch pixel) so a
    patch pixel averages the image pixels it covers -- bilinear sampling alone would use one or
    two of them and waste the rest of the dose."""
    img = np.asarray(image)
    if img.ndim not in (2, 3):
        raise ValueError(f"expected an image (H×W) or a stack of co-registered images (C×H×W), got shape {img.shape}")
    if img.dtype.kind not in "biuf":
        raise ValueError(f"image data of type {img.dtype} is not numeric")
    stack = img[None] if img.ndim == 2 else img
    if min(stack.shape[1:]) < 2:
        raise ValueError(f"the image ({stack.shape[1]}×{stack.shape[2]}) is too small for patches")
    pos = np.asarray(positions_px, np.float64)
    if pos.ndim != 2 or pos.shape[1] != 2:
        raise ValueError(f"positions must be (n, 2) rows and columns, got shape {pos.shape}")
    if not np.isfinite(pos).all():
        raise ValueError("positions hold NaN or infinite values")
    if not (isinstance(size, (int, np.integer)) and size >= 2):
        raise ValueError(f"patch size must be an integer ≥ 2 pixels, got {size!r}")
    if edge_px is None:
        edge_px = spacings * column_spacing(pos)
    if not (np.isfinite(edge_px) and edge_px > 0):
        raise ValueError(f"the patch edge must be a positive number of pixels, got {edge_px}")
    h, w = stack.shape[1:]
    coords = pos[:, None, None, :] + patch_offsets(edge_px, size)[None]  # (n, size, size, 2)
    measured = np.isfinite(stack).all(axis=0)
    inside = ((coords[..., 0] >= -0.5) & (coords[..., 0] <= h - 0.5) &
              (coords[..., 1] >= -0.5) & (coords[..., 1] <= w - 0.5))
    # a patch pixel is valid where it lies in the image and its nearest pixel was measured
    near = np.clip(np.rint(coords), 0, [h - 1, w - 1]).astype(int)
    valid = inside & measured[near[..., 0], near[..., 1]]
    flat = coords.reshape(-1, 2).T
    out = np.empty((len(pos), len(stack), size, size), np.float32)
    step = edge_px / size
    for c, chan in enumerate(stack.astype(np.float64)):
        filled = _fill_unmeasured(chan, measured)
        if prefilter and step > 1:
            filled = ndimage.gaussian_filter(filled, 0.4 * step, mode="nearest")
        out[:, c] = ndimage.map_coordinates(filled, flat, order=1, mode="nearest").reshape(len(pos), size, size)
    return ColumnPatches(out, valid, pos.copy(), float(edge_px), int(size))


def _fill_unmeasured(chan: np.ndarray, measured: np.ndarray) -> np.ndarray:
    """NaN pixels take the value of the nearest measured one (zero where none is measured)."""
    if measured.all():
        return chan
    if not measured.any():
        return np.zeros_like(chan)
    idx = ndimage.distance_transform_edt(~measured, return_distances=False, return_indices=True)
    return chan[tuple(idx)]
