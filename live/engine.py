"""`BlockEngine`: from UDF partial results to analysed, stored and published blocks.

The acquisition loop hands every `run_udf_iter` result to :meth:`BlockEngine.on_result`, which
only compares frame counts with what each block expects, copies the sums of newly completed
blocks and the radial bins of newly arrived frames, and queues them -- a few milliseconds, so
frame ingest never waits for a network.  One worker thread analyses the queued blocks in
batches (each exactly once), evaluates the virtual rings, writes the store and publishes.
The first completed blocks calibrate the disk centre (and size, unless ``mrad_per_px`` was
given): they alone are analysed at once, in the loop (one short wait, counted in the ingest
statistics), so the centre reaches the VirtualDetectorUDF (`take_calibration`) at the same point
of the scan in every run; their estimates are reused, not recomputed.  With an `AtomStitcher`,
the worker also finds atomic columns in the calibrated virtual image, block by block, as soon
as a block and its margin have their final values -- and, with the stitcher's ``columns``
(`atoms_analyse.BlockColumns`), their species and anomaly from the same windows.

The library check (``checker``, `models/checked_analysis.py`) is a second stage in its own
thread: a block is stored and published with the networks' reading (``maps/method`` 1) at once,
then queued for the check; when its check lands the block's map values are replaced in the
state, the store and on the wire (``maps/method`` 2).  The check is slower than the networks
(~0.1-0.7 s a block on 2 cores today), so it never holds up ingest or the first stage: it
lags, and :meth:`BlockEngine.close` gives it until ``check_timeout`` to catch up (an aborted run
does not wait); blocks whose check has not landed keep the networks' values, the store says how
many (``checks_unfinished``).  The check is a deterministic function of the block's mean
pattern and its networks' estimate, both the same live and in a replay, so a completed run's
final maps do not depend on when the checks landed.
"""
from __future__ import annotations

import logging
import queue
from collections import Counter
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from ..udf.block_grid import BlockGrid
from ..udf.radial_bins import DEFAULT_RINGS, RingScale
from ..udf.virtual_detector import frame_profiles, ring_images
from .com_maps import com_images, idpc
from .publisher import Publisher
from .state import LiveState
from .store import MAP_FIELDS, ResultStore, estimate_row

log = logging.getLogger(__name__)
_NOTHING = object()


@dataclass
class Calibration:
    """Disk centre and radius on the detector, from the first analysed block (or given)."""

    center_px: tuple[float, float]
    radius_px: float
    source: str


@dataclass
class EngineStats:
    ingest_s: list = field(default_factory=list)  # time on_result took, per result
    block_delay_s: list = field(default_factory=list)  # block complete -> stored and published
    stored_at: dict = field(default_factory=dict)  # (i, j) -> time.perf_counter() when stored
    failures: Counter = field(default_factory=Counter)  # analysis error -> blocks it struck
    check_s: list = field(default_factory=list)  # seconds each library check took
    check_delay_s: list = field(default_factory=list)  # block complete -> its check stored and published
    checks_queued: int = 0
    checks_done: int = 0
    checks_unfinished: int = 0  # queued, but the run closed before they landed
    check_failures: Counter = field(default_factory=Counter)  # check error -> blocks (they keep the networks' values)
    check_span_s: list = field(default_factory=lambda: [None, None])  # first check started, last one landed

    @property
    def checks_per_s(self) -> float:
        """Checks landed per second of the check stage's life (first start to last landing)."""
        t0, t1 = self.check_span_s
        return self.checks_done / (t1 - t0) if self.checks_done and t1 and t1 > t0 else 0.0


LOST_AFTER_S = 5.0  # a frame missing this long after a later one arrived is counted lost
VIRTUAL_INTERVAL_S = 0.25  # new frames reach the virtual images (and the browsers) at most this often
IDPC_INTERVAL_S = 1.0  # the live iDPC is integrated at most this often (and when the last frame is in)


