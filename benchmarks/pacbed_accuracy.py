"""PACBED accuracy in the shape of the seed's Table 2: networks, least squares and hybrid.

Held-out simulations (tilts, hence phonon seeds, the training never saw) of both shipped
settings, at 2.3e7, 4.7e7 and 2.3e8 electrons/pattern, each pattern misaligned as a raw recording
is (centre ±5 px, size ±20 %, rotation ±45°) in a 64×64 detector frame (α ≈ 12 px).  The
analysis starts from the raw pattern (coarse disk, alignment iterations, background, thickness,
tilt).  LSF and hybrid run on the first ``--lsf-n`` patterns of each set; their library is the
full one, which *contains* the held-out simulations noise-free — a favourable case for LSF.

    python benchmarks/pacbed_accuracy.py [--n 1000] [--lsf-n 40] [--alpha 13.6 19.1]

Results are cached in .bench-cache/pacbed (keyed by model and library sha256), so an
interrupted run continues.  Writes docs/pacbed_accuracy_vs_thickness.png (the seed's Fig. 3).
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from pacbed_common import DOSES, as_arrays, cache_key, cached, library_for, print_table, scores
from stemlive.models.cards import SHIPPED_DIR, sha256_of
from stemlive.models.lsf import LsfAnalyzer
from stemlive.models.pacbed_analysis import PacbedAnalyzer
from stemlive.simulate.heldout_patterns import heldout_raw_patterns


SET_VERSION = 2  # bump when the held-out sets change (cache keys)


def run_network(analyzer, x, batch=256):
    out = []
    for i in tqdm(range(0, len(x), batch), desc="network", leave=False):
        out += analyzer.analyze(x[i:i + batch])
    return out


def plot_vs_thickness(per_alpha: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(per_alpha), figsize=(5.5 * len(per_alpha), 7), squeeze=False,
                             constrained_layout=True)
    for j, (alpha, sets) in enumerate(per_alpha.items()):
        for dose, (est, truth) in sets.items():
            t = truth["thickness_nm"][:len(est["thickness_nm"])]
            edges = np.linspace(0, t.max() + 1, 13)
            mid = 0.5 * (edges[1:] + edges[:-1])
            idx = np.digitize(t, edges) - 1
            dt = np.abs(est["thickness_nm"] - t)
            dtilt = np.abs(est["tilt_mrad"] - truth["tilt_mrad"][:len(t)]).max(axis=1)
            acc_t = [np.mean(dt[idx == k] <= 1) if (idx == k).any() else np.nan for k in range(len(mid))]
            acc_a = [np.mean(dtilt[idx == k] <= 0.25) if (idx == k).any() else np.nan for k in range(len(mid))]
            axes[0, j].plot(mid, acc_t, "o-", label=f"{dose:.1e} e⁻")
            axes[1, j].plot(mid, acc_a, "o-", label=f"{dose:.1e} e⁻")
        axes[0, j].set(title=f"{alpha} mrad: thickness within ±1 nm", xlabel="thickness [nm]", ylim=(0, 1.02))
        axes[1, j].set(title=f"{alpha} mrad: tilt within ±0.25 mrad (both)", xlabel="thickness [nm]", ylim=(0, 1.02))
        for a in axes[:, j]:
            a.grid(alpha=0.3)
            a.legend(fontsize=8)
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=90)
    plt.close(fig)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=1000, help="patterns per dose for the networks")
    ap.add_argument("--lsf-n", type=int, default=40, help="patterns per dose for LSF and hybrid (slow)")
    ap.add_argument("--alpha", type=float, nargs="+", default=[13.6, 19.1])
    ap.add_argument("--models", type=Path, default=SHIPPED_DIR)
    ap.add_argument("--png", type=Path, default=Path(__file__).resolve().parent.parent / "docs" / "pacbed_accuracy_vs_thickness.png")
    args = ap.parse_args(argv)
    per_alpha: dict = {}
    for alpha in args.alpha:
        lib = library_for(alpha)
        analyzer = PacbedAnalyzer.for_acquisition(200, alpha, args.models, backend="onnxruntime")
        model_key = [c.data["onnx_sha256"] for c in analyzer.cards]
        lib_sha = sha256_of(lib)
        lsf = None
        rows, per_alpha[alpha] = [], {}
        for k, dose in enumerate(DOSES):
            x, truth = heldout_raw_patterns(lib, args.n, dose, seed=100)  # same patterns, other noise
            net = cached("network", cache_key(model_key, lib_sha, args.n, dose, SET_VERSION),
                         lambda: as_arrays(run_network(analyzer, x)))
            per_alpha[alpha][dose] = (net, truth)
            rows.append((f"network {dose:.1e}", scores(net, truth)))
            if args.lsf_n <= 0:
                continue
            m = args.lsf_n

            def run_lsf(kind):
                nonlocal lsf
                lsf = lsf or LsfAnalyzer(lib, 200, alpha)
                if kind == "lsf":
                    return as_arrays([lsf.analyze_one(p) for p in tqdm(x[:m], desc="lsf", leave=False)])
                return as_arrays(lsf.refine(x[:m], analyzer.analyze(x[:m])))

            for kind in ("lsf", "hybrid"):
                key = cache_key(model_key if kind == "hybrid" else None, lib_sha, m, dose, args.n, SET_VERSION)
                res = cached(kind, key, lambda: run_lsf(kind))
                rows.append((f"{kind} {dose:.1e}", scores(res, truth)))
            rows.append((f"network (same {m}) {dose:.1e}", scores({k: v[:m] for k, v in net.items()}, truth)))
        print_table(f"SrTiO3 [001], 200 kV, {alpha} mrad — held-out simulations ({args.n} per dose; "
                    f"LSF/hybrid on {args.lsf_n})", rows)
    plot_vs_thickness(per_alpha, args.png)
    print(f"\nwrote {args.png}")


if __name__ == "__main__":
    t0 = time.perf_counter()
    main()
    print(f"({time.perf_counter() - t0:.0f} s)")
