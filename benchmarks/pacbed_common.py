"""Shared by the PACBED benchmarks: the held-out sets, scoring, and a resumable result cache."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from stemlive.models.pacbed_analysis import PacbedEstimate
from stemlive.simulate.cli import default_library_path
from stemlive.simulate.train_cli import SHIPPED

DOSES = (2.3e7, 4.7e7, 2.3e8)
CACHE = Path(__file__).resolve().parent.parent / ".bench-cache" / "pacbed"
ALPHAS = {p.alpha_mrad: (name, p) for name, p in SHIPPED}


def library_for(alpha: float) -> Path:
    name, params = ALPHAS[alpha]
    path = default_library_path(params)
    if not path.exists():
        raise SystemExit(f"{path} missing: build it with `make libraries`")
    return path


def as_arrays(results: list[PacbedEstimate]) -> dict[str, np.ndarray]:
    """Result fields as float arrays (NaN where a pattern failed)."""
    def col(key, width=None):
        vals = [getattr(r, key) if r.error is None else None for r in results]
        shape = (width,) if width else ()
        return np.array([np.full(shape, np.nan) if v is None else np.asarray(v, float) for v in vals], float)

    return {"center_px": col("center_px", 2), "radius_px": col("radius_px"), "rotation_deg": col("rotation_deg"),
            "thickness_nm": col("thickness_nm"), "thickness_sigma_nm": col("thickness_sigma_nm"),
            "tilt_mrad": col("tilt_mrad", 2), "tilt_sigma_mrad": col("tilt_sigma_mrad", 2)}


def errors(est: dict[str, np.ndarray], truth: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    n = len(est["thickness_nm"])
    t = {k: np.asarray(v)[:n] for k, v in truth.items()}
    return {
        "center": np.hypot(*(est["center_px"] - t["center_px"]).T),
        "size": np.abs(est["radius_px"] / t["radius_px"] - 1),
        "rotation": np.abs((est["rotation_deg"] - t["rotation_deg"] + 45) % 90 - 45),
        "thickness": np.abs(est["thickness_nm"] - t["thickness_nm"]),
        "tilt": np.abs(est["tilt_mrad"] - t["tilt_mrad"]),
        "true_thickness": t["thickness_nm"],
    }


def scores(est: dict[str, np.ndarray], truth: dict[str, np.ndarray]) -> dict[str, float]:
    """The seed's Table 2 figures (and σ calibration), as fractions; NaN errors count as misses."""
    e = errors(est, truth)
    thick10 = e["true_thickness"] >= 10
    tilt_ok = (e["tilt"] <= 0.25).all(axis=1)
    with np.errstate(invalid="ignore"):
        return {
            "centre ±1 px": float(np.mean(e["center"] <= 1)),
            "size ±1 %": float(np.mean(e["size"] <= 0.01)),
            "rotation ±1°": float(np.mean(e["rotation"] <= 1)),
            "thickness ±1 nm": float(np.mean(e["thickness"] <= 1)),
            "thickness ±2 nm": float(np.mean(e["thickness"] <= 2)),
            "tilt ±0.25 mrad (t≥10 nm)": float(np.mean(tilt_ok[thick10])),
            "thickness in ±1σ": float(np.mean(e["thickness"] <= est["thickness_sigma_nm"])),
            "tilt in ±1σ": float(np.mean(e["tilt"] <= est["tilt_sigma_mrad"])),
            "thickness median err nm": float(np.nanmedian(e["thickness"])),
        }


def cache_key(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def cached(name: str, key: str, compute) -> dict:
    """A dict of arrays computed once per key and kept in .bench-cache (npz, no pickle)."""
    CACHE.mkdir(parents=True, exist_ok=True)
    path = CACHE / f"{name}-{key}.npz"
    if path.exists():
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    out = compute()
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, **out)
    tmp.replace(path)
    return out


def print_table(title: str, rows: list[tuple[str, dict[str, float]]]) -> None:
    cols = list(rows[0][1])
    w = max(len(r[0]) for r in rows) + 2
    print(f"\n{title}")
    print("".ljust(w) + " | ".join(c.rjust(12) for c in cols))
    for name, vals in rows:
        cells = [(f"{100 * v:11.1f}%" if "err" not in c else f"{v:12.2f}") if np.isfinite(v) else "           -"
                 for c, v in vals.items()]
        print(name.ljust(w) + " | ".join(cells))
