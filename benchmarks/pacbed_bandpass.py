"""Which parts of the pattern the thickness/tilt network reads: the seed's band-pass analysis
(Section 5.1, Figs. 5-6).

An annulus of the aligned pattern, as wide as the seed's (2.2 mrad at 13.6 mrad, 1.6 mrad at
19.1 mrad), is replaced by its mean intensity; the annulus's inner semi-angle is swept across the
pattern and the accuracy on held-out simulations (4.7e7 electrons/pattern) is recorded per
thickness range.  Alignment is taken from the truth so that only the network's reading is tested.

    python benchmarks/pacbed_bandpass.py [--alpha 13.6 19.1] [--n 600]

Prints a table and writes docs/pacbed_bandpass.png.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from pacbed_common import library_for
from stemlive.models import canonical
from stemlive.models.cards import SHIPPED_DIR
from stemlive.models.pacbed_analysis import PacbedAnalyzer, canonical_crop
from stemlive.models.pacbed_estimate import estimate
from stemlive.simulate.heldout_patterns import heldout_raw_patterns

WIDTH_MRAD = {13.6: 2.2, 19.1: 1.6}
RANGES = [(0, 20), (20, 60), (60, 200)]


def band_pass(crops: np.ndarray, lo_mrad: float, width_mrad: float, alpha_mrad: float) -> np.ndarray:
    """Set the annulus [lo, lo + width) (mrad from the centre) to its mean, per pattern."""
    c = (canonical.PIXELS - 1) / 2
    r = np.hypot(*(np.indices(crops.shape[-2:]) - c)) * alpha_mrad / canonical.ALPHA_PX
    ring = (r >= lo_mrad) & (r < lo_mrad + width_mrad)
    out = crops.copy()
    out[:, ring] = crops[:, ring].mean(axis=1, keepdims=True)
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--alpha", type=float, nargs="+", default=[13.6, 19.1])
    ap.add_argument("--n", type=int, default=600)
    ap.add_argument("--models", type=Path, default=SHIPPED_DIR)
    ap.add_argument("--png", type=Path, default=Path(__file__).resolve().parent.parent / "docs" / "pacbed_bandpass.png")
    args = ap.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(args.alpha), figsize=(5.5 * len(args.alpha), 7), squeeze=False,
                             constrained_layout=True)
    for j, alpha in enumerate(args.alpha):
        an = PacbedAnalyzer.for_acquisition(200, alpha, args.models, backend="onnxruntime")
        x, truth = heldout_raw_patterns(library_for(alpha), args.n, 4.7e7, seed=300)
        crops = np.stack([canonical_crop(p, c, r, t) for p, c, r, t in
                          zip(x, truth["center_px"], truth["radius_px"], truth["rotation_deg"])])
        tilt_true = truth["tilt_crystal_mrad"]
        width = WIDTH_MRAD.get(alpha, 2.2 * alpha / 13.6)
        starts = np.arange(0.0, canonical.ANALYSIS_WINDOW_ALPHA * alpha - width, width / 2)
        acc_t = np.zeros((len(starts) + 1, len(RANGES)))
        acc_a = np.zeros_like(acc_t)
        for i, lo in enumerate(tqdm([None, *starts], desc=f"band-pass {alpha} mrad")):
            c = crops if lo is None else band_pass(crops, lo, width, alpha)
            out = an.read_crops(c)
            th, _ = estimate(out["thickness_prob"], an.thickness_bins)
            tilt = np.stack([estimate(out[f"tilt{k}_prob"], an.tilt_bins)[0] for k in (0, 1)], axis=1)
            for k, (a, b) in enumerate(RANGES):
                m = (truth["thickness_nm"] >= a) & (truth["thickness_nm"] < b)
                acc_t[i, k] = np.mean(np.abs(th - truth["thickness_nm"])[m] <= 1)
                acc_a[i, k] = np.mean((np.abs(tilt - tilt_true)[m] <= 0.25).all(axis=1))
        print(f"\n{alpha} mrad, annulus {width} mrad wide; accuracy (thickness ±1 nm / tilt ±0.25 mrad) by thickness range")
        print("mask start [mrad] " + " ".join(f"{a}-{b} nm".rjust(16) for a, b in RANGES))
        for i, lo in enumerate([None, *starts]):
            name = "none" if lo is None else f"{lo:.1f}"
            print(name.rjust(17) + " " + " ".join(f"{acc_t[i, k]:7.1%} /{acc_a[i, k]:7.1%}" for k in range(len(RANGES))))
        for k, (a, b) in enumerate(RANGES):
            axes[0, j].plot(starts, acc_t[1:, k], "o-", ms=3, label=f"{a}-{b} nm (no mask {acc_t[0, k]:.0%})")
            axes[1, j].plot(starts, acc_a[1:, k], "o-", ms=3, label=f"{a}-{b} nm (no mask {acc_a[0, k]:.0%})")
        for row, what in enumerate(("thickness within ±1 nm", "tilt within ±0.25 mrad")):
            axes[row, j].axvline(alpha, color="k", ls="--", lw=0.8)
            axes[row, j].set(title=f"{alpha} mrad: {what}", xlabel="band-pass mask start [mrad]", ylim=(0, 1.02))
            axes[row, j].legend(fontsize=8)
    args.png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.png, dpi=90)
    print(f"\nwrote {args.png}")


if __name__ == "__main__":
    main()
