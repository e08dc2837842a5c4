"""Command-line front ends of the live path: `live`, `replay`, `reanalyse`."""
from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

from .pipeline import AcquisitionError, RunSummary, Settings, StreamStalled
from .processes import end_children
from ..protocol.security import check_token


def add_run_options(ap: argparse.ArgumentParser, out_required: bool = True) -> None:
    """Options every acquisition run shares (the model choice, calibration, outputs)."""
    ap.add_argument("--block", type=positive(int), nargs=2, required=True, metavar=("BY", "BX"),
                    help="scan block in frames")
    ap.add_argument("--alpha-mrad", type=positive(), required=True, help="convergence semi-angle")
    ap.add_argument("--kv", type=positive(), required=True, help="acceleration voltage")
    ap.add_argument("--mrad-per-px", type=positive(), default=None, help="detector calibration")
    ap.add_argument("--scan-step-nm", type=positive(), default=None,
                    help="scan step (checks a block spans a unit cell; gives the atom finder its sampling)")
    ap.add_argument("--scan-rotation-deg", type=float, default=0.0,
                    help="scan vs detector rotation (stored; turns the CoM shifts as LiberTEM's CoM analysis does: "
                         "positive = clockwise)")
    ap.add_argument("--holder-axis-deg", type=float, default=None,
                    help="the holder's α tilt axis on the detector, degrees from axis 1 towards axis 0 (stored; "
                         "the dashboard then gives tilt corrections as holder α/β)")
    ap.add_argument("--com", action="store_true",
                    help="also centre-of-mass (DPC) shift and iDPC maps, from LiberTEM's CoMUDF (one more pass per frame)")
    ap.add_argument("--flip-y", action="store_true",
                    help="the detector's first row is at the bottom (e.g. some Merlin set-ups): for the CoM maps")
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
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    ap.add_argument("--atoms", choices=("haadf", "abf", "off"), default="haadf",
                    help="find atomic columns in this virtual image, block by block (default haadf)")
    ap.add_argument("--atom-margin", type=int, default=16,
                    help="scan pixels of context around a block for atom finding (default 16)")
    ap.add_argument("--no-columns", action="store_true",
                    help="without the species and anomaly of the located columns (per block window)")
    add_method_options(ap)


def add_method_options(ap: argparse.ArgumentParser, timeout: float | None = 120.0) -> None:
    """--method (and --check-timeout): the networks alone, or checked against the library."""
    ap.add_argument("--method", choices=("check", "network"), default=None,
                    help="check (default where the setting's check data exists, else network with a warning): "
                         "each block is shown with the networks' reading at once, then re-fitted against the "
                         "simulated library in a second stage (maps/method says which a block shows); "
                         "network: the networks alone")
    if timeout:
        ap.add_argument("--check-timeout", type=positive(), default=timeout,
                        help=f"seconds the library check may take to catch up after the scan (default {timeout:g}); "
                             "blocks it has not reached keep the networks' values (counted in the store)")


