"""Changed rows of a 2-D image column as `ColumnDataSource.patch` entries: one entry per run of
consecutive rows (values flattened row by row), so an update costs the rows it changes."""
from __future__ import annotations

import numpy as np


def row_runs(rows: list[int]) -> list[tuple[int, int]]:
    """Sorted rows as [start, stop) runs: one patch entry per run instead of one per row."""
    runs: list[list[int]] = []
    for r in sorted(rows):
        if runs and r == runs[-1][1]:
            runs[-1][1] = r + 1
        else:
            runs.append([r, r + 1])
    return [(a, b) for a, b in runs]


def row_patch(values: np.ndarray, rows: list[int]) -> list:
    """Patch entries replacing ``rows`` of a 2-D image column (values flattened row by row)."""
    return [((0, slice(a, b), slice(None)), np.ascontiguousarray(values[a:b]).ravel()) for a, b in row_runs(rows)]
