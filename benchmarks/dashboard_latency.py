"""Dashboard latency, frame -> pixel, with the real engine end to end; or a long load test.

Default (the real path): `stemlive sim-detector` streams the demo wedge scan at --dwell-us per
frame (DECTRIS SIMPLON over ZMQ), `stemlive live` acquires it with LiberTEM-live, analyses each
block with the shipped networks and publishes it, `stemlive dashboard` serves --sessions headless
Chromium pages (each redrawing at 10 Hz).  Each page records, on every animation frame, the
first time each block of the thickness map holds a value (the pixel is drawn).  When a block's
last frame left the simulator is the frame schedule: the simulator paces frame k at t0 + k·dwell;
t0 is taken from the engine's status messages (frames received by time t, read here on a third
subscription) as min(t - (n - 1)·dwell), the earliest the schedule can have started -- so the
figures leave out the engine's smallest receive lag (a few ms).  Prints per session the median
and 90th percentile of (pixel drawn - last frame sent) over the scan's blocks.

    python benchmarks/dashboard_latency.py [--scan 64 64] [--block 8 8] [--dwell-us 10000] [--sessions 2]
                                           [--repeat 5]   (runs pooled: this machine's load varies)

--stand-in: a stand-in engine (LiveState + the real Publisher) publishes a --blocks² map evenly
over --minutes and the script prints each 10 s the median publish -> browser delay per session,
so a backlog would show as a rising median.

    python benchmarks/dashboard_latency.py --stand-in [--minutes 5] [--blocks 256]
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


def stand_in(args) -> None:
    """A stand-in engine publishing a large map for --minutes: does a backlog build up?"""
    from tests import browser as br

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


RECORDER = """
window.stemliveDrawn = {};  // flat block index -> unix time its pixel was first drawn
const src = Bokeh.documents[0].get_model_by_name('source-thickness');
const seen = window.stemliveDrawn;
for (const v of Array.from(src.data.image[0].shape ? src.data.image[0] : src.data.image[0].flat()).entries())
  if (v[1] != null && !Number.isNaN(v[1])) seen[v[0]] = -1;  // already there: not measured
