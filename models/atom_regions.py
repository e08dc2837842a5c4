"""`AtomStitcher`: atom finding per scan block while the scan runs, each column found once.

A block is analysed once every pixel of it and of a margin around it has its virtual image
value (the blocks around it are complete), so the network sees a column on the block's edge
with the same context as one in its middle.  The block keeps the columns that fall inside it,
or up to ``edge_px`` beyond an edge whose neighbour has not been analysed yet; a column a
neighbour already kept (closer than ``edge_px``) is not kept again.  With the margin, a column
on an edge comes out of both windows at nearly the same place, so this finds it exactly once.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..udf.block_grid import BlockGrid
from .atom_analysis import AtomFinder


@dataclass
class AtomRows:
    """Columns found in a batch of blocks (positions in scan pixels); with the per-column
    analyses on (`atoms_analyse.BlockColumns`), their species and anomaly too (else None)."""

    positions_px: np.ndarray  # (n, 2) float32
    confidence: np.ndarray  # (n,) float32
    intensity: np.ndarray  # (n,) float32
    block: np.ndarray  # (n, 2) int32: the block that owns the column
    species: np.ndarray | None = None  # (n,) int8 class index, -1 unknown
    species_prob: np.ndarray | None = None  # (n, k) float32, NaN unknown
    anomaly: np.ndarray | None = None  # (n,) float32 score, NaN unknown
    anomaly_flag: np.ndarray | None = None  # (n,) bool: score above the card's threshold

    FIELDS = ("positions_px", "confidence", "intensity", "block")
    ANALYSES = ("species", "species_prob", "anomaly", "anomaly_flag")

    @classmethod
    def empty(cls) -> "AtomRows":
        return cls(np.zeros((0, 2), np.float32), np.zeros(0, np.float32), np.zeros(0, np.float32),
                   np.zeros((0, 2), np.int32))

    @classmethod
    def concat(cls, parts: list["AtomRows"]) -> "AtomRows":
        if not parts:
            return cls.empty()
        out = cls(*(np.concatenate([getattr(p, f) for p in parts]) for f in cls.FIELDS))
        if any(p.species is not None for p in parts):  # parts without the analyses: unknown
            k = next(p.species_prob.shape[1] for p in parts if p.species is not None)
            filled = [p if p.species is not None else p.with_unknown(k) for p in parts]
            for f in cls.ANALYSES:
                setattr(out, f, np.concatenate([getattr(p, f) for p in filled]))
        return out

    def with_unknown(self, k: int) -> "AtomRows":
        """These rows with species and anomaly unknown (``k`` classes)."""
        n = len(self)
        return AtomRows(self.positions_px, self.confidence, self.intensity, self.block, np.full(n, -1, np.int8),
                        np.full((n, k), np.nan, np.float32), np.full(n, np.nan, np.float32), np.zeros(n, bool))

    def head(self, n: int) -> "AtomRows":
        """The first ``n`` rows."""
        return AtomRows(*(None if getattr(self, f) is None else getattr(self, f)[:n]
                          for f in self.FIELDS + self.ANALYSES))

    def arrays(self, prefix: str = "atoms/") -> dict[str, np.ndarray]:
        """Wire/state arrays: positions, confidence, intensity, block (+ the analyses when on)."""
        out = {f"{prefix}positions": self.positions_px, f"{prefix}confidence": self.confidence,
               f"{prefix}intensity": self.intensity, f"{prefix}block": self.block}
        if self.species is not None:
            out.update({f"{prefix}{f}": getattr(self, f) for f in self.ANALYSES})
        return out

    def __len__(self) -> int:
        return len(self.positions_px)


class AtomStitcher:
    def __init__(self, finder: AtomFinder, grid: BlockGrid, sampling_A: float | None = None,
                 margin_px: int = 16, edge_px: float = 1.0):
        self.finder = finder
        self.image_name = finder.contrast  # the virtual image it reads: "haadf" or "abf"
        self.grid = grid
        self.sampling_A = sampling_A
        self.margin = int(margin_px)
        self.edge_px = float(edge_px)
        self.analysed = np.zeros(grid.shape, bool)
        self._kept: dict[tuple[int, int], np.ndarray] = {}  # block -> its columns' positions
        self.errors: list[str] = []
        self.last_windows: list = []
        self.columns = None  # `atoms_analyse.BlockColumns`: species and anomaly of the kept columns, or None
        # every block's window [r0, r1) × [c0, c1), for the vectorised readiness test
        ny, nx = grid.shape
        bounds = np.array([[(w[0].start, w[0].stop, w[1].start, w[1].stop) for w in
                            (self.window(i, j) for j in range(nx))] for i in range(ny)])
        self._r0, self._r1, self._c0, self._c1 = np.moveaxis(bounds, -1, 0)
        self._area = (self._r1 - self._r0) * (self._c1 - self._c0)

    def window(self, i: int, j: int) -> tuple[slice, slice]:
        rs, cs = self.grid.scan_slices(i, j)
        h, w = self.grid.scan_shape
        return (slice(max(0, rs.start - self.margin), min(h, rs.stop + self.margin)),
                slice(max(0, cs.start - self.margin), min(w, cs.stop + self.margin)))

    def ready(self, have: np.ndarray) -> list[tuple[int, int]]:
        """Blocks not yet analysed whose window is complete (``have``: scan-grid bool, True where
        the virtual image holds its final value or the pixel is not scanned at all).

        Called after every engine step, so it counts each window's pixels from one summed-area
        table (four lookups per block) instead of scanning the windows."""
        sat = np.zeros((have.shape[0] + 1, have.shape[1] + 1), np.int64)
        sat[1:, 1:] = np.cumsum(np.cumsum(have, axis=0, dtype=np.int64), axis=1)
        count = (sat[self._r1, self._c1] - sat[self._r0, self._c1] - sat[self._r1, self._c0]
                 + sat[self._r0, self._c0])
        return [(int(i), int(j)) for i, j in np.argwhere((count == self._area) & ~self.analysed)]

    def analyse(self, image: np.ndarray, blocks: list[tuple[int, int]]) -> AtomRows:
        """Find the columns of ``blocks`` in the scan-grid ``image``; marks them analysed.
        Pixels outside the scanned region (NaN) take the mean of the rest of their window."""
        parts = []
        # per analysed block: (block, window slices, all columns found in the window (window px),
        # which of them the block kept) -- the per-column analyses read the same windows
        self.last_windows: list = []
        for i, j in blocks:
            self.analysed[i, j] = True
            ws = self.window(i, j)
            win = image[ws]
            if np.isnan(win).any():
                win = np.where(np.isnan(win), np.nanmean(win) if np.isfinite(win).any() else 0.0, win)
            try:
                found = self.finder.find(win, self.sampling_A)
            except ValueError as exc:  # e.g. no lattice in this window: say so, keep going
                self.errors.append(f"block ({i}, {j}): {exc}")
                self._kept[(i, j)] = np.zeros((0, 2))
                continue
            pos = found.positions_px + [ws[0].start, ws[1].start]
            keep = self._owned(i, j, pos)
            self.last_windows.append(((i, j), ws, np.asarray(found.positions_px, np.float64), keep))
            pos = pos[keep]
            self._kept[(i, j)] = pos
            parts.append(AtomRows(pos.astype(np.float32), found.confidence[keep].astype(np.float32),
                                  found.intensity[keep].astype(np.float32),
                                  np.tile(np.array([i, j], np.int32), (len(pos), 1))))
        return AtomRows.concat(parts)

    def _owned(self, i: int, j: int, pos: np.ndarray) -> np.ndarray:
        rs, cs = self.grid.scan_slices(i, j)
        ny, nx = self.grid.shape
        lo = np.array([rs.start - 0.5, cs.start - 0.5])
        hi = np.array([rs.stop - 0.5, cs.stop - 0.5])
        # beyond an edge whose neighbour is still to come, reach a little further: that neighbour
        # will drop what this block keeps there; where it was analysed already, stay inside
        grow = np.array([[0 < i and not self.analysed_before(i - 1, j), 0 < j and not self.analysed_before(i, j - 1)],
                         [i < ny - 1 and not self.analysed_before(i + 1, j),
                          j < nx - 1 and not self.analysed_before(i, j + 1)]], float) * self.edge_px
        keep = ((pos >= lo - grow[0]) & (pos < hi + grow[1])).all(axis=1)
        near = [self._kept[(a, b)] for a in range(i - 1, i + 2) for b in range(j - 1, j + 2)
                if (a, b) != (i, j) and (a, b) in self._kept and len(self._kept[(a, b)])]
        if near and keep.any():
            others = np.concatenate(near)
            d = np.linalg.norm(pos[:, None, :] - others[None, :, :], axis=-1).min(axis=1)
            keep &= d >= self.edge_px
        return keep

    def analysed_before(self, i: int, j: int) -> bool:
        return (i, j) in self._kept
