"""Recorded datasets through the same path as live data: open, pick an executor, run."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .executors import make_executor
from .outputs import check_output
from .pipeline import RunSummary, Settings, run_pipeline

def make_context(executor: str = "inline", scheduler: str | None = None, workers: int | None = None):
    """A LiberTEM Context: inline, pipelined (processes), a local Dask cluster on 127.0.0.1, or the
    existing dask.distributed cluster at ``scheduler`` (DaskJobExecutor.connect)."""
    from libertem.api import Context

    return Context(executor=make_executor(executor, workers, scheduler))


def open_dataset(ctx, path: str | Path, scan_shape: tuple[int, int] | None = None, fmt: str | None = None,
                 **options):
    """Any format LiberTEM reads: npy, raw (needs dtype and shapes), HDF5 incl. DECTRIS master
    files, MIB, and the rest through LiberTEM's loader ('auto' detection unless ``fmt``)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    kw = dict(options)
    if scan_shape is not None:
        scan_shape = check_scan_shape(scan_shape)
        kw["nav_shape"] = scan_shape
    if fmt is None:
        fmt = {".npy": "npy", ".raw": "raw", ".bin": "raw"}.get(path.suffix.lower(), "auto")
        if path.suffix in (".h5", ".hdf5", ".nxs") and "ds_path" not in kw:
            master = dectris_data_path(path)
            if master is not None:
                fmt, kw["ds_path"] = "hdf5", master
    if fmt == "raw":
        missing = [opt for key, opt in (("nav_shape", "--scan-shape"), ("sig_shape", "--sig-shape"),
                                        ("dtype", "--dtype")) if kw.get(key) is None]
        if missing:
            raise ValueError(f"{path}: a raw file says nothing about its layout; give {', '.join(missing)}")
    try:
        ds = ctx.load(fmt, path=str(path), **kw)
    except Exception as exc:
        raise ValueError(f"LiberTEM cannot open {path} as {fmt}: {exc}") from exc
    frames = int(getattr(ds.meta, "image_count", 0) or 0)
    if scan_shape is not None and frames and frames != int(np.prod(scan_shape)):
        raise ValueError(f"--scan-shape {scan_shape[0]} {scan_shape[1]} holds {int(np.prod(scan_shape))} frames, "
                         f"{path} has {frames}: replaying part of a file (or padding it) would report a "
                         "wrong scan as complete")
    return ds


def check_scan_shape(scan_shape) -> tuple[int, int]:
    """A 2D scan shape of positive sizes, or a ValueError saying what is wrong."""
    shape = tuple(int(v) for v in scan_shape)
    if len(shape) != 2 or min(shape) < 1:
        raise ValueError(f"the scan shape must be two positive sizes (H W), got {' '.join(map(str, shape))}")
    return shape


def dectris_data_path(path: Path) -> str | None:
    """The frames of a DECTRIS master file (``/entry/data/data_000001``, linked to its data file)."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            group = f.get("entry/data")
            names = sorted(k for k in group if k.startswith("data_")) if group is not None else []
    except OSError:
        return None
    if not names:
        return None
    if len(names) > 1:
        raise ValueError(f"{path}: DECTRIS master file with {len(names)} data files; LiberTEM reads one dataset "
                         f"at a time -- join them, or replay one with --format hdf5 (ds_path {names[0]})")
    return f"/entry/data/{names[0]}"


def replay(path: str | Path, settings: Settings, *, executor: str = "inline", scheduler: str | None = None,
           scan_shape: tuple[int, int] | None = None, fmt: str | None = None, workers: int | None = None,
           ctx=None, **options) -> RunSummary:
    if not Path(path).exists():
        raise FileNotFoundError(f"{path} does not exist")
    check_output(settings.out, [path], overwrite=settings.overwrite)  # before any work: a refusal costs nothing
    own = ctx is None
    ctx = ctx or make_context(executor, scheduler, workers)
    try:
        ds = open_dataset(ctx, path, scan_shape, fmt, **options)
        nav = tuple(int(v) for v in ds.shape.nav)
        if len(nav) == 2 and "num_partitions" not in options:
            # partition as a live acquisition does, so the centre calibration lands on the same frames
            from .acquire import frames_per_partition

            n = int(np.prod(nav))
            try:
                ds = open_dataset(ctx, path, scan_shape, fmt,
                                  num_partitions=-(-n // frames_per_partition(nav, settings.block)), **options)
            except ValueError as exc:
                if "num_partitions" not in str(exc):  # e.g. LiberTEM's HDF5 reader partitions by itself
                    raise
        return run_pipeline(ctx, ds, settings, source=f"replay of {path}")
    finally:
        if own:
            ctx.close()
