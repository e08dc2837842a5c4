"""Live path throughput, block delay and memory (issue 4's benchmark; prints tables).

1. frames/s of the full live path (BlockPacbedUDF + VirtualDetectorUDF -> engine -> networks ->
   store + publisher) against a bare LiberTEM-live SumUDF on the same simulated DECTRIS stream
   (uint16, bslz4, unpaced), for 64², 128², 256² frames, in one run with one LiveContext;
2. delay from a block's last frame to its row in the store, on a paced stream;
3. resident memory of the whole process tree over a long paced stream (--minutes).

Streams are synthetic CBED-like frames (a bright disk with weak Bragg disks, Poisson noise)
written once into .bench-cache/live (resumable: existing dumps are reused).

    python benchmarks/live_throughput.py            # all three, 5-minute memory run
    python benchmarks/live_throughput.py --minutes 1 --sizes 64
"""
from __future__ import annotations

import argparse
import json
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


def sum_udf_run(ctx, sim, scan, block) -> float:
    from libertem.udf.sum import SumUDF

    from stemlive.live.acquire import FRAME_STACK, frames_per_partition

    conn = ctx.make_connection("dectris").open(api_host="127.0.0.1", api_port=sim.api_port,
                                               data_host="127.0.0.1", data_port=sim.data_port,
                                               frame_stack_size=FRAME_STACK)  # as the live path
    try:
        aq = ctx.make_acquisition(conn=conn, nav_shape=scan, frames_per_partition=frames_per_partition(scan, block))
        t = time.perf_counter()
        ctx.run_udf(dataset=aq, udf=SumUDF())
        return time.perf_counter() - t
    finally:
        conn.close()


def pipeline_run(ctx, sim, scan, block, mpp, analyzer, out: Path, center=None):
    from stemlive.live.acquire import live

    t = time.perf_counter()
    summary = live(settings(out, block, mpp, center_px=center), detector="dectris", api_host="127.0.0.1", api_port=sim.api_port,
                   data_host="127.0.0.1", data_port=sim.data_port, scan_shape=scan, ctx=ctx, analyzer=analyzer)
    return time.perf_counter() - t, summary


def throughput(sizes, rounds: int, workers: int) -> list[dict]:
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
            with SimDetector(dump, 0, 0) as sim:
                sum_udf_run(ctx, sim, scan, block)  # warm-up: workers, caches
                t_sum, t_full, t_ingest, t_cal = [], [], [], []
                for _ in range(rounds):
                    t_sum.append(sum_udf_run(ctx, sim, scan, block))
                    wall, summary = pipeline_run(ctx, sim, scan, block, mpp, analyzer, CACHE / f"result-{px}.h5")
                    t_full.append(wall)
                    t_ingest.append(summary.acquisition_s)
                    # a calibrated detector (--center given): rings are read directly from the first frame
                    wall_c, _ = pipeline_run(ctx, sim, scan, block, mpp, analyzer, CACHE / f"result-{px}.h5",
                                             center=((px - 1) / 2, (px - 1) / 2))
                    t_cal.append(wall_c)
            row = {"frame": f"{px}²", "frames": n, "sum_fps": n / min(t_sum), "full_fps": n / min(t_full),
                   "ingest_fps": n / min(t_ingest), "ingest_ms_max": summary.ingest_ms_max,
                   "centre_given_fps": n / min(t_cal)}
            row["ratio"] = row["full_fps"] / row["sum_fps"]
            row["ratio_centre_given"] = row["centre_given_fps"] / row["sum_fps"]
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


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


def paced(minutes: float, workers: int) -> dict:
    """One long paced acquisition (64² frames): block delay and memory over time."""
    from libertem_live.api import LiveContext

    from stemlive.live.acquire import frames_per_partition
    from stemlive.live.pipeline import Settings, load_analyzer
    from stemlive.udf.radial_bins import n_bins_for

    px, dwell_us, block = 64, 1000, (16, 16)
    n_target = int(minutes * 60e6 / dwell_us)
    side = int(np.sqrt(n_target)) // 16 * 16
    scan = (side, side)
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
    frame_delay = (summary.block_stored_s - t0 - last)[np.isfinite(summary.block_stored_s)] * 1e3
    nb = n_bins_for((px, px), 0.5)
    # LiberTEM's nav buffers of the VirtualDetectorUDF: radial + dipole bins, centre, 4 rings (float32), flag
    per_frame = (3 * nb + 2 + 4) * 4 + 1
    q = max(1, len(s) // 10)
    return {"scan": scan, "frames": scan[0] * scan[1], "dwell_us": dwell_us, "wall_s": wall,
            "delay_ms_median": summary.block_delay_ms_median, "delay_ms_p90": summary.block_delay_ms_p90,
            "frame_delay_ms_median": float(np.median(frame_delay)), "frame_delay_ms_p90": float(np.percentile(frame_delay, 90)),
            "frame_delay_ms_max": float(frame_delay.max()), "frames_per_partition": frames_per_partition(scan, block),
            "rss_start_mb": float(s[:q, 1].mean()), "rss_end_mb": float(s[-q:, 1].mean()),
            "uss_start_mb": float(s[:q, 2].mean()), "uss_end_mb": float(s[-q:, 2].mean()),
            "uss_peak_mb": float(s[:, 2].max()), "rss_peak_mb": float(s[:, 1].max()),
            "expected_growth_mb": scan[0] * scan[1] * per_frame / 2**20, "bytes_per_frame": per_frame,
            "samples": s.tolist()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[64, 128, 256], choices=[64, 128, 256])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--minutes", type=float, default=5.0, help="length of the paced memory run (0: skip)")
    ap.add_argument("--paced-only", action="store_true", help="skip the throughput table")
    args = ap.parse_args()
    rows = [] if args.paced_only else throughput(args.sizes, args.rounds, args.workers)
    print("\nLive path vs bare SumUDF, same simulated DECTRIS stream (uint16, bslz4, unpaced), "
          f"pipelined executor, {args.workers} workers, best of {args.rounds}")
    print(f"{'frame':>6} {'frames':>7} {'SumUDF f/s':>11} {'full path f/s':>14} {'ratio':>6} {'ingest f/s':>11} "
          f"{'hand-off max ms':>16} {'centre given f/s':>17} {'ratio':>6}")
    for r in rows:
        print(f"{r['frame']:>6} {r['frames']:>7} {r['sum_fps']:>11.0f} {r['full_fps']:>14.0f} {r['ratio']:>6.2f} "
              f"{r['ingest_fps']:>11.0f} {r['ingest_ms_max']:>16.1f} {r['centre_given_fps']:>17.0f} "
              f"{r['ratio_centre_given']:>6.2f}")
    if args.minutes > 0:
        m = paced(args.minutes, args.workers)
        (CACHE / "paced.json").write_text(json.dumps(m))
        print(f"\nPaced stream: {m['frames']} frames of 64² at {m['dwell_us']} µs ({m['wall_s']:.0f} s)")
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
        plot_memory(m)


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
