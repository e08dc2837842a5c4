"""The scan divided into blocks: which block a frame belongs to and how many frames each expects.

Shared by `BlockPacbedUDF` (which sums into blocks) and the live engine (which decides when a
block is complete), so both agree on ragged edges and ROIs.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class BlockGrid:
    """A 2D scan of ``scan_shape`` frames cut into ``block`` = (by, bx) blocks, raster order.

    The last block row/column is ragged when the scan is not a multiple of the block; such
    blocks hold fewer frames and are marked partial.
    """

    scan_shape: tuple[int, int]
    block: tuple[int, int]

    def __post_init__(self):
        if len(self.scan_shape) != 2 or len(self.block) != 2:
            raise ValueError(f"scan and block must be 2D, got scan {self.scan_shape}, block {self.block}")
        if min(self.scan_shape) < 1 or min(self.block) < 1:
            raise ValueError(f"scan {self.scan_shape} and block {self.block} must be positive")
        object.__setattr__(self, "scan_shape", tuple(int(v) for v in self.scan_shape))
        object.__setattr__(self, "block", tuple(int(v) for v in self.block))

    @property
    def shape(self) -> tuple[int, int]:
        """Blocks along each scan axis (ceil: ragged blocks count)."""
        return (-(-self.scan_shape[0] // self.block[0]), -(-self.scan_shape[1] // self.block[1]))

    @property
    def size(self) -> int:
        return self.shape[0] * self.shape[1]

    def flat_block_of(self, coords: np.ndarray) -> np.ndarray:
        """Flat block index of each (row, col) scan coordinate, shape (n, 2) -> (n,)."""
        coords = np.asarray(coords)
        return (coords[:, 0] // self.block[0]) * self.shape[1] + coords[:, 1] // self.block[1]

    def expected_counts(self, roi: np.ndarray | None = None) -> np.ndarray:
        """Frames each block holds when the scan is done, (ny, nx); the ROI excludes frames."""
        mask = np.ones(self.scan_shape, bool) if roi is None else np.asarray(roi, bool).reshape(self.scan_shape)
        ny, nx = self.shape
        by, bx = self.block
        padded = np.zeros((ny * by, nx * bx), np.int64)
        padded[: self.scan_shape[0], : self.scan_shape[1]] = mask
        return padded.reshape(ny, by, nx, bx).sum(axis=(1, 3))

    def partial(self) -> np.ndarray:
        """True for ragged blocks at the scan's edge (fewer than by*bx positions in the scan)."""
        return self.expected_counts() < self.block[0] * self.block[1]

    def scan_slices(self, i: int, j: int) -> tuple[slice, slice]:
        """Scan-pixel slices covered by block (i, j)."""
        by, bx = self.block
        return (slice(i * by, min((i + 1) * by, self.scan_shape[0])),
                slice(j * bx, min((j + 1) * bx, self.scan_shape[1])))
