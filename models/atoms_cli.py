"""`stemlive atoms find IMAGE --out atoms.csv`: the atom finder on one image file;
`stemlive atoms analyse IMAGE --out columns.csv|.h5`: every column with its species and anomaly."""
from __future__ import annotations

import csv
import math
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np


def add_parsers(sub) -> None:
    a = sub.add_parser("atoms", help="atomic columns in STEM images")
    asub = a.add_subparsers(dest="what", required=True)
    f = asub.add_parser("find", help="find the atomic columns of one image (npy, TIFF, dm3/dm4) and write a CSV",
                        description="Columns with sub-pixel positions (row, col; pixel centres at integer indices), "
                                    "the network's confidence and the image's intensity around each. Without "
                                    "--sampling-A-per-px the column spacing is measured from the image; an image "
                                    "with no evident lattice is refused. With it, an image that shows nothing "
                                    "above its shot noise gives no columns and a warning.")
    f.add_argument("image", type=Path)
    f.add_argument("--out", type=Path, required=True, help="CSV file to write (never the input)")
    f.add_argument("--overwrite", action="store_true",
                   help="replace an existing --out (only once the columns were found)")
    f.add_argument("--sampling-A-per-px", type=float, default=None, dest="sampling",
                   help="pixel size [Å]; adds row_A, col_A to the CSV")
    f.add_argument("--contrast", choices=["haadf", "abf"], default="haadf",
                   help="haadf: cation-containing columns (bright); abf: every column incl. oxygen (dark)")
    f.add_argument("--models", type=Path, default=None, help="directory of model cards (default: the shipped models)")
    f.add_argument("--backend", choices=["auto", "onnxruntime", "tensorrt"], default="auto")
    f.add_argument("--threshold", type=float, default=None,
                   help="confidence a column needs, in (0, 1) (default: the card's, raised to the column screen's)")
    f.add_argument("--no-screen", action="store_false", dest="screen",
                   help="keep every peak of the network above the threshold (default: drop peaks that are not "
                        "columns: too little contrast above the noise, or closer than 0.9 Å to a likelier one)")
    f.set_defaults(func=run_find)

    an = asub.add_parser("analyse", aliases=["analyze"],
                         help="every column of one scan's HAADF/ABF pair: position, confidence, species, anomaly",
                         description="Columns found in the --contrast image (as `atoms find`), each with its "
                                     "lattice site, species (class and probabilities) and point-defect anomaly "
                                     "score and flag (above the model card's threshold). The species and anomaly "
                                     "networks read the HAADF and the ABF image of one scan: IMAGE as a 2×H×W "
                                     "stack (HAADF first), or one image and --pair. Writes CSV (.csv) or HDF5 "
                                     "(.h5, .hdf5; attributes name the models' ids).")
    an.add_argument("image", type=Path)
    an.add_argument("--pair", type=Path, default=None,
                    help="the other detector's image of the same scan (ABF when --contrast haadf, and vice versa)")
    an.add_argument("--out", type=Path, required=True, help="columns.csv or columns.h5 (never an input)")
    an.add_argument("--overwrite", action="store_true", help="replace an existing --out (only once analysed)")
    an.add_argument("--sampling-A-per-px", type=float, default=None, dest="sampling",
                    help="pixel size [Å] (default: from the fitted lattice and the models' material, SrTiO3 [001])")
    an.add_argument("--contrast", choices=["haadf", "abf"], default="haadf",
                    help="the image the columns are found in (haadf: Sr and Ti-O; abf: every column incl. O)")
    an.add_argument("--models", type=Path, default=None, help="directory of model cards (default: the shipped models)")
    an.add_argument("--backend", choices=["auto", "onnxruntime", "tensorrt"], default="auto")
    an.set_defaults(func=run_analyse, threshold=None)


def check_arguments(args) -> None:
    """Numbers the finder cannot use are usage errors before anything is read or loaded."""
    from .atom_analysis import check_sampling

    if args.threshold is not None and not (math.isfinite(args.threshold) and 0 < args.threshold < 1):
        raise ValueError(f"--threshold {args.threshold}: the network's confidence lies in (0, 1); "
                         "give a number between them, e.g. 0.5")
    if args.sampling is not None:
        try:
            check_sampling(args.sampling)
        except ValueError as exc:
            raise ValueError(f"--sampling-A-per-px: {exc}") from None


