"""Live path throughput, block delay and memory (prints tables).

1. frames/s on the same simulated DECTRIS stream (uint16, bslz4, unpaced), in one run with one
   LiveContext, for 64², 128², 256² frames: a no-op UDF (the stream's floor: replay, ZMQ, decode,
   dispatch), a bare SumUDF, SumUDF + ApplyMasksUDF (4 rings), stemlive's two UDFs alone
   (BlockPacbedUDF + VirtualDetectorUDF, centre given), and the full live path (UDFs -> engine
   -> networks -> store + publisher) with and without the centre given; configurations take
   turns within each round, and every figure is the best of the rounds with the spread
   (slowest .. fastest) beside it, ratios against the SumUDF of the same run;
2. delay from a block's last frame to its row in the store, on a paced stream;
3. resident memory of the whole process tree over a long paced stream (--minutes).

Streams are synthetic CBED-like frames (a bright disk with weak Bragg disks, Poisson noise)
written once into .bench-cache/live (resumable: existing dumps are reused).

    python benchmarks/live_throughput.py            # all three, 5-minute paced run at 1000 frames/s
    python benchmarks/live_throughput.py --minutes 1 --sizes 64
    python benchmarks/live_throughput.py --paced-only --minutes 5 --dwell-us 100 50 25   # sustained rates
"""
from __future__ import annotations

import argparse
import json
import os
import threading
import time
from pathlib import Path

import numpy as np

CACHE = Path(__file__).resolve().parent.parent / ".bench-cache" / "live"
SCANS = {64: (256, 256), 128: (128, 128), 256: (64, 64)}  # 512 MB of raw uint16 frames each
BLOCKS = {64: (16, 16), 128: (16, 16), 256: (8, 8)}
ALPHA, KV = 13.6, 200.0


def template(px: int) -> tuple[np.ndarray, float]:
    """A CBED-like mean frame (counts per electron) and its mrad/px: zero disk of radius px/9."""
    r_disk = px / 9
    yy, xx = np.indices((px, px)) - (px - 1) / 2
    t = np.zeros((px, px))
    for k in range(-2, 3):
        for m in range(-2, 3):
            w = 1.0 if k == m == 0 else 0.04 / (k * k + m * m)
            r = np.hypot(yy - k * 2.4 * r_disk, xx - m * 2.4 * r_disk)
            t += w / (1 + np.exp((r - r_disk) / 0.6))
    return t / t.sum(), ALPHA / r_disk


def frames(px: int, n: int, dose: float = 5e4, seed: int = 0):
    rng = np.random.default_rng(seed)
    t, _ = template(px)
    for lo in range(0, n, 256):
        for f in rng.poisson(t * dose, size=(min(256, n - lo), px, px)).astype(np.uint16):
            yield f


def stream(px: int, scan: tuple[int, int]) -> Path:
    from stemlive.live.dectris_dump import write_dump

    CACHE.mkdir(parents=True, exist_ok=True)
    out = CACHE / f"stream-{px}px-{scan[0]}x{scan[1]}.dump"
    if not out.exists():
        n = scan[0] * scan[1]
        write_dump(frames(px, n), n, (px, px), np.uint16, out, progress=True)
    return out


def settings(out: Path, block, mpp, **kw):
    from stemlive.live.pipeline import Settings

    # the networks' path (comparable with earlier tables); the library check is a second stage off
    # the ingest path whose rate is measured on its own
    kw.setdefault("method", "network")
    return Settings(block=block, alpha_mrad=ALPHA, kv=KV, out=out, mrad_per_px=mpp, overwrite=True,
                    pub="tcp://127.0.0.1:0", rep="tcp://127.0.0.1:0", progress=False, **kw)


class NoOpUDF:
    """Built lazily (LiberTEM imported inside): a UDF that reads every tile and does nothing."""

    @staticmethod
    def make():
        from libertem.udf.base import UDF

        class NoOp(UDF):
            def get_result_buffers(self):
                return {"tiles": self.buffer(kind="single", dtype=np.int64)}

            def get_preferred_input_dtype(self):
                return self.USE_NATIVE_DTYPE

            def process_tile(self, tile):
                self.results.tiles[:] += 1

            def merge(self, dest, src):
                dest.tiles[:] += src.tiles

        return NoOp()


