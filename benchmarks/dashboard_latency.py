"""Dashboard latency: a block's analysis -> its pixel in the browser (issue 5's benchmark).

A stand-in engine (LiveState + the real Publisher) publishes analysed blocks of a 256×256-block
map at an even rate for --minutes; `stemlive dashboard` (its own process) serves two headless
Chromium sessions.  Each session's page notes, in the browser, the arrival of the newest drawn
block's publish time (the page's hidden latency probe, updated in the same document patch as the
maps); the script reads those delays every 10 s and prints the median per interval, so a growing
backlog would show as a rising median.

    python benchmarks/dashboard_latency.py [--minutes 5] [--blocks 256]
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def engine(n: int, minutes: float, pub_port: int, rep_port: int, stop: threading.Event):
    """Publishes n×n blocks (thickness, tilt, ...) evenly over ``minutes``, in batches of 16."""
    from stemlive.live.publisher import Publisher
    from stemlive.live.state import LiveState
    from stemlive.live.store import MAP_FIELDS, StoreLayout

    layout = StoreLayout(scan_shape=(2 * n, 2 * n), block_shape=(2, 2), sig_shape=(8, 8))
    state = LiveState(layout, {"alpha_mrad": 13.6, "kv": 200, "models": ["stand-in"]})
    pub = Publisher(state, f"tcp://127.0.0.1:{pub_port}", f"tcp://127.0.0.1:{rep_port}")
    rng = np.random.default_rng(0)
    batch = 16
    interval = minutes * 60 / (n * n / batch)
    order = np.argwhere(np.ones((n, n), bool))
    t0 = time.perf_counter()
    for k, lo in enumerate(range(0, n * n, batch)):
        if stop.is_set():
            break
        idx = order[lo:lo + batch]
        rows = {key: np.full((len(idx), *trail), fill, dtype) for key, (trail, dtype, fill) in MAP_FIELDS.items()}
        rows["thickness_nm"][:] = rng.uniform(10, 60, len(idx))
        rows["thickness_sigma_nm"][:] = 1.0
        rows["tilt_mrad"][:] = rng.normal(0, 1, (len(idx), 2))
        rows["tilt_crystal_mrad"][:] = rows["tilt_mrad"]
        rows["in_range"][:] = 1
        seq = state.apply_blocks(idx, rows, np.zeros((len(idx), 8, 8), np.float32), np.full(len(idx), 4),
                                 np.zeros(len(idx), bool))
        pub.blocks(seq, idx, rows)
        if k % 20 == 0:
            pub.status(state.update_status(frames_seen=int(lo + batch) * 4))
        delay = t0 + (k + 1) * interval - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
    state.update_status(state="complete")
    pub.status(state.status)
    time.sleep(1.0)
    pub.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=5.0)
    ap.add_argument("--blocks", type=int, default=256, help="blocks per side of the map")
    ap.add_argument("--sessions", type=int, default=2)
    args = ap.parse_args()
    from tests import browser as br

    why = br.available()
    if why:
        sys.exit(f"cannot run: {why}")
    pub_port, rep_port, web = free_port(), free_port(), free_port()
    stop = threading.Event()
    eng = threading.Thread(target=engine, args=(args.blocks, args.minutes, pub_port, rep_port, stop), daemon=True)
    eng.start()
    dash = subprocess.Popen([sys.executable, "-m", "stemlive.live.cli", "dashboard", "--sub",
                             f"tcp://127.0.0.1:{pub_port}", "--req", f"tcp://127.0.0.1:{rep_port}", "--port", str(web)],
                            stdout=subprocess.PIPE, text=True, start_new_session=True)
    drivers = []
    intervals = []
    try:
        assert "dashboard:" in dash.stdout.readline()
        for _ in range(args.sessions):
            d = br.browser()
            d.get(f"http://127.0.0.1:{web}/")
            drivers.append(d)
        t0 = time.monotonic()
        print(f"{args.blocks}×{args.blocks}-block map over {args.minutes:g} min, {args.sessions} sessions at 10 Hz")
        print(f"{'t [s]':>6} " + " ".join(f"{'session ' + str(i) + ' median/p90 ms':>26}" for i in range(args.sessions)))
        while eng.is_alive():
            time.sleep(10)
            row = []
            for d in drivers:
                delays = d.execute_script("const d = window.stemliveDelays || []; window.stemliveDelays = []; return d;")
                row.append(np.array(delays) * 1e3)
            intervals.append(row)
            print(f"{time.monotonic() - t0:6.0f} " + " ".join(
                f"{np.median(r):12.0f} / {np.percentile(r, 90):6.0f} ({len(r):4d})" if len(r) else f"{'—':>26}"
                for r in row), flush=True)
        errors = [e for d in drivers for e in br.console_errors(d)]
    finally:
        stop.set()
        for d in drivers:
            d.quit()
        os.killpg(dash.pid, signal.SIGTERM)
    allv = np.concatenate([r for row in intervals for r in row if len(r)])
    first = np.concatenate([r for row in intervals[:3] for r in row if len(r)])
    last = np.concatenate([r for row in intervals[-3:] for r in row if len(r)])
    summary = {"median_ms": float(np.median(allv)), "p90_ms": float(np.percentile(allv, 90)),
               "first_30s_median_ms": float(np.median(first)), "last_30s_median_ms": float(np.median(last)),
               "console_errors": len(errors)}
    print(json.dumps(summary))
    print(f"delay analysis -> pixel: median {summary['median_ms']:.0f} ms (target ≤ 500), 90th percentile "
          f"{summary['p90_ms']:.0f} ms; first 30 s {summary['first_30s_median_ms']:.0f} ms, last 30 s "
          f"{summary['last_30s_median_ms']:.0f} ms (a backlog would grow)")


if __name__ == "__main__":
    main()
