"""The convolution approximation against multislice: column weights, Z exponent and fit quality.

Fits ``b + Σ_c w_c K(p - r_c)`` (K: probe intensity blurred by σ) to detector-ring images taken
from the shipped position-resolved CBED library (abTEM multislice with frozen phonons, SrTiO3
[001], 200 kV, 13.6 mrad; 8×8 probe positions per cell) at each thickness, and prints the weight
ratios, the Z exponent they imply and the correlation r.  Tells whether the training images'
exponent ranges cover multislice (simulate/atom_images.py).

    python benchmarks/atom_contrast_calibration.py [--every 3]
"""
from __future__ import annotations

import argparse

from stemlive.simulate.contrast_calibration import fit_image, ring_images
from stemlive.simulate.scan_cli import SHIPPED_LIBRARY

RINGS = {"HAADF 41-61 mrad (the frames' edge)": (40.8, 61.3), "ADF 20-41 mrad": (20.4, 40.8),
         "ABF 6.8-13.6 mrad": (6.8, 13.6)}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--every", type=int, default=3, help="every n-th library thickness")
    args = ap.parse_args(argv)
    print("| ring | thickness nm | w(Ti-O)/w(Sr) | w(O)/w(Sr) | implied n | kernel blur σ Å | r |")
    print("|---|---|---|---|---|---|---|")
    for name, (lo, hi) in RINGS.items():
        images, attrs = ring_images(SHIPPED_LIBRARY, lo, hi)
        for k in range(0, len(images), args.every):
            f = fit_image(images[k], attrs, float(attrs["thickness_nm"][k]))
            w = f.weights
            n = "-" if f.exponent is None else f"{f.exponent:.2f}"
            print(f"| {name} | {f.thickness_nm:.1f} | {w['O+Ti'] / w['Sr']:.3f} | {w['O'] / w['Sr']:.3f} | {n} | "
                  f"{f.sigma_A:.2f} | {f.r:.3f} |")


if __name__ == "__main__":
    main()
