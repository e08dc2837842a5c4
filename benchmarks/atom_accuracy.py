"""Atom finding on held-out simulated images: the shipped networks against the classical baseline.

Images are drawn as in training but from seeds training never used, in two groups: the training
structures and zones (new specimens, probes, distortions) and structures/zones training never
saw (BaTiO3 [110], 2H-MoS2 [001] and [100]).  Every image is made at four doses (10², 10³, 10⁴,
10⁵ e/Å²) from the same specimen, so the doses differ only in noise.  All methods get the same
images; the baseline (Laplacian-of-Gaussian peaks + 2D Gaussian refinement, as in Atomap) is
given the column width from the true sampling, the network is given the sampling; "network" is
the shipped finder (the network's peaks screened by `models/column_filter.py`), "network,
unscreened" its peaks above the card's threshold alone.

Truth: HAADF -- the cation-containing columns; ABF -- every column, with oxygen (anion-only)
columns also scored on their own.  A column counts as found within 0.5 Å; RMSE over matched
columns in pm; columns within 2 px of the border are left out for both methods.

    python benchmarks/atom_accuracy.py [--n 16] [--contrast haadf abf] [--no-baseline] [--out docs/atoms_accuracy_vs_dose.png]

Prints one table per contrast (and the throughput in megapixels per second on this CPU) and
writes the plot.  Targets (issue 6): HAADF F1 ≥ 0.99 and RMSE ≤ 5 pm at ≥ 10³ e/Å², better
than the baseline at every dose.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from stemlive.models.atom_analysis import AtomFinder
from stemlive.models.atom_baseline import log_gaussian_columns
from stemlive.models.atom_locator import match_inside
from stemlive.models.cards import SHIPPED_DIR
from stemlive.simulate.atom_images import HELD_OUT_STRUCTURES, STRUCTURES, ImageRanges, random_image

DOSES = (1e2, 1e3, 1e4, 1e5)
GROUPS = {"seen structures": STRUCTURES, "unseen structures": HELD_OUT_STRUCTURES}
SEED = 7_000_000  # training images use seeds 0-2; these never overlap them
BORDER_PX = 2
# the shipped finder (network + column screen), the network's peaks alone, the classical baseline
METHODS = ("network", "network, unscreened", "baseline")


def screen_id(finder: AtomFinder) -> str:
    """The screen's settings, part of the results key: a retuned screen is measured again."""
    s = finder.screen
    return "unscreened" if s is None else (f"screen-c{s.min_confidence}-z{s.min_contrast_z}-d{s.min_separation_A}"
                                           f"-b{s.background_A}")


def score(found: np.ndarray, truth: np.ndarray, anion: np.ndarray, n: int, radius: float) -> dict:
    """Counts for precision/recall/RMSE, overall and for the anion-only columns (border excluded)."""
    m = match_inside(found, truth, radius, (n, n), BORDER_PX)
    d2 = np.sum((found[m.found_index] - truth[m.truth_index]) ** 2, axis=1)
    an = anion[m.truth_index]
    return {"found": m.score.matched + m.false_positives, "truth": int(m.truth_inside.sum()),
            "matched": m.score.matched, "sq": float(d2.sum()), "anion_truth": int((anion & m.truth_inside).sum()),
            "anion_matched": int(an.sum()), "anion_sq": float(d2[an].sum())}


def summarise(counts: list[dict], sampling: list[float]) -> dict:
    found = sum(c["found"] for c in counts)
    truth = sum(c["truth"] for c in counts)
    m = sum(c["matched"] for c in counts)
    # squared distances are in px²: convert per image before pooling
    sq_pm = sum(c["sq"] * (s * 100) ** 2 for c, s in zip(counts, sampling))
    asq_pm = sum(c["anion_sq"] * (s * 100) ** 2 for c, s in zip(counts, sampling))
    p = m / found if found else 0.0
    r = m / truth if truth else 0.0
    at, am = sum(c["anion_truth"] for c in counts), sum(c["anion_matched"] for c in counts)
    return {"precision": p, "recall": r, "f1": 2 * p * r / (p + r) if p + r else 0.0,
            "rmse_pm": float(np.sqrt(sq_pm / m)) if m else float("nan"),
            "anion_recall": am / at if at else float("nan"),
            "anion_rmse_pm": float(np.sqrt(asq_pm / am)) if am else float("nan"), "images": len(counts)}


def run_contrast(contrast: str, n: int, size: int, finder: AtomFinder, results_path: Path,
                 methods: tuple[str, ...] = METHODS) -> dict:
    """{group: {dose: {method: summary}}}, resumable through ``results_path``."""
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    key = f"{contrast}-n{n}-s{size}-{finder.card.id}-{screen_id(finder)}-{'+'.join(methods)}"
    if key in results:
        return results[key]
    out: dict = {}
    total = len(GROUPS) * n * len(DOSES)
    bar = tqdm(total=total, desc=f"{contrast} images", unit="image")
    for gi, (g, structures) in enumerate(GROUPS.items()):
        per = {f"{d:.0e}": {m: [] for m in METHODS + ("sampling",)} for d in DOSES}
        for k in range(n):
            for d in DOSES:
                r = ImageRanges(structures=structures, contrast=contrast, size_px=size, dose_e_per_A2=(d, d))
                img, truth = random_image(np.random.default_rng([SEED, gi, k]), r)
                s = truth.meta["sampling_A"]
                target = truth.target(contrast)
                anion = (~truth.cation & truth.visible)[truth.cation if contrast == "haadf" else truth.visible]
                radius = 0.5 / s
                net = finder.find(img, s).positions_px
                raw = finder.find(img, s, screen=False).positions_px
                e = per[f"{d:.0e}"]
                e["network"].append(score(net, target, anion, size, radius))
                e["network, unscreened"].append(score(raw, target, anion, size, radius))
                if "baseline" in methods:  # minutes per low-dose image: a least-squares fit per peak
                    base_img = -img if contrast == "abf" else img
                    base = log_gaussian_columns(base_img, sigma_px=0.4 / s,
                                                min_distance_px=max(1, int(round(1.0 / s)))).positions_px
                    e["baseline"].append(score(base, target, anion, size, radius))
                e["sampling"].append(s)
                bar.update()
        out[g] = {d: {m: summarise(v[m], v["sampling"]) for m in methods} for d, v in per.items()}
    bar.close()
    results[key] = out
    results_path.parent.mkdir(parents=True, exist_ok=True)
    results_path.write_text(json.dumps(results, indent=1))
    return out


