"""PACBED analysis speed: ms per raw pattern, networks (ONNX Runtime, CPU) vs LSF and hybrid.

The whole analysis of each raw pattern is timed: coarse disk, crops, alignment iterations,
background iterations, thickness and tilt.  Networks at batch 1 and 64; LSF and hybrid one
pattern at a time (their library search is already vectorised over the library).

    python benchmarks/pacbed_speed.py [--alpha 13.6] [--frame 64] [--threads 2] [--lsf-n 5]

``--frame 256`` puts each held-out pattern into a 256×256 detector frame (more coarse-finding
work).  Target: ≤ 1 ms/pattern batched on 2 cores, ≥ 10⁴× faster than LSF.  ``--threads``
sets ONNX Runtime's intra-op threads (1 leaves a core to frame ingest in a live run).
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from pacbed_common import library_for
from stemlive.models.cards import SHIPPED_DIR
from stemlive.models.lsf import LsfAnalyzer
from stemlive.models.pacbed_analysis import PacbedAnalyzer
from stemlive.simulate.heldout_patterns import heldout_raw_patterns


def per_pattern_ms(fn, x, batch: int, repeats: int = 3) -> float:
    best = np.inf
    for _ in range(repeats):
        t = time.perf_counter()
        for i in range(0, len(x), batch):
            fn(x[i:i + batch])
        best = min(best, time.perf_counter() - t)
    return 1e3 * best / len(x)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--alpha", type=float, default=13.6)
    ap.add_argument("--frame", type=int, default=64, help="detector frame size (patterns are padded into it)")
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--lsf-n", type=int, default=5)
    ap.add_argument("--models", type=Path, default=SHIPPED_DIR)
    args = ap.parse_args(argv)
    lib = library_for(args.alpha)
    x, _ = heldout_raw_patterns(lib, args.n, 4.7e7, seed=7)
    if args.frame > x.shape[-1]:
        big = np.zeros((len(x), args.frame, args.frame), np.float32)
        o = (args.frame - x.shape[-1]) // 3
        big[:, o:o + x.shape[-1], o:o + x.shape[-1]] = x
        x = big
    analyzer = PacbedAnalyzer.for_acquisition(200, args.alpha, args.models, backend="onnxruntime",
                                              threads=args.threads)
    analyzer.analyze(x[:64])  # warm-up
    rows = [(f"network, batch {b}", per_pattern_ms(analyzer.analyze, x[: (64 if b == 1 else len(x))], b))
            for b in (1, 64)]
    runs, inference_s = count_network_runs(analyzer, x)
    m = args.lsf_n
    if m > 0:
        lsf = LsfAnalyzer(lib, 200, args.alpha)
        rows.append(("LSF", per_pattern_ms(lambda p: [lsf.analyze_one(q) for q in p], x[:m], 1, repeats=1)))
        rows.append(("hybrid", per_pattern_ms(lambda p: lsf.refine(p, analyzer.analyze(p)), x[:m], 1, repeats=1)))
    print(f"\nSpeed, {args.alpha} mrad, {args.frame}×{args.frame} frames, ONNX Runtime CPU, {args.threads} threads")
    print(f"{'method':22s} {'ms/pattern':>12s} {'LSF / this':>12s}")
    lsf_ms = rows[2][1] if m > 0 else np.nan
    for name, ms in rows:
        print(f"{name:22s} {ms:12.2f} {lsf_ms / ms:12.0f}")
    print(f"network runs per pattern (batch 64): {runs:.2f} (alignment steps until converged + 2 thickness/tilt); "
          f"inside ONNX Runtime {1e3 * inference_s / len(x):.2f} ms/pattern of the batch-64 figure")


def count_network_runs(analyzer, x, batch: int = 64) -> tuple[float, float]:
    """Network evaluations per pattern and seconds inside the runtime, for one pass at ``batch``."""
    counted = {"patterns": 0, "s": 0.0}

    def wrap(backend):
        def run(b):
            t = time.perf_counter()
            out = backend(b)
            counted["s"] += time.perf_counter() - t
            counted["patterns"] += len(b)
            return out
        return run

    align, thick = analyzer.align, analyzer.thickness_tilt
    analyzer.align, analyzer.thickness_tilt = wrap(align), wrap(thick)
    try:
        for i in range(0, len(x), batch):
            analyzer.analyze(x[i:i + batch])
    finally:
        analyzer.align, analyzer.thickness_tilt = align, thick
    return counted["patterns"] / len(x), counted["s"]


if __name__ == "__main__":
    main()
