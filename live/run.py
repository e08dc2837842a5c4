"""`open_run`: one owner for everything a run writes to -- store, state, cards, publisher, engine.

`stemlive live`, `replay`, `demo` (through `pipeline.run_pipeline`) and `reanalyse` open their run
here and close it with :meth:`Run.close`, so the order that keeps a refused run from writing
anything (servers bound before the store is created), the model cards recorded, the store
layout and the engine's settings are decided in one place.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..udf.block_grid import BlockGrid
from ..udf.radial_bins import n_bins_for
from .com_maps import COM_IMAGES
from .engine import BlockEngine
from .processes import signals_deferred
from .publisher import Publisher
from .state import LiveState
from .store import ResultStore, StoreLayout

BIN_PX = 0.5  # width of the per-frame radial bins (VirtualDetectorUDF's default)


@dataclass
class Run:
    """An open run: close it exactly once with :meth:`close` (every way out of the run)."""

    grid: BlockGrid
    layout: StoreLayout
    state: LiveState
    store: ResultStore
    engine: BlockEngine
    publisher: Publisher | None
    analyzer: object
    checker: object
    atoms: object

    def close(self, final: str, reason: str, **kw) -> None:
        """End the run: the engine drains and closes the store with ``final`` and the reason;
        the publisher's last status leaves before it closes.  A signal now waits until done."""
        with signals_deferred():  # a signal now must not leave the store "running"
            try:
                self.engine.close(final, reason, **kw)
            finally:
                if self.store.state == "running":  # the engine could not close it
                    self.store.finish("aborted", reason or "the run could not be closed")
                if self.publisher is not None:
                    time.sleep(0.05)  # let the last status message leave
                    self.publisher.close()


def cards_of(analyzer, atoms) -> list[dict]:
    """The model cards a run records: the PACBED networks', the atom finder's, then the
    per-column species and anomaly models' (when on)."""
    cols = getattr(atoms, "columns", None) if atoms else None
    return ([c.data for c in analyzer.cards] + ([atoms.finder.card.data] if atoms else [])
            + ([c.data for c in cols.cards] if cols is not None else []))


def open_run(settings, scan_shape: tuple[int, int], sig_shape: tuple[int, int], *, analyzer, checker,
             atoms=None, roi: np.ndarray | None = None, source: str = "", virtual: tuple[str, ...] | None = None,
             radial_bins: int | None = None, radial_bin_px: float = BIN_PX, batch: int = 64,
             check_timeout: float | None | object = ..., meta: dict | None = None) -> Run:
    """Bind the servers, create the store, the live state and the engine for one run.

    ``settings`` is a `pipeline.Settings`; ``analyzer``/``checker``/``atoms`` are loaded by the
    caller (it may pass its own); ``virtual``: the ring images (default the settings' rings);
    ``radial_bins``: per-frame profile bins (default: enough for ``sig_shape``; 0: none).
    Servers are bound before the store is created: a run refused on its addresses writes nothing.
    """
    grid = BlockGrid(scan_shape, settings.block)
    com = settings.com
    virtual = tuple(virtual or settings.rings) + (COM_IMAGES if com else ())
    layout = StoreLayout(scan_shape, grid.block, sig_shape, virtual,
                         atoms=atoms.image_name if atoms else None,
                         atom_classes=atoms.columns.classes if atoms and atoms.columns is not None else (),
                         anomaly_threshold=atoms.columns.threshold if atoms and atoms.columns is not None else None,
                         radial_bins=n_bins_for(sig_shape, radial_bin_px) if radial_bins is None else radial_bins,
                         radial_bin_px=radial_bin_px)
    cards = cards_of(analyzer, atoms)
    method = "check" if checker is not None else "network"
    check = checker.info if checker is not None else {}
    info = {"alpha_mrad": settings.alpha_mrad, "kv": settings.kv, "mrad_per_px": settings.mrad_per_px,
            "scan_step_nm": settings.scan_step_nm, "scan_rotation_deg": settings.scan_rotation_deg,
            "models": [c["id"] for c in cards], "store": str(settings.out), "rings": settings.rings,
            "method": method, "check": check, "holder_axis_deg": settings.holder_axis_deg}
    state = LiveState(layout, info if meta is None else meta)
    publisher = None
    if settings.pub and settings.rep:
        publisher = Publisher(state, settings.pub, settings.rep, token=settings.token)
        state.meta["pub"], state.meta["rep"] = publisher.pub_address, publisher.rep_address
    try:
        store = ResultStore.create(settings.out, layout, alpha_mrad=settings.alpha_mrad, kv=settings.kv,
                                   mrad_per_px=settings.mrad_per_px, scan_step_nm=settings.scan_step_nm,
                                   scan_rotation_deg=settings.scan_rotation_deg, models=cards, rings=settings.rings,
                                   source=source, overwrite=settings.overwrite, method=method, check=check,
                                   holder_axis_deg=settings.holder_axis_deg)
    except BaseException:
        if publisher is not None:
            publisher.close()
        raise
    try:
        engine = BlockEngine(grid, analyzer, state, store, publisher, roi=roi, alpha_mrad=settings.alpha_mrad,
                             mrad_per_px=settings.mrad_per_px, center_px=settings.center_px, rings=settings.rings,
                             bin_px=radial_bin_px, batch=batch, atoms=atoms, checker=checker,
                             check_timeout=settings.check_timeout_s if check_timeout is ... else check_timeout,
                             progress=settings.progress,
                             com={"scan_rotation_deg": settings.scan_rotation_deg, "flip_y": settings.flip_y} if com else None)
    except BaseException as exc:
        store.finish("aborted", f"{type(exc).__name__}: {exc}")
        if publisher is not None:
            publisher.close()
        raise
    return Run(grid, layout, state, store, engine, publisher, analyzer, checker, atoms)


def source_settings(store: dict, out: Path, **kw):
    """`pipeline.Settings` of a finished store's run (for `reanalyse`), ``kw`` overriding."""
    from .pipeline import Settings

    a = store["attrs"]
    mpp = None if np.isnan(a["mrad_per_px"]) else float(a["mrad_per_px"])
    step = None if np.isnan(a["scan_step_nm"]) else float(a["scan_step_nm"])
    return Settings(block=tuple(int(v) for v in a["block_shape"]), alpha_mrad=float(a["alpha_mrad"]),
                    kv=float(a["kv"]), out=Path(out), mrad_per_px=mpp, scan_step_nm=step,
                    scan_rotation_deg=float(a["scan_rotation_deg"]), pub=None, rep=None,
                    holder_axis_deg=float(a["holder_axis_deg"]) if "holder_axis_deg" in a else None,
                    **({"rings": a["rings"]} if a["rings"] else {}), **kw)