def run_find(args) -> int:
    """Find the columns and write the CSV.

    With the sampling given, an image that is only noise gives an empty CSV and a warning: the
    scale is known, so "no columns" is the true answer (vacuum, amorphous film, a blank frame), as
    a microscopist reads such an image, and a script over many images should not stop there.
    Without the sampling such an image is refused (exit 2): its scale cannot be told."""
    from ..live.outputs import replacing
    from .atom_analysis import AtomFinder
    from .cards import SHIPPED_DIR
    from .cli import prepare_output
    from .readers import read_patterns

    check_arguments(args)
    prepare_output(args.out, [args.image], args.overwrite)
    stack = read_patterns(args.image)
    if len(stack) != 1:
        raise ValueError(f"{args.image} holds {len(stack)} images; `stemlive atoms find` takes one")
    finder = AtomFinder.shipped(args.contrast, args.models or SHIPPED_DIR, backend=args.backend)
    if args.threshold is not None:  # the user's floor replaces the screen's too
        finder.threshold = args.threshold
        if finder.screen is not None:
            finder.screen = replace(finder.screen, min_confidence=args.threshold)
    found = finder.find(stack[0], args.sampling, require_structure=True, screen=args.screen)
    with replacing(args.out) as tmp:
        write_csv(tmp, found, args.sampling)
    if found.note:
        print(f"stemlive atoms find: warning: {args.image}: {found.note}", file=sys.stderr)
    how = (f"sampling {args.sampling:g} Å/px" if args.sampling else
           f"column spacing {found.spacing_px:.2f} px measured")
    zoom = f", resampled ×{found.zoom:.3g} for the network" if abs(found.zoom - 1) > 1e-6 else ""
    dropped = f"; {found.rejected} peaks screened out as no column" if found.rejected else ""
    print(f"{len(found.positions_px)} columns ({args.contrast}, {how}{zoom}; model {finder.card.id}{dropped}) "
          f"-> {args.out}", file=sys.stderr)
    return 0


OUT_SUFFIXES = {".csv": "csv", ".h5": "h5", ".hdf5": "h5"}


def run_analyse(args) -> int:
    """Find, classify and score every column; write the table only when all of it succeeded."""
    from ..live.outputs import replacing
    from .atoms_analyse import analyse, split_pair, write_csv as write_table_csv, write_h5
    from .atom_analysis import AtomFinder
    from .cards import SHIPPED_DIR
    from .cli import prepare_output
    from .column_anomaly import AnomalyDetector
    from .column_species import SpeciesClassifier
    from .readers import read_patterns

    check_arguments(args)
    prepare_output(args.out, [args.image, args.pair], args.overwrite)
    kind = OUT_SUFFIXES.get(args.out.suffix.lower())
    if kind is None:
        raise ValueError(f"--out {args.out}: write .csv or .h5 (.hdf5), not {args.out.suffix or 'no suffix'!r}")
    stack = read_patterns(args.image)
    pair = read_patterns(args.pair) if args.pair is not None else None
    haadf, abf = split_pair(stack, pair, args.contrast, str(args.image))
    models = args.models or SHIPPED_DIR
    finder = AtomFinder.shipped(args.contrast, models, backend=args.backend)
    ort = "onnxruntime" if args.backend == "auto" else args.backend
    classifier = SpeciesClassifier.shipped(models, backend=ort)
    detector = AnomalyDetector.shipped(models, backend=ort)
    res = analyse(haadf, abf, args.contrast, finder, classifier, detector, args.sampling)
    with replacing(args.out) as tmp:
        if kind == "csv":
            write_table_csv(tmp, res)
        else:
            write_h5(tmp, res, str(args.image), args.contrast)
    for note in res.notes:
        print(f"stemlive atoms analyse: warning: {args.image}: {note}", file=sys.stderr)
    n = len(res.positions_px)
    counts = ", ".join(f"{c} {int(((res.species == i) & np.isfinite(res.probabilities).all(axis=1)).sum())}"
                       for i, c in enumerate(res.classes))
    scored = int(np.isfinite(res.anomaly_score).sum())
    s = f"{res.sampling_A:.4g} Å/px ({res.sampling_source})" if res.sampling_A else "sampling unknown"
    print(f"{n} columns ({args.contrast}, {s}); species: {counts or '-'}; anomaly: {int(res.anomaly_flagged.sum())} "
          f"of {scored} scored flagged (threshold {res.anomaly_threshold:.2f}) -> {args.out}", file=sys.stderr)
    return 0


def write_csv(path: Path, found, sampling_A: float | None) -> None:
    """The CSV contract: header, then row_px,col_px,confidence,intensity[,row_A,col_A].
    Written where it is told: callers replace files through ``live.outputs.replacing``."""
    header = ["row_px", "col_px", "confidence", "intensity"] + (["row_A", "col_A"] if sampling_A else [])
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        for (r, c), conf, inten in zip(found.positions_px, found.confidence, found.intensity):
            row = [f"{r:.3f}", f"{c:.3f}", f"{conf:.4f}", f"{inten:.6g}"]
            if sampling_A:
                row += [f"{r * sampling_A:.4f}", f"{c * sampling_A:.4f}"]
            w.writerow(row)


def read_csv(path: Path) -> dict[str, np.ndarray]:
    """Columns of a CSV written by :func:`write_csv` (tests, notebooks)."""
    data = np.genfromtxt(path, delimiter=",", names=True, ndmin=1)
    return {name: np.atleast_1d(data[name]) for name in data.dtype.names}
