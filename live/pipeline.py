"""One acquisition through the UDFs, the engine, the store and the publisher -- live or replayed.

`run_pipeline` is the single code path behind `stemlive live`, `stemlive replay` and
`stemlive demo`: a LiberTEM(-live) Context runs `BlockPacbedUDF` and `VirtualDetectorUDF` with
`run_udf_iter`, every partial result goes to the `BlockEngine`, and the disk centre found on the
first analysed block reaches the VirtualDetectorUDF through `update_parameters_experimental`.
"""
from __future__ import annotations

import logging
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..udf import BlockGrid, BlockPacbedUDF, VirtualDetectorUDF
from ..udf.radial_bins import DEFAULT_RINGS
from ..udf.virtual_detector import PROVISIONAL
from .engine import BlockEngine
from .run import BIN_PX, open_run

log = logging.getLogger(__name__)

# in-plane unit cell of the zone axes the shipped models cover [nm]: a block must span one
UNIT_CELL_NM = {("SrTiO3", "[001]"): 0.3905}


class AcquisitionError(RuntimeError):
    """The acquisition could not be completed; the store says so (state aborted, reason)."""


class StreamStalled(AcquisitionError):
    """No frames for too long.  The receiving thread may still be blocked inside the detector
    library (libertem-dectris waits without a timeout), so its connection cannot be closed; a
    command-line run exits the process after reporting."""


@dataclass
class Settings:
    """Everything about one run that does not come from the data."""

    block: tuple[int, int]
    alpha_mrad: float
    kv: float
    out: Path
    mrad_per_px: float | None = None
    scan_step_nm: float | None = None
    scan_rotation_deg: float = 0.0
    center_px: tuple[float, float] | None = None
    models_dir: Path | None = None
    backend: str = "auto"
    rings: dict = field(default_factory=lambda: dict(DEFAULT_RINGS))
    pub: str | None = "tcp://127.0.0.1:5557"
    rep: str | None = "tcp://127.0.0.1:5558"
    overwrite: bool = False  # replace an existing store, only once this run has succeeded
    stall_timeout_s: float | None = 30.0  # no frames received for this long: the detector stopped (None: no watchdog)
    token: str | None = None  # access token, needed to publish beyond 127.0.0.1
    progress: bool = True
    atoms: str | None = "haadf"  # find atomic columns in this virtual image (None: off)
    atom_margin_px: int = 16  # context around a block for atom finding
    columns: bool = True  # species and anomaly of the located columns (needs the scan step, HAADF and ABF rings)
    method: str | None = None  # "check" (None: check where the setting's check data exists) or "network"
    check_timeout_s: float | None = 120.0  # at the end, wait this long for the library check to catch up
    com: bool = False  # centre-of-mass (DPC) and iDPC maps from LiberTEM's CoMUDF (one more pass per frame)
    flip_y: bool = False  # the detector's first row is at the bottom (e.g. some Merlin set-ups): for the CoM maps
    holder_axis_deg: float | None = None  # the holder's α axis on the detector (from axis 1 towards 0): stored, for α/β


@dataclass
class RunSummary:
    out: Path
    state: str
    reason: str
    frames: int
    blocks_done: int
    blocks_total: int
    wall_s: float
    ingest_ms_median: float = 0.0
    ingest_ms_max: float = 0.0
    block_delay_ms_median: float = 0.0
    acquisition_s: float = 0.0  # first to last UDF result: the frame ingest itself
    block_delay_ms_p90: float = 0.0
    block_stored_s: np.ndarray | None = None  # per block: stored this long after the acquisition started
    first_result_s: float = 0.0  # the first UDF result, after the acquisition started
    first_result_frames: int = 0  # frames in it
    atoms: int = 0  # atomic columns found
    blocks_failed: int = 0  # analysed, but the analysis gave an error (kept in place, flag "error")
    failures: dict = field(default_factory=dict)  # error message -> number of blocks
    method: str = "network"  # what the run used: "check" or "network"
    checks_done: int = 0  # blocks whose library check landed
    checks_unfinished: int = 0  # blocks left with the networks' values: the run closed first
    checks_failed: int = 0
    check_ms_median: float = 0.0  # one block's check
    checks_per_s: float = 0.0  # landed per second of the check stage's life
    check_delay_ms_median: float = 0.0  # block complete -> checked values stored and published

    @property
    def useful(self) -> bool:
        """Something came out: at least one block analysed without an error."""
        return self.blocks_done > self.blocks_failed


