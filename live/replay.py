"""Recorded datasets through the same path as live data: open, pick an executor, run."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .pipeline import RunSummary, Settings, run_pipeline

EXECUTORS = ("inline", "pipelined", "dask")


def make_context(executor: str = "inline", scheduler: str | None = None, workers: int | None = None):
    """A LiberTEM Context: inline, pipelined (processes), or Dask (a local cluster, or the
    existing dask.distributed cluster at ``scheduler`` via DaskJobExecutor.connect)."""
    from libertem.api import Context

    if executor not in EXECUTORS:
        raise ValueError(f"unknown executor {executor!r}; choose one of {', '.join(EXECUTORS)}")
    if scheduler is not None:
        if executor != "dask":
            raise ValueError("--scheduler needs --executor dask")
        from libertem.executor.dask import DaskJobExecutor

        return Context(executor=DaskJobExecutor.connect(scheduler))
    if executor == "inline":
        return Context.make_with("inline")
    return Context.make_with(executor, cpus=workers) if workers else Context.make_with(executor)


def open_dataset(ctx, path: str | Path, scan_shape: tuple[int, int] | None = None, fmt: str | None = None,
                 **options):
    """Any format LiberTEM reads: npy, raw (needs dtype and shapes), HDF5 incl. DECTRIS master
    files, MIB, and the rest through LiberTEM's loader ('auto' detection unless ``fmt``)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    kw = dict(options)
    if scan_shape is not None:
        kw["nav_shape"] = tuple(scan_shape)
    if fmt is None:
        fmt = "npy" if path.suffix == ".npy" else "auto"
    try:
        return ctx.load(fmt, path=str(path), **kw)
    except Exception as exc:
        raise ValueError(f"LiberTEM cannot open {path} as {fmt}: {exc}") from exc


def replay(path: str | Path, settings: Settings, *, executor: str = "inline", scheduler: str | None = None,
           scan_shape: tuple[int, int] | None = None, fmt: str | None = None, workers: int | None = None,
           ctx=None, **options) -> RunSummary:
    own = ctx is None
    ctx = ctx or make_context(executor, scheduler, workers)
    try:
        ds = open_dataset(ctx, path, scan_shape, fmt, **options)
        nav = tuple(int(v) for v in ds.shape.nav)
        if len(nav) == 2 and "num_partitions" not in options:
            # partition as a live acquisition does, so the centre calibration lands on the same frames
            from .acquire import frames_per_partition

            n = int(np.prod(nav))
            ds = open_dataset(ctx, path, scan_shape, fmt, num_partitions=-(-n // frames_per_partition(nav, settings.block)),
                              **options)
        return run_pipeline(ctx, ds, settings, source=f"replay of {path}")
    finally:
        if own:
            ctx.close()
