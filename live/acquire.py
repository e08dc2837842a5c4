"""`stemlive live`: a real detector (or the simulator) through LiberTEM-live into the pipeline."""
from __future__ import annotations

from pathlib import Path

from .outputs import check_output
from .pipeline import AcquisitionError, RunSummary, Settings, StreamStalled, run_pipeline

DETECTORS = ("dectris", "merlin")
FRAME_STACK = 128
API_TIMEOUT_S = 10.0  # a detector's REST API answers in milliseconds; this long means it never will


class FrameCount:
    """Frames the detector connection has handed to LiberTEM so far: what the stall watchdog
    watches (UDF results can be minutes apart on a slow scan with large partitions)."""

    def __init__(self):
        self.frames = 0

    def __call__(self) -> int:
        return self.frames


class CountingStream:
    """A detector connection's frame source (LiberTEM-live's ``get_conn_impl()``), counting frames."""

    def __init__(self, impl, count: FrameCount):
        self._impl, self._count = impl, count

    def get_next_stack(self, *args, **kwargs):
        stack = self._impl.get_next_stack(*args, **kwargs)
        if stack is not None:
            self._count.frames += len(stack)
        return stack

    def __getattr__(self, name):
        return getattr(self._impl, name)


class _CountingConnImpl:
    """Stands in for ``conn.get_conn_impl`` on one connection object."""

    def __init__(self, get_impl, count: FrameCount):
        self._get_impl, self._count = get_impl, count

    def __call__(self):
        return CountingStream(self._get_impl(), self._count)


def count_frames(conn) -> FrameCount:
    """Count the frames ``conn`` delivers from now on."""
    count = FrameCount()
    conn.get_conn_impl = _CountingConnImpl(conn.get_conn_impl, count)
    return count


PARTITION_BUDGET_S = 0.1  # a partition at a known frame rate lasts about this long, at most


