"""`stemlive atoms find IMAGE --out atoms.csv`: the atom finder on one image file."""
from __future__ import annotations

import csv
import os
import sys
from pathlib import Path

import numpy as np


def add_parsers(sub) -> None:
    a = sub.add_parser("atoms", help="atomic columns in STEM images")
    asub = a.add_subparsers(dest="what", required=True)
    f = asub.add_parser("find", help="find the atomic columns of one image (npy, TIFF, dm3/dm4) and write a CSV",
                        description="Columns with sub-pixel positions (row, col; pixel centres at integer indices), "
                                    "the network's confidence and the image's intensity around each. Without "
                                    "--sampling-A-per-px the column spacing is measured from the image; an image "
                                    "with no evident lattice is refused.")
    f.add_argument("image", type=Path)
    f.add_argument("--out", type=Path, required=True, help="CSV file to write")
    f.add_argument("--sampling-A-per-px", type=float, default=None, dest="sampling",
                   help="pixel size [Å]; adds row_A, col_A to the CSV")
    f.add_argument("--contrast", choices=["haadf", "abf"], default="haadf",
                   help="haadf: cation-containing columns (bright); abf: every column incl. oxygen (dark)")
    f.add_argument("--models", type=Path, default=None, help="directory of model cards (default: the shipped models)")
    f.add_argument("--backend", choices=["auto", "onnxruntime", "tensorrt"], default="auto")
    f.add_argument("--threshold", type=float, default=None, help="confidence a column needs (default: the card's)")
    f.set_defaults(func=run_find)


def run_find(args) -> int:
    from .atom_analysis import AtomFinder
    from .cards import SHIPPED_DIR
    from .readers import read_patterns

    stack = read_patterns(args.image)
    if len(stack) != 1:
        raise ValueError(f"{args.image} holds {len(stack)} images; `stemlive atoms find` takes one")
    finder = AtomFinder.shipped(args.contrast, args.models or SHIPPED_DIR, backend=args.backend)
    if args.threshold is not None:
        finder.threshold = args.threshold
    found = finder.find(stack[0], args.sampling)
    write_csv(args.out, found, args.sampling)
    how = (f"sampling {args.sampling:g} Å/px" if args.sampling else
           f"column spacing {found.spacing_px:.2f} px measured")
    zoom = f", resampled ×{found.zoom:.3g} for the network" if abs(found.zoom - 1) > 1e-6 else ""
    print(f"{len(found.positions_px)} columns ({args.contrast}, {how}{zoom}; model {finder.card.id}) -> {args.out}",
          file=sys.stderr)
    return 0


def write_csv(path: Path, found, sampling_A: float | None) -> None:
    """The CSV contract: header, then row_px,col_px,confidence,intensity[,row_A,col_A]; atomic write."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    header = ["row_px", "col_px", "confidence", "intensity"] + (["row_A", "col_A"] if sampling_A else [])
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        for (r, c), conf, inten in zip(found.positions_px, found.confidence, found.intensity):
            row = [f"{r:.3f}", f"{c:.3f}", f"{conf:.4f}", f"{inten:.6g}"]
            if sampling_A:
                row += [f"{r * sampling_A:.4f}", f"{c * sampling_A:.4f}"]
            w.writerow(row)
    os.replace(tmp, path)


def read_csv(path: Path) -> dict[str, np.ndarray]:
    """Columns of a CSV written by :func:`write_csv` (tests, notebooks)."""
    data = np.genfromtxt(path, delimiter=",", names=True, ndmin=1)
    return {name: np.atleast_1d(data[name]) for name in data.dtype.names}
