"""Shared by the PACBED benchmarks: the held-out sets, scoring, and a resumable result cache."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from stemlive.models.pacbed_analysis import FLAGS, PacbedEstimate
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


# flags that say "do not trust this thickness" (a gross miss carrying one is not silent); a
# saturated zero disk is one: its plateau hides the intensities thickness is read from
DOUBT = {"ambiguous", "model-mismatch", "low-confidence", "vacuum", "not-on-zone", "thickness-at-range-edge",
         "saturated"}
GROSS_NM, SILENT_SIGMA_NM = 10.0, 5.0
ROW_KEYS = ("answered", "partial-field", "thickness ±1 nm", "thickness ±2 nm", "tilt ±0.25 mrad (t≥10 nm)",
            "tilt ±0.5 mrad (t≥10 nm)", "centre ±0.02 α", "size ±1 %", "rotation ±1°", "thickness in ±1σ",
            "tilt in ±1σ", "gross > 10 nm", "of them silent", "thickness median err nm")


def row_scores(results: list[PacbedEstimate], truth: dict[str, np.ndarray]) -> dict[str, float]:
    """One benchmark row (issue 13's figures) from estimates and their truth, as fractions.

    Geometry (centre within 0.02 α, size ±1 %, rotation ±1°) counts over every pattern, a failed
    one as a miss.  Thickness, tilt (both components; t ≥ 10 nm), σ coverage and gross misses
    (> 10 nm) count over the *answered* patterns: no error and a finite thickness (a
    ``partial-field`` frame is an honest "don't know", not a miss; its share is a column).  A
    gross miss is silent when its σ ≤ 5 nm and it carries no doubt flag (DOUBT)."""
    if not results:
        return dict.fromkeys(ROW_KEYS, np.nan)
    e = errors(as_arrays(results), truth)
    n = len(results)
    t = {k: np.asarray(v)[:len(results)] for k, v in truth.items()}
    flags = [set(r.flags) if r.error is None else {"error"} for r in results]
    sigma = np.array([np.nan if r.error or r.thickness_sigma_nm is None else r.thickness_sigma_nm for r in results], float)
    tilt_sig = np.array([(np.nan, np.nan) if r.error or r.tilt_sigma_mrad is None else r.tilt_sigma_mrad
                         for r in results], float).reshape(-1, 2)
    ans = np.isfinite(e["thickness"])
    thick10 = ans & (e["true_thickness"] >= 10)
    tilt_max = e["tilt"].max(axis=1)
    gross = ans & (e["thickness"] > GROSS_NM)
    doubt = np.array([bool(DOUBT & f) for f in flags], bool)
    silent = gross & (sigma <= SILENT_SIGMA_NM) & ~doubt
    everything = np.ones(n, bool)
    with np.errstate(invalid="ignore"):
        return {
            "answered": _share(ans, everything),
            "partial-field": _share(np.array(["partial-field" in f for f in flags]), everything),
            "thickness ±1 nm": _share(e["thickness"] <= 1, ans),
            "thickness ±2 nm": _share(e["thickness"] <= 2, ans),
            "tilt ±0.25 mrad (t≥10 nm)": _share(tilt_max <= 0.25, thick10),
            "tilt ±0.5 mrad (t≥10 nm)": _share(tilt_max <= 0.5, thick10),
            "centre ±0.02 α": _share(e["center"] <= 0.02 * t["radius_px"], everything),
            "size ±1 %": _share(e["size"] <= 0.01, everything),
            "rotation ±1°": _share(e["rotation"] <= 1, everything),
            "thickness in ±1σ": _share(e["thickness"] <= sigma, ans),
            "tilt in ±1σ": _share((e["tilt"] <= tilt_sig).mean(axis=1), ans),
            "gross > 10 nm": _share(gross, ans),
            "of them silent": _share(silent, gross),
            "thickness median err nm": float(np.median(e["thickness"][ans])) if ans.any() else np.nan,
        }


def _share(hits: np.ndarray, among: np.ndarray) -> float:
    """Mean of ``hits`` over ``among`` (NaN when there is nothing to count)."""
    return float(np.mean(hits[among])) if among.any() else np.nan


def estimates_to_arrays(results: list[PacbedEstimate]) -> dict[str, np.ndarray]:
    """:func:`as_arrays` plus what rebuilding the estimates needs (flags as bits of FLAGS, errors,
    tilt in the crystal frame): a cache entry for :func:`cached`."""
    out = as_arrays(results)
    crystal = [r.tilt_crystal_mrad if r.error is None and r.tilt_crystal_mrad is not None else (np.nan, np.nan)
               for r in results]
    out["tilt_crystal_mrad"] = np.array(crystal, float).reshape(-1, 2)
    out["flag_bits"] = np.array([sum(1 << FLAGS.index(f) for f in r.flags if f in FLAGS) for r in results], np.int64)
    out["failed"] = np.array([r.error is not None for r in results], bool)
    return out


def arrays_to_estimates(d: dict[str, np.ndarray]) -> list[PacbedEstimate]:
    """The estimates back from :func:`estimates_to_arrays` (numbers and flags; errors as "failed")."""
    out = []
    for i in range(len(d["failed"])):
        if d["failed"][i]:
            out.append(PacbedEstimate(error="failed"))
            continue
        pair = lambda k: tuple(float(v) for v in d[k][i])  # noqa: E731
        out.append(PacbedEstimate(
            center_px=pair("center_px"), radius_px=float(d["radius_px"][i]), rotation_deg=float(d["rotation_deg"][i]),
            thickness_nm=float(d["thickness_nm"][i]), thickness_sigma_nm=float(d["thickness_sigma_nm"][i]),
            tilt_mrad=pair("tilt_mrad"), tilt_sigma_mrad=pair("tilt_sigma_mrad"),
            tilt_crystal_mrad=pair("tilt_crystal_mrad"),
            flags=[f for j, f in enumerate(FLAGS) if int(d["flag_bits"][i]) >> j & 1]))
    return out


def check_library(alpha: float, rank: int | None = 384, all_tilts: bool = False):
    """The library check's compact library for a benchmark: built from the networks' *training*
    tilt orbits only (same holdout fraction and seed as training), so held-out patterns are not in
    it, as a real specimen's pattern never is; cached in .bench-cache (a build takes minutes)."""
    from stemlive.models.cards import sha256_of
    from stemlive.models.compact_library import CompactLibrary, build_compact
    from stemlive.simulate.library import PacbedLibrary
    from stemlive.simulate.pacbed_data import PacbedSampler

    path = library_for(alpha)
    out = CACHE / f"check-{cache_key(sha256_of(path), rank, all_tilts)}.h5"
    if out.exists():
        return CompactLibrary.load(out)
    lib = PacbedLibrary.load(path)
    if not all_tilts:
        held = PacbedSampler(lib, 0.1, seed=0).held_orbits
        keep = ~np.isin(lib.tilt_source, held)
        lib = PacbedLibrary(lib.patterns[keep], lib.thickness_nm, lib.tilt_mrad[keep], lib.mrad_per_px, lib.kv,
                            lib.alpha_mrad, lib.attrs)
        print(f"check library: {keep.sum()} of {len(keep)} tilts (held-out orbits {held} left out)")
    compact = build_compact(lib, rank=rank)
    CACHE.mkdir(parents=True, exist_ok=True)
    compact.save(out)
    return CompactLibrary.load(out)
