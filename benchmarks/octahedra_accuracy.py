"""Accuracy of octahedral-tilt estimates on held-out multislice simulations (ABF, (110)pc).

    nice .venv/bin/python benchmarks/octahedra_accuracy.py [--runs-only] [--cache DIR]

Held-out runs: one abTEM multislice run per tilt system (random angles, compound, aberrations
and mistilt from seed 1000+, never used for training), thickness series 5/10 nm, cached in
.bench-cache/octahedra/ (resumable).  Each run image is observed at several doses (Poisson,
0.5 Å source, 0.05 Å scan jitter) over a field of 2×2 projected cells at a random offset.
The baseline gets the cation lattice (an A column's position, refined by its own cation
fits), as the network will get it from the atom finder.  Prints the MAE of α, β, γ per dose
and thickness (signed where the projection carries the
sign, else magnitudes), tilt-system accuracy and time per field, for the classical baseline
(`models/octahedra_baseline.py`); network columns come with the network.

Measured 2026-12-03 (this command, runs cached, load ~8 on 2 cores):

     dose e/Å²  t nm  MAE α  MAE β  MAE γ  system fields s/field
         1e+03   5.0   3.07   2.87   3.91      0%      6    10.2
         1e+03  10.0   3.12   2.84   9.08      0%      6     6.4
         1e+04   5.0   3.03   2.81   7.38      0%      6     9.5
         1e+04  10.0   3.09   2.89   7.43      0%      6     5.5
         1e+05   5.0   3.14   5.32   6.86      0%      6     8.6
         1e+05  10.0   3.13   4.77   8.80      0%      6     5.8

The baseline finds no tilt system right: it answers a0a0a0 in 24 of 36 fields (so α, β, γ
≈ 0; the MAE then is the truth's size) and a0a0c-/a0b-b- pinned at 15° in most others -- the
O-column Gaussians on these aberrated, mistilted images shift and broaden by as much as the
tilts do, and the spreads (the only trace of γ in [110]) are dominated by the untilted column
shape.  This is the "filter-and-fit workflow struggles" of source paper 000, measured.

Small settings (0.12 Å sampling, 15.6 x 11 Å probe window, 0.2 Å scan step -- coarser steps
alias the 24 mrad probe's images (cut-off 2α/λ = 2.4 Å⁻¹), a first try at 0.4 Å made the
HAADF registration fail --, HAADF 35-52 mrad, one phonon configuration, 10 nm at most) so
the set fits this shared 2-core machine (~1-2 min CPU per run); the numbers are the
baseline's on these images, not on a production-quality simulation.
"""
from __future__ import annotations

import argparse
import zlib
import time
from pathlib import Path

import numpy as np

from stemlive.simulate import octahedra as oc
from stemlive.simulate import octahedra_images as oi

CACHE = Path(__file__).resolve().parents[1] / ".bench-cache" / "octahedra"
NUMERICS = oi.Numerics(sampling_A=0.12, min_extent_A=8.0, scan_step_A=0.2, phonon_configs=1,
                       abf_mrad=(12.0, 24.0), haadf_mrad=(35.0, 52.0))
THICKNESS_NM = (5.0, 10.0)
DOSES = (1e3, 1e4, 1e5)
SYSTEMS = oc.TILT_SYSTEMS[1:]


def heldout_runs(cache: Path = CACHE, progress: bool = True) -> list[Path]:
    """One held-out run per tilt system (resumable; each file written by `write_runs`)."""
    paths = []
    for n, system in enumerate(SYSTEMS):
        path = cache / f"heldout_{system}.h5"
        ranges = oi.RunRanges(systems=(system,), zone="[110]")
        oi.write_runs(path, 1, seed=1000 + n, ranges=ranges, numerics=NUMERICS, thickness_nm=THICKNESS_NM,
                      progress=progress)
        paths.append(path)
    return paths


def _truth_columns(run: oi.RunImages, origin_A, pixel_A: float, shape) -> tuple[np.ndarray, np.ndarray]:
    """Image positions [px] and reported truth (signed where the projection carries it) of the
    B columns of the observed field."""
    from stemlive.models.octahedra_baseline import Registration, _positions_in_field

    t = run.truth
    reg = Registration(-np.asarray(origin_A) / pixel_A, pixel_A, np.asarray(t.cell_A))
    pos, idx = _positions_in_field(t.positions_A, reg, shape, 1.0 / pixel_A)
    ang = t.angles_deg[idx]
    return pos, np.where(np.array(t.signed), ang, np.abs(ang))