def print_table(contrast: str, out: dict) -> None:
    anion = contrast == "abf"
    print(f"\n{contrast.upper()} (truth: {'every column; O = anion-only columns' if anion else 'cation-containing columns'})")
    head = "| structures | dose e/Å² | method | precision | recall | F1 | RMSE pm |" + (" O recall | O RMSE pm |" if anion else "")
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for g, per in out.items():
        for d, methods in per.items():
            for m, s in methods.items():
                line = (f"| {g} | {float(d):.0e} | {m} | {s['precision']:.3f} | {s['recall']:.3f} | {s['f1']:.3f} | "
                        f"{s['rmse_pm']:.1f} |")
                if anion:
                    line += f" {s['anion_recall']:.3f} | {s['anion_rmse_pm']:.1f} |"
                print(line)


def plot(all_out: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(all_out), 2, figsize=(10, 3.6 * len(all_out)), squeeze=False)
    for row, (contrast, out) in enumerate(all_out.items()):
        for g, per in out.items():
            doses = [float(d) for d in per]
            for m, style in (("network", "-o"), ("network, unscreened", ":^"), ("baseline", "--s")):
                if m not in per[next(iter(per))]:
                    continue
                ls = "tab:blue" if g.startswith("seen") else "tab:orange"
                axes[row, 0].semilogx(doses, [per[d][m]["f1"] for d in per], style, color=ls, label=f"{m}, {g}")
                axes[row, 1].loglog(doses, [per[d][m]["rmse_pm"] for d in per], style, color=ls, label=f"{m}, {g}")
        axes[row, 0].set(xlabel="dose [e/Å²]", ylabel="F1 within 0.5 Å", title=f"{contrast.upper()}: F1", ylim=(0, 1.02))
        axes[row, 0].axhline(0.99, color="grey", lw=0.8, ls=":")
        axes[row, 1].set(xlabel="dose [e/Å²]", ylabel="RMSE [pm]", title=f"{contrast.upper()}: position RMSE")
        axes[row, 1].axhline(5, color="grey", lw=0.8, ls=":")
        axes[row, 0].legend(fontsize=7)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)


def throughput(finder: AtomFinder, edge: int = 1024, sampling: float = 0.2) -> tuple[float, float]:
    """Megapixels per second for one large image, network (incl. locating) and baseline."""
    r = ImageRanges(structures=(("SrTiO3", "[001]"),), size_px=edge, sampling_A=(sampling, sampling),
                    dose_e_per_A2=(1e4, 1e4))
    img, _ = random_image(np.random.default_rng(1), r)
    finder.find(img[:256, :256], sampling)  # warm-up
    t = time.perf_counter()
    finder.find(img, sampling)
    net = edge * edge / 1e6 / (time.perf_counter() - t)
    t = time.perf_counter()
    log_gaussian_columns(img, sigma_px=0.4 / sampling, min_distance_px=int(round(1.0 / sampling)))
    base = edge * edge / 1e6 / (time.perf_counter() - t)
    return net, base


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=16, help="specimens per group (each at every dose)")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--contrast", nargs="+", default=["haadf", "abf"], choices=["haadf", "abf"])
    ap.add_argument("--models", type=Path, default=SHIPPED_DIR)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--results", type=Path, default=Path(".bench-cache/atom_accuracy.json"),
                    help="results so far (a rerun continues from here)")
    ap.add_argument("--out", type=Path, default=Path("docs/atoms_accuracy_vs_dose.png"))
    ap.add_argument("--no-baseline", action="store_true",
                    help="the networks only (the baseline's least-squares fits take most of the time)")
    args = ap.parse_args(argv)
    methods = tuple(m for m in METHODS if not (args.no_baseline and m == "baseline"))
    all_out = {}
    for c in args.contrast:
        finder = AtomFinder.shipped(c, args.models, backend="onnxruntime", threads=args.threads)
        all_out[c] = run_contrast(c, args.n, args.size, finder, args.results, methods)
        print_table(c, all_out[c])
    plot(all_out, args.out)
    print(f"\nplot: {args.out}")
    finder = AtomFinder.shipped(args.contrast[0], args.models, backend="onnxruntime", threads=args.threads)
    net, base = throughput(finder)
    print(f"throughput (1024² {args.contrast[0].upper()} image at 0.2 Å/px, this CPU): network {net:.2f} MPix/s, "
          f"baseline {base:.2f} MPix/s")


if __name__ == "__main__":
    main()
