"""Compiled per-tile kernels of the UDFs (numba, a LiberTEM dependency).

Why compiled: a frame tile arrives in its native type (e.g. uint16, ``(frames, pixels)``) and
each UDF must touch every pixel once.  numpy needs a float32 copy of the tile, a reshape-sum per
run of frames and, for the radial profiles, a transposed copy; these kernels read the tile once.

* `add_block_sums`: frame i added to block ``slot[i]`` of a (blocks, pixels) float32 buffer --
  one pass, no float copy of the tile (measured 64² px: 0.3 µs/frame; numpy's reshaped runs
  ~1 µs/frame plus the cast).
* `transpose_f32`: frames (n, pixels) -> float32 (pixels, n) in strips of 16 pixels, the layout in which
  the sparse bin matrix's product vectorises over frames (`radial_profiles`).
"""
from __future__ import annotations

import numba
import numpy as np
import scipy.sparse as sp


@numba.njit(nogil=True, cache=True)
def _add_block_sums(tile, slot, out):
    n, npix = tile.shape
    for i in range(n):
        b = slot[i]
        if b < 0:
            continue
        row = out[b]
        for p in range(npix):
            row[p] += np.float32(tile[i, p])


def add_block_sums(tile: np.ndarray, slot: np.ndarray, out: np.ndarray) -> None:
    """``out[slot[i]] += tile[i]`` in float32 for each frame i (``slot`` < 0: skipped).

    ``tile`` (n, pixels) of any real dtype, ``out`` (blocks, pixels) float32 C-contiguous.
    float32 holds integer counts exactly up to 2**24 per pixel and cannot overflow.
    """
    _add_block_sums(np.ascontiguousarray(tile), np.asarray(slot, np.int64), out)


@numba.njit(nogil=True, cache=True)
def _transpose_f32(tile, out):
    n, npix = tile.shape
    for p0 in range(0, npix, 16):  # strips of 16 pixels down all frames (measured best of 4-32)
        p1 = min(npix, p0 + 16)
        for f in range(n):
            for p in range(p0, p1):
                out[p, f] = np.float32(tile[f, p])


def transpose_f32(tile: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """float32 (pixels, n) copy of frames (n, pixels), in strips so both sides stay in cache
    (64² px: 2 µs/frame; numpy's transposing copy 13 µs/frame)."""
    tile = np.ascontiguousarray(tile)
    if out is None:
        out = np.empty(tile.shape[::-1], np.float32)
    _transpose_f32(tile, out)
    return out


def chunk_frames(n_pixels: int, budget_bytes: int = 1 << 22) -> int:
    """Frames per transposed chunk: a float32 (pixels, chunk) block of about ``budget_bytes`` (4 MB
    measured best of 0.5-8 MB at 128² and 256² px: fewer, longer rows for the sparse product)."""
    return int(np.clip(budget_bytes // (4 * max(1, n_pixels)), 4, 256))


def radial_profiles(flat: np.ndarray, matrix_t: sp.csr_matrix, out: np.ndarray) -> None:
    """``out += flat @ matrix_t.T`` for frames ``flat`` (n, pixels), any real dtype.

    ``matrix_t`` is the (columns, pixels) CSR transpose of a bin matrix; the product runs on
    float32 chunks of frames transposed to (pixels, chunk), where scipy's CSR kernel adds whole
    rows of frames at once (vectorised over frames) instead of scattering pixel by pixel.
    """
    n = len(flat)
    chunk = chunk_frames(flat.shape[1])
    buf = np.empty((flat.shape[1], min(chunk, n)), np.float32)
    for lo in range(0, n, chunk):
        hi = min(n, lo + chunk)
        x = buf if hi - lo == buf.shape[1] else np.empty((flat.shape[1], hi - lo), np.float32)
        _transpose_f32(np.ascontiguousarray(flat[lo:hi]), x)
        out[lo:hi] += (matrix_t @ x).T
