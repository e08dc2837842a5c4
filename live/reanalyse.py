"""`stemlive reanalyse`: the stored block PACBEDs and virtual image through (other) models into a new store.

``method``: "check" (default where the setting's check data exists) re-fits every block against
the simulated library after the networks, waiting for all of them (offline, no time limit);
"network" the networks alone.  A store made with ``--method network`` (e.g. for speed, live)
gets its checked maps this way."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .engine import BlockEngine
from .outputs import check_output
from .pipeline import RunSummary, Settings, check_summary, load_analyzer, load_atom_stitcher, load_checker
from .state import LiveState
from .store import ResultStore, StoreLayout, read_store
from ..udf.block_grid import BlockGrid


def reanalyse(src: Path, out: Path, *, models_dir: Path | None = None, backend: str = "auto",
              overwrite: bool = False, batch: int = 64, method: str | None = None,
              progress: bool = True) -> RunSummary:
    import time

    t0 = time.perf_counter()
    check_output(out, [src], overwrite=overwrite)
    old = read_store(src)
    a = old["attrs"]
    scan, block = tuple(int(v) for v in a["scan_shape"]), tuple(int(v) for v in a["block_shape"])
    pac = old["blocks"]["pacbed"]
    mpp = None if np.isnan(a["mrad_per_px"]) else float(a["mrad_per_px"])
    step = None if np.isnan(a["scan_step_nm"]) else float(a["scan_step_nm"])
    settings = Settings(block=block, alpha_mrad=float(a["alpha_mrad"]), kv=float(a["kv"]), out=Path(out),
                        mrad_per_px=mpp, scan_step_nm=step, scan_rotation_deg=float(a["scan_rotation_deg"]),
                        models_dir=models_dir, backend=backend, rings=a["rings"] or None, overwrite=overwrite,
                        pub=None, rep=None, method=method)
    analyzer = load_analyzer(settings)
    checker = load_checker(settings)
    check = checker.info if checker is not None else {}
    grid = BlockGrid(scan, block)
    atoms = load_atom_stitcher(settings, grid) if settings.atoms in old["virtual"] else None
    radial = old.get("radial")
    layout = StoreLayout(scan, block, pac.shape[2:], tuple(old["virtual"]), atoms=atoms.image_name if atoms else None,
                         radial_bins=radial["profiles"].shape[-1] if radial else 0,
                         radial_bin_px=radial["bin_px"] if radial else 0.5)
    store = ResultStore.create(out, layout, alpha_mrad=settings.alpha_mrad, kv=settings.kv, mrad_per_px=mpp,
                               scan_step_nm=step, scan_rotation_deg=settings.scan_rotation_deg,
                               models=[c.data for c in analyzer.cards] + ([atoms.finder.card.data] if atoms else []),
                               rings=a["rings"],
                               source=f"reanalysis of {src} ({a['source']})", overwrite=overwrite,
                               method="check" if checker is not None else "network", check=check)
    state = LiveState(layout, {"alpha_mrad": settings.alpha_mrad, "kv": settings.kv})
    engine = BlockEngine(grid, analyzer, state, store, None, alpha_mrad=settings.alpha_mrad, mrad_per_px=mpp,
                         batch=batch, checker=checker, check_timeout=None, progress=progress)
    done = old["blocks"]["done"]
    reason = "" if a["state"] == "complete" else f"source store was {a['state']}: {a['reason']}"
    try:
        engine.expected = np.where(done, old["blocks"]["counts"], 0)  # only what the source analysed
        engine.on_result({"counts": np.where(done, old["blocks"]["counts"], 0), "pacbed": pac}, None,
                         np.zeros(scan, bool))
        store.write_virtual(old["virtual"], int(old["progress"][0]))
        if radial is not None:
            store.write_radial(np.arange(int(np.prod(scan))), radial["profiles"].reshape(-1, layout.radial_bins),
                               radial["center_px"])
        if atoms is not None:  # every block whose window of the stored image is complete
            image = old["virtual"][atoms.image_name]
            blocks = atoms.ready(np.isfinite(image))
            if blocks:
                store.write_atoms(atoms.analyse(image, blocks), atoms.analysed)
        engine.close("complete", reason)
    except BaseException as exc:  # Ctrl-C while the checks run, too: the new store ends honestly
        if store.state == "running":
            engine.close("aborted", getattr(exc, "reason", None) or f"{type(exc).__name__}: {exc}", check_timeout=0)
        raise
    st = state.status
    return RunSummary(out=Path(out), state=store.state, reason=reason, frames=int(old["progress"][0]),
                      blocks_done=int(st["blocks_done"]), blocks_total=int(st["blocks_total"]),
                      wall_s=time.perf_counter() - t0, blocks_failed=sum(engine.stats.failures.values()),
                      failures=dict(engine.stats.failures.most_common()), **check_summary(engine))
