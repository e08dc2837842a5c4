"""`stemlive demo`: the default end-to-end run on a CPU-only laptop.

It composes (or reuses from the cache) the synthetic SrTiO3 [001] wedge scan with a bent
region, serves it through the DECTRIS detector simulator (REST + ZMQ, LiberTEM-live's
DectrisSim), acquires it with LiberTEM-live's real `dectris` connection, analyses each
completed scan block with the shipped networks (then checks it against the simulated library,
`--method`), writes the result store, publishes the blocks
on ZMQ, serves the dashboard, and compares the maps with the scan's ground truth (printed and
written beside the store as ``*.vs-truth.json``).
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

PLAN = """stemlive demo
  1. compose (or reuse) a synthetic 4D-STEM scan: SrTiO3 [001], 200 kV, 13.6 mrad, 97² px frames
     at 1.28 mrad/px, a FIB wedge (terraces ~3.9 nm apart) with a bowl-shaped bent region, Poisson noise
  2. serve it as a DECTRIS detector (SIMPLON REST API + ZMQ stream, bslz4)
  3. acquire it live with LiberTEM-live; per scan block: PACBED networks (then, in a second stage, the
     library check), virtual BF/ABF/ADF/HAADF, CoM shift and iDPC
  4. results: HDF5 store + ZMQ publisher (PUB {pub}, REP {rep}) + the dashboard (unless --headless)