def frames_per_partition(scan_shape: tuple[int, int], block: tuple[int, int], cap: int = 4096,
                         frame_time_s: float | None = None, budget_s: float = PARTITION_BUDGET_S) -> int:
    """Frames per partition: a block completes when the partition holding its last frame ends.

    Unknown frame rate (or one so fast that a block row passes within ``budget_s``): whole scan
    rows, as many as divide a block row and fit under ``cap`` -- a block completes within a scan
    row of its last frame, and few blocks are touched per partition (small buffers to merge).
    At a known, slower rate, the largest run of block widths that divides a scan row and lasts
    at most ``budget_s``: partitions end where blocks do, so a block is handed to the analysis
    at most ``budget_s`` after its last frame instead of waiting for the rest of its scan row
    (at 100 frames/s on a 64-px-wide scan that wait alone averaged 0.3 s).
    """
    width = scan_shape[1]
    rows = max([m for m in range(1, block[0] + 1) if block[0] % m == 0 and m * width <= cap] or [1])
    whole_rows = rows * width
    if frame_time_s is None or not frame_time_s > 0 or whole_rows * frame_time_s <= budget_s:
        return whole_rows
    runs = [k * block[1] for k in range(1, width // block[1] + 1) if width % (k * block[1]) == 0]
    runs += [m * width for m in range(1, rows + 1) if rows % m == 0]
    runs = sorted(set(runs)) or [whole_rows]
    fitting = [n for n in runs if n * frame_time_s <= budget_s]
    return max(fitting) if fitting else runs[0]


def partition_frames(scan_shape: tuple[int, int], block: tuple[int, int], frame_time_s: float | None,
                     executor: str) -> int:
    """`frames_per_partition` for ``executor``.  Pipelined: whole block rows still.  LiberTEM's
    pipelined executor hands back at most one result per partition it dispatches, so results that
    queued up once (a worker's first partition, the calibration) stay that many partitions behind,
    and every partition dispatched before the calibrated centre reaches the UDFs bins its frames
    around its own provisional centre -- on the demo scan 1-3 px off for a partition starting on
    some rows, up to 20 % off in BF after the first-order recentering (measured with one-row
    partitions at 500 frames/s).  Inline runs pass the first partition's centre on
    (`VirtualDetectorUDF` ``provisional_center``) and take partitions as small as the rate allows."""
    if executor == "pipelined":
        return frames_per_partition(scan_shape, block)
    return frames_per_partition(scan_shape, block, frame_time_s=frame_time_s)


def live(settings: Settings, *, detector: str, api_host: str, api_port: int, data_host: str, data_port: int,
         scan_shape: tuple[int, int], mode: str = "active", executor: str = "pipelined", workers: int | None = None,
         record: Path | None = None, arm_timeout_s: float = 30.0, ctx=None, analyzer=None,
         frame_time_s: float | None = None) -> RunSummary:
    """One acquisition.  Active: stemlive arms the detector; passive: waits for someone else to.
    ``frame_time_s`` sizes the partitions (`frames_per_partition`); DECTRIS: asked of the detector."""
    from libertem_live.api import LiveContext

    if detector not in DETECTORS:
        raise ValueError(f"unknown detector {detector!r}; choose one of {', '.join(DETECTORS)}")
    if executor not in ("inline", "pipelined"):
        raise ValueError("live data runs on the inline or pipelined executor only")
    if mode not in ("active", "passive"):
        raise ValueError(f"mode must be 'active' or 'passive', got {mode!r}")
    if record is not None:  # raw frames are never written over anything
        check_output(record, [settings.out], what="--record")
    if detector == "dectris":
        probe_rest_api(api_host, api_port)
        if frame_time_s is None:
            frame_time_s = dectris_frame_time(api_host, api_port)
    analyzer = load_models(settings, scan_shape, analyzer)  # before connecting: see load_models
    from .pipeline import load_checker

    checker = load_checker(settings)  # the library check's set-up (seconds) before connecting too
    own = ctx is None
    if own:
        from .executors import make_executor

        ctx = LiveContext(executor=make_executor(executor, workers))
    stuck = False
    conn = None
    try:
        conn = _connect(ctx, detector, api_host, api_port, data_host, data_port)
        pending = None
        if mode == "passive":
            pending = conn.wait_for_acquisition(timeout=arm_timeout_s)
            if pending is None:
                raise AcquisitionError(f"no acquisition was armed within {arm_timeout_s:.0f} s (passive mode)")
        received = count_frames(conn)
        aq = ctx.make_acquisition(conn=conn, nav_shape=tuple(scan_shape), pending_aq=pending,
                                  frames_per_partition=partition_frames(tuple(scan_shape), settings.block,
                                                                               frame_time_s, executor))
        return run_pipeline(ctx, aq, settings, source=f"{detector} {api_host}:{api_port} ({mode})", record=record,
                            analyzer=analyzer, received=received, checker=checker)
    except (StreamStalled, KeyboardInterrupt):
        stuck = True  # the receiver may be blocked in the detector library: closing it would block or fail
        raise
    finally:
        if not stuck:
            if conn is not None:
                conn.close()
            if own:
                ctx.close()


def load_models(settings: Settings, scan_shape: tuple[int, int], analyzer=None):
    """Load the networks before the detector is connected or armed.

    A model's first load on a GPU builds its TensorRT engine, which takes minutes; in passive
    mode someone else arms the detector, so a build after connecting loses the start of the
    scan.  The PACBED analyser loaded here goes to the pipeline; the atom network is loaded here
    only where an engine may need building (a CUDA device, a backend other than onnxruntime) and
    released at once -- the pipeline then loads it from the engine cache in milliseconds."""
    import warnings

    from ..models.backends.tensorrt import cuda_device
    from ..udf import BlockGrid
    from .pipeline import load_analyzer, load_atom_stitcher

    analyzer = analyzer if analyzer is not None else load_analyzer(settings)
    if settings.atoms and settings.backend != "onnxruntime" and cuda_device() is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the pipeline's own load says "atom finding off" once
            stitcher = load_atom_stitcher(settings, BlockGrid(tuple(scan_shape), settings.block))
        if stitcher is not None:
            stitcher.finder.backend.close()
    return analyzer


def _rest_get(host: str, port: int, path: str, timeout: float):
    """GET ``path`` from a DECTRIS REST API: (status, reason, body), with a timeout."""
    import http.client
    import socket

    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.reason, resp.read()
    except (socket.timeout, TimeoutError):
        raise AcquisitionError(f"the detector's REST API at {host}:{port} accepted the connection but did not "
                               f"answer within {timeout:.0f} s") from None
    except (OSError, http.client.HTTPException) as exc:
        raise AcquisitionError(f"cannot connect to the dectris detector's REST API at {host}:{port}: {exc}") from None
    finally:
        conn.close()


def probe_rest_api(host: str, port: int, timeout: float = API_TIMEOUT_S) -> None:
    """Ask a DECTRIS detector's REST API for its version, with a timeout: LiberTEM-live's client
    waits up to 24 h (and retries 50 times) on an endpoint that accepts and never answers."""
    status, reason, _ = _rest_get(host, port, "/detector/api/version/", timeout)
    if status >= 400:
        raise AcquisitionError(f"the server at {host}:{port} is not a DECTRIS detector REST API (GET "
                               f"/detector/api/version/ answered {status} {reason})")


def dectris_frame_time(host: str, port: int, timeout: float = API_TIMEOUT_S) -> float | None:
    """The frame time (s) the detector is configured for, or None where it does not say."""
    import json

    status, _, body = _rest_get(host, port, "/detector/api/1.8.0/config/frame_time", timeout)
    try:
        value = float(json.loads(body)["value"]) if status < 400 else None
    except (ValueError, KeyError, TypeError):
        return None
    return value if value is not None and value > 0 else None


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
