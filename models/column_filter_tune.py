"""Tune the column screen's thresholds (`column_filter.SCREENS`) on training-seed images.

Images are drawn as in training (the training structures, seed 0 -- the seed `stemlive
simulate images` uses -- at indices past those training used) at 10³, 10⁴ and 10⁵ e/Å²; the
network's peaks are found once with a low threshold, then every combination of confidence
floor, contrast-z floor and minimum separation is scored (precision, recall, F1 within 0.5 Å,
2 px border left out, as `benchmarks/atom_accuracy.py` scores).  The benchmark's held-out seeds
are never used here.

    python -m stemlive.models.column_filter_tune --contrast abf [--n 10]
"""
from __future__ import annotations

import argparse
import itertools
from pathlib import Path

import numpy as np

from .atom_analysis import AtomFinder, network_input
from .atom_locator import match_inside
from .cards import SHIPPED_DIR
from .column_filter import Scales, Screen, contrast_z, suppress_close

DOSES = (1e3, 1e4, 1e5)
FIRST_INDEX = 50_000  # training sets use indices [0, n_images) of seed 0; these lie beyond them
CONFIDENCE = (0.15, 0.3, 0.5, 0.7, 0.8, 0.9)
CONTRAST_Z = (-np.inf, 1.0, 2.0, 3.0, 4.0, 5.0)
SEPARATION_A = (0.0, 0.9)
BACKGROUND_A = (0.9, 1.3)


def peaks(contrast: str, n: int, models: Path = SHIPPED_DIR, size: int = 256, random_lattices: float = 0.0) -> list[dict]:
    """The network's unscreened peaks (threshold 0.05) with their contrast z, per image and dose."""
    from ..simulate.atom_images import STRUCTURES, ImageRanges, random_image

    finder = AtomFinder.shipped(contrast, models, backend="onnxruntime", threads=1)
    finder.threshold = min(CONFIDENCE)
    out = []
    for k in range(n):
        for d in DOSES:
            r = ImageRanges(structures=STRUCTURES, contrast=contrast, size_px=size, dose_e_per_A2=(d, d),
                            random_lattice_probability=random_lattices)
            img, truth = random_image(np.random.default_rng([0, FIRST_INDEX + k]), r)
            s = truth.meta["sampling_A"]
            f = finder.find(img, s, screen=False)
            x = network_input(img, contrast)
            z = {}
            for b in BACKGROUND_A:
                sc = Scales.from_sampling(s, Screen(0.0, 0.0, background_A=b))
                z[b] = contrast_z(x, f.positions_px, sc.column_px, sc.background_px)
            out.append({"dose": d, "sampling": s, "pos": f.positions_px, "conf": f.confidence, "z": z,
                        "truth": truth.target(contrast), "size": size})
    return out


def evaluate(data: list[dict], conf: float, z: float, sep_A: float, bg_A: float) -> dict[float, tuple[float, float, float]]:
    """{dose: (precision, recall, F1)} pooled over the images, for one setting."""
    out = {}
    for d in DOSES:
        m = fp = t = 0
        for e in (e for e in data if e["dose"] == d):
            keep = (e["conf"] > conf) & (e["z"][bg_A] > z)
            idx = np.flatnonzero(keep)
            keep[idx] = suppress_close(e["pos"][idx], e["conf"][idx], sep_A / e["sampling"])
            r = match_inside(e["pos"][keep], e["truth"], 0.5 / e["sampling"], (e["size"], e["size"]), 2)
            m, fp, t = m + r.score.matched, fp + r.false_positives, t + int(r.truth_inside.sum())
        p, rc = m / max(m + fp, 1), m / max(t, 1)
        out[d] = (p, rc, 2 * p * rc / max(p + rc, 1e-12))
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--contrast", choices=["haadf", "abf"], required=True)
    ap.add_argument("--n", type=int, default=10, help="images per dose")
    ap.add_argument("--top", type=int, default=10)
    ap.add_argument("--models", type=Path, default=SHIPPED_DIR)
    ap.add_argument("--random-lattices", type=float, default=0.0,
                    help="fraction of made-up crystals (a stand-in for structures the network never saw)")
    args = ap.parse_args(argv)
    data = peaks(args.contrast, args.n, args.models, random_lattices=args.random_lattices)
    rows = [(c, z, s, b, evaluate(data, c, z, s, b))
            for c, z, s, b in itertools.product(CONFIDENCE, CONTRAST_Z, SEPARATION_A, BACKGROUND_A)]
    rows.sort(key=lambda r: -(r[4][1e4][2] + r[4][1e5][2]))
    if args.contrast == "haadf":  # HAADF: show the card's threshold with each image test too
        rows = [r for r in rows if r[0] >= 0.5]
    print("| confidence > | z > | separation Å | background Å | " + " | ".join(f"P / R / F1 at {d:.0e}" for d in DOSES) + " |")
    print("|---|---|---|---|" + "---|" * len(DOSES))
    card = AtomFinder.shipped(args.contrast, args.models, backend="onnxruntime").card.data["threshold"]
    b0 = BACKGROUND_A[0]
    rows = rows[:args.top] + [(card, -np.inf, 0.0, b0, evaluate(data, card, -np.inf, 0.0, b0))]  # last: the network alone
    for c, z, s, b, sc in rows:
        print(f"| {c} | {z} | {s} | {b} | " + " | ".join("%.3f / %.3f / %.3f" % sc[d] for d in DOSES) + " |")


if __name__ == "__main__":
    main()
