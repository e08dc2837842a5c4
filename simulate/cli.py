"""`stemlive simulate pacbed|scan`: command-line front end of the simulation package."""
from __future__ import annotations

from pathlib import Path

from .params import SEED_TILTS_MRAD, PacbedParams


def default_cache_dir() -> Path:
    """Per-user cache for libraries and scans (never committed)."""
    import os

    from platformdirs import user_cache_dir

    return Path(os.environ.get("STEMLIVE_CACHE", user_cache_dir("stemlive")))


def default_library_path(p: PacbedParams) -> Path:
    zone = p.zone.strip("[]")
    kind = "cbed-positions" if p.keep_positions else "pacbed"
    name = f"{kind}_{Path(p.material).stem}_{zone}_{p.kv:g}kV_{p.alpha_mrad:g}mrad.h5"
    return default_cache_dir() / "libraries" / name


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(v) for v in text.replace(",", " ").split())


def add_pacbed_parser(sub) -> None:
    ap = sub.add_parser(
        "pacbed", help="simulate a PACBED (or position-resolved CBED) library with abTEM",
        description="Frozen-phonon multislice thickness series for a grid of tilts. Resumable: "
                    "rerun the same command after an interruption.",
    )
    ap.add_argument("--material", default="SrTiO3", help="built-in 'SrTiO3' or a CIF file")
    ap.add_argument("--zone", default="[001]", help="zone axis [uvw] (default [001])")
    ap.add_argument("--kv", type=float, default=200.0, help="high tension [kV]")
    ap.add_argument("--alpha", type=float, default=13.6, help="convergence semi-angle [mrad]")
    ap.add_argument("--thickness", type=float, nargs=3, default=(1.0, 120.0, 1.0),
                    metavar=("MIN", "MAX", "STEP"), help="thickness range [nm]")
    ap.add_argument("--tilts", type=_floats, default=SEED_TILTS_MRAD,
                    help="tilt values along both axes [mrad], e.g. '0 0.25 0.5 1' (default: the seed's "
                         "0-4 mrad, 0.25 steps below 1 and 0.5 above)")
    ap.add_argument("--signed-tilts", action="store_true", help="also negative tilts (default: first quadrant; "
                    "the others follow by the zone's mirrors when reading)")
    ap.add_argument("--max-angle", type=float, default=None, help="stored half-range [mrad] (default 3α)")
    ap.add_argument("--pixels", type=int, default=None, help="stored pattern size, odd (default: native sampling)")
    ap.add_argument("--positions", type=int, nargs=2, default=None, metavar=("N0", "N1"),
                    help="probe positions per unit cell (default: smallest N > 2α/θ₁₀₀)")
    ap.add_argument("--cell-extent", type=float, default=19.5, help="supercell edge [Å] (sets λ/extent sampling)")
    ap.add_argument("--sampling", type=float, default=0.0765, help="potential sampling [Å]")
    ap.add_argument("--phonon-passes", type=int, default=2,
                    help="frozen-phonon passes; each gives every row of probe positions a fresh configuration "
                         "(0: static lattice)")
    ap.add_argument("--pool-cells", type=int, default=32, help="displaced unit-cell repeats in the slice pool")
    ap.add_argument("--keep-positions", action="store_true", help="store the CBED of every probe position")
    ap.add_argument("--no-symmetry", action="store_true", help="simulate every tilt directly")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=None, help="processes (default: one per core)")
    ap.add_argument("--keep-parts", action="store_true", help="keep the per-tilt parts after assembly")
    ap.add_argument("--out", type=Path, default=None, help="output HDF5 (default: the user cache)")
    ap.set_defaults(func=run_pacbed)


def run_pacbed(args) -> int:
    from .build import build_library

    p = PacbedParams(
        material=args.material, zone=args.zone, kv=args.kv, alpha_mrad=args.alpha,
        thickness_nm=tuple(args.thickness), tilt_values_mrad=tuple(args.tilts), tilt_signed=args.signed_tilts,
        max_angle_mrad=args.max_angle, pixels=args.pixels,
        positions=tuple(args.positions) if args.positions else None, cell_extent_A=args.cell_extent,
        sampling_A=args.sampling, phonon_passes=args.phonon_passes, pool_cells=args.pool_cells,
        keep_positions=args.keep_positions, use_symmetry=not args.no_symmetry, seed=args.seed,
    )
    out = args.out or default_library_path(p)
    build_library(p, out, workers=args.workers, keep_parts=args.keep_parts)
    print(out)
    return 0