function tick() {
  const img = src.data.image[0], now = Date.now() / 1000;
  const flat = img.shape ? img : img.flat();
  for (let k = 0; k < flat.length; k++)
    if (!(k in seen) && flat[k] != null && !Number.isNaN(flat[k])) seen[k] = now;
  requestAnimationFrame(tick);
}
requestAnimationFrame(tick);
// paints per plot and their time: which plots an update makes the browser redraw
window.stemlivePaints = {};
const plotView = Bokeh.index.find_one(Bokeh.documents[0].get_model_by_name('map-thickness'));
const proto = Object.getPrototypeOf(plotView);
if (!proto.__stemliveCounted) {
  const paint = proto._actual_paint;
  proto._actual_paint = function () {
    const t = performance.now();
    const r = paint.call(this);
    const name = this.model.name || this.model.title?.text || 'plot';
    const e = window.stemlivePaints[name] || (window.stemlivePaints[name] = [0, 0]);
    e[0] += 1; e[1] += performance.now() - t;
    return r;
  };
  proto.__stemliveCounted = true;
}
"""


def last_frame_index(scan: tuple[int, int], block: tuple[int, int]) -> np.ndarray:
    """Row-major index of the last frame of each block (ragged edges included)."""
    sy, sx = scan
    by, bx = block
    ny, nx = -(-sy // by), -(-sx // bx)
    rows = np.minimum((np.arange(ny) + 1) * by, sy) - 1
    cols = np.minimum((np.arange(nx) + 1) * bx, sx) - 1
    return rows[:, None] * sx + cols[None, :]


def page_metrics(driver) -> dict[str, float]:
    return {m["name"]: m["value"] for m in driver.execute_cdp_cmd("Performance.getMetrics", {})["metrics"]}


def print_js_profile(profile: dict, top: int) -> None:
    """Where session 0's page spent its CPU time during the scan (Chrome's sampling profiler):
    self time per function, the ``top`` largest, and the idle share."""
    from collections import Counter

    nodes = {n["id"]: n["callFrame"] for n in profile["nodes"]}
    self_ms: Counter = Counter()
    for node, dt in zip(profile["samples"], profile["timeDeltas"]):
        f = nodes[node]
        self_ms[f"{f['functionName'] or '(anonymous)'} {Path(f['url']).name}:{f['lineNumber']}"] += dt / 1e3
    total = sum(self_ms.values())
    print(f"page CPU profile (session 0, {total / 1e3:.1f} s sampled):")
    for name, ms in self_ms.most_common(top):
        print(f"  {ms:8.0f} ms {100 * ms / total:5.1f} %  {name}")
    parent = {c: n["id"] for n in profile["nodes"] for c in n.get("children", [])}
    callers: Counter = Counter()  # who the busiest native calls come from (3 frames up)
    for node, dt in zip(profile["samples"], profile["timeDeltas"]):
        if nodes[node]["functionName"] in ("getPropertyValue", "getComputedStyle"):
            chain, k = [], node
            for _ in range(4):
                k = parent.get(k)
                if k is None:
                    break
                f = nodes[k]
                chain.append(f"{f['functionName'] or '(anon)'}:{f['lineNumber']}:{f['columnNumber']}")
            callers[" < ".join(chain)] += dt / 1e3
    for chain, ms in callers.most_common(6):
        print(f"  {ms:8.0f} ms  style read from {chain}")


def status_listener(address: str, stop: threading.Event, out: list, published: dict) -> None:
    """(time received, frames seen) of every status message the engine publishes, and the time
    each block was first published (engine clock = this machine's)."""
    import zmq

    from stemlive.protocol import decode

    ctx = zmq.Context.instance()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(address)
    while not stop.is_set():
        if not sub.poll(100):
            continue
        header, arrays = decode(sub.recv_multipart())
        if header.get("type") == "status" and header["status"].get("frames_seen"):
            out.append((time.time(), int(header["status"]["frames_seen"])))
        elif header.get("type") == "blocks":
            for i, j in arrays["indices"]:
                published.setdefault((int(i), int(j)), float(header["sent"]))
    sub.close()


def real_engine(args) -> None:
    from stemlive.live.demo import demo_scan
    from tests import browser as br

    scan, block, dwell = tuple(args.scan), tuple(args.block), args.dwell_us * 1e-6
    d = demo_scan(scan_shape=scan, progress=True)
    meta = json.loads((d / "params.json").read_text())
    api, data, pub, rep, web = (free_port() for _ in range(5))
    sub_addr, req_addr = f"tcp://127.0.0.1:{pub}", f"tcp://127.0.0.1:{rep}"
    cli = [sys.executable, "-m", "stemlive.live.cli"]
    procs, drivers, statuses, published = [], [], [], {}
    stop = threading.Event()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    try:
        sim = subprocess.Popen(cli + ["sim-detector", str(d / "frames.npy"), "--dwell-us", str(args.dwell_us),
                                      "--api-port", str(api), "--data-port", str(data), "--cache", str(work)],
                               stdout=subprocess.PIPE, text=True, start_new_session=True)
        procs.append(sim)
        if "simulated DECTRIS detector" not in sim.stdout.readline():
            sys.exit("the simulator did not start")
        dash = subprocess.Popen(cli + ["dashboard", "--sub", sub_addr, "--req", req_addr, "--port", str(web)],
                                stdout=subprocess.PIPE, text=True, start_new_session=True)
        procs.append(dash)
        if "dashboard:" not in dash.stdout.readline():
            sys.exit("the dashboard did not start")
        listener = threading.Thread(target=status_listener, args=(sub_addr, stop, statuses, published), daemon=True)
        listener.start()
        engine = subprocess.Popen(cli + ["live", "--nice", str(args.nice), "--detector", "dectris", "--api-port", str(api), "--data-port", str(data),
                                         "--scan-shape", *map(str, scan), "--block", *map(str, block),
                                         "--alpha-mrad", str(meta.get("alpha_mrad", 13.6)), "--kv", str(meta.get("kv", 200)),
                                         "--mrad-per-px", str(meta["mrad_per_px"]),
                                         "--scan-step-nm", str(meta["scan_step_nm"]), "--method", args.method,
                                         "--out", str(work / "latency.h5"), "--overwrite", "--pub", sub_addr,
                                         "--rep", req_addr, "--quiet", "--executor", "inline"],
                                  start_new_session=True)
        procs.append(engine)
        for _ in range(args.sessions):
            drv = br.browser()
            drv.get(f"http://127.0.0.1:{web}/")
            drivers.append(drv)
        for drv in drivers:  # the page is built once the engine's first state arrived
            br.wait_for(lambda drv=drv: drv.execute_script(
                "return typeof Bokeh !== 'undefined' && Bokeh.documents.length > 0 && "
                "Bokeh.documents[0].get_model_by_name('source-thickness') !== null"), 120, what="the page")
            drv.execute_script(RECORDER)
        if args.js_profile:
            drivers[0].execute_cdp_cmd("Profiler.enable", {})
            drivers[0].execute_cdp_cmd("Profiler.setSamplingInterval", {"interval": 1000})
            drivers[0].execute_cdp_cmd("Profiler.start", {})
            drivers[0].execute_cdp_cmd("Performance.enable", {})
            metrics0 = page_metrics(drivers[0])
        if engine.wait(timeout=args.timeout) != 0:
            sys.exit(f"the engine failed (exit {engine.returncode})")
        time.sleep(2.0)  # the last blocks reach the pages
        if args.js_profile:
            print_js_profile(drivers[0].execute_cdp_cmd("Profiler.stop", {})["profile"], args.js_profile)
            metrics1 = page_metrics(drivers[0])
            print("page time during the scan (Chrome's Performance metrics, s): " + ", ".join(
                f"{k} {metrics1[k] - metrics0[k]:.2f}" for k in ("TaskDuration", "ScriptDuration", "LayoutDuration",
                                                                "RecalcStyleDuration") if k in metrics1)
                  + f"; layouts {metrics1.get('LayoutCount', 0) - metrics0.get('LayoutCount', 0):.0f}")
        paints = drivers[0].execute_script("return window.stemlivePaints || {}")
        drawn = [drv.execute_script("return window.stemliveDrawn") for drv in drivers]
        # the page's own probe: publish -> the update carrying it reached the browser (before drawing)
        arrived = [np.array(drv.execute_script("return window.stemliveDelays || []"), float) for drv in drivers]
        errors = [e for drv in drivers for e in br.console_errors(drv)]
    finally:
        stop.set()
        for drv in drivers:
            drv.quit()
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    st = np.array(statuses, float)
    if len(st) < 3:
        sys.exit("too few status messages from the engine to place the frame schedule")
    t0 = float(np.min(st[:, 0] - (st[:, 1] - 1) * dwell))
    rate = np.polyfit(st[:, 0], st[:, 1], 1)[0]
    sent = t0 + last_frame_index(scan, block).ravel() * dwell
    print(f"demo scan {scan[0]}×{scan[1]} frames of {meta['frame_shape']}, blocks {block[0]}×{block[1]} "
          f"({sent.size}), dwell {args.dwell_us} µs ({1 / dwell:.0f} frames/s; engine received {rate:.0f} frames/s), "
          f"method {args.method}, engine at nice {args.nice}, {args.sessions} Chromium sessions at 10 Hz; "
          f"load: {os.getloadavg()[0]:.1f}")
    nx = -(-scan[1] // block[1])
    pub_t = np.array([published.get((k // nx, k % nx), np.nan) for k in range(sent.size)])
    engine_part = pub_t - sent
    summary = {"blocks": int(sent.size), "console_errors": len(errors), "sessions": [],
               "last_frame_to_published_median_s": float(np.nanmedian(engine_part)),
               "last_frame_to_published_p90_s": float(np.nanpercentile(engine_part, 90))}
    print(f"engine: last frame sent -> block published: median {np.nanmedian(engine_part) * 1e3:.0f} ms, "
          f"90th percentile {np.nanpercentile(engine_part, 90) * 1e3:.0f} ms")
    for n, rec in enumerate(drawn):
        idx = np.array([int(k) for k, v in rec.items() if v > 0], int)
        if idx.size == 0:
            print(f"session {n}: no block drawn after the page was ready (it was built late?)")
            continue
        lat = np.array([rec[str(k)] for k in idx]) - sent[idx]
        med, p90 = float(np.median(lat)), float(np.percentile(lat, 90))
        page = np.array([rec[str(k)] for k in idx]) - pub_t[idx]
        summary["sessions"].append({"latencies_s": lat.tolist(), "measured_blocks": int(idx.size), "median_s": med,
                                    "p90_s": p90,
                                    "max_s": float(lat.max()), "published_to_drawn_median_s": float(np.nanmedian(page)),
                                    "published_to_drawn_p90_s": float(np.nanpercentile(page, 90))})
        print(f"session {n}: {idx.size} blocks, last frame sent -> pixel drawn: median {med * 1e3:.0f} ms, "
              f"90th percentile {p90 * 1e3:.0f} ms, max {lat.max() * 1e3:.0f} ms; of which published -> drawn "
              f"median {np.nanmedian(page) * 1e3:.0f} ms, 90th percentile {np.nanpercentile(page, 90) * 1e3:.0f} ms "
              f"(the newest block's update reached the page {np.median(arrived[n]) * 1e3:.0f} ms after publishing, "
              f"median of {arrived[n].size} updates)")
    if paints:
        busiest = sorted(paints.items(), key=lambda kv: -kv[1][1])
        print(f"session 0 repainted plots {sum(n for n, _ in paints.values())} times "
              f"({sum(ms for _, ms in paints.values()) / 1e3:.1f} s of script): " + ", ".join(
                  f"{name} {n}× {ms:.0f} ms" for name, (n, ms) in busiest[:12]))
    print(json.dumps({**summary, "sessions": [{k: v for k, v in s.items() if k != "latencies_s"}
                                              for s in summary["sessions"]]}))
    return summary


def repeated(args) -> None:
    """--repeat N runs of the real path, one after another with a pause (the machine's load
    settles): every block of every run and session pooled, and each run's medians."""
    runs = []
    for k in range(args.repeat):
        if k:
            time.sleep(args.pause)
        print(f"--- run {k + 1} of {args.repeat}", flush=True)
        runs.append(real_engine(args))
    pooled = np.concatenate([s["latencies_s"] for r in runs for s in r["sessions"]])
    engine = [r["last_frame_to_published_median_s"] for r in runs]
    medians = [s["median_s"] for r in runs for s in r["sessions"]]
    print(f"=== {args.repeat} runs × {args.sessions} sessions, {pooled.size} blocks drawn: last frame sent -> pixel "
          f"drawn median {np.median(pooled) * 1e3:.0f} ms (target ≤ 500), 90th percentile "
          f"{np.percentile(pooled, 90) * 1e3:.0f} ms; per run and session medians "
          + " ".join(f"{m * 1e3:.0f}" for m in medians)
          + "; engine (last frame -> published) medians " + " ".join(f"{m * 1e3:.0f}" for m in engine) + " ms")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stand-in", action="store_true", help="the long load test with a stand-in engine")
    ap.add_argument("--sessions", type=int, default=2)
    ap.add_argument("--scan", type=int, nargs=2, default=(64, 64), help="demo scan shape (real engine)")
    ap.add_argument("--block", type=int, nargs=2, default=(8, 8))
    ap.add_argument("--dwell-us", type=int, default=10000, help="frame time of the simulator")
    ap.add_argument("--method", choices=("network", "check"), default="network")
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds the engine may take")
    ap.add_argument("--js-profile", type=int, default=0, metavar="N",
                    help="print the N functions session 0's page spent most time in (Chrome's profiler)")
    ap.add_argument("--nice", type=int, default=10,
                    help="the engine's `stemlive live --nice` (0: at the dashboard's and browsers' priority)")
    ap.add_argument("--repeat", type=int, default=1, help="runs of the real path, pooled")
    ap.add_argument("--pause", type=float, default=20.0, help="seconds between repeated runs")
    ap.add_argument("--work", default=str(ROOT / ".bench-cache" / "dashboard_latency"), help="store and stream dump")
    ap.add_argument("--minutes", type=float, default=5.0, help="stand-in: how long")
    ap.add_argument("--blocks", type=int, default=256, help="stand-in: blocks per side of the map")
    args = ap.parse_args()
    from tests import browser as br

    why = br.available()
    if why:
        sys.exit(f"cannot run: {why}")
    if args.stand_in:
        stand_in(args)
    elif args.repeat > 1:
        repeated(args)
    else:
        real_engine(args)



if __name__ == "__main__":
    main()