class BlockEngine:
    def __init__(self, grid: BlockGrid, analyzer, state: LiveState, store: ResultStore | None = None,
                 publisher: Publisher | None = None, *, roi: np.ndarray | None = None,
                 alpha_mrad: float, mrad_per_px: float | None = None, center_px: tuple[float, float] | None = None,
                 rings: dict | None = None, bin_px: float = 0.5, batch: int = 64, atoms=None,
                 checker=None, check_timeout: float | None = 120.0, progress: bool = False,
                 com: dict | None = None):
        self.grid = grid
        # CoM maps from LiberTEM's CoMUDF (``raw_com`` in the record): {"scan_rotation_deg", "flip_y"}; None: off
        self.com = com
        self._idpc_at, self._idpc_stale = -np.inf, False  # when the iDPC was last integrated; frames since
        self.analyzer = analyzer
        self.state = state
        self.store = store
        self.publisher = publisher
        self.expected = grid.expected_counts(roi)
        self.partial = grid.partial()
        self.alpha_mrad = alpha_mrad
        self.mrad_per_px = mrad_per_px
        self.rings = dict(rings or DEFAULT_RINGS)
        self.bin_px = bin_px
        self.batch = batch
        self.stats = EngineStats()
        self.calibration: Calibration | None = None
        self.given_center = center_px
        self._calibration_pending: Calibration | None = None
        self._queued = np.zeros(grid.shape, bool)
        self._precomputed: dict[tuple[int, int], object] = {}  # block -> estimate from the calibration
        self._frames_seen = np.zeros(grid.scan_shape, bool)
        self._fronts: list[tuple[float, int]] = []  # (when, newest frame index seen): the lost-frame count
        self._bins = None  # the VirtualDetectorUDF's per-frame record (LiberTEM's result buffers)
        self._have = np.zeros(int(np.prod(grid.scan_shape)), bool)
        self.atoms = atoms  # AtomStitcher or None
        self._unscanned = (np.zeros(grid.scan_shape, bool) if roi is None
                           else ~np.asarray(roi, bool).reshape(grid.scan_shape))
        self._virtual_final = False  # the virtual images use the calibrated centre
        self._queue: queue.Queue = queue.Queue()
        self._error: BaseException | None = None
        self._t0 = time.perf_counter()
        self._status_sent = 0.0
        # state + publish in one step, so the two stages' messages leave in ``seq`` order
        self._emit = threading.Lock()
        self.checker = checker if analyzer is not None else None
        self.check_timeout = check_timeout
        self.progress = progress
        self._checks: queue.Queue = queue.Queue()
        self._check_lock = threading.Lock()  # a landing check vs close()
        self._checks_closed = False
        self._checks_closing = False  # close() is waiting: land every check at once
        self._worker = threading.Thread(target=self._work, name="stemlive-engine", daemon=True)
        self._worker.start()
        self._check_worker = None
        if self.checker is not None:
            self._check_worker = threading.Thread(target=self._check_work, name="stemlive-check", daemon=True)
            self._check_worker.start()

    # -- ingest side (the acquisition loop) ------------------------------------------------
    def on_result(self, blocks: dict, virtual: dict | None, damage: np.ndarray) -> None:
        """Queue newly completed blocks and newly arrived frames; cheap, never waits."""
        t = time.perf_counter()
        if self._error is not None:
            raise RuntimeError(f"analysis failed: {self._error}") from self._error
        counts = np.asarray(blocks["counts"])
        new = (counts >= self.expected) & (self.expected > 0) & ~self._queued
        if new.any():
            idx = np.argwhere(new)
            self._queued[new] = True
            pac = np.asarray(blocks["pacbed"])
            if self.calibration is None and self.analyzer is not None:
                self._calibrate_now(idx[:4], pac[new][:4] / counts[new][:4, None, None])
            self._queue.put(("blocks", idx, pac[new].copy(), counts[new].copy(), time.perf_counter()))
        if virtual is not None:
            damage = np.asarray(damage, bool).reshape(self.grid.scan_shape)
            fresh = damage & ~self._frames_seen
            if fresh.any():
                self._frames_seen |= fresh
                # LiberTEM merges into these buffers in place; frames already merged are never
                # touched again, so the worker may read them without a copy (no second per-frame store)
                self._bins = {k: np.asarray(v) for k, v in virtual.items()}
                self._queue.put(("frames", fresh))
        seen = int(self._frames_seen.sum()) if virtual is not None else int(counts.sum())
        elapsed = time.perf_counter() - self._t0
        lost = self._lost_so_far() if virtual is not None else {}
        status = self.state.update_status(frames_seen=seen, frames_per_s=seen / max(elapsed, 1e-9), **lost)
        if self.publisher is not None and time.perf_counter() - self._status_sent > 0.2:  # ≤ 5 Hz
            self._status_sent = time.perf_counter()
            self.publisher.status(status)
        self.stats.ingest_s.append(time.perf_counter() - t)

    def _lost_so_far(self) -> dict:
        """Frames the scan passed ``LOST_AFTER_S`` ago or earlier that never arrived: the running
        count of lost frames (a frame still in a partition being reduced is not lost yet)."""
        flat = self._frames_seen.ravel()
        now = time.monotonic()
        newest = int(np.flatnonzero(flat)[-1]) if flat.any() else -1
        if not self._fronts or newest > self._fronts[-1][1]:
            self._fronts.append((now, newest))
        while len(self._fronts) > 1 and self._fronts[1][0] <= now - LOST_AFTER_S:
            self._fronts.pop(0)  # the newest front old enough stays first
        t, front = self._fronts[0]
        if t > now - LOST_AFTER_S or front < 0:
            return {}
        passed = ~self._unscanned.ravel()[:front + 1]
        return {"frames_dropped": int(passed.sum()) - int(np.count_nonzero(flat[:front + 1] & passed))}

    def _calibrate_now(self, idx: np.ndarray, means: np.ndarray) -> None:
        estimates = self.analyzer.analyze(means)
        for (i, j), e in zip(idx, estimates):
            self._precomputed[(int(i), int(j))] = e
        self._calibrate(estimates, recompute=False)

    def take_calibration(self) -> Calibration | None:
        """The calibration found since the last call (once), for update_parameters_experimental."""
        cal, self._calibration_pending = self._calibration_pending, None
        return cal

    # -- worker side -------------------------------------------------------------------------
    def _work(self) -> None:
        """Blocks first, in batches of what is waiting; new frames' virtual pixels gathered and
        published at most every ``VIRTUAL_INTERVAL_S`` (each publish sums profiles, writes the
        store and sends rows the browsers redraw: per partition at a slow scan that is ~10 a
        second, and the blocks queued behind them -- the maps the operator watches -- waited)."""
        fresh = np.zeros(self.grid.scan_shape, bool)  # frames arrived, not yet published
        recompute, published_at = False, -np.inf
        while True:
            due = published_at + VIRTUAL_INTERVAL_S - time.monotonic() if fresh.any() else None
            try:
                items = [self._queue.get(timeout=max(due, 0.0)) if due is not None else self._queue.get()]
            except queue.Empty:
                items = []
            while True:  # everything waiting now
                try:
                    items.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            stop = any(it is None for it in items)
            try:
                blocks = [it for it in items if it is not None and it[0] == "blocks"]
                if blocks:
                    self._analyse(blocks)
                for it in items:
                    if it is not None and it[0] == "frames":
                        fresh |= it[1]
                recompute |= any(it is not None and it[0] == "recompute" for it in items)
                if (fresh.any() or recompute) and (stop or time.monotonic() - published_at >= VIRTUAL_INTERVAL_S):
                    self._have[fresh.ravel()] = True
                    if recompute:
                        self._recompute_virtual()
                    else:
                        self._publish_virtual(np.flatnonzero(fresh.ravel()))
                    fresh[:] = False
                    recompute, published_at = False, time.monotonic()
                self._find_atoms()
            except BaseException as exc:  # surfaced to the acquisition loop by on_result/close
                log.exception("engine worker failed")
                self._error = exc
                return
            if stop:
                return

    def _analyse(self, items) -> None:
        idx = np.concatenate([it[1] for it in items])
        sums = np.concatenate([it[2] for it in items])
        counts = np.concatenate([it[3] for it in items])
        t_complete = [t for it in items for t in [it[4]] * len(it[1])]
        for lo in range(0, len(idx), self.batch):
            sl = slice(lo, lo + self.batch)
            means = sums[sl] / counts[sl, None, None]
            estimates = self._estimates(idx[sl], means)
            self.stats.failures.update(e.error for e in estimates if e is not None and e.error is not None)
            part = self.partial[idx[sl, 0], idx[sl, 1]]
            rows = [estimate_row(e, p) for e, p in zip(estimates, part)]
            arrays = {k: np.stack([r[k] for r in rows]) for k in MAP_FIELDS}
            if self.store is not None:
                self.store.write_blocks(idx[sl], sums[sl], counts[sl], None, part, int(self._frames_seen.sum()),
                                        rows=arrays)
            with self._emit:
                seq = self.state.apply_blocks(idx[sl], arrays, sums[sl], counts[sl], part)
                if self.publisher is not None:  # with when the newest block's last frame came (wall clock)
                    self.publisher.blocks(seq, idx[sl], arrays,
                                          completed=time.time() - (time.perf_counter() - max(t_complete[sl])))
            now = time.perf_counter()
            self.stats.block_delay_s.extend(now - t for t in t_complete[sl])
            self.stats.stored_at.update({(int(i), int(j)): now for i, j in idx[sl]})
            if self.checker is not None:
                self._queue_checks(idx[sl], means, estimates, part, t_complete[sl])
            if self.calibration is None:
                self._calibrate(estimates)

    def _estimates(self, idx: np.ndarray, means: np.ndarray) -> list:
        if self.analyzer is None:
            return [None] * len(means)
        todo = [k for k, (i, j) in enumerate(idx) if (int(i), int(j)) not in self._precomputed]
        fresh = iter(self.analyzer.analyze(means[todo]) if todo else [])
        return [self._precomputed.pop((int(i), int(j))) if (int(i), int(j)) in self._precomputed else next(fresh)
                for i, j in idx]

    def _calibrate(self, estimates, recompute: bool = True) -> None:
        good = [e for e in estimates if e is not None and e.error is None and e.center_px is not None]
        if not good:
            return
        center = tuple(float(v) for v in np.median([e.center_px for e in good], axis=0))
        if self.given_center is not None:
            center = tuple(self.given_center)
        radius = (self.alpha_mrad / self.mrad_per_px if self.mrad_per_px
                  else float(np.median([e.radius_px for e in good])))
        self.calibration = Calibration(center, radius, "given" if self.given_center else "first analysed block")
        self._calibration_pending = self.calibration
        self.state.meta["calibration"] = {"center_px": list(center), "radius_px": radius,
                                          "source": self.calibration.source}
        if recompute:
            self._recompute_virtual()
        else:  # called from the loop: let the worker re-evaluate the frames it already holds
            self._queue.put(("recompute",))

    def _ring_scale(self) -> RingScale | None:
        if self.calibration is not None:
            return RingScale(radius_px=self.calibration.radius_px, mrad_per_px=self.mrad_per_px
                             or self.alpha_mrad / self.calibration.radius_px)
        if self.mrad_per_px:
            return RingScale(radius_px=self.alpha_mrad / self.mrad_per_px, mrad_per_px=self.mrad_per_px)
        return None

    def _recompute_virtual(self) -> None:
        if self._bins is not None:
            self._publish_virtual(np.flatnonzero(self._have))
        self._virtual_final = self.calibration is not None

    def _find_atoms(self) -> None:
        """Columns in every block whose window of the calibrated virtual image is complete."""
        if self.atoms is None or not self._virtual_final:
            return
        have = self._have.reshape(self.grid.scan_shape) | self._unscanned
        blocks = self.atoms.ready(have)
        # complete blocks whose neighbours are not: the atom finder waits for them, and says so
        waiting = int((self.state.done & ~self.atoms.analysed).sum()) - len(blocks)
        self.state.update_status(atoms_waiting=max(0, waiting))
        if not blocks:
            return
        rows = self.atoms.analyse(self.state.virtual[self.atoms.image_name], blocks)
        if self.atoms.columns is not None:  # species and anomaly: every window of this step in one batch
            rows = self.atoms.columns.analyse(self.state.virtual, self.atoms.last_windows, rows)
        if self.store is not None:
            self.store.write_atoms(rows, self.atoms.analysed)
        with self._emit:
            seq = self.state.apply_atoms(rows, blocks)
            if self.publisher is not None:
                self.publisher.atoms(seq, rows, blocks)

    def _publish_virtual(self, flat: np.ndarray) -> None:
        scale = self._ring_scale()
        if scale is None or flat.size == 0:
            return
        center = self.calibration.center_px if self.calibration is not None else None
        values = ring_images(self._bins, self.rings, scale, self.bin_px, center, frames=flat)
        # the same frames' profiles (around the calibrated centre once known): kept by the state for
        # the operator's rings, and stored
        profiles = frame_profiles(self._bins, self.bin_px, center, flat)
        images = {}
        for name in self.rings:
            img = self.state.virtual[name].copy()
            img.ravel()[flat] = values[name]
            images[name] = img
        r0, r1 = flat.min() // self.grid.scan_shape[1], flat.max() // self.grid.scan_shape[1] + 1
        rows = slice(int(r0), int(r1))
        with self._emit:
            seq = self.state.apply_virtual(rows, {k: v[rows] for k, v in images.items()}, frames=flat,
                                           profiles=profiles, scale=scale, bin_px=self.bin_px)
            if self.publisher is not None:
                self.publisher.virtual(seq, rows, {k: v[rows] for k, v in images.items()})
        if self.com is not None and center is not None and "raw_com" in self._bins:
            images.update(self._publish_com(flat, center, scale))
        if self.store is not None:
            self.store.write_virtual(images, int(self._frames_seen.sum()))
            if center is not None and self.store.layout.radial_bins:
                self.store.write_radial(flat, profiles, center, radius_px=scale.radius_px)

    def _publish_com(self, flat: np.ndarray, center, scale, final: bool = False) -> dict[str, np.ndarray]:
        """CoM shifts of the frames ``flat`` into the scan images, and iDPC of all frames so far.

        The shifts are per frame (only the new ones are computed); the iDPC integral changes
        everywhere and costs an FFT of the whole scan (~0.1 s for 256²), so it is redone at
        most every ``IDPC_INTERVAL_S``, when the last frame is in, and at ``final``."""
        raw = np.asarray(self._bins["raw_com"], np.float64).reshape(-1, 2)[flat]
        new = com_images(raw[None], center, scale.mrad_per_px, self.com.get("scan_rotation_deg", 0.0),
                         self.com.get("flip_y", False), integrate=False)
        images = {}
        for name, values in new.items():
            img = self.state.virtual[name].copy()
            img.ravel()[flat] = values[0]
            images[name] = img
        now = time.monotonic()
        complete = bool((self._have | self._unscanned.ravel()).all())
        if final or complete or now - self._idpc_at >= IDPC_INTERVAL_S:
            images["idpc"] = idpc(images["com_y"], images["com_x"])
            self._idpc_at, self._idpc_stale = now, False
        else:
            self._idpc_stale = True
        with self._emit:  # iDPC changes everywhere: whole images
            seq = self.state.apply_virtual(slice(None), images)
            if self.publisher is not None:
                self.publisher.virtual(seq, slice(0, self.grid.scan_shape[0]), images)
        return images

    def _final_com(self) -> None:
        """The iDPC of every frame recorded, if the last one landed between two integrations."""
        if self.com is None or not self._idpc_stale or self.calibration is None:
            return
        images = self._publish_com(np.zeros(0, np.int64), self.calibration.center_px, self._ring_scale(), final=True)
        if self.store is not None:
            self.store.write_virtual(images, int(self._frames_seen.sum()))

    # -- second stage: the library check -------------------------------------------------------
    def _queue_checks(self, idx, means, estimates, part, t_complete) -> None:
        from ..models.checked_analysis import applies

        for k, e in enumerate(estimates):
            if applies(e):
                self.stats.checks_queued += 1
                self._checks.put(((int(idx[k, 0]), int(idx[k, 1])), means[k], e, bool(part[k]), t_complete[k]))

    def _check_work(self) -> None:
        """Check queued blocks one by one; land them in batches (at once when the queue is
        empty or the run is closing, else every 16 blocks or 0.25 s, so fast checks do not
        cost one store write each)."""
        landed: list = []
        last = 0.0
        while True:
            item = self._checks.get()
            if item is None or self._checks_closed:
                break
            ij, mean, est, part, t_complete = item
            t = time.perf_counter()
            if self.stats.check_span_s[0] is None:
                self.stats.check_span_s[0] = t
            try:
                out = self.checker(mean, est)
                row = estimate_row(est, part, check=out)
            except Exception as exc:  # noqa: BLE001 -- the block keeps the networks' reading
                msg = f"{type(exc).__name__}: {exc}"
                if not self.stats.check_failures:
                    log.exception("library check failed on block %s (the networks' values stay)", ij)
                self.stats.check_failures[msg] += 1
                continue
            finally:
                self.stats.check_s.append(time.perf_counter() - t)
            landed.append((ij, row, t_complete))
            now = time.perf_counter()
            if self._checks.empty() or self._checks_closing or len(landed) >= 16 or now - last > 0.25:
                self._land(landed)
                landed, last = [], time.perf_counter()
        if landed:
            self._land(landed)

    def _land(self, landed: list) -> None:
        """The checked values of ``landed`` blocks into the store, the state and on the wire."""
        idx = np.array([ij for ij, _, _ in landed], np.int64).reshape(-1, 2)
        arrays = {k: np.stack([row[k] for _, row, _ in landed]) for k in MAP_FIELDS}
        with self._check_lock:
            if self._checks_closed:  # the run closed while these were being checked
                return
            try:
                if self.store is not None:
                    self.store.write_maps(idx, arrays)
            except Exception:  # noqa: BLE001 -- a store that fails here fails the first stage too
                log.exception("could not store checked blocks")
                self.stats.check_failures["store write failed"] += len(landed)
                return
            with self._emit:
                seq = self.state.apply_maps(idx, arrays)
                if self.publisher is not None:
                    self.publisher.blocks(seq, idx, arrays, stage="check",
                                          completed=time.time() - (time.perf_counter() - max(t for _, _, t in landed)))
            now = time.perf_counter()
            self.stats.checks_done += len(landed)
            self.stats.check_span_s[1] = now
            self.stats.check_delay_s.extend(now - t for _, _, t in landed)

    def _finish_checks(self, timeout: float | None) -> None:
        """Let the check stage land what is queued within ``timeout`` (None: all of it), then
        stop it; what is left keeps the networks' values and is counted."""
        if self._check_worker is None:
            return
        self._checks_closing = True
        self._checks.put(None)
        todo = self.stats.checks_queued - self.stats.checks_done - sum(self.stats.check_failures.values())
        if timeout is None or timeout > 0:
            from tqdm import tqdm

            deadline = None if timeout is None else time.perf_counter() + timeout
            with tqdm(total=todo, unit="block", desc="library check", disable=not (self.progress and todo > 0),
                      smoothing=0.1) as bar:
                seen = self.stats.checks_done
                while self._check_worker.is_alive():
                    left = None if deadline is None else deadline - time.perf_counter()
                    if left is not None and left <= 0:
                        break
                    self._check_worker.join(0.2 if left is None else min(0.2, left))
                    bar.update(self.stats.checks_done - seen)
                    seen = self.stats.checks_done
        with self._check_lock:
            self._checks_closed = True
        self.stats.checks_unfinished = max(0, self.stats.checks_queued - self.stats.checks_done
                                           - sum(self.stats.check_failures.values()))
        if self.stats.checks_unfinished:
            self.state.update_status(checks_unfinished=self.stats.checks_unfinished)

    # -- end -------------------------------------------------------------------------------
    def _dropped(self) -> dict:
        """Frames the scan should have had but never arrived, and blocks never completed."""
        seen = int(self.state.status.get("frames_seen", 0))
        return {"frames_dropped": max(0, int(self.expected.sum()) - seen),
                "blocks_dropped": int(((self.expected > 0) & ~self.state.done).sum())}

    def _join_while_progressing(self, idle_timeout: float) -> bool:
        """Wait for the analysis worker while blocks keep being stored or taken from the queue;
        False when it is still running after ``idle_timeout`` s with neither."""
        last, since = None, time.perf_counter()
        while self._worker.is_alive():
            self._worker.join(min(1.0, idle_timeout))
            now = (len(self.stats.stored_at), self._queue.qsize())
            if now != last:
                last, since = now, time.perf_counter()
            elif time.perf_counter() - since >= idle_timeout:
                return not self._worker.is_alive()
        return True

    def close(self, state: str = "complete", reason: str = "", timeout: float = 120.0,
              check_timeout: float | None | object = _NOTHING) -> None:
        """Analyse what is queued (waiting as long as the analysis makes progress: on a busy
        machine the networks may trail the scan by minutes; given up after ``timeout`` s without a
        block stored), give the library check until ``check_timeout`` (default: the engine's;
        None: no limit) to land what it has queued -- a run that is not complete does not wait
        for it -- then close the store with ``state`` and the reason."""
        self._queue.put(None)
        if not self._join_while_progressing(timeout):
            reason = (reason + "; " if reason else "") + f"analysis made no progress for {timeout:.0f} s"
            state = "aborted"
        self._final_com()
        if check_timeout is _NOTHING:
            check_timeout = self.check_timeout
        self._finish_checks(check_timeout if state == "complete" and self._error is None else 0.0)
        if self._error is not None and state == "complete":
            state, reason = "aborted", f"analysis failed: {self._error}"
        missing = int((~self.state.done & (self.expected > 0)).sum())
        if state == "complete" and missing:
            state, reason = "aborted", f"{missing} blocks never completed"
        failed = sum(self.stats.failures.values())
        useful = int(self.state.done.sum()) > failed
        if failed:
            self.state.update_status(blocks_failed=failed)
        dropped = self._dropped()
        checks = {}
        if self.checker is not None:
            checks = {"checks_done": self.stats.checks_done, "checks_unfinished": self.stats.checks_unfinished,
                      "checks_failed": sum(self.stats.check_failures.values())}
        if self.store is not None:
            self.store.finish(state, reason, replace=useful, blocks_failed=failed, **dropped, **checks)
            reason = self.store.reason
        status = self.state.update_status(state=state, reason=reason, **dropped)
        if self.publisher is not None:
            self.publisher.status(status)