def positive(kind=float):
    """An argparse type: a finite number > 0 (a clear error for 0, negatives, nan, inf)."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not (math.isfinite(value) and value > 0):
            raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
        return value
    parse.__name__ = f"positive {kind.__name__}"
    return parse


def settings_from(args) -> Settings:
    check_token(args.token)
    return Settings(block=tuple(args.block), alpha_mrad=args.alpha_mrad, kv=args.kv, out=args.out,
                    mrad_per_px=args.mrad_per_px, scan_step_nm=args.scan_step_nm,
                    scan_rotation_deg=args.scan_rotation_deg, center_px=tuple(args.center) if args.center else None,
                    models_dir=args.models, backend=args.backend, overwrite=args.overwrite,
                    pub=None if args.no_publish else args.pub, rep=None if args.no_publish else args.rep,
                    stall_timeout_s=getattr(args, "stall_timeout", None), progress=not args.quiet, token=args.token,
                    atoms=None if args.atoms == "off" else args.atoms, atom_margin_px=args.atom_margin,
                    columns=not args.no_columns,
                    method=args.method, check_timeout_s=args.check_timeout, com=args.com, flip_y=args.flip_y,
                    holder_axis_deg=args.holder_axis_deg)


def add_parsers(sub) -> None:
    ap = sub.add_parser("live", help="analyse a running acquisition (DECTRIS or Merlin via LiberTEM-live)")
    ap.add_argument("--detector", choices=("dectris", "merlin"), required=True)
    ap.add_argument("--api-host", default="127.0.0.1")
    ap.add_argument("--api-port", type=int, required=True)
    ap.add_argument("--data-host", default=None, help="stream host (default: --api-host)")
    ap.add_argument("--data-port", type=int, required=True)
    ap.add_argument("--scan-shape", type=positive(int), nargs=2, required=True, metavar=("H", "W"))
    ap.add_argument("--mode", choices=("active", "passive"), default="active",
                    help="active: stemlive arms the detector; passive: wait for the microscope software to")
    ap.add_argument("--executor", choices=("inline", "pipelined"), default="pipelined")
    ap.add_argument("--workers", type=positive(int), default=None)
    ap.add_argument("--record", type=Path, default=None,
                    help="also keep the raw frames (.npy) for a replay (never replaces an existing file)")
    ap.add_argument("--arm-timeout", type=positive(), default=60.0, help="passive mode: seconds to wait for an arm")
    ap.add_argument("--stall-timeout", type=positive(), default=30.0,
                    help="seconds without a frame from the detector before the run is aborted (default 30)")
    ap.add_argument("--frame-time-us", type=positive(), default=None,
                    help="the detector's frame time: at slow rates partitions end where blocks do, so each "
                         "block is analysed within 0.1 s of its last frame (DECTRIS: asked of the detector)")
    ap.add_argument("--nice", type=int, choices=range(0, 20), default=0, metavar="0-19",
                    help="lower the engine's CPU priority by this much (its workers too): with the dashboard "
                         "and the operator's browser on the same machine, 10 keeps the page prompt while "
                         "the engine still gets every cycle they leave (default 0)")
    add_run_options(ap)
    ap.set_defaults(func=run_live)

    ap = sub.add_parser("replay", help="analyse a recorded dataset through the live path")
    ap.add_argument("input", type=Path, help="npy, raw, HDF5 (incl. DECTRIS master), MIB, ... (LiberTEM formats)")
    ap.add_argument("--format", default=None, help="LiberTEM dataset type (default: detected; .raw/.bin: raw)")
    ap.add_argument("--scan-shape", type=positive(int), nargs=2, default=None, metavar=("H", "W"),
                    help="scan shape; must hold exactly the file's frames")
    ap.add_argument("--sig-shape", type=positive(int), nargs=2, default=None, metavar=("h", "w"),
                    help="frame shape (raw files)")
    ap.add_argument("--dtype", default=None, help="pixel type, e.g. uint16 or <f4 (raw files)")
    ap.add_argument("--executor", choices=("inline", "pipelined", "dask"), default="inline",
                    help="dask: a local cluster on 127.0.0.1 (or --scheduler)")
    ap.add_argument("--scheduler", default=None,
                    help="tcp://host:port of your own dask.distributed cluster (secure it: Dask runs pickles)")
    ap.add_argument("--workers", type=positive(int), default=None)
    add_run_options(ap)
    ap.set_defaults(func=run_replay)

    ap = sub.add_parser("reanalyse", help="re-run the analysers on a store's block PACBEDs into a new store")
    ap.add_argument("store", type=Path)
    ap.add_argument("--out", type=Path, default=None, help="new store (default: STORE-reanalysed.h5)")
    ap.add_argument("--models", type=Path, default=None)
    ap.add_argument("--backend", choices=("auto", "onnxruntime", "tensorrt"), default="auto")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing --out (once the run succeeded)")
    add_method_options(ap, timeout=None)  # offline: every check is waited for
    ap.set_defaults(func=run_reanalyse)


def report(summary: RunSummary) -> int:
    """Print the run's summary; exit 0, or 1 when nothing useful came out (every block failed)."""
    print(f"{summary.state}: {summary.blocks_done}/{summary.blocks_total} blocks, {summary.frames} frames, "
          f"{summary.atoms} atomic columns in "
          f"{summary.wall_s:.1f} s -> {summary.out}")
    if summary.method == "check":
        print(f"  library check: {summary.checks_done} blocks checked ({summary.check_ms_median:.0f} ms each, "
              f"{summary.checks_per_s:.1f}/s), {summary.checks_unfinished} left with the networks' values"
              + (f", {summary.checks_failed} failed" if summary.checks_failed else ""))
    if summary.ingest_ms_max:
        print(f"  ingest hand-off {summary.ingest_ms_median:.2f} ms median, {summary.ingest_ms_max:.1f} ms max per "
              f"result; block complete -> stored {summary.block_delay_ms_median:.0f} ms median")
    if summary.reason:
        print(f"  note: {summary.reason}")
    if summary.blocks_failed:
        print(f"stemlive: {summary.blocks_failed} of {summary.blocks_done} blocks could not be analysed "
              "(flag 'error' in /maps/flags):", file=sys.stderr)
        for message, n in list(summary.failures.items())[:5]:
            print(f"  {n} × {message}", file=sys.stderr)
    if not summary.useful:
        print("stemlive: nothing useful came out of this run: no block was analysed without an error",
              file=sys.stderr)
        return 1
    return 0


