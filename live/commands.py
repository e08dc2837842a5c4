"""Command-line front ends of the live path: `live`, `replay`, `reanalyse`."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .pipeline import AcquisitionError, RunSummary, Settings, StreamStalled


def add_run_options(ap: argparse.ArgumentParser, out_required: bool = True) -> None:
    """Options every acquisition run shares (the model choice, calibration, outputs)."""
    ap.add_argument("--block", type=int, nargs=2, required=True, metavar=("BY", "BX"), help="scan block in frames")
    ap.add_argument("--alpha-mrad", type=float, required=True, help="convergence semi-angle")
    ap.add_argument("--kv", type=float, required=True, help="acceleration voltage")
    ap.add_argument("--mrad-per-px", type=float, default=None, help="detector calibration")
    ap.add_argument("--scan-step-nm", type=float, default=None,
                    help="scan step (checks a block spans a unit cell; gives the atom finder its sampling)")
    ap.add_argument("--scan-rotation-deg", type=float, default=0.0, help="scan vs detector rotation (stored)")
    ap.add_argument("--center", type=float, nargs=2, default=None, metavar=("ROW", "COL"),
                    help="disk centre on the detector [px]; default: found on the first analysed block")
    ap.add_argument("--out", type=Path, required=out_required, help="result store (HDF5)")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    ap.add_argument("--models", type=Path, default=None, help="model directory (default: the shipped models)")
    ap.add_argument("--backend", choices=("auto", "onnxruntime", "tensorrt"), default="auto")
    ap.add_argument("--pub", default="tcp://127.0.0.1:5557", help="publisher PUB address")
    ap.add_argument("--rep", default="tcp://127.0.0.1:5558", help="publisher REP address")
    ap.add_argument("--no-publish", action="store_true", help="no ZMQ publisher (store only)")
    ap.add_argument("--token", default=os.environ.get("STEMLIVE_TOKEN"),
                    help="access token; required to publish on an address other than 127.0.0.1 "
                         "(default: $STEMLIVE_TOKEN)")
    ap.add_argument("--stall-timeout", type=float, default=30.0,
                    help="seconds without frames before the run is aborted (default 30)")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    ap.add_argument("--atoms", choices=("haadf", "abf", "off"), default="haadf",
                    help="find atomic columns in this virtual image, block by block (default haadf)")
    ap.add_argument("--atom-margin", type=int, default=16,
                    help="scan pixels of context around a block for atom finding (default 16)")


def settings_from(args) -> Settings:
    return Settings(block=tuple(args.block), alpha_mrad=args.alpha_mrad, kv=args.kv, out=args.out,
                    mrad_per_px=args.mrad_per_px, scan_step_nm=args.scan_step_nm,
                    scan_rotation_deg=args.scan_rotation_deg, center_px=tuple(args.center) if args.center else None,
                    models_dir=args.models, backend=args.backend, overwrite=args.overwrite,
                    pub=None if args.no_publish else args.pub, rep=None if args.no_publish else args.rep,
                    stall_timeout_s=args.stall_timeout, progress=not args.quiet, token=args.token,
                    atoms=None if args.atoms == "off" else args.atoms, atom_margin_px=args.atom_margin)


def add_parsers(sub) -> None:
    ap = sub.add_parser("live", help="analyse a running acquisition (DECTRIS or Merlin via LiberTEM-live)")
    ap.add_argument("--detector", choices=("dectris", "merlin"), required=True)
    ap.add_argument("--api-host", default="127.0.0.1")
    ap.add_argument("--api-port", type=int, required=True)
    ap.add_argument("--data-host", default=None, help="stream host (default: --api-host)")
    ap.add_argument("--data-port", type=int, required=True)
    ap.add_argument("--scan-shape", type=int, nargs=2, required=True, metavar=("H", "W"))
    ap.add_argument("--mode", choices=("active", "passive"), default="active",
                    help="active: stemlive arms the detector; passive: wait for the microscope software to")
    ap.add_argument("--executor", choices=("inline", "pipelined"), default="pipelined")
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--record", type=Path, default=None, help="also keep the raw frames (.npy) for a replay")
    ap.add_argument("--arm-timeout", type=float, default=60.0, help="passive mode: seconds to wait for an arm")
    add_run_options(ap)
    ap.set_defaults(func=run_live)

    ap = sub.add_parser("replay", help="analyse a recorded dataset through the live path")
    ap.add_argument("input", type=Path, help="npy, raw, HDF5 (incl. DECTRIS master), MIB, ... (LiberTEM formats)")
    ap.add_argument("--format", default=None, help="LiberTEM dataset type (default: detected)")
    ap.add_argument("--scan-shape", type=int, nargs=2, default=None, metavar=("H", "W"))
    ap.add_argument("--executor", choices=("inline", "pipelined", "dask"), default="inline")
    ap.add_argument("--scheduler", default=None, help="tcp://host:port of an existing dask.distributed cluster")
    ap.add_argument("--workers", type=int, default=None)
    add_run_options(ap)
    ap.set_defaults(func=run_replay)

    ap = sub.add_parser("reanalyse", help="re-run the analysers on a store's block PACBEDs into a new store")
    ap.add_argument("store", type=Path)
    ap.add_argument("--out", type=Path, default=None, help="new store (default: STORE-reanalysed.h5)")
    ap.add_argument("--models", type=Path, default=None)
    ap.add_argument("--backend", choices=("auto", "onnxruntime", "tensorrt"), default="auto")
    ap.add_argument("--overwrite", action="store_true")
    ap.set_defaults(func=run_reanalyse)


def report(summary: RunSummary) -> int:
    print(f"{summary.state}: {summary.blocks_done}/{summary.blocks_total} blocks, {summary.frames} frames, "
          f"{summary.atoms} atomic columns in "
          f"{summary.wall_s:.1f} s -> {summary.out}")
    if summary.ingest_ms_max:
        print(f"  ingest hand-off {summary.ingest_ms_median:.2f} ms median, {summary.ingest_ms_max:.1f} ms max per "
              f"result; block complete -> stored {summary.block_delay_ms_median:.0f} ms median")
    if summary.reason:
        print(f"  note: {summary.reason}")
    return 0


def _guarded(fn) -> int:
    try:
        return report(fn())
    except KeyboardInterrupt:
        exit_stuck("stemlive: interrupted (Ctrl-C); the result store is closed as aborted with every "
                   "completed block", code=130)
    except StreamStalled as exc:
        exit_stuck(f"stemlive: acquisition aborted: {exc}")
    except AcquisitionError as exc:
        print(f"stemlive: acquisition aborted: {exc}", file=sys.stderr)
        return 1


def exit_stuck(message: str, code: int = 1) -> None:
    """Report, then leave at once: a receiver thread blocked in the detector library would keep the
    process alive (or crash it at interpreter shutdown).  The store is already closed (aborted)."""
    import os

    print(message, file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(code)


def run_live(args) -> int:
    from .acquire import live

    return _guarded(lambda: live(settings_from(args), detector=args.detector, api_host=args.api_host,
                                 api_port=args.api_port, data_host=args.data_host or args.api_host,
                                 data_port=args.data_port, scan_shape=tuple(args.scan_shape), mode=args.mode,
                                 executor=args.executor, workers=args.workers, record=args.record,
                                 arm_timeout_s=args.arm_timeout))


def run_replay(args) -> int:
    from .replay import replay

    return _guarded(lambda: replay(args.input, settings_from(args), executor=args.executor, scheduler=args.scheduler,
                                   scan_shape=tuple(args.scan_shape) if args.scan_shape else None, fmt=args.format,
                                   workers=args.workers))


def run_reanalyse(args) -> int:
    from .reanalyse import reanalyse

    out = args.out or args.store.with_name(args.store.stem + "-reanalysed.h5")
    return _guarded(lambda: reanalyse(args.store, out, models_dir=args.models, backend=args.backend,
                                      overwrite=args.overwrite))
