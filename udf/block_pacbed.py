"""`BlockPacbedUDF`: position-averaged CBED (PACBED) summed per scan block.

A PACBED is the probe-position average over whole unit cells; summing the frames of a scan
block gives one per block, which the networks then read.  The sums are order-independent, so
partitions may finish in any order; frames arrive in their native type (e.g. uint16) and each
tile is cast to float64, summed, then added to the float32 sums, so nothing overflows.
"""
from __future__ import annotations

import numpy as np
from libertem.udf.base import UDF

from .block_grid import BlockGrid


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
        starts = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]])
        run_sums = np.add.reduceat(np.asarray(tile, np.float64), starts, axis=0)
        run_lengths = np.diff(np.r_[starts, len(ids)])
        sig_part = self.meta.sig_slice.get(sig_only=True)
        rows, cols = np.divmod(ids[starts], grid.shape[1])
        np.add.at(self.results.pacbed, (rows, cols) + tuple(sig_part), run_sums.astype(np.float32))
        if self._first_sig_tile():
            np.add.at(self.results.counts, (rows, cols), run_lengths)

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
