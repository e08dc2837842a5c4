"""`stemlive train pacbed`: reproduce the shipped PACBED models from the libraries."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from .params import PacbedParams

ALIGN_STEPS = 6000  # the alignment network learns faster than thickness/tilt
# thickness/tilt networks trained longer than the default (measured better on held-out data)
SHIPPED_STEPS = {"pacbed_SrTiO3_001_200kV_13.6mrad": 16000}

# The shipped models and the libraries they come from (`make libraries` builds these).
SHIPPED = [
    ("pacbed_SrTiO3_001_200kV_13.6mrad", PacbedParams(alpha_mrad=13.6, thickness_nm=(1.0, 120.0, 1.0))),
    ("pacbed_SrTiO3_001_200kV_19.1mrad", PacbedParams(alpha_mrad=19.1, thickness_nm=(1.0, 80.0, 1.0))),
]


def add_parsers(sub) -> None:
    from .train_config import TrainConfig

    ap = sub.add_parser("train", help="train the networks (PyTorch) and export ONNX + model cards")
    tsub = ap.add_subparsers(dest="what", required=True)
    d = TrainConfig()
    p = tsub.add_parser("pacbed", help="thickness/tilt network(s) from PACBED libraries (resumable)",
                        description="Without --library, reproduces every shipped model from the default "
                                    "libraries in the user cache (build them with `make libraries`).")
    p.add_argument("--library", type=Path, default=None, help="one library to train on")
    p.add_argument("--name", default=None, help="model name (with --library)")
    p.add_argument("--out", type=Path, default=None, help="where the .onnx and .json go (default: models/shipped)")
    p.add_argument("--work", type=Path, default=None, help="checkpoints and curves (default: user cache)")
    p.add_argument("--steps", type=int, default=None,
                   help=f"thickness/tilt steps (default {d.steps}; the shipped models: as they were trained)")
    p.add_argument("--align-steps", type=int, default=ALIGN_STEPS, help="steps for the alignment network")
    p.add_argument("--batch", type=int, default=d.batch)
    p.add_argument("--width", type=int, default=d.width)
    p.add_argument("--holdout", type=float, default=d.holdout_fraction, help="fraction of simulations held out")
    p.add_argument("--val-every", type=int, default=d.val_every)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--field-prob", type=float, default=0.0,
                   help="thickness/tilt: share of training crops cut by a frame edge (frames showing ±1.4-2.6 α; "
                        "off-frame pixels filled radially as at inference)")
    p.add_argument("--task", choices=["all", "align", "thickness-tilt"], default="all",
                   help="which network(s): the alignment one (centre, size, rotation), the thickness/tilt one, or both")
    p.set_defaults(func=run_pacbed)

    a = tsub.add_parser("atoms", help="the atom-finding network from `stemlive simulate images` output (resumable)")
    a.add_argument("--images", type=Path, required=True, help="HDF5 written by `stemlive simulate images`")
    a.add_argument("--name", default="atoms_haadf")
    a.add_argument("--out", type=Path, default=None, help="where the .onnx and .json go (default: models/shipped)")
    a.add_argument("--work", type=Path, default=None, help="checkpoints and curves (default: user cache)")
    a.add_argument("--steps", type=int, default=3000)
    a.add_argument("--batch", type=int, default=16)
    a.add_argument("--width", type=int, default=16)
    a.add_argument("--seed", type=int, default=0)
    a.set_defaults(func=run_atoms)

    from . import anomaly_train

    an = tsub.add_parser("anomaly", help="the column point-defect anomaly VAE on simulated bulk SrTiO3 [001] "
                                         "patches (resumable)", description=anomaly_train.__doc__.split("\n")[0])
    anomaly_train.add_arguments(an)
    an.set_defaults(func=anomaly_train.run)

    rv = tsub.add_parser("rvae", help="a rotationally invariant VAE on one image's column patches: per-column "
                                      "angle and latent maps (local symmetry, seed 004; resumable)")
    rv.add_argument("--image", type=Path, required=True, help="HAADF image (npy, TIFF, dm3/dm4)")
    rv.add_argument("--out", type=Path, required=True, help="directory for the encoder ONNX, its card, the maps")
    rv.add_argument("--positions", type=Path, default=None,
                    help="column positions (npy (n, 2) or CSV with row,col columns, px); default: the shipped "
                         "HAADF atom finder")
    rv.add_argument("--sampling-A-per-px", type=float, default=None, help="for the atom finder")
    rv.add_argument("--work", type=Path, default=None, help="checkpoint (resumable; default: OUT/work)")
    rv.add_argument("--steps", type=int, default=1500)
    rv.add_argument("--latent", type=int, default=2)
    rv.add_argument("--threads", type=int, default=1)
    rv.set_defaults(func=lambda args: __import__("stemlive.models.column_rvae", fromlist=["run_cli"]).run_cli(args))


def run_pacbed(args) -> int:
    from ..models.cards import SHIPPED_DIR
    from .cli import default_cache_dir, default_library_path
    from .train_config import TrainConfig
    from .train_align import train_align

    d = TrainConfig()
    if not 0 <= args.field_prob <= 1:
        raise ValueError(f"--field-prob must lie between 0 and 1, got {args.field_prob:g}")
    from .pacbed_data import Augment
    from .train_pacbed import train_pacbed

    cfg = TrainConfig(steps=args.steps or d.steps, batch=args.batch, width=args.width, holdout_fraction=args.holdout,
                      val_every=args.val_every, seed=args.seed)
    if args.library:
        jobs = [(args.name or args.library.stem, args.library)]
    else:
        jobs = [(name, default_library_path(p)) for name, p in SHIPPED]
        missing = [str(lib) for _, lib in jobs if not lib.exists()]
        if missing:
            raise FileNotFoundError(f"libraries missing: {', '.join(missing)}; build them with `make libraries`")
    tasks = [("align", train_align, "_align"), ("thickness-tilt", train_pacbed, "")]
    for name, lib in jobs:
        for task, train, suffix in tasks:
            if args.task not in ("all", task):
                continue
            model = name + suffix
            c = replace(cfg, steps=args.align_steps) if task == "align" else cfg
            if task == "thickness-tilt" and not args.library and args.steps is None:
                c = replace(c, steps=SHIPPED_STEPS.get(name, cfg.steps))
            tag, kw = "", {}
            if task == "thickness-tilt" and args.field_prob > 0:
                tag, kw = f"-f{args.field_prob:g}", {"aug": Augment(field_prob=args.field_prob)}
            work = (args.work or default_cache_dir() / "training") / f"{model}-s{c.steps}-b{c.batch}-w{c.width}{tag}"
            print(train(lib, args.out or SHIPPED_DIR, model, work, c, **kw))
    return 0


def run_atoms(args) -> int:
    from ..models.cards import SHIPPED_DIR
    from .cli import default_cache_dir
    from .train_atoms import train_atoms

    work = args.work or default_cache_dir() / "training" / args.name
    card = train_atoms(args.images, args.out or SHIPPED_DIR, work, name=args.name, steps=args.steps,
                       batch=args.batch, width=args.width, seed=args.seed)
    print(f"model card: {card}")
    return 0