"""


def add_parser(sub) -> None:
    ap = sub.add_parser("demo", help="the synthetic wedge scan through the simulator and the live path")
    ap.add_argument("--headless", action="store_true", help="no dashboard: run, print progress, exit 0 when done")
    ap.add_argument("--out", type=Path, default=None, help="result store (default: in the user cache)")
    ap.add_argument("--cache", type=Path, default=None, help="where the demo scan is cached (default: user cache)")
    ap.add_argument("--scan-shape", type=int, nargs=2, default=None, metavar=("H", "W"))
    ap.add_argument("--block", type=int, default=16, help="scan block edge [frames] (default 16: 2×2 unit cells)")
    ap.add_argument("--dwell-us", type=int, default=0, help="simulated frame time in µs (0: as fast as possible)")
    ap.add_argument("--executor", choices=("inline", "pipelined"), default="inline")
    ap.add_argument("--api-port", type=int, default=8910, help="simulator REST port (0: any free)")
    ap.add_argument("--data-port", type=int, default=9999, help="simulator ZMQ port (0: any free)")
    ap.add_argument("--pub", default="tcp://127.0.0.1:5557", help="publisher PUB address (port 0: any free)")
    ap.add_argument("--rep", default="tcp://127.0.0.1:5558", help="publisher REP address (port 0: any free)")
    ap.add_argument("--port", type=int, default=5006, help="dashboard port (0: any free)")
    ap.add_argument("--no-com", action="store_true",
                    help="without the centre-of-mass (DPC) and iDPC maps (LiberTEM's CoMUDF, one more pass per frame)")
    ap.add_argument("--no-columns", action="store_true",
                    help="without the species and anomaly of the located columns (per block window)")
    from .commands import add_method_options

    add_method_options(ap, timeout=600.0)  # the demo compares the checked maps with its truth: wait for them
    ap.add_argument("--exit-when-done", action="store_true",
                    help="with the dashboard: exit when the scan is done instead of serving until Ctrl-C")
    ap.set_defaults(func=run)


def concrete(address: str) -> str:
    """tcp://host:0 -> tcp://host:<a free port>, so the dashboard can be told where to connect
    before the publisher exists."""
    if not address.endswith(":0"):
        return address
    import socket

    host = address[len("tcp://"): address.rindex(":")]
    with socket.socket() as sock:
        sock.bind((host, 0))
        return f"tcp://{host}:{sock.getsockname()[1]}"


def demo_scan(cache: Path | None = None, scan_shape: tuple[int, int] | None = None, progress: bool = True,
              formats: tuple[str, ...] = ("npy", "h5")) -> Path:
    """Build (or reuse) the demo scan in the cache; returns its directory.

    The scan is ScanParams' default: the FIB wedge's terraces and the bent region, frames from
    the shipped 97-px library (sampled as a PACBED recording is)."""
    from ..simulate.cli import default_cache_dir
    from ..simulate.scan import ScanParams, write_scan
    from ..simulate.scan_cli import DEMO_LIBRARY

    if not DEMO_LIBRARY.exists():
        raise FileNotFoundError(f"the demo library {DEMO_LIBRARY} is missing; rebuild it with `make demo-library`")
    p = ScanParams() if scan_shape is None else ScanParams(scan_shape=tuple(scan_shape))
    root = Path(cache) if cache else default_cache_dir() / "scans"
    out = root / f"demo-{p.key(DEMO_LIBRARY)}"
    wanted = [out / "params.json"] + [out / f"frames.{f}" for f in formats]
    if not all(f.exists() for f in wanted):
        write_scan(DEMO_LIBRARY, p, out, formats=formats, progress=progress)
    return out


def run(args) -> int:
    from .acquire import live
    from .commands import exit_stuck
    from .pipeline import AcquisitionError, Settings, StreamStalled
    from .simulator import SimDetector, dump_for, input_array

    pub, rep = concrete(args.pub), concrete(args.rep)
    print(PLAN.format(pub=pub, rep=rep))
    feed = None
    if not args.headless:  # the page is up at once and says what is happening
        from ..dashboards.feed import LiveFeed
        from ..dashboards.server import serve_in_thread

        feed = LiveFeed(pub, rep)
        _, url = serve_in_thread(feed, args.port)
        print(f"dashboard: {url}", flush=True)
    t = time.perf_counter()
    scan_dir = demo_scan(args.cache, args.scan_shape, formats=("npy",))  # the stream is made from frames.npy
    meta = json.loads((scan_dir / "params.json").read_text())
    data = input_array(scan_dir)
    print(f"scan ready in {time.perf_counter() - t:.1f} s: {scan_dir}")
    print(f"  {data.shape[0]}×{data.shape[1]} frames of {data.shape[2]}×{data.shape[3]} {data.dtype}, "
          f"{meta['mrad_per_px']:.2f} mrad/px, scan step {meta['scan_step_nm'] * 10:.3f} Å", flush=True)
    dump = dump_for(data, scan_dir / "frames.npy", "bslz4", cache=scan_dir)
    out = args.out or scan_dir / "demo-result.h5"
    settings = Settings(block=(args.block, args.block), alpha_mrad=meta["alpha_mrad"], kv=meta["kv"], out=out,
                        mrad_per_px=meta["mrad_per_px"], scan_step_nm=meta["scan_step_nm"], overwrite=True,
                        pub=pub, rep=rep, method=args.method, check_timeout_s=args.check_timeout,
                        com=not args.no_com, columns=not args.no_columns)
    try:
        with SimDetector(dump, args.api_port, args.data_port, args.dwell_us or None) as sim:
            print(f"simulated detector: REST http://127.0.0.1:{sim.api_port}, stream tcp://127.0.0.1:{sim.data_port}",
                  flush=True)
            summary = live(settings, detector="dectris", api_host="127.0.0.1", api_port=sim.api_port,
                           data_host="127.0.0.1", data_port=sim.data_port, scan_shape=data.shape[:2],
                           executor=args.executor)
    except KeyboardInterrupt as exc:  # Ctrl-C or SIGTERM
        exit_stuck(f"stemlive demo: {getattr(exc, 'reason', 'interrupted')}; partial results in "
                   f"{getattr(exc, 'store_path', out)} (state aborted)", code=getattr(exc, "exit_code", 130))
    except StreamStalled as exc:
        exit_stuck(f"stemlive demo: acquisition aborted: {exc} (partial results in {getattr(exc, 'store_path', out)})")
    except AcquisitionError as exc:
        print(f"stemlive demo: acquisition aborted: {exc} (partial results in {getattr(exc, 'store_path', out)})", file=sys.stderr)
        return 1
    print(f"{summary.state}: {summary.blocks_done}/{summary.blocks_total} blocks, {summary.frames} frames, "
          f"{summary.atoms} atomic columns in "
          f"{summary.wall_s:.1f} s ({summary.frames / summary.wall_s:.0f} frames/s) -> {out}")
    print(f"  ingest hand-off {summary.ingest_ms_median:.2f} ms median per result; "
          f"block complete -> stored {summary.block_delay_ms_median:.0f} ms median")
    if summary.method == "check":
        print(f"  library check: {summary.checks_done} blocks ({summary.check_ms_median:.0f} ms each, "
              f"{summary.checks_per_s:.1f}/s; block complete -> checked {summary.check_delay_ms_median / 1e3:.1f} s "
              f"median), {summary.checks_unfinished} left with the networks' values")
    compare_with_truth(out, scan_dir / "truth.h5", json_out=Path(out).with_suffix(".vs-truth.json"))
    if feed is not None and not args.exit_when_done:
        from ..dashboards.feed import StoreFeed

        feed.close()  # the engine is gone: the page now shows the finished store
        print(f"the scan is done; the dashboard keeps showing {out} -- Ctrl-C to quit", flush=True)
        _serve_store_until_interrupted(feed, StoreFeed(out))
    return 0


def _serve_store_until_interrupted(live_feed, store_feed) -> None:
    """Swap the page's data source to the finished store and wait for Ctrl-C."""
    live_feed.replace_with(store_feed)
    try:
        while True:
            time.sleep(1.0)
    except KeyboardInterrupt:
        pass


