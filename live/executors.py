"""The LiberTEM executors stemlive runs on, made so that they bind loopback and die with stemlive.

* pipelined: LiberTEM's PipelinedExecutor whose workers exit when stemlive's process is gone
  (`processes.exit_with_parent`), so a killed run leaves no worker behind.
* dask: a local cluster whose scheduler, workers, nannies and dashboard all listen on
  127.0.0.1 only.  Dask's protocol carries pickles, so a cluster reachable from the network
  runs code for anyone who reaches it; a cluster meant to be reachable is the user's own,
  passed with ``--scheduler`` (set up with TLS/authentication as Dask documents).
* inline: the main process.
"""
from __future__ import annotations

LOOPBACK = "127.0.0.1"
EXECUTORS = ("inline", "pipelined", "dask")


def _spec_args(workers: int | None) -> dict:
    from libertem.utils.devices import detect

    args = detect()
    if workers:
        args["cpus"] = int(workers)
    return args


def pipelined_worker_setup() -> None:
    """Each pipelined worker, before its first task: exit with stemlive (`exit_with_parent`), and
    import stemlive's UDFs and load their compiled kernels now.

    Done in the first task instead, that takes a second or two while the stream keeps coming;
    LiberTEM's pipelined executor hands back at most one result per task it schedules, so the
    results queued meanwhile stay queued to the end of the scan: every block then reached the
    analysis ~30 partitions late at 200 frames/s, and the calibrated centre reached the UDFs as
    late (measured: 500 frames binned around provisional centres instead of none)."""
    from .processes import exit_with_parent

    exit_with_parent()
    from ..udf import warm_up

    warm_up()


def pipelined_executor(workers: int | None = None):
    from libertem.executor.pipelined import PipelinedExecutor

    return PipelinedExecutor(spec=PipelinedExecutor.make_spec(**_spec_args(workers)),
                             early_setup=pipelined_worker_setup)


def local_dask_executor(workers: int | None = None):
    """A LiberTEM Dask cluster on this machine, every socket on 127.0.0.1."""
    import distributed as dd
    from libertem.executor.dask import DaskJobExecutor, cluster_spec

    spec = cluster_spec(**_spec_args(workers), options={"host": LOOPBACK, "dashboard": False})
    scheduler = {"cls": dd.Scheduler, "options": {"host": LOOPBACK, "dashboard_address": f"{LOOPBACK}:0"}}
    return DaskJobExecutor.make_local(spec=spec, cluster_kwargs={"scheduler": scheduler})


def make_executor(kind: str = "inline", workers: int | None = None, scheduler: str | None = None):
    """The executor for ``kind``; ``scheduler`` (tcp://host:port) connects to an existing Dask cluster."""
    if kind not in EXECUTORS:
        raise ValueError(f"unknown executor {kind!r}; choose one of {', '.join(EXECUTORS)}")
    if workers is not None and workers < 1:
        raise ValueError(f"--workers must be at least 1, got {workers}")
    if scheduler is not None:
        if kind != "dask":
            raise ValueError("--scheduler needs --executor dask")
        from libertem.executor.dask import DaskJobExecutor

        return DaskJobExecutor.connect(scheduler)
    if kind == "inline":
        from libertem.executor.inline import InlineJobExecutor

        return InlineJobExecutor()
    if kind == "pipelined":
        return pipelined_executor(workers)
    return local_dask_executor(workers)