def add_parsers(sub) -> None:
    ap = sub.add_parser("simulate", help="simulate PACBED libraries and synthetic 4D-STEM scans")
    ssub = ap.add_subparsers(dest="what", required=True)
    add_pacbed_parser(ssub)
    from .scan_cli import add_scan_parser

    add_scan_parser(ssub)
    add_images_parser(ssub)
    add_compact_parser(ssub)


def add_compact_parser(ssub) -> None:
    ap = ssub.add_parser("compact-library",
                         help="a PACBED library in the canonical frame, compressed, for the library check")
    ap.add_argument("library", type=Path, help="a PACBED library (stemlive simulate pacbed)")
    ap.add_argument("--out", type=Path, required=True, help="compact library (HDF5)")
    ap.add_argument("--tolerance", type=float, default=2e-3,
                    help="worst relative reconstruction error allowed (sets the rank; default 2e-3)")
    ap.add_argument("--rank", type=int, default=None,
                    help="number of principal components kept (default: the smallest within --tolerance; "
                         "the shipped libraries use 384)")
    ap.add_argument("--exclude-held-out", action="store_true",
                    help="leave out the tilt orbits the networks held out (for an honest benchmark)")
    ap.add_argument("--overwrite", action="store_true")
    ap.set_defaults(func=run_compact)


def run_compact(args) -> int:
    import numpy as np

    from ..live.outputs import check_output
    from ..models.compact_library import build_compact
    from .library import PacbedLibrary

    check_output(args.out, [args.library], overwrite=args.overwrite)
    lib = PacbedLibrary.load(args.library)
    if args.exclude_held_out:
        from .pacbed_data import PacbedSampler

        keep = ~np.isin(lib.tilt_source, PacbedSampler(lib, 0.1, seed=0).held_orbits)
        lib = PacbedLibrary(lib.patterns[keep], lib.thickness_nm, lib.tilt_mrad[keep], lib.mrad_per_px, lib.kv,
                            lib.alpha_mrad, lib.attrs)
    compact = build_compact(lib, rank=args.rank, tolerance=args.tolerance)
    from ..models.cards import sha256_of

    compact.attrs.update(source=str(args.library), source_sha256=sha256_of(args.library),
                         held_out_excluded=bool(args.exclude_held_out))
    compact.save(args.out)
    print(f"{args.out}: rank {compact.attrs['rank']}, worst reconstruction error "
          f"{compact.attrs['max_relative_error']:.1e}, {args.out.stat().st_size / 1e6:.1f} MB")
    return 0


def add_images_parser(ssub) -> None:
    ap = ssub.add_parser("images", help="randomised HAADF or ABF images with their column positions (atom finding)")
    ap.add_argument("--out", type=Path, required=True, help="HDF5 file (resumable: rerun to continue)")
    ap.add_argument("--n", type=int, default=1000, help="number of images")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--size", type=int, default=256, help="image edge [px]")
    ap.add_argument("--contrast", choices=["haadf", "abf"], default="haadf")
    ap.add_argument("--random-lattices", type=float, default=0.0, metavar="P",
                    help="share of crystals replaced by made-up lattices of random composition (default 0)")
    ap.add_argument("--held-out", action="store_true",
                    help="only the structures and zones training never sees (BaTiO3 [110], 2H-MoS2 [001] and [100])")
    ap.set_defaults(func=run_images)


def run_images(args) -> int:
    from .atom_images import HELD_OUT_STRUCTURES, STRUCTURES, ImageRanges, write_images

    ranges = ImageRanges(size_px=args.size, contrast=args.contrast, random_lattice_probability=args.random_lattices,
                         structures=HELD_OUT_STRUCTURES if args.held_out else STRUCTURES)
    out = write_images(args.out, args.n, args.seed, ranges)
    print(f"{args.n} images in {out}")
    return 0