# flags that tell the user not to trust a block's thickness (a gross miss carrying one of them,
# or σ > 5 nm, is not silent); names a store does not know simply never match
DISTRUST_FLAGS = ("ambiguous", "model-mismatch", "low-confidence", "vacuum", "not-on-zone",
                  "thickness-at-range-edge", "partial-field")


def compare_with_truth(store: Path, truth: Path, json_out: Path | None = None) -> dict:
    """The store's block maps against the scan's truth (block means); printed, returned, and
    written to ``json_out`` if given, with the same numbers.

    Over whole blocks (done, not partial): thickness within ±2 nm and its median miss; tilt
    within ±0.5 mrad (both components) and the median of the larger component's miss; both at
    once (the demo's target: ≥ 95 %); blocks without an estimate count as misses.  Gross
    misses are > 10 nm off; a silent one has σ ≤ 5 nm and none of DISTRUST_FLAGS (target: none).
    Blocks across a terrace edge hold two thicknesses; their share of the misses is reported.
    """
    import h5py

    from .store import read_store

    res = read_store(store)
    maps = res["maps"]
    by, bx = (int(v) for v in res["attrs"]["block_shape"])
    with h5py.File(truth, "r") as f:
        thick, tilt = f["thickness_nm"][()], f["tilt_mrad"][()]
    ny, nx = maps["thickness_nm"].shape
    full = res["blocks"]["done"] & ~res["blocks"]["partial"]
    blocks = thick[:ny * by, :nx * bx].reshape(ny, by, nx, bx)
    t_true = blocks.mean(axis=(1, 3))
    edge = (blocks.max(axis=(1, 3)) - blocks.min(axis=(1, 3)) > 0.1)[full]
    tilt_true = tilt[:ny * by, :nx * bx].reshape(ny, by, nx, bx, 2).mean(axis=(1, 3))
    dt = np.abs(maps["thickness_nm"] - t_true)[full]
    dtilt = np.abs(maps["tilt_mrad"] - tilt_true).max(axis=-1)[full]
    sigma = maps["thickness_sigma_nm"][full]
    names = list(res["attrs"]["flag_names"])
    distrust = sum(1 << i for i, n in enumerate(names) if n in DISTRUST_FLAGS)
    flagged = (maps["flags"][full].astype(np.int64) & distrust) != 0
    t_ok, tilt_ok = dt <= 2, dtilt <= 0.5  # NaN (no estimate) compares False: a miss
    gross = dt > 10
    n = int(full.sum())
    out = {"blocks": n, "blocks_across_terrace_edge": int(edge.sum()),
           "blocks_without_estimate": int(np.count_nonzero(~np.isfinite(dt))),
           "thickness_median_err_nm": _nanmedian(dt), "thickness_within_2nm": _frac(t_ok),
           "thickness_within_2nm_one_terrace": _frac(t_ok[~edge]),
           "thickness_within_2nm_across_edge": _frac(t_ok[edge]),
           "tilt_median_err_mrad": _nanmedian(dtilt), "tilt_within_0.5mrad": _frac(tilt_ok),
           "within_2nm_and_0.5mrad": _frac(t_ok & tilt_ok), "gross_misses": int(gross.sum()),
           "silent_gross_misses": int(np.count_nonzero(gross & (sigma <= 5) & ~flagged))}
    print(f"  vs ground truth ({n} whole blocks, {out['blocks_across_terrace_edge']} across a terrace edge, "
          f"{out['blocks_without_estimate']} without an estimate):\n"
          f"    thickness error median {out['thickness_median_err_nm']:.1f} nm, within ±2 nm "
          f"{out['thickness_within_2nm']:.0%} (on one terrace {_pct(out['thickness_within_2nm_one_terrace'])}, "
          f"across an edge {_pct(out['thickness_within_2nm_across_edge'])})\n"
          f"    tilt error median {out['tilt_median_err_mrad']:.2f} mrad (larger component), within ±0.5 mrad "
          f"{out['tilt_within_0.5mrad']:.0%}\n"
          f"    both within ±2 nm and ±0.5 mrad: {out['within_2nm_and_0.5mrad']:.0%} of blocks (target ≥ 95 %)\n"
          f"    gross misses (> 10 nm): {out['gross_misses']}, of them silent (σ ≤ 5 nm, no flag): "
          f"{out['silent_gross_misses']} (target 0)")
    if "atoms" in res:
        out.update(compare_atoms(res, truth))
    if json_out is not None:
        strict = {k: None if isinstance(v, float) and not np.isfinite(v) else v for k, v in out.items()}
        Path(json_out).write_text(json.dumps(strict, indent=2))
    return out