def ring_masks_udf(px: int):
    """ApplyMasksUDF with the four default rings (BF, ABF, ADF, HAADF) around the frame centre."""
    from libertem.masks import ring
    from libertem.udf.masks import ApplyMasksUDF

    from stemlive.udf.radial_bins import DEFAULT_RINGS

    r = px / 9  # the template's disk radius (α)
    c = (px - 1) / 2
    factories = [(lambda a=a, b=b: ring(c, c, px, px, max(b * r, 0.5), a * r)) for a, b, _ in DEFAULT_RINGS.values()]
    return ApplyMasksUDF(mask_factories=factories, mask_count=len(factories), mask_dtype=np.float32)


def stemlive_udfs(px: int, block):
    """BlockPacbedUDF + VirtualDetectorUDF as the live path runs them, with the centre given."""
    from stemlive.udf import BlockPacbedUDF, VirtualDetectorUDF

    _, mpp = template(px)
    return [BlockPacbedUDF(block=block),
            VirtualDetectorUDF(center=((px - 1) / 2, (px - 1) / 2), alpha_mrad=ALPHA, mrad_per_px=mpp, images=False)]


def udf_run(ctx, sim, scan, block, udfs) -> float:
    """Seconds for ``udfs`` over the whole stream, through the same connection as the live path."""
    from stemlive.live.acquire import FRAME_STACK, frames_per_partition

    conn = ctx.make_connection("dectris").open(api_host="127.0.0.1", api_port=sim.api_port,
                                               data_host="127.0.0.1", data_port=sim.data_port,
                                               frame_stack_size=FRAME_STACK)  # as the live path
    try:
        aq = ctx.make_acquisition(conn=conn, nav_shape=scan, frames_per_partition=frames_per_partition(scan, block))
        t = time.perf_counter()
        ctx.run_udf(dataset=aq, udf=udfs)
        return time.perf_counter() - t
    finally:
        conn.close()


def sum_udf_run(ctx, sim, scan, block) -> float:
    from libertem.udf.sum import SumUDF

    return udf_run(ctx, sim, scan, block, [SumUDF()])


def pipeline_run(ctx, sim, scan, block, mpp, analyzer, out: Path, center=None):
    from stemlive.live.acquire import live

    t = time.perf_counter()
    summary = live(settings(out, block, mpp, center_px=center), detector="dectris", api_host="127.0.0.1", api_port=sim.api_port,
                   data_host="127.0.0.1", data_port=sim.data_port, scan_shape=scan, ctx=ctx, analyzer=analyzer)
    return time.perf_counter() - t, summary


CONFIGS = ("noop", "sum", "sum+masks", "stemlive UDFs", "full, centre given", "full")