# ONNX Runtime threads of a run's networks: one, so frame ingest (receiver, LiberTEM's merges,
# the engine) keeps the other core of a 2-core machine; offline (reanalyse) None: every core
LIVE_INFERENCE_THREADS = 1


def load_analyzer(settings: Settings, threads: int | None = LIVE_INFERENCE_THREADS):
    from ..models.pacbed_analysis import PacbedAnalyzer
    from ..models.cards import SHIPPED_DIR

    return PacbedAnalyzer.for_acquisition(settings.kv, settings.alpha_mrad, settings.models_dir or SHIPPED_DIR,
                                          backend=settings.backend, threads=threads)


def load_checker(settings: Settings):
    """The library check for this acquisition (`models/checked_analysis.py`), or None: method
    network, or no check data for the setting (then a one-line warning says how to build it)."""
    from ..models.checked_analysis import open_checker

    return open_checker(settings.method, settings.kv, settings.alpha_mrad, settings.models_dir)


def check_summary(engine: BlockEngine) -> dict:
    """The check stage's figures for a RunSummary."""
    st = engine.stats
    return {"method": "check" if engine.checker is not None else "network", "checks_done": st.checks_done,
            "checks_unfinished": st.checks_unfinished, "checks_failed": sum(st.check_failures.values()),
            "check_ms_median": float(np.median(st.check_s) * 1e3) if st.check_s else 0.0,
            "checks_per_s": st.checks_per_s,
            "check_delay_ms_median": float(np.median(st.check_delay_s) * 1e3) if st.check_delay_s else 0.0}


def load_atom_stitcher(settings: Settings, grid: BlockGrid):
    """The atom finder for ``settings.atoms`` over the block grid, or None (off, or no model:
    then a warning says why and the rest of the run goes on)."""
    if not settings.atoms:
        return None
    from ..models.atom_analysis import AtomFinder
    from ..models.atom_regions import AtomStitcher
    from ..models.cards import SHIPPED_DIR

    if settings.atoms not in settings.rings:
        raise ValueError(f"atoms are found in the {settings.atoms!r} virtual image, but the rings are "
                         f"{', '.join(settings.rings)}")
    try:
        finder = AtomFinder.shipped(settings.atoms, settings.models_dir or SHIPPED_DIR, backend=settings.backend)
    except FileNotFoundError as exc:
        warnings.warn(f"atom finding off: {exc}", stacklevel=3)
        return None
    sampling = settings.scan_step_nm * 10 if settings.scan_step_nm else None
    stitcher = AtomStitcher(finder, grid, sampling, margin_px=settings.atom_margin_px)
    stitcher.columns = load_block_columns(settings, sampling)
    return stitcher


def load_block_columns(settings: Settings, sampling_A: float | None):
    """Species and anomaly of the located columns (`atoms_analyse.BlockColumns`), or None with a
    one-line warning: off (``settings.columns``), no scan step (the networks' patches are sized
    in Å), a HAADF or ABF ring missing (they read both), or no model."""
    if not settings.columns:
        return None
    from ..models.atoms_analyse import BlockColumns
    from ..models.cards import SHIPPED_DIR
    from ..models.column_anomaly import AnomalyDetector
    from ..models.column_species import SpeciesClassifier

    missing = [r for r in ("haadf", "abf") if r not in settings.rings]
    why = (f"no {' and no '.join(r.upper() for r in missing)} ring (they read the HAADF and the ABF image)" if missing
           else "the scan step is not known (give --scan-step-nm)" if sampling_A is None else None)
    if why is None:
        try:
            kw = {"backend": settings.backend, "threads": LIVE_INFERENCE_THREADS}
            mdir = settings.models_dir or SHIPPED_DIR
            return BlockColumns(SpeciesClassifier.shipped(mdir, **kw), AnomalyDetector.shipped(mdir, **kw),
                                settings.atoms, sampling_A)
        except FileNotFoundError as exc:
            why = str(exc)
    warnings.warn(f"column species and anomaly off: {why}", stacklevel=3)
    return None


