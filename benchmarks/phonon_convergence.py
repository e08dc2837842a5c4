"""How many frozen-phonon configurations does a converged PACBED need, and does the slice pool
reproduce abTEM's own FrozenPhonons?

Reference: abTEM ``FrozenPhonons`` with R independent configurations of the whole crystal (every
probe position sees every configuration).  Candidates: the static lattice, and stemlive's
slice-pool scheme with 1, 2, 4 passes (each pass gives every row of probe positions a fresh
configuration).  Prints the L1 difference (sum|P-R| / sum R within ±3α) per thickness; the
reference's own noise is estimated from its two halves (scaled by 1/2 for the full average).

    python benchmarks/phonon_convergence.py [--alpha 13.6] [--tmax 40] [--configs 12] [--tilt 1 0.5]

Resumable: each result is cached as .npy under --work.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
import numpy as np

from stemlive.simulate.params import PacbedParams
from stemlive.simulate.pacbed import make_plan, simulate_tilt


def reference(plan, tilt, configs: int, seed: int) -> np.ndarray:
    """abTEM's standard frozen-phonon PACBED (R configs × all positions), per config."""
    import abtem

    from stemlive.simulate.crystals import zone_cell
    from stemlive.simulate.phonons import layer_offset
    from stemlive.simulate.resample import centre_crop

    abtem.config.set({"dask.lazy": False})
    p = plan.params
    zc = zone_cell(p.material, p.zone)
    atoms = zc.atoms.copy()
    atoms.positions[:, 2] += layer_offset(atoms.positions[:, 2], zc.repeat_z, plan.per_repeat)
    atoms.wrap()
    crystal = atoms * (plan.reps[0], plan.reps[1], plan.num_slices // plan.per_repeat)
    n0, n1 = plan.positions
    a = plan.extent[0] / plan.reps[0]
    b = plan.extent[1] / plan.reps[1]
    scan = np.array([(i * a / n0, j * b / n1) for i in range(n0) for j in range(n1)])
    out = []
    for c in range(configs):
        fp = abtem.FrozenPhonons(crystal, num_configs=1, sigmas=plan.sigmas, seed=seed + c)
        pot = abtem.Potential(fp, gpts=plan.gpts, slice_thickness=plan.slice_thickness,
                              exit_planes=plan.exit_every).build(lazy=False)
        probe = abtem.Probe(semiangle_cutoff=p.alpha_mrad, energy=p.kv * 1e3, tilt=tuple(tilt),
                            gpts=plan.gpts, extent=plan.extent)
        m = probe.scan(pot, scan=scan, detectors=abtem.PixelatedDetector(max_angle=None), lazy=False)
        arr = np.asarray(m.array)
        arr = arr.reshape((-1,) + arr.shape[-3:]) if arr.ndim > 4 else arr
        arr = arr[plan.exit_index]
        arr = centre_crop(arr, (plan.gpts[0] // 2, plan.gpts[1] // 2), min(plan.half_px)).mean(axis=1)
        out.append(arr.astype(np.float32))
    return np.stack(out)


def l1(p: np.ndarray, r: np.ndarray) -> np.ndarray:
    return np.abs(p - r).sum(axis=(-1, -2)) / r.sum(axis=(-1, -2))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--alpha", type=float, default=13.6)
    ap.add_argument("--tmax", type=float, default=40.0)
    ap.add_argument("--configs", type=int, default=12)
    ap.add_argument("--tilt", type=float, nargs=2, default=(1.0, 0.5))
    ap.add_argument("--passes", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--work", type=Path, default=Path(".bench-cache/phonons"))
    args = ap.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    tag = f"a{args.alpha}_t{args.tmax}_tilt{args.tilt[0]}_{args.tilt[1]}"

    def cached(name, fn):
        f = args.work / f"{tag}_{name}.npy"
        if f.exists():
            return np.load(f)
        t = time.perf_counter()
        arr = fn()
        print(f"  {name}: {time.perf_counter() - t:.0f} s", file=sys.stderr)
        np.save(f, arr)
        return arr

    def ours(passes, seed=0):
        prm = PacbedParams(alpha_mrad=args.alpha, thickness_nm=(1, args.tmax, 1), tilt_values_mrad=(0,),
                           phonon_passes=passes, seed=seed, use_symmetry=False)
        plan = make_plan(prm)
        plan.sim_tilts = np.array([args.tilt], float)
        return simulate_tilt(plan, 0)["patterns"]

    base = make_plan(PacbedParams(alpha_mrad=args.alpha, thickness_nm=(1, args.tmax, 1), tilt_values_mrad=(0,),
                                  use_symmetry=False))
    ref = cached(f"ref{args.configs}", lambda: reference(base, args.tilt, args.configs, seed=1000))
    R = ref.mean(axis=0)
    half = args.configs // 2
    noise = l1(ref[:half].mean(0), ref[half:].mean(0)) / 2  # ≈ error of the full mean
    cols = {"static": cached("static", lambda: ours(0))}
    for m in args.passes:
        cols[f"pool x{m}"] = cached(f"pool{m}", lambda m=m: ours(m))
    cols[f"abTEM x{max(1, half // 2)}"] = ref[: max(1, half // 2)].mean(0)
    t = base.thickness_nm
    head = f"{'t [nm]':>7} " + " ".join(f"{k:>10}" for k in cols) + f" {'ref noise':>10}"
    print(f"PACBED L1 difference to abTEM FrozenPhonons ({args.configs} configs), α={args.alpha} mrad, "
          f"tilt={tuple(args.tilt)} mrad")
    print(head)
    for i in range(0, len(t), max(1, len(t) // 12)):
        print(f"{t[i]:7.1f} " + " ".join(f"{l1(v[i], R[i]):10.4f}" for v in cols.values()) + f" {noise[i]:10.4f}")
    print("mean    " + " ".join(f"{l1(v, R).mean():10.4f}" for v in cols.values()) + f" {noise.mean():10.4f}")


if __name__ == "__main__":
    main()