def throughput(sizes, rounds: int, workers: int) -> list[dict]:
    """One row per frame size: frames/s of every configuration (best and spread over rounds)."""
    from libertem.udf.sum import SumUDF
    from libertem_live.api import LiveContext

    from stemlive.live.pipeline import Settings, load_analyzer
    from stemlive.live.simulator import SimDetector

    analyzer = load_analyzer(Settings(block=(8, 8), alpha_mrad=ALPHA, kv=KV, out=Path("x")))
    rows = []
    with LiveContext.make_with("pipelined", cpus=workers) as ctx:
        for px in sizes:
            scan, block = SCANS[px], BLOCKS[px]
            n = scan[0] * scan[1]
            dump = stream(px, scan)
            _, mpp = template(px)
            out = CACHE / f"result-{px}.h5"
            centre = ((px - 1) / 2, (px - 1) / 2)
            runs = {
                "noop": lambda: udf_run(ctx, sim, scan, block, [NoOpUDF.make()]),
                "sum": lambda: udf_run(ctx, sim, scan, block, [SumUDF()]),
                "sum+masks": lambda: udf_run(ctx, sim, scan, block, [SumUDF(), ring_masks_udf(px)]),
                "stemlive UDFs": lambda: udf_run(ctx, sim, scan, block, stemlive_udfs(px, block)),
                "full, centre given": lambda: pipeline_run(ctx, sim, scan, block, mpp, analyzer, out, centre)[0],
                "full": lambda: pipeline_run(ctx, sim, scan, block, mpp, analyzer, out)[0],
            }
            times = {k: [] for k in CONFIGS}
            with SimDetector(dump, 0, 0) as sim:
                for k in CONFIGS:  # warm-up: workers, caches, compiled kernels
                    runs[k]()
                for _ in range(rounds):
                    for k in CONFIGS:
                        times[k].append(runs[k]())
            row = {"frame": f"{px}²", "frames": n, "load": os.getloadavg()[0]}
            for k in CONFIGS:
                fps = n / np.asarray(times[k])
                row[k] = {"best": float(fps.max()), "slowest": float(fps.min()), "median": float(np.median(fps))}
            for k in CONFIGS:
                row[k]["ratio"] = row[k]["best"] / row["sum"]["best"]
                # the same ratio round by round (each round's runs are neighbours in time)
                per_round = (n / np.asarray(times[k])) / (n / np.asarray(times["sum"]))
                row[k]["ratio_rounds"] = [float(v) for v in per_round]
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def print_table(rows: list[dict], rounds: int, workers: int) -> None:
    print("\nFrames/s on the same simulated DECTRIS stream (uint16, bslz4, unpaced), pipelined executor, "
          f"{workers} workers, best of {rounds} (slowest in brackets); × = best / SumUDF's best")
    head = f"{'frame':>6}" + "".join(f" {k:>26}" for k in CONFIGS)
    print(head)
    for r in rows:
        cells = []
        for k in CONFIGS:
            c = r[k]
            txt = f"{c['best'] / 1e3:.1f}k ({c['slowest'] / 1e3:.1f}k)"
            if k != "sum":
                txt += f" {c['ratio']:.2f}×"
            cells.append(f" {txt:>26}")
        print(f"{r['frame']:>6}" + "".join(cells))
    print("per-round ratios to SumUDF (min..max): " + "; ".join(
        f"{r['frame']} " + ", ".join(f"{k} {min(r[k]['ratio_rounds']):.2f}..{max(r[k]['ratio_rounds']):.2f}"
                                     for k in CONFIGS if k != "sum") for r in rows))
    print("load average (1 min) during each size: " + ", ".join(f"{r['frame']} {r['load']:.1f}" for r in rows))


class RssSampler(threading.Thread):
    """Memory of this process and its children (workers, simulator), once a second: RSS, and USS
    (private pages only -- RSS counts the receiver's shared-memory ring buffer once per process
    that touched it, so it grows until the whole ring has been used)."""

    def __init__(self, exclude: int | None = None):
        super().__init__(daemon=True)
        self.exclude = exclude
        self.samples: list[tuple[float, float, float]] = []
        self._halt = threading.Event()

    def run(self):
        import psutil

        me = psutil.Process()
        t0 = time.monotonic()
        while not self._halt.wait(1.0):
            rss = uss = 0
            for p in [me] + me.children(recursive=True):
                if self.exclude is not None and (p.pid == self.exclude or p.ppid() == self.exclude):
                    continue
                try:
                    info = p.memory_full_info()
                    rss, uss = rss + info.rss, uss + info.uss
                except psutil.Error:
                    pass
            self.samples.append((time.monotonic() - t0, rss / 2**20, uss / 2**20))

    def stop(self):
        self._halt.set()
        self.join()


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ExternalSim:
    """`stemlive sim-detector` in its own process: its memory (it maps the whole dump file)
    stays out of the measurement, as a real detector's would."""

    def __init__(self, dump: Path, dwell_us: int):
        import subprocess
        import sys

        self.api_port, self.data_port = free_port(), free_port()
        self.proc = subprocess.Popen([sys.executable, "-m", "stemlive.live.cli", "sim-detector", str(dump),
                                      "--dwell-us", str(dwell_us), "--api-port", str(self.api_port),
                                      "--data-port", str(self.data_port)], stdout=subprocess.PIPE, text=True,
                                     start_new_session=True)
        line = self.proc.stdout.readline()
        if "simulated DECTRIS detector" not in line:
            raise RuntimeError(f"simulator did not start: {line}")

    def close(self):
        import os
        import signal

        os.killpg(self.proc.pid, signal.SIGTERM)
        self.proc.wait()


