"""`stemlive demo`: the default end-to-end run on a CPU-only laptop.

Until the live path lands (issue 4) the demo prepares what it will stream -- the synthetic
SrTiO3 [001] wedge scan with a bent region, composed from the shipped position-resolved
library with numpy alone and cached -- reports its ground truth, analyses its scan blocks
offline with the shipped PACBED networks against that truth, and says what comes next.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

PLAN = """stemlive demo
  1. compose (or reuse) a synthetic 4D-STEM scan: SrTiO3 [001], 200 kV, 13.6 mrad, a thickness
     wedge with a bowl-shaped bent region, Poisson noise           [available]
  2. stream it through the DECTRIS SIMPLON simulator into LiberTEM-live   [issue 4]
  3. analyse each scan block with the shipped PACBED networks  [offline now; live: issue 4]
  4. serve the maps on http://127.0.0.1:5006                              [issue 5]
"""


def add_parser(sub) -> None:
    ap = sub.add_parser("demo", help="run the default demo (synthetic wedge scan; live path as it lands)")
    ap.add_argument("--cache", type=Path, default=None, help="where the demo scan is cached (default: user cache)")
    ap.add_argument("--scan-shape", type=int, nargs=2, default=None, metavar=("H", "W"))
    ap.add_argument("--block", type=int, default=32, help="scan block edge for the PACBED analysis [frames]")
    ap.set_defaults(func=run)


def demo_scan(cache: Path | None = None, scan_shape: tuple[int, int] | None = None, progress: bool = True) -> Path:
    """Build (or reuse) the demo scan in the cache; returns its directory."""
    from ..simulate.cli import default_cache_dir
    from ..simulate.scan import ScanParams, write_scan
    from ..simulate.scan_cli import SHIPPED_LIBRARY

    p = ScanParams() if scan_shape is None else ScanParams(scan_shape=tuple(scan_shape))
    root = Path(cache) if cache else default_cache_dir() / "scans"
    out = root / f"demo-{p.key(SHIPPED_LIBRARY)}"
    if not (out / "params.json").exists():
        write_scan(SHIPPED_LIBRARY, p, out, progress=progress)
    return out


def run(args) -> int:
    import h5py

    print(PLAN)
    t = time.perf_counter()
    out = demo_scan(args.cache, args.scan_shape)
    meta = json.loads((out / "params.json").read_text())
    with h5py.File(out / "truth.h5", "r") as f:
        thick, tilt = f["thickness_nm"][()], f["tilt_mrad"][()]
        ncol = len(f["columns/position_px"])
    frames = np.load(out / "frames.npy", mmap_mode="r")
    print(f"scan ready in {time.perf_counter() - t:.1f} s: {out}")
    print(f"  frames {frames.shape} {frames.dtype}, {meta['mrad_per_px']:.2f} mrad/px, "
          f"scan step {meta['scan_step_nm'] * 10:.3f} Å")
    print(f"  thickness {thick.min():.1f}-{thick.max():.1f} nm, |tilt| ≤ {np.linalg.norm(tilt, axis=-1).max():.2f} mrad, "
          f"{ncol} atomic columns in the field")
    analyse_blocks(frames, thick, tilt, meta, block=args.block)
    print("  the live path (issue 4) will stream these frames next.")
    return 0


def analyse_blocks(frames: np.ndarray, thick: np.ndarray, tilt: np.ndarray, meta: dict, block: int = 32) -> None:
    """Sum the scan into block PACBEDs, analyse them, and compare with the ground truth."""
    from ..models.pacbed_analysis import PacbedAnalyzer

    sy, sx = frames.shape[:2]
    ny, nx = sy // block, sx // block
    f = np.asarray(frames[:ny * block, :nx * block], np.float32)
    pacbed = f.reshape(ny, block, nx, block, *f.shape[2:]).sum(axis=(1, 3)).reshape(ny * nx, *f.shape[2:])
    t_true = thick[:ny * block, :nx * block].reshape(ny, block, nx, block).mean(axis=(1, 3)).ravel()
    tilt_true = tilt[:ny * block, :nx * block].reshape(ny, block, nx, block, 2).mean(axis=(1, 3)).reshape(-1, 2)
    lp = meta["library_params"]
    analyzer = PacbedAnalyzer.for_acquisition(lp["kv"], lp["alpha_mrad"], backend="auto")
    t = time.perf_counter()
    res = analyzer.analyze(pacbed)
    ms = 1e3 * (time.perf_counter() - t) / len(res)
    ok = [i for i, r in enumerate(res) if r.error is None]
    dt = np.array([res[i].thickness_nm - t_true[i] for i in ok])
    dtilt = np.array([np.subtract(res[i].tilt_mrad, tilt_true[i]) for i in ok])
    print(f"  {len(res)} blocks of {block}×{block} frames analysed in {ms:.1f} ms each; vs ground truth (block means):")
    print(f"    thickness error median {np.median(np.abs(dt)):.1f} nm, within ±2 nm {np.mean(np.abs(dt) <= 2):.0%}; "
          f"tilt error median {np.median(np.abs(dtilt)):.2f} mrad")
    print("    block   true t [nm]  est t ± σ [nm]    true tilt [mrad]   est tilt [mrad]")
    for i in [i for i in ok if i // nx == (i % nx) * ny // nx][:8]:  # down the diagonal: across the wedge
        r = res[i]
        print(f"    {i // nx:2d},{i % nx:2d}   {t_true[i]:9.1f}   {r.thickness_nm:6.1f} ± {r.thickness_sigma_nm:4.1f}"
              f"    ({tilt_true[i][0]:+.2f}, {tilt_true[i][1]:+.2f})    ({r.tilt_mrad[0]:+.2f}, {r.tilt_mrad[1]:+.2f})")