def check_block_size(settings: Settings, analyzer) -> str | None:
    """A warning when a block cannot span one unit cell at this scan step (its PACBED is then biased)."""
    if settings.scan_step_nm is None:
        return None
    tr = analyzer.cards[-1].data.get("training", {})
    cell = UNIT_CELL_NM.get((tr.get("material"), tr.get("zone")))
    if cell is None:
        return None
    span = [b * settings.scan_step_nm for b in settings.block]
    if min(span) < cell * (1 - 1e-6):
        return (f"block {settings.block[0]}×{settings.block[1]} at {settings.scan_step_nm:g} nm per step spans "
                f"{span[0]:.3f}×{span[1]:.3f} nm, less than one {tr.get('material')} {tr.get('zone')} unit cell "
                f"({cell} nm): its PACBED does not average the probe over the cell")
    return None


def make_udfs(settings: Settings, record: Path | None = None) -> list:
    # images=False: the engine evaluates the rings of new frames itself, incrementally
    udfs = [BlockPacbedUDF(block=settings.block),
            VirtualDetectorUDF(center=settings.center_px, alpha_mrad=settings.alpha_mrad,
                               mrad_per_px=settings.mrad_per_px, rings=settings.rings, bin_px=BIN_PX, images=False)]
    if settings.com:  # whole-frame centre of mass; shifts, scan rotation and iDPC in the engine
        from libertem.udf.com import CoMUDF

        udfs.append(CoMUDF.with_params())
    if record is not None:
        from libertem_live.udf.record import RecordUDF  # raw frames (.npy) for a later replay

        udfs.append(RecordUDF(str(record)))
    return udfs


def run_pipeline(ctx, dataset, settings: Settings, *, roi: np.ndarray | None = None, source: str = "",
                 analyzer=None, record: Path | None = None, received=None, checker=False) -> RunSummary:
    """Run one acquisition (or recorded dataset) to the end; the store is closed honestly either way.

    ``received()``, when given, counts the frames the detector connection delivered: the stall
    watchdog watches it (and the UDF results), so a slow but healthy stream is never aborted.
    ``checker``: the library check (default: :func:`load_checker` for ``settings``; None: off)."""
    t0 = time.perf_counter()
    scan_shape = tuple(int(v) for v in dataset.shape.nav)
    sig_shape = tuple(int(v) for v in dataset.shape.sig)
    if len(scan_shape) != 2:
        raise ValueError(f"a 2D scan is needed, the dataset's scan shape is {scan_shape} (give --scan-shape)")
    grid = BlockGrid(scan_shape, settings.block)
    analyzer = analyzer if analyzer is not None else load_analyzer(settings)
    checker = load_checker(settings) if checker is False else checker
    warning = check_block_size(settings, analyzer)
    if warning:
        warnings.warn(warning, stacklevel=2)
    atoms = load_atom_stitcher(settings, grid)
    run = open_run(settings, scan_shape, sig_shape, analyzer=analyzer, checker=checker, atoms=atoms, roi=roi,
                   source=source)
    state, engine = run.state, run.engine
    final, reason = "aborted", "not started"
    timing: dict = {}
    try:  # from the store's creation on, every way out closes it honestly
        _iterate(ctx, dataset, settings, engine, roi, grid, record, timing, received)
        final, reason = "complete", ""
    except BaseException as exc:
        final = "aborted"
        if isinstance(exc, KeyboardInterrupt):  # Ctrl-C or SIGTERM (processes.Terminated)
            reason, err = getattr(exc, "reason", "interrupted (Ctrl-C)"), exc
        elif isinstance(exc, AcquisitionError):
            reason, err = str(exc), exc
        else:
            reason = f"{type(exc).__name__}: {exc}"
            err = AcquisitionError(reason)
        err.store_path = run.store.path  # where this run's blocks are (beside --out when replacing it)
        if err is exc:
            raise
        raise err from exc
    finally:
        run.close(final, reason)
    st = state.status
    ing = np.asarray(engine.stats.ingest_s) * 1e3
    dly = np.asarray(engine.stats.block_delay_s) * 1e3
    start = timing.get("start", 0.0)
    summary = RunSummary(
        out=Path(settings.out), state=st["state"], reason=st["reason"], frames=int(st["frames_seen"]),
        blocks_done=int(st["blocks_done"]), blocks_total=int(st["blocks_total"]), wall_s=time.perf_counter() - t0,
        ingest_ms_median=float(np.median(ing)) if ing.size else 0.0,
        ingest_ms_max=float(ing.max()) if ing.size else 0.0,
        block_delay_ms_median=float(np.median(dly)) if dly.size else 0.0,
        block_delay_ms_p90=float(np.percentile(dly, 90)) if dly.size else 0.0,
        acquisition_s=timing.get("last", start) - start, block_stored_s=stored_times(engine, grid, start),
        first_result_s=timing.get("first", start) - start, first_result_frames=int(timing.get("first_frames", 0)),
        atoms=int(st.get("atoms", 0)), blocks_failed=sum(engine.stats.failures.values()),
        failures=dict(engine.stats.failures.most_common()), **check_summary(engine))
    if summary.state != "complete":
        raise AcquisitionError(summary.reason)
    return summary