def _frac(ok: np.ndarray) -> float:
    """Fraction of True; NaN (null in the JSON) when there are no such blocks."""
    return float(np.mean(ok)) if ok.size else float("nan")


def _pct(x: float) -> str:
    return "n/a" if not np.isfinite(x) else f"{x:.0%}"


def _nanmedian(x: np.ndarray) -> float:
    return float(np.nanmedian(x)) if np.isfinite(x).any() else float("nan")


def compare_atoms(res: dict, truth: Path) -> dict:
    """The store's atom table against the scan's cation columns (HAADF truth), within 0.5 Å."""
    import h5py

    from ..models.atom_locator import match_inside

    with h5py.File(truth, "r") as f:
        cols = f["columns/position_px"][()]
        species = f["columns/species"][()].astype(str)
    step_A = float(res["attrs"]["scan_step_nm"]) * 10
    h, w = (int(v) for v in res["attrs"]["scan_shape"])
    keep = species != "O" if res["atoms"]["contrast"] == "haadf" else np.ones(len(cols), bool)
    # peaks on the scan's outermost rows cannot be located: scored 1 px inside (match_inside)
    s = match_inside(res["atoms"]["positions"], cols[keep], 0.5 / step_A, (h, w), border=1.0).score
    out = {"atoms_found": int(len(res["atoms"]["positions"])), "atoms_precision": s.precision,
           "atoms_recall": s.recall, "atoms_f1": s.f1, "atoms_rmse_pm": s.rmse * step_A * 100}
    print(f"  atoms ({res['atoms']['contrast']}): {out['atoms_found']} columns; vs the scan's "
          f"{'cation ' if res['atoms']['contrast'] == 'haadf' else ''}columns (within 0.5 Å): precision "
          f"{s.precision:.3f}, recall {s.recall:.3f}, F1 {s.f1:.3f}, RMSE {out['atoms_rmse_pm']:.1f} pm")
    return out
