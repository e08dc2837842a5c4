"""The maps as a CSV table: one row per block, every stored field, flags by name."""
from __future__ import annotations

import csv
import io

import numpy as np

from .display import flag_text

COLUMNS = (("thickness_nm", None), ("thickness_sigma_nm", None), ("tilt_mrad", ("t0", "t1")),
           ("tilt_sigma_mrad", ("t0", "t1")), ("tilt_crystal_mrad", ("100", "010")), ("center_px", ("row", "col")),
           ("radius_px", None), ("rotation_deg", None), ("background", None), ("in_range", None),
           ("fit_quality", None), ("thickness_alt_nm", None), ("alt_delta_chi2", None), ("method", None))


def maps_csv(maps: dict, done: np.ndarray, flag_names: list[str], block: tuple[int, int],
             scan_step_nm: float | None) -> str:
    """Every block of the grid (analysed or not: ``done`` says), full resolution."""
    fields = [(k, sub) for k, sub in COLUMNS if k in maps]
    head = ["block_row", "block_col", "done"]
    if scan_step_nm:
        head += ["y0_nm", "x0_nm"]
    for k, sub in fields:
        head += [k] if sub is None else [f"{k}_{s}" for s in sub]
    head.append("flags")
    out = io.StringIO()
    w = csv.writer(out, lineterminator="\n")
    w.writerow(head)
    ny, nx = done.shape
    for i in range(ny):
        for j in range(nx):
            line = [i, j, int(done[i, j])]
            if scan_step_nm:
                line += [f"{i * block[0] * scan_step_nm:.4g}", f"{j * block[1] * scan_step_nm:.4g}"]
            for k, sub in fields:
                v = np.asarray(maps[k][i, j]).ravel()
                line += ["" if isinstance(x, float) and np.isnan(x) else x for x in v.tolist()]
            line.append(flag_text(maps["flags"][i, j], flag_names) if "flags" in maps else "")
            w.writerow(line)
    return out.getvalue()