def evaluate(paths: list[Path], doses=DOSES, pixel_A: float = 0.2, seed: int = 0) -> list[dict]:
    """Baseline errors per (run, thickness, dose): per-column |estimate − truth| and the system."""
    from stemlive.models import octahedra_baseline as bl

    rows = []
    for path in paths:
        run = oi.read_run(path, 0)
        st = run.meta["structure"]
        built = oc.build(st["system"], st["angles_deg"], st["a_site"], st["b_site"], square_xy=st["zone"] == "[110]")
        period = bl.projected_period(built.pc_lengths_A, st["zone"])
        shape = tuple(int(2 * c / pixel_A) for c in run.truth.cell_A)  # 2 x 2 cells
        for ti, thickness in enumerate(run.thickness_nm):
            for di, dose in enumerate(doses):
                rng = np.random.default_rng([seed, ti, di, zlib.crc32(path.name.encode())])
                origin = rng.uniform(0, 1, 2) * np.asarray(run.truth.cell_A)
                obs = oi.Observation(source_fwhm_A=0.5, jitter_A=0.05, dose_e_per_A2=dose, pixel_A=pixel_A)
                abf = oi.observe(run.abf[ti], run.step_A, obs, rng, shape, origin)
                t0 = time.perf_counter()
                try:
                    # the cation lattice given, as the atom finder (with HAADF species) will give it
                    # to the network too: this 35-52 mrad "HAADF" (all the 0.12 Å grid allows) does
                    # not tell A-O from B columns, and the ABF-only search lands on B columns in
                    # about half the fields (then every column counts as missed)
                    a_column = np.mod(-origin, period) / pixel_A
                    est = bl.estimate(abf, pixel_A, st["zone"], period, origin_px=a_column)
                except ValueError as e:  # no O column fitted: counted as a failure, not skipped
                    rows.append({"system": st["system"], "thickness_nm": float(thickness), "dose": dose,
                                 "errors": np.full((1, 3), np.nan), "system_ok": False, "seconds": 0.0,
                                 "failed": str(e)})
                    continue
                seconds = time.perf_counter() - t0
                p_est, a_est = bl.column_angles(est, st["zone"], shape)
                p_true, a_true = _truth_columns(run, origin, pixel_A, shape)
                errors = []
                for p, a in zip(p_true, a_true):
                    d = np.hypot(*(p_est - p).T)
                    errors.append(a_est[np.argmin(d)] - a if d.size and d.min() < 0.5 / pixel_A else np.full(3, np.nan))
                rows.append({"system": st["system"], "thickness_nm": float(thickness), "dose": dose,
                             "errors": np.array(errors), "system_ok": est.system == st["system"],
                             "seconds": seconds, "truth": st["angles_deg"], "estimate": est.angles_deg.tolist(),
                             "found": est.system})
    return rows


def table(rows: list[dict]) -> str:
    """MAE of α, β, γ [deg] per dose and thickness (missed columns count as 15°), system accuracy."""
    lines = [f"{'dose e/Å²':>10} {'t nm':>5} {'MAE α':>6} {'MAE β':>6} {'MAE γ':>6} {'system':>7} {'fields':>6} {'s/field':>7}"]
    def nominal(t):  # realised thicknesses are whole slices, a little off the nominal ones
        return min(THICKNESS_NM, key=lambda n: abs(n - t))

    keys = sorted({(r["dose"], nominal(r["thickness_nm"])) for r in rows})
    for dose, thick in keys:
        sel = [r for r in rows if r["dose"] == dose and nominal(r["thickness_nm"]) == thick]
        err = np.concatenate([r["errors"] for r in sel])
        err = np.where(np.isnan(err), 15.0, np.abs(err))
        mae = err.mean(axis=0)
        acc = np.mean([r["system_ok"] for r in sel])
        sec = np.mean([r["seconds"] for r in sel])
        lines.append(f"{dose:>10.0e} {thick:>5.1f} {mae[0]:>6.2f} {mae[1]:>6.2f} {mae[2]:>6.2f} {acc:>7.0%} {len(sel):>6d} {sec:>7.1f}")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cache", type=Path, default=CACHE, help="where the held-out runs are cached")
    ap.add_argument("--runs-only", action="store_true", help="only simulate (or finish) the held-out runs")
    ap.add_argument("--verbose", action="store_true", help="print every field's truth and estimate")
    args = ap.parse_args(argv)
    paths = heldout_runs(args.cache)
    if args.runs_only:
        return
    rows = evaluate(paths)
    if args.verbose:
        for r in rows:
            print(r["system"], r.get("found"), f"{r['thickness_nm']:.1f} nm {r['dose']:.0e}", r.get("truth"),
                  np.round(r.get("estimate", []), 2))
    print("Classical baseline (Gaussian O-column fits + rigid-octahedron model), held-out [110]pc ABF,")
    print(f"one run per tilt system {', '.join(SYSTEMS)}; errors per B column, signed where the projection")
    print("carries the sign (octahedra.SIGNS_IN_PROJECTION), else magnitudes:")
    print(table(rows))


if __name__ == "__main__":
    main()
