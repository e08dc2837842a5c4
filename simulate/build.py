"""Resumable, parallel building of a PACBED library.

Each simulated tilt is one job whose result is written atomically to ``<out>.parts/`` as soon as
it is done, so a killed run (sessions end without warning) continues where it stopped, on this
or another machine, as long as the parameters are the same.  The parts are assembled into the
HDF5 library at the end (written to a temporary name, then renamed).  One single-threaded
process per core: threaded BLAS/FFT under load ran 10x slower here.
"""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import shutil
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from .params import PacbedParams

PARTS_SUFFIX = ".parts"


def _version(pkg: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(pkg)
    except PackageNotFoundError:
        return "unknown"


def _atomic_save(path: Path, arr: np.ndarray, meta: dict) -> None:
    tmp = path.with_suffix(".tmp.npy")
    with open(tmp, "wb") as fh:
        np.save(fh, arr, allow_pickle=False)
        fh.flush()
        os.fsync(fh.fileno())
    meta_tmp = path.with_suffix(".tmp.json")
    meta_tmp.write_text(json.dumps(meta))
    os.replace(tmp, path)
    os.replace(meta_tmp, path.with_suffix(".json"))


def _worker_init() -> None:
    os.environ["OPENBLAS_NUM_THREADS"] = "1"
    os.environ["OMP_NUM_THREADS"] = "1"
    import dask

    dask.config.set(scheduler="synchronous")


def _run_job(args) -> tuple[int, float]:
    params_json, index, part = args
    from .pacbed import make_plan, simulate_tilt

    plan = _plan_cache.get(params_json)
    if plan is None:
        plan = _plan_cache[params_json] = make_plan(PacbedParams.from_json(params_json))
    res = simulate_tilt(plan, index)
    _atomic_save(Path(part), res["patterns"], {
        "tilt_mrad": plan.sim_tilts[index].tolist(), "seconds": res["seconds"],
        "configurations": res["configurations"], "seed_entropy": res["seed_entropy"],
    })
    return index, res["seconds"]


_plan_cache: dict = {}


def round_float16(arr: np.ndarray, drop_bits: int) -> np.ndarray:
    """float16 with the lowest ``drop_bits`` mantissa bits rounded away (to nearest)."""
    u = arr.astype(np.float16).view(np.uint16).astype(np.uint32)
    u = (u + (1 << (drop_bits - 1))) & (0xFFFF & ~((1 << drop_bits) - 1))
    return u.astype(np.uint16).view(np.float16)


def parts_dir(out: Path) -> Path:
    return out.with_name(out.name + PARTS_SUFFIX)


def build_library(params: PacbedParams, out: str | Path, workers: int | None = None,
                  progress: bool = True, keep_parts: bool = False, max_jobs: int | None = None) -> Path | None:
    """Simulate every tilt that is not done yet, then write ``out``. Returns ``out``.

    An existing ``out`` built with the same parameters is reused as it is.  ``max_jobs`` stops
    after that many new tilts (for benchmarks); the library is then not assembled (returns None)."""
    from tqdm.auto import tqdm

    from .pacbed import make_plan

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    pj = params.to_json()
    if out.exists():
        import h5py

        with h5py.File(out, "r") as f:
            same = f.attrs.get("params") == pj
        if same:
            return out
        raise FileExistsError(f"{out} exists and was built with other parameters; remove it or choose another --out")
    plan = make_plan(params)
    parts = parts_dir(out)
    parts.mkdir(exist_ok=True)
    stamp = parts / "params.json"
    if stamp.exists() and stamp.read_text() != pj:
        raise ValueError(
            f"{parts} holds a run with other parameters; delete it or choose another --out "
            f"(stored: {stamp.read_text()})"
        )
    stamp.write_text(pj)
    jobs = [(pj, i, str(parts / f"tilt_{i:04d}.npy")) for i in range(len(plan.sim_tilts))]
    todo = [j for j in jobs if not Path(j[2]).exists()]
    done_before = len(jobs) - len(todo)
    partial = max_jobs is not None and len(todo) > max_jobs
    todo = todo[:max_jobs] if max_jobs is not None else todo
    workers = workers or min(os.cpu_count() or 1, max(1, len(todo)))
    with tqdm(total=len(jobs), initial=done_before, unit="tilt", disable=not progress,
              desc=f"PACBED α={params.alpha_mrad} mrad") as bar:
        if workers == 1 or len(todo) <= 1:
            _worker_init()
            for j in todo:
                _run_job(j)
                bar.update()
        elif todo:
            ctx = mp.get_context("spawn")
            with ctx.Pool(workers, initializer=_worker_init) as pool:
                for _ in pool.imap_unordered(_run_job, todo):
                    bar.update()
    if partial:
        return None
    write_library(plan, parts, out)
    if not keep_parts:
        shutil.rmtree(parts)
    return out


def write_library(plan, parts: Path, out: Path) -> None:
    """Assemble the per-tilt parts into the HDF5 library (atomically)."""
    import h5py

    p = plan.params
    sims = [np.load(parts / f"tilt_{i:04d}.npy") for i in range(len(plan.sim_tilts))]
    metas = [json.loads((parts / f"tilt_{i:04d}.json").read_text()) for i in range(len(plan.sim_tilts))]
    from .symmetry import apply_to_pattern

    tmp = out.with_name(out.name + ".tmp")
    with h5py.File(tmp, "w") as f:
        n = len(plan.tilts)
        shape = sims[0].shape
        nt, k = shape[0], shape[-1]
        pacbed = np.stack([apply_to_pattern(sims[plan.tilt_source[i]].mean(axis=(1, 2)) if p.keep_positions
                                            else sims[plan.tilt_source[i]], plan.tilt_ops[i]) for i in range(n)])
        # a position-resolved library is stored compactly (see below); a PACBED library in float32
        f.create_dataset("patterns", data=round_float16(pacbed, 3).astype(np.float32) if p.keep_positions else pacbed,
                         chunks=(1, nt, k, k), compression="gzip", compression_opts=4, shuffle=True)
        if p.keep_positions:
            # Only the simulated tilts: derived ones cost a flip at read time (PacbedLibrary), which
            # keeps the shipped demo library small.  float16 rounded to 8 significant bits
            # (relative precision 0.4 %, below the Poisson noise of any pixel with < 60 000 counts)
            # compresses 1.5x better with shuffle + gzip than full float16.
            f.create_dataset("position_patterns", data=round_float16(np.stack(sims), drop_bits=3),
                             chunks=(1, 1) + shape[1:], compression="gzip", compression_opts=9, shuffle=True)
        f["thickness_nm"] = plan.thickness_nm
        f["tilt_mrad"] = plan.tilts
        f["tilt_crystal_mrad"] = plan.tilts  # axis 0/1 are the crystal directions in the attrs
        f["tilt_simulated"] = np.array([np.array_equal(g, np.eye(2)) for g in plan.tilt_ops])
        f["tilt_op"] = plan.tilt_ops
        f["tilt_source"] = plan.tilt_source
        f["simulated_tilt_mrad"] = plan.sim_tilts
        f["phonon_seed_entropy"] = np.array([m["seed_entropy"] for m in metas], np.int64)
        f["seconds"] = np.array([m["seconds"] for m in metas])
        n0, n1 = plan.positions
        f["probe_positions_frac"] = np.array([(i / n0, j / n1) for i in range(n0) for j in range(n1)])
        plan_info = {
            "reps": plan.reps, "extent_A": plan.extent, "gpts": plan.gpts,
            "slice_thickness_A": plan.slice_thickness, "slices_per_exit": plan.exit_every,
            "num_slices": plan.num_slices, "positions_per_cell": plan.positions,
            "position_origin_A": plan.origin.tolist(),
            "position_origin_frac": (plan.origin / np.array(plan.cell)).tolist(),
            "cell_A": plan.cell, "native_mrad_per_px": plan.native_mrad_per_px,
            "phonon_configurations": metas[0]["configurations"],
            "sigmas_A": plan.sigmas, "symmetrized_over_stabilizer": True,
        }
        attrs = {
            "kv": p.kv, "alpha_mrad": p.alpha_mrad, "mrad_per_px": plan.mrad_per_px,
            "center_px": [(plan.pixels - 1) / 2] * 2, "max_angle_mrad": p.resolved_max_angle(),
            "material": p.material, "zone": p.zone,
            "axis0_direction": plan.axis_directions[0], "axis1_direction": plan.axis_directions[1],
            "point_group": json.dumps([g.tolist() for g in plan.group]),
            "columns": json.dumps(plan.columns),
            "simulator": "abTEM multislice, frozen phonons from a slice pool",
            "simulator_version": _version("abtem"), "stemlive_version": _version("stemlive"),
            "params": p.to_json(), "plan": json.dumps(plan_info),
            "normalisation": "fraction of the incident probe intensity per pixel",
            "tilt_convention": "abTEM Probe(tilt=(t0, t1)), t0 along axis 0; see DESIGN.md",
            "created": datetime.now(timezone.utc).isoformat(),
        }
        for k, v in attrs.items():
            f.attrs[k] = json.dumps(v) if isinstance(v, (list, tuple, dict)) else v
    os.replace(tmp, out)


__all__ = ["build_library", "write_library", "parts_dir"]
