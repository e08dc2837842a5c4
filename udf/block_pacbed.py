"""`BlockPacbedUDF`: position-averaged CBED (PACBED) summed per scan block.

A PACBED is the probe-position average over whole unit cells; summing the frames of a scan
block gives one per block, which the networks then read.  The sums are order-independent, so
partitions may finish in any order; frames arrive in their native type (e.g. uint16) and are
summed in float32, which holds integer counts exactly up to 2**24 per pixel and cannot overflow.
"""
from __future__ import annotations

import numpy as np
from libertem.udf.base import UDF

from .block_grid import BlockGrid


def sum_runs(frames: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """float32 sums of consecutive runs of frames.

    Runs of equal length (all of a tile, bar the scan's edges) are summed as one reshaped
    array -- numpy's ``add.reduceat`` along the first axis is ~20× slower.
    """
    out = np.empty((len(starts), *frames.shape[1:]), np.float32)
    change = np.flatnonzero(np.r_[True, lengths[1:] != lengths[:-1], True])
    for a, b in zip(change[:-1], change[1:]):  # segments of runs [a, b) with equal length
        length = int(lengths[a])
        lo = int(starts[a])
        chunk = frames[lo:lo + (b - a) * length]
        out[a:b] = chunk.reshape(b - a, length, *frames.shape[1:]).sum(axis=1, dtype=np.float32)
    return out


class BlockPacbedUDF(UDF):
    """Sum of frames and frame count per scan block.

    Parameters
    ----------
    block
        (by, bx) frames per block along the scan's (row, col) axes. Blocks at the scan's
        edge may be ragged (smaller); ``partial`` marks them.

    Results
    -------
    pacbed : (ny, nx, *sig) float32, the summed frames per block (divide by ``counts``)
    counts : (ny, nx) int64, frames summed so far
    expected : (ny, nx) int64, frames the block holds when the scan (within the ROI) is done
    partial : (ny, nx) bool, ragged edge blocks

    Examples
    --------
    >>> udf = BlockPacbedUDF(block=(8, 8))
    >>> res = ctx.run_udf(dataset=ds, udf=udf)  # doctest: +SKIP
    >>> mean_pacbed = res["pacbed"].data / res["counts"].data[..., None, None]  # doctest: +SKIP
    """

    def __init__(self, block: tuple[int, int] = (8, 8)):
        super().__init__(block=tuple(int(b) for b in block))

    def _grid(self) -> BlockGrid:
        nav = tuple(self.meta.dataset_shape.nav)
        if len(nav) != 2:
            raise ValueError(f"BlockPacbedUDF needs a 2D scan, the dataset's navigation shape is {nav}")
        return BlockGrid(nav, self.params.block)

    def get_tiling_preferences(self):
        """Deep tiles: the per-tile bookkeeping is Python, so fewer, larger tiles are faster."""
        return {"depth": 256, "total_size": self.TILE_SIZE_MAX}

    def get_preferred_input_dtype(self):
        """Frames as they come (e.g. uint16): cast per tile here, and recorders keep the native type."""
        return self.USE_NATIVE_DTYPE

    def get_result_buffers(self):
        grid = self._grid()
        sig = tuple(self.meta.dataset_shape.sig)
        return {
            "pacbed": self.buffer(kind="single", extra_shape=(*grid.shape, *sig), dtype=np.float32),
            "counts": self.buffer(kind="single", extra_shape=grid.shape, dtype=np.int64),
            "expected": self.buffer(kind="single", extra_shape=grid.shape, dtype=np.int64, use="result_only"),
            "partial": self.buffer(kind="single", extra_shape=grid.shape, dtype=bool, use="result_only"),
        }

    def process_tile(self, tile):
        grid = self._grid()
        ids = grid.flat_block_of(self.meta.coordinates)
        # frames of a tile come in raster order: sum each run of frames of the same block at once
        # (float32 is exact for integer counts below 2**24 per pixel and run), then the runs of
        # each block (a tile spanning several scan rows meets a block more than once)
        starts = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]])
        run_lengths = np.diff(np.r_[starts, len(ids)])
        run_sums = sum_runs(np.asarray(tile), starts, run_lengths)
        run_ids = ids[starts]
        order = np.argsort(run_ids, kind="stable")
        sorted_ids = run_ids[order]
        firsts = np.flatnonzero(np.r_[True, sorted_ids[1:] != sorted_ids[:-1]])
        if len(firsts) < len(order):
            run_sums = np.add.reduceat(run_sums[order], firsts, axis=0)
            run_lengths = np.add.reduceat(run_lengths[order], firsts)
        else:
            run_sums, run_lengths = run_sums[order], run_lengths[order]
        rows, cols = np.divmod(sorted_ids[firsts], grid.shape[1])
        sig_part = tuple(self.meta.sig_slice.get(sig_only=True))
        self.results.pacbed[(rows, cols) + sig_part] += run_sums  # unique blocks: no repeated index
        if self._first_sig_tile():
            self.results.counts[rows, cols] += run_lengths

    def _first_sig_tile(self) -> bool:
        """Count frames once even when LiberTEM splits frames into several signal tiles."""
        origin = self.meta.sig_slice.origin
        return all(o == 0 for o in origin[-len(self.meta.dataset_shape.sig):])

    def merge(self, dest, src):
        touched = np.nonzero(src.counts)  # a partition touches few blocks: add only those
        dest.pacbed[touched] += src.pacbed[touched]
        dest.counts[:] += src.counts

    def get_results(self):
        grid = self._grid()
        return {
            "pacbed": self.results.pacbed,
            "counts": self.results.counts,
            "expected": grid.expected_counts(self.meta.roi),
            "partial": grid.partial(),
        }
