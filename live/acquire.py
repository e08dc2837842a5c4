"""`stemlive live`: a real detector (or the simulator) through LiberTEM-live into the pipeline."""
from __future__ import annotations

from pathlib import Path

from .pipeline import AcquisitionError, RunSummary, Settings, StreamStalled, run_pipeline

DETECTORS = ("dectris", "merlin")
FRAME_STACK = 128


def frames_per_partition(scan_shape: tuple[int, int], block: tuple[int, int], cap: int = 4096) -> int:
    """Whole scan rows per partition, as many as divide a block row and fit under ``cap``.

    A block completes when the partition holding its last frame ends; partitions that end on
    block-row boundaries make that happen within a scan row of its last frame, and few blocks
    are touched per partition (small BlockPacbedUDF buffers to merge).
    """
    rows = max([m for m in range(1, block[0] + 1) if block[0] % m == 0 and m * scan_shape[1] <= cap] or [1])
    return rows * scan_shape[1]


def live(settings: Settings, *, detector: str, api_host: str, api_port: int, data_host: str, data_port: int,
         scan_shape: tuple[int, int], mode: str = "active", executor: str = "pipelined", workers: int | None = None,
         record: Path | None = None, arm_timeout_s: float = 30.0, ctx=None, analyzer=None) -> RunSummary:
    """One acquisition.  Active: stemlive arms the detector; passive: waits for someone else to."""
    from libertem_live.api import LiveContext

    if detector not in DETECTORS:
        raise ValueError(f"unknown detector {detector!r}; choose one of {', '.join(DETECTORS)}")
    if executor not in ("inline", "pipelined"):
        raise ValueError("live data runs on the inline or pipelined executor only")
    if mode not in ("active", "passive"):
        raise ValueError(f"mode must be 'active' or 'passive', got {mode!r}")
    own = ctx is None
    if own:
        ctx = LiveContext.make_with(executor, cpus=workers) if (workers and executor != "inline") \
            else LiveContext.make_with(executor)
    stuck = False
    conn = None
    try:
        conn = _connect(ctx, detector, api_host, api_port, data_host, data_port)
        pending = None
        if mode == "passive":
            pending = conn.wait_for_acquisition(timeout=arm_timeout_s)
            if pending is None:
                raise AcquisitionError(f"no acquisition was armed within {arm_timeout_s:.0f} s (passive mode)")
        aq = ctx.make_acquisition(conn=conn, nav_shape=tuple(scan_shape), pending_aq=pending,
                                  frames_per_partition=frames_per_partition(tuple(scan_shape), settings.block))
        return run_pipeline(ctx, aq, settings, source=f"{detector} {api_host}:{api_port} ({mode})", record=record,
                            analyzer=analyzer)
    except (StreamStalled, KeyboardInterrupt):
        stuck = True  # the receiver may be blocked in the detector library: closing it would block or fail
        raise
    finally:
        if not stuck:
            if conn is not None:
                conn.close()
            if own:
                ctx.close()


def _connect(ctx, detector, api_host, api_port, data_host, data_port):
    try:
        if detector == "dectris":
            # frames reach the UDFs in stacks of this many: large stacks, few Python calls per frame
            return ctx.make_connection("dectris").open(api_host=api_host, api_port=api_port,
                                                       data_host=data_host, data_port=data_port,
                                                       frame_stack_size=FRAME_STACK)
        return ctx.make_connection("merlin").open(data_host=data_host, data_port=data_port,
                                                  api_host=api_host, api_port=api_port)
    except Exception as exc:
        raise AcquisitionError(f"cannot connect to the {detector} detector at {api_host}:{api_port} "
                               f"(data {data_host}:{data_port}): {exc}") from exc