def _guarded(fn) -> int:
    """Run ``fn``; every way out reports, ends child processes, and leaves an honest store."""
    try:
        return report(fn())
    except KeyboardInterrupt as exc:  # Ctrl-C or SIGTERM (processes.Terminated)
        reason = getattr(exc, "reason", "interrupted (Ctrl-C)")
        exit_stuck(f"stemlive: {reason}; the result store {_where(exc)}is closed as aborted with every "
                   "completed block", code=getattr(exc, "exit_code", 130))
    except StreamStalled as exc:
        exit_stuck(f"stemlive: acquisition aborted: {exc} ({_where(exc)}kept as aborted)")
    except AcquisitionError as exc:
        print(f"stemlive: acquisition aborted: {exc}", file=sys.stderr)
        return 1
    finally:
        end_children()


def _where(exc) -> str:
    path = getattr(exc, "store_path", None)
    return f"{path} " if path else ""


def exit_stuck(message: str, code: int = 1) -> None:
    """Report, end every child process, then leave at once: a receiver thread blocked in the
    detector library would keep the process alive (or crash it at interpreter shutdown).  The
    store is already closed (aborted)."""
    print(message, file=sys.stderr, flush=True)
    sys.stdout.flush()
    end_children()
    os._exit(code)


def run_live(args) -> int:
    from .acquire import live

    if args.nice:
        os.nice(args.nice)  # before any worker starts: they inherit it
    return _guarded(lambda: live(settings_from(args), detector=args.detector, api_host=args.api_host,
                                 api_port=args.api_port, data_host=args.data_host or args.api_host,
                                 data_port=args.data_port, scan_shape=tuple(args.scan_shape), mode=args.mode,
                                 executor=args.executor, workers=args.workers, record=args.record,
                                 arm_timeout_s=args.arm_timeout,
                                 frame_time_s=args.frame_time_us * 1e-6 if args.frame_time_us else None))


def run_replay(args) -> int:
    from .replay import replay

    raw = {k: v for k, v in (("sig_shape", tuple(args.sig_shape) if args.sig_shape else None),
                             ("dtype", args.dtype)) if v is not None}
    return _guarded(lambda: replay(args.input, settings_from(args), executor=args.executor, scheduler=args.scheduler,
                                   scan_shape=tuple(args.scan_shape) if args.scan_shape else None, fmt=args.format,
                                   workers=args.workers, **raw))


def run_reanalyse(args) -> int:
    from .reanalyse import reanalyse

    out = args.out or args.store.with_name(args.store.stem + "-reanalysed.h5")
    return _guarded(lambda: reanalyse(args.store, out, models_dir=args.models, backend=args.backend,
                                      overwrite=args.overwrite, method=args.method))
