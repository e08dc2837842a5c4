"""Simulation speed of the default training libraries, and the projected wall time for both.

Runs ``--jobs`` tilts of each default library (SrTiO3 [001], 200 kV; 13.6 mrad 1-120 nm and
19.1 mrad 1-80 nm) with one process per core, into the same resumable parts the real build
uses (so the time is not lost), and prints patterns/s and the projected total.

    python benchmarks/library_speed.py [--jobs 4] [--workers 2] [--phonon-passes 2]

Target (issue 2): both libraries in ≤ 1 h wall on the 2-core machine.
"""
from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

from stemlive.simulate.build import build_library, parts_dir
from stemlive.simulate.cli import default_library_path
from stemlive.simulate.pacbed import make_plan
from stemlive.simulate.params import PacbedParams

DEFAULTS = [(13.6, (1.0, 120.0, 1.0)), (19.1, (1.0, 80.0, 1.0))]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--jobs", type=int, default=4, help="new tilts to simulate per library")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--phonon-passes", type=int, default=PacbedParams.phonon_passes)
    args = ap.parse_args(argv)
    rows = []
    for alpha, thick in DEFAULTS:
        p = PacbedParams(alpha_mrad=alpha, thickness_nm=thick, phonon_passes=args.phonon_passes)
        plan = make_plan(p)
        out = default_library_path(p)
        t = time.perf_counter()
        build_library(p, out, workers=args.workers, max_jobs=args.jobs, keep_parts=True)
        wall = time.perf_counter() - t
        metas = [json.loads(f.read_text()) for f in sorted(parts_dir(out).glob("tilt_*.json"))]
        per_job = sum(m["seconds"] for m in metas) / max(1, len(metas))  # CPU-seconds in one worker
        n_sim, n_all, n_t = len(plan.sim_tilts), len(plan.tilts), len(plan.thickness_nm)
        rows.append({
            "alpha": alpha, "thick": f"{thick[0]:g}-{thick[1]:g}", "positions": "x".join(map(str, plan.positions)),
            "slices": plan.num_slices, "configs": metas[0]["configurations"] if metas else 0,
            "sim_tilts": n_sim, "all_tilts": n_all, "n_thick": n_t, "s_per_tilt": per_job,
            "wall_new": wall, "projected_min": n_sim * per_job / args.workers / 60,
            "patterns_per_s": n_t * args.workers / per_job, "stored_per_s": n_t * n_all / n_sim * args.workers / per_job,
            "done": len(metas),
        })
    print(f"PACBED library simulation, {args.workers} worker process(es), phonon passes {args.phonon_passes}")
    hdr = (f"{'α mrad':>6} {'t nm':>7} {'pos':>5} {'slices':>6} {'confs':>5} {'tilts sim/all':>13} "
           f"{'s/tilt':>7} {'sim pat/s':>9} {'stored pat/s':>12} {'done':>5} {'projected':>10}")
    print(hdr)
    for r in rows:
        print(f"{r['alpha']:6.1f} {r['thick']:>7} {r['positions']:>5} {r['slices']:6d} {r['configs']:5d} "
              f"{r['sim_tilts']:>6}/{r['all_tilts']:<6} {r['s_per_tilt']:7.1f} {r['patterns_per_s']:9.2f} "
              f"{r['stored_per_s']:12.2f} {r['done']:5d} {r['projected_min']:7.1f} min")
    total = sum(r["projected_min"] for r in rows)
    print(f"projected wall time for both libraries: {total:.1f} min (target ≤ 60 min)")


if __name__ == "__main__":
    main()