def stored_times(engine: BlockEngine, grid: BlockGrid, start: float | None) -> np.ndarray:
    out = np.full(grid.shape, np.nan)
    for (i, j), t in engine.stats.stored_at.items():
        out[i, j] = t - (start or 0.0)
    return out


def _iterate(ctx, dataset, settings: Settings, engine: BlockEngine, roi, grid: BlockGrid, record=None,
             timing: dict | None = None, received=None) -> None:
    """The acquisition loop, watched: no frame received (and no result) for ``stall_timeout_s``
    is a stopped detector."""
    from tqdm import tqdm

    total = int(np.prod(grid.scan_shape)) if roi is None else int(np.count_nonzero(roi))
    bar = tqdm(total=total, unit="frame", disable=not settings.progress, desc="frames", smoothing=0.1)
    box: dict = {}
    seen = [0]
    done = threading.Event()

    timing = {} if timing is None else timing

    provisional = [False]  # the first partition's provisional centre was passed on (or calibration came)

    def consume():
        try:
            timing["start"] = time.perf_counter()
            it = ctx.run_udf_iter(dataset=dataset, udf=make_udfs(settings, record), roi=roi)
            for res in it:
                blocks, virtual = res.buffers[0], res.buffers[1]
                per_frame = {k: virtual[k].data for k in ("radial", "dipole", "center_used", "recorded")}
                if settings.com:
                    per_frame["raw_com"] = res.buffers[2]["raw_com"].data
                engine.on_result({k: blocks[k].data for k in ("counts", "pacbed")}, per_frame, res.damage.data)
                n = int(np.count_nonzero(res.damage.data))
                if n > seen[0]:
                    timing["last"] = time.perf_counter()
                    if "first" not in timing:
                        timing["first"], timing["first_frames"] = timing["last"], n
                bar.update(n - seen[0])
                seen[0] = n
                cal = engine.take_calibration()
                if cal is not None:  # from now on the UDF reads the rings directly
                    it.update_parameters_experimental([{}, {"center": cal.center_px, "radius_px": cal.radius_px}])
                    provisional[0] = True
                elif not provisional[0] and (per_frame["recorded"] == PROVISIONAL).any():
                    # the first partition's provisional centre for every partition until the calibration
                    first = int(np.flatnonzero(per_frame["recorded"].ravel() == PROVISIONAL)[0])
                    centre = per_frame["center_used"].reshape(-1, 2)[first]
                    it.update_parameters_experimental([{}, {"provisional_center": tuple(float(c) for c in centre)}])
                    provisional[0] = True
        except BaseException as exc:
            box["error"] = exc
        finally:
            done.set()

    worker = threading.Thread(target=consume, name="stemlive-acquisition", daemon=True)
    worker.start()
    watch = StallWatch(settings.stall_timeout_s, lambda: max(seen[0], received() if received else 0))
    try:
        while not done.wait(0.2):
            if watch.stalled():
                raise StreamStalled(
                    f"no frames for {settings.stall_timeout_s:.0f} s after {watch.progress} of {total}: "
                    "the detector stopped or the stream never started")
    finally:
        bar.close()
    if "error" in box:
        raise box["error"]


class StallWatch:
    """Progress that has not moved for ``timeout_s`` (None: never stalled)."""

    def __init__(self, timeout_s: float | None, progress):
        self.timeout_s, self._progress = timeout_s, progress
        self.progress = progress()
        self._moved = time.monotonic()

    def stalled(self) -> bool:
        if self.timeout_s is None:
            return False
        now = self._progress()
        if now != self.progress:
            self.progress, self._moved = now, time.monotonic()
        return time.monotonic() - self._moved > self.timeout_s