def paced_sum(minutes: float, workers: int, dwell_us: int) -> dict:
    """A bare SumUDF on the same paced stream: the rate it keeps (frames / wall time)."""
    from libertem_live.api import LiveContext

    px, block = 64, (16, 16)
    scan = paced_scan(minutes, dwell_us)
    sim = ExternalSim(stream(px, scan), dwell_us)
    try:
        with LiveContext.make_with("pipelined", cpus=workers) as ctx:
            wall = sum_udf_run(ctx, sim, scan, block)
    finally:
        sim.close()
    n = scan[0] * scan[1]
    return {"frames": n, "dwell_us": dwell_us, "wall_s": wall, "offered_fps": 1e6 / dwell_us, "kept_fps": n / wall}


def paced_scan(minutes: float, dwell_us: int) -> tuple[int, int]:
    """A square scan of whole 16×16 blocks lasting about ``minutes`` at ``dwell_us``."""
    side = max(16, int(np.sqrt(minutes * 60e6 / dwell_us)) // 16 * 16)
    return (side, side)


def paced(minutes: float, workers: int, dwell_us: int = 1000) -> dict:
    """One long paced acquisition (64² frames): block delay and memory over time."""
    from libertem_live.api import LiveContext

    from stemlive.live.acquire import frames_per_partition
    from stemlive.live.pipeline import Settings, load_analyzer
    from stemlive.udf.radial_bins import n_bins_for

    px, block = 64, (16, 16)
    scan = paced_scan(minutes, dwell_us)
    dump = stream(px, scan)
    _, mpp = template(px)
    analyzer = load_analyzer(Settings(block=(8, 8), alpha_mrad=ALPHA, kv=KV, out=Path("x")))
    sim = ExternalSim(dump, dwell_us)
    sampler = RssSampler(exclude=sim.proc.pid)
    try:
        with LiveContext.make_with("pipelined", cpus=workers) as ctx:
            sampler.start()
            wall, summary = pipeline_run(ctx, sim, scan, block, mpp, analyzer, CACHE / "result-paced.h5")
            sampler.stop()
    finally:
        sim.close()
    s = np.array(sampler.samples)
    # a block's last frame leaves the simulator (index + 1) × dwell after the stream started; the
    # start is inferred from the first result (its frames at the dwell rate, processing taken as 0,
    # so the delays below are, if anything, a little low)
    by, bx = block
    rows = (np.arange(summary.block_stored_s.shape[0]) + 1) * by - 1
    cols = (np.arange(summary.block_stored_s.shape[1]) + 1) * bx - 1
    last = (np.minimum(rows, scan[0] - 1)[:, None] * scan[1] + np.minimum(cols, scan[1] - 1)[None, :] + 1) * dwell_us * 1e-6
    t0 = summary.first_result_s - summary.first_result_frames * dwell_us * 1e-6
    stored = np.isfinite(summary.block_stored_s)
    frame_delay = (summary.block_stored_s - t0 - last)[stored] * 1e3
    # flat lag: the delay of the last tenth of the blocks (in scan order) against the first tenth
    tenth = max(1, len(frame_delay) // 10)
    nb = n_bins_for((px, px), 0.5)
    # LiberTEM's nav buffers of the VirtualDetectorUDF once calibrated: the radial profile and the
    # centre (float32) and a flag per frame (the dipoles only for frames recorded before)
    per_frame = (nb + 2) * 4 + 1
    q = max(1, len(s) // 10)
    return {"scan": scan, "frames": scan[0] * scan[1], "dwell_us": dwell_us, "wall_s": wall,
            "delay_ms_median": summary.block_delay_ms_median, "delay_ms_p90": summary.block_delay_ms_p90,
            "frame_delay_ms_median": float(np.median(frame_delay)), "frame_delay_ms_p90": float(np.percentile(frame_delay, 90)),
            "frame_delay_ms_max": float(frame_delay.max()), "frames_per_partition": frames_per_partition(scan, block),
            "lag_first_tenth_ms": float(np.median(frame_delay[:tenth])),
            "lag_last_tenth_ms": float(np.median(frame_delay[-tenth:])),
            "offered_fps": 1e6 / dwell_us, "kept_fps": scan[0] * scan[1] / wall,
            "rss_start_mb": float(s[:q, 1].mean()), "rss_end_mb": float(s[-q:, 1].mean()),
            "uss_start_mb": float(s[:q, 2].mean()), "uss_end_mb": float(s[-q:, 2].mean()),
            "uss_peak_mb": float(s[:, 2].max()), "rss_peak_mb": float(s[:, 1].max()),
            "expected_growth_mb": scan[0] * scan[1] * per_frame / 2**20, "bytes_per_frame": per_frame,
            "samples": s.tolist()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[64, 128, 256], choices=[64, 128, 256])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--minutes", type=float, default=5.0, help="length of the paced memory run (0: skip)")
    ap.add_argument("--paced-only", action="store_true", help="skip the throughput table")
    ap.add_argument("--dwell-us", type=int, nargs="+", default=[1000],
                    help="paced runs at these dwell times (the full path, then a bare SumUDF, at each)")
    args = ap.parse_args()
    rows = [] if args.paced_only else throughput(args.sizes, args.rounds, args.workers)
    if rows:
        (CACHE / "throughput.json").write_text(json.dumps(rows))
        print_table(rows, args.rounds, args.workers)
    if args.minutes > 0:
        for dwell in args.dwell_us:
            m = paced(args.minutes, args.workers, dwell)
            b = paced_sum(args.minutes, args.workers, dwell)
            (CACHE / f"paced-{dwell}us.json").write_text(json.dumps({"full": m, "sum": b}))
            report_paced(m, b)
            plot_memory(m)


def report_paced(m: dict, b: dict) -> None:
    print(f"\nPaced stream: {m['frames']} frames of 64² at {m['dwell_us']} µs = {m['offered_fps']:.0f} frames/s "
          f"offered ({m['wall_s']:.0f} s)")
    print(f"  kept: full path {m['kept_fps']:.0f} frames/s ({m['kept_fps'] / m['offered_fps']:.2f} of offered), "
          f"bare SumUDF {b['kept_fps']:.0f} frames/s ({b['kept_fps'] / b['offered_fps']:.2f})")
    print(f"  lag (a block's last frame -> its row in the store), median: first tenth of the blocks "
          f"{m['lag_first_tenth_ms']:.0f} ms, last tenth {m['lag_last_tenth_ms']:.0f} ms")
    print(f"  a block's last frame -> its row in the store: {m['frame_delay_ms_median']:.0f} ms median, "
          f"{m['frame_delay_ms_p90']:.0f} ms 90th percentile, {m['frame_delay_ms_max']:.0f} ms max "
          f"(partitions of {m['frames_per_partition']} frames = whole block rows)")
    print(f"  of which block found complete -> stored and published: {m['delay_ms_median']:.0f} ms median, "
          f"{m['delay_ms_p90']:.0f} ms 90th percentile")
    print(f"  private memory (USS, process tree): first tenth {m['uss_start_mb']:.0f} MB, last tenth "
          f"{m['uss_end_mb']:.0f} MB, peak {m['uss_peak_mb']:.0f} MB; RSS {m['rss_start_mb']:.0f} -> "
          f"{m['rss_end_mb']:.0f} MB (incl. shared memory)")
    print(f"  the per-frame virtual-detector record LiberTEM keeps for the scan: {m['expected_growth_mb']:.0f} MB "
          f"({m['bytes_per_frame']} B/frame)")


def plot_memory(m: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = np.array(m["samples"])
    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.plot(s[:, 0], s[:, 1], label="RSS, process tree (incl. shared memory)")
    ax.plot(s[:, 0], s[:, 2], label="USS, process tree (private)")
    ax.plot([s[0, 0], s[-1, 0]], [s[0, 2], s[0, 2] + m["expected_growth_mb"]], "--",
            label="USS at start + per-frame virtual-detector record")
    ax.set_xlabel("time [s]")
    ax.set_ylabel("MB")
    ax.set_title(f"Live path memory, {m['frames']} frames of 64² at {m['dwell_us']} µs")
    ax.legend()
    fig.tight_layout()
    out = Path(__file__).resolve().parent.parent / "docs" / "live_memory.png"
    fig.savefig(out, dpi=120)
    print(f"  plot: {out}")


if __name__ == "__main__":
    main()
