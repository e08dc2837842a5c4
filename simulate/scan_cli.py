"""`stemlive simulate scan`: a synthetic 4D-STEM dataset with ground truth.

``python -m stemlive.simulate.scan_cli pack SRC DST`` re-stores a position-resolved library
small enough to ship (`make demo-library`).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from .scan import ScanParams

DATA = Path(__file__).parent / "data"
# 41² frames at 3.06 mrad/px (zero disk 9 px across), 2 nm planes: too coarse to measure
# thickness from, kept for the tests and benchmarks that were calibrated on it
SHIPPED_LIBRARY = DATA / "cbed-positions_SrTiO3_001_200kV_13.6mrad.h5"
# the demo's: sampled as a PACBED recording is, 97² frames at 1.28 mrad/px (zero disk 21 px
# across, field ±4.5 α), exit planes 3.9 nm apart, tilts 0, ±1.25, ±2.5 mrad (`make demo-library`)
DEMO_LIBRARY = DATA / "cbed-positions-97px_SrTiO3_001_200kV_13.6mrad.h5"


def add_scan_parser(sub) -> None:
    d = ScanParams()
    ap = sub.add_parser(
        "scan", help="compose a synthetic 4D-STEM scan (wedge + bent region) with ground truth",
        description="Frames from a position-resolved CBED library (numpy only), with inelastic "
                    "background, detector blur and Poisson noise; writes frames.npy/frames.h5, truth.h5 "
                    "and params.json.",
    )
    ap.add_argument("--library", type=Path, default=DEMO_LIBRARY,
                    help="position-resolved library (`simulate pacbed --keep-positions --signed-tilts`); "
                         "default: the demo's, SrTiO3 [001] 200 kV 13.6 mrad, 97² px frames")
    ap.add_argument("--out", type=Path, required=True, help="output directory")
    ap.add_argument("--scan-shape", type=int, nargs=2, default=d.scan_shape, metavar=("H", "W"))
    ap.add_argument("--stride", type=int, default=d.stride,
                    help="scan step in library probe positions: a/N·stride (shipped library: N = 8)")
    ap.add_argument("--frame-pixels", type=int, default=None,
                    help="resample frames to this odd size over the same angular range")
    ap.add_argument("--thickness", type=float, nargs=2, default=d.thickness_nm, metavar=("LEFT", "RIGHT"),
                    help="wedge thickness at the first and last scan column (first and last terrace) [nm]")
    ap.add_argument("--steps", type=int, default=d.thickness_steps,
                    help=f"terraces of the wedge, on the library's exit planes (default {d.thickness_steps}; "
                         "0: a smooth wedge)")
    ap.add_argument("--terrace-jitter", type=float, default=d.terrace_jitter,
                    help="terrace edges moved at random by up to ± half this fraction of the mean width")
    ap.add_argument("--tilt-offset", type=float, nargs=2, default=d.tilt_offset_mrad, metavar=("T0", "T1"),
                    help="uniform tilt [mrad] (DESIGN.md convention)")
    ap.add_argument("--bowl-tilt", type=float, default=d.bowl_tilt_mrad, help="largest tilt of the bent region [mrad]")
    ap.add_argument("--bowl-center", type=float, nargs=2, default=d.bowl_center, metavar=("R", "C"),
                    help="bent region's centre (fractions of the scan)")
    ap.add_argument("--bowl-radius", type=float, default=d.bowl_radius, help="radius of largest tilt (fraction of width)")
    ap.add_argument("--dose", type=float, default=d.dose, help="electrons per frame")
    ap.add_argument("--psf", type=float, default=d.psf_sigma_px, help="detector blur σ [px]")
    ap.add_argument("--dtype", default=d.dtype, choices=["uint8", "uint16", "uint32"])
    ap.add_argument("--format", default="npy,h5", help="comma-separated: npy, h5")
    ap.add_argument("--seed", type=int, default=d.seed)
    ap.add_argument("--no-preview", action="store_true", help="skip overview.png (truth, virtual images, PACBEDs)")
    ap.set_defaults(func=run_scan)


def run_scan(args) -> int:
    from .scan import write_scan

    p = ScanParams(
        scan_shape=tuple(args.scan_shape), stride=args.stride, frame_pixels=args.frame_pixels,
        thickness_nm=tuple(args.thickness), thickness_steps=args.steps, terrace_jitter=args.terrace_jitter,
        tilt_offset_mrad=tuple(args.tilt_offset), bowl_center=tuple(args.bowl_center),
        bowl_radius=args.bowl_radius, bowl_tilt_mrad=args.bowl_tilt, dose=args.dose,
        psf_sigma_px=args.psf, dtype=args.dtype, seed=args.seed,
    )
    formats = tuple(f.strip() for f in args.format.split(",") if f.strip())
    bad = set(formats) - {"npy", "h5"}
    if bad:
        raise ValueError(f"unknown format(s) {sorted(bad)}; choose from npy, h5")
    out = write_scan(args.library, p, args.out, formats=formats)
    if not args.no_preview and "npy" in formats:
        from .preview import write_overview

        write_overview(out)
    print(json.dumps({"out": str(out), "files": sorted(f.name for f in out.iterdir())}))
    return 0


def main(argv: list[str] | None = None) -> int:
    """`pack SRC DST`: the shippable copy of a position-resolved library (see scan.pack_library)."""
    from .scan import pack_library

    ap = argparse.ArgumentParser(prog="python -m stemlive.simulate.scan_cli")
    sub = ap.add_subparsers(dest="cmd", required=True)
    pk = sub.add_parser("pack", help="re-store a position-resolved library small enough to ship")
    pk.add_argument("src", type=Path)
    pk.add_argument("dst", type=Path)
    pk.add_argument("--drop-bits", type=int, default=6, help="float16 mantissa bits rounded away (default 6)")
    args = ap.parse_args(argv)
    out = pack_library(args.src, args.dst, args.drop_bits)
    print(f"{out}: {out.stat().st_size / 1e6:.1f} MB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
