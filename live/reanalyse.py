"""`stemlive reanalyse`: the stored block PACBEDs and virtual image through (other) models into a new store.

``method``: "check" (default where the setting's check data exists) re-fits every block against
the simulated library after the networks, waiting for all of them (offline, no time limit);
"network" the networks alone.  A store made with ``--method network`` (e.g. for speed, live)
gets its checked maps this way."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .outputs import check_output
from .pipeline import RunSummary, check_summary, load_analyzer, load_atom_stitcher, load_checker
from .run import open_run, source_settings
from .store import read_store
from ..udf.block_grid import BlockGrid


def reanalyse(src: Path, out: Path, *, models_dir: Path | None = None, backend: str = "auto",
              overwrite: bool = False, batch: int = 64, method: str | None = None,
              progress: bool = True) -> RunSummary:
    import time

    t0 = time.perf_counter()
    check_output(out, [src], overwrite=overwrite)
    old = read_store(src)
    a = old["attrs"]
    scan = tuple(int(v) for v in a["scan_shape"])
    pac = old["blocks"]["pacbed"]
    settings = source_settings(old, out, models_dir=models_dir, backend=backend, overwrite=overwrite,
                               method=method, progress=progress)
    analyzer = load_analyzer(settings, threads=None)  # offline: every core
    checker = load_checker(settings)
    grid = BlockGrid(scan, settings.block)
    atoms = load_atom_stitcher(settings, grid) if settings.atoms in old["virtual"] else None
    radial = old.get("radial")
    run = open_run(settings, scan, pac.shape[2:], analyzer=analyzer, checker=checker, atoms=atoms,
                   source=f"reanalysis of {src} ({a['source']})", virtual=tuple(old["virtual"]),
                   radial_bins=radial["profiles"].shape[-1] if radial else 0,
                   radial_bin_px=radial["bin_px"] if radial else 0.5, batch=batch, check_timeout=None,
                   meta={"alpha_mrad": settings.alpha_mrad, "kv": settings.kv})
    store, engine, state = run.store, run.engine, run.state
    done = old["blocks"]["done"]
    reason = "" if a["state"] == "complete" else f"source store was {a['state']}: {a['reason']}"
    try:
        engine.expected = np.where(done, old["blocks"]["counts"], 0)  # only what the source analysed
        engine.on_result({"counts": np.where(done, old["blocks"]["counts"], 0), "pacbed": pac}, None,
                         np.zeros(scan, bool))
        store.write_virtual(old["virtual"], int(old["progress"][0]))
        if radial is not None:
            store.write_radial(np.arange(int(np.prod(scan))), radial["profiles"].reshape(-1, run.layout.radial_bins),
                               radial["center_px"],
                               None if np.isnan(radial.get("radius_px", np.nan)) else radial["radius_px"])
        if atoms is not None:  # every block whose window of the stored image is complete
            image = old["virtual"][atoms.image_name]
            blocks = atoms.ready(np.isfinite(image))
            if blocks:
                rows = atoms.analyse(image, blocks)
                if atoms.columns is not None and {"haadf", "abf"} <= set(old["virtual"]):  # species, anomaly
                    rows = atoms.columns.analyse(old["virtual"], atoms.last_windows, rows)
                store.write_atoms(rows, atoms.analysed)
        run.close("complete", reason)
    except BaseException as exc:  # Ctrl-C while the checks run, too: the new store ends honestly
        if store.state == "running":
            run.close("aborted", getattr(exc, "reason", None) or f"{type(exc).__name__}: {exc}", check_timeout=0)
        raise
    st = state.status
    return RunSummary(out=Path(out), state=store.state, reason=reason, frames=int(old["progress"][0]),
                      blocks_done=int(st["blocks_done"]), blocks_total=int(st["blocks_total"]),
                      wall_s=time.perf_counter() - t0, blocks_failed=sum(engine.stats.failures.values()),
                      failures=dict(engine.stats.failures.most_common()), **check_summary(engine))
