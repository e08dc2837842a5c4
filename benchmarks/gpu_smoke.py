"""GPU smoke test of the TensorRT path (engines, cache, numerics, both CLI commands), ≤ 5 minutes.

On a machine with an NVIDIA GPU and ``stemlive[tensorrt]`` (CUDA 12) or ``stemlive[tensorrt-cu13]``:

    python benchmarks/gpu_smoke.py [--device N] [--quick] [--budget-s 270]

* builds the engine of every shipped model with FP16 off and on, in a fresh cache folder, checks
  that a second load hits the cache, and times both;
* compares TensorRT with ONNX Runtime output by output within :data:`NETWORK_TOL`: random inputs
  (PACBED batches 1-300, atom images 16² to 1024², non-square and over-size batches included)
  and the inputs the analysers really send (recorded from an ONNX Runtime analysis); an input
  outside the optimisation profile must raise;
* runs ``stemlive pacbed analyze`` and ``stemlive atoms find`` on both backends and compares the
  results within :data:`PACBED_TOL` and :data:`ATOM_TOL`;
* prints timings: build, cached load, and both backends' throughput.

Without a usable GPU (or with ``--cpu-only``) it runs what needs none -- every shipped card
against its ONNX file and metadata, ONNX Runtime on every model, the engine settings against what
the analysers send, the reference inputs through both commands on ONNX Runtime -- and prints
``SKIP tensorrt: <reason>``.  Exit status: 0 when every check that ran passed, 1 otherwise.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from stemlive.models.atom_analysis import MIN_WORK_SIDE, TILE
from stemlive.models.backends import BackendUnavailable, OnnxRuntimeBackend
from stemlive.models.backends import tensorrt as trtb
from stemlive.models.cards import SHIPPED_DIR, find_cards, onnx_metadata, verify

# Max |TensorRT − ONNX Runtime| over one output, in units of max(1, max |ONNX Runtime|).  FP32
# engines run convolutions in TF32 on Ampere and newer (10-bit mantissa: 2⁻¹¹ ≈ 5·10⁻⁴ relative
# per operation); through these networks' 10-20 layers that stays near 10⁻³, and the bound
# leaves a factor ~10.  FP16 engines also store activations in FP16: five times that.
NETWORK_TOL = {False: 1e-2, True: 5e-2}
# `pacbed analyze`: per-pattern |Δ| allowed, for at least PACBED_FRACTION of the patterns (a
# thickness class whose probability is tied with its neighbour's may flip under any rounding)
PACBED_TOL = {False: {"center_px": 0.05, "radius_rel": 0.002, "rotation_deg": 0.2, "thickness_nm": 1.0,
                      "tilt_mrad": 0.1},
              True: {"center_px": 0.5, "radius_rel": 0.01, "rotation_deg": 1.0, "thickness_nm": 2.0,
                     "tilt_mrad": 0.25}}
PACBED_FRACTION = {False: 0.95, True: 0.9}
# `atoms find`: (largest position difference of columns matched within 0.5 px [px], smallest
# fraction of columns matched)
ATOM_TOL = {False: (0.05, 0.99), True: (0.25, 0.97)}
PACBED_BATCHES = {False: (1, 2, 63, 64, 256, 300), True: (1, 7, 300)}  # by --quick
ATOM_SIZES = {False: ((16, 16), (64, 64), (200, 120), (256, 256), (512, 512), (1024, 1024)),
              True: ((16, 16), (24, 200), (64, 64), (256, 256))}
NOT_RUN = ("not run: engine builds with FP16 off and on, cache hits, TensorRT against ONNX Runtime on random "
           "and recorded inputs, the profile refusal, both commands on TensorRT, timings")
KV, ALPHA = 200.0, 13.6  # the shipped demo library's setting: the real PACBED inputs


class Report:
    """One line per check: PASS, FAIL or SKIP with the reason; counts for the exit status."""

    def __init__(self):
        self.failed = self.passed = self.skipped = 0

    def check(self, name: str, ok: bool, detail: str = "") -> bool:
        self.passed += bool(ok)
        self.failed += not ok
        print(f"{'PASS' if ok else 'FAIL'} {name}{': ' + detail if detail else ''}", flush=True)
        return ok

    def skip(self, name: str, reason: str) -> None:
        self.skipped += 1
        print(f"SKIP {name}: {reason}", flush=True)

    @contextlib.contextmanager
    def guard(self, name: str):
        """A check whose exception is a failure of that check, not the end of the run."""
        try:
            yield
        except Exception as exc:  # noqa: BLE001
            self.check(name, False, f"{type(exc).__name__}: {exc}")


class Clock:
    """The run's time budget: later checks are skipped, with the reason, once it is spent."""

    def __init__(self, budget_s: float):
        self.t0, self.budget_s = time.perf_counter(), budget_s

    def used(self) -> float:
        return time.perf_counter() - self.t0

    def left(self, share: float = 1.0) -> bool:
        return self.used() < share * self.budget_s


# -- reference inputs ----------------------------------------------------------------------------
def pacbed_stack(n: int, rng) -> np.ndarray:
    """Raw PACBED frames from the shipped demo library (multislice, 13.6 mrad), as a detector
    records them: 128² frames, disk radius 30 px off-centre, rotated 17°, Poisson noise."""
    from scipy import ndimage

    from stemlive.simulate.library import PacbedLibrary
    from stemlive.simulate.scan_cli import SHIPPED_LIBRARY

    lib = PacbedLibrary.load(SHIPPED_LIBRARY)
    alpha_px = lib.alpha_mrad / lib.mrad_per_px
    tilts = [(0.0, 0.0), (1.5, 0.0), (0.0, -1.5), (1.5, 1.5)]
    combos = [(t, tl) for t in lib.thickness_nm[::2] for tl in tilts]
    frames = []
    for i in np.linspace(0, len(combos) - 1, n).astype(int):
        p = lib.pattern(*combos[i])
        zoom, c, rot = 30.0 / alpha_px, (p.shape[0] - 1) / 2, np.deg2rad(17.0)
        yy, xx = np.indices((128, 128), dtype=float)
        dy, dx = (yy - 60.0) / zoom, (xx - 66.0) / zoom
        img = ndimage.map_coordinates(p, [c + np.cos(rot) * dy - np.sin(rot) * dx,
                                          c + np.sin(rot) * dy + np.cos(rot) * dx], order=1, mode="constant")
        frames.append(rng.poisson(img / img.max() * 8000).astype(np.uint16))
    return np.stack(frames)


def lattice_image(n: int, contrast: str, rng, sampling_A: float = 0.15) -> np.ndarray:
    """SrTiO3 [001] in the column picture at ``sampling_A``: HAADF shows Sr (bright) and Ti-O
    columns, ABF all three (O included) as dips on a bright background; Poisson noise."""
    a = 3.905 / sampling_A
    rr, cc = np.indices((n, n), dtype=float)
    img = np.zeros((n, n))
    sites = [((0.0, 0.0), 1.0), ((0.5, 0.5), 0.55)] + ([((0.5, 0.0), 0.3), ((0.0, 0.5), 0.3)] if contrast == "abf" else [])
    sigma = 0.45 / sampling_A
    for (fr, fc), weight in sites:
        for r0 in np.arange(fr * a + 3.3, n, a):
            for c0 in np.arange(fc * a + 2.1, n, a):
                img += weight * np.exp(-((rr - r0) ** 2 + (cc - c0) ** 2) / (2 * sigma ** 2))
    img = 1.0 - 0.3 * img if contrast == "abf" else 0.05 + img
    return rng.poisson(img / img.max() * 400).astype(np.float32)


class Recorder:
    """Stands in for an analyser's backend and keeps every batch it is sent: the real inputs."""

    def __init__(self, backend):
        self.backend, self.batches = backend, []

    def __call__(self, batch):
        self.batches.append(np.array(batch, np.float32))
        return self.backend(batch)

    def __getattr__(self, name):
        return getattr(self.backend, name)


def stemlive(argv: list[str]) -> tuple[int, str]:
    """The ``stemlive`` command in this process (the backends' modules are already imported)."""
    from stemlive.live.cli import main

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
        code = main(argv)
    return code, buf.getvalue()


# -- checks that need no GPU ---------------------------------------------------------------------
def check_cards(report: Report, cards) -> None:
    with report.guard("cards"):
        for card in cards:
            verify(card, onnx_metadata(card.onnx_path))
        report.check("cards", True, f"{len(cards)} models match their cards (sha256, card id and contract in the file)")


def check_onnxruntime(report: Report, cards, rng) -> None:
    for card in cards:
        with report.guard(f"onnxruntime {card.id}"):
            be = OnnxRuntimeBackend.load(card.onnx_path)
            shape = (2,) + tuple(64 if d is None else d for d in be.input_shape)
            out = be(rng.normal(size=shape).astype(np.float32))
            ok = be.metadata() == onnx_metadata(card.onnx_path) and set(out) == set(card.data["outputs"]) \
                and all(np.isfinite(v).all() and len(v) == 2 for v in out.values())
            report.check(f"onnxruntime {card.id}", ok, f"outputs {', '.join(f'{k} {v.shape}' for k, v in out.items())}")


def check_settings(report: Report, cards) -> None:
    print(f"{'model':56s} {'fp16':>4s} {'batch':>11s} {'edges (min/opt/max)':>20s}")
    for card in cards:
        s = trtb.settings_for_task(card.task)
        print(f"{card.id:56s} {'on' if s.fp16 else 'off':>4s} {s.min_batch:>3d}-{s.max_batch:<7d} "
              f"{s.min_edge:>6d}/{s.opt_edge}/{s.max_edge}")
        if card.task.startswith("atoms-"):
            ok = s.min_edge <= MIN_WORK_SIDE and s.opt_edge == TILE and s.max_edge >= TILE
            report.check(f"settings {card.id}", ok, f"profile {s.min_edge}-{s.max_edge} px covers the finder's "
                                                    f"{MIN_WORK_SIDE}-{TILE} px inputs, tuned for {TILE}")


def run_cli_onnxruntime(report: Report, work: Path, timings: dict) -> dict:
    """Both commands on ONNX Runtime: the reference results (and the recorded network inputs)."""
    ref = {}
    code, out = timed(timings, "pacbed analyze onnxruntime", stemlive, pacbed_argv(work, "onnxruntime"))
    if report.check("pacbed analyze (onnxruntime)", code == 0, out.strip().splitlines()[-1] if out.strip() else ""):
        ref["pacbed"] = json.loads((work / "pacbed-onnxruntime.json").read_text())
    for contrast in ("haadf", "abf"):
        code, out = timed(timings, f"atoms find {contrast} onnxruntime", stemlive,
                          atoms_argv(work, contrast, "onnxruntime"))
        if report.check(f"atoms find {contrast} (onnxruntime)", code == 0, out.strip().splitlines()[-1]):
            ref[f"atoms-{contrast}"] = read_atoms(work / f"atoms-{contrast}-onnxruntime.csv")
    return ref


def record_real_inputs(inputs: dict) -> dict[str, list[np.ndarray]]:
    """The batches the analysers send their networks for the reference inputs, by model file."""
    from stemlive.models.atom_analysis import AtomFinder
    from stemlive.models.pacbed_analysis import PacbedAnalyzer

    an = PacbedAnalyzer.for_acquisition(KV, ALPHA, backend="onnxruntime")
    an.align, an.thickness_tilt = Recorder(an.align), Recorder(an.thickness_tilt)
    an.analyze(inputs["pacbed"])
    real = {an.cards[0].onnx_path.name: an.align.batches, an.cards[1].onnx_path.name: an.thickness_tilt.batches}
    for contrast in ("haadf", "abf"):
        finder = AtomFinder.shipped(contrast, backend="onnxruntime")
        finder.backend = Recorder(finder.backend)
        finder.find(inputs[contrast], 0.15)
        real[finder.card.onnx_path.name] = finder.backend.batches
    return real


def pacbed_argv(work: Path, backend: str, tag: str = "") -> list[str]:
    """`stemlive pacbed analyze` of the reference stack; --overwrite: the GPU part reruns it."""
    return ["pacbed", "analyze", str(work / "pacbed.npy"), "--alpha-mrad", str(ALPHA), "--kv", str(KV),
            "--out", str(work / f"pacbed-{backend}{tag}.json"), "--backend", backend, "--overwrite"]


def atoms_argv(work: Path, contrast: str, backend: str, tag: str = "") -> list[str]:
    return ["atoms", "find", str(work / f"{contrast}.npy"), "--contrast", contrast, "--sampling-A-per-px", "0.15",
            "--out", str(work / f"atoms-{contrast}-{backend}{tag}.csv"), "--backend", backend, "--overwrite"]


def read_atoms(path: Path) -> np.ndarray:
    from stemlive.models.atoms_cli import read_csv

    d = read_csv(path)
    return np.column_stack([d["row_px"], d["col_px"]]) if len(d["row_px"]) else np.zeros((0, 2))


def timed(timings: dict, key: str, fn, *args):
    t0 = time.perf_counter()
    result = fn(*args)
    timings[key] = time.perf_counter() - t0
    return result


# -- comparisons ---------------------------------------------------------------------------------
def network_error(got: dict, want: dict) -> float:
    """Largest |Δ| over all outputs, each in units of max(1, max |reference|)."""
    if set(got) != set(want):
        return float("inf")
    return max(float(np.max(np.abs(got[k] - want[k]))) / max(1.0, float(np.max(np.abs(want[k])))) for k in want)


def compare_pacbed(got: dict, want: dict, fp16: bool) -> tuple[bool, str]:
    tol, need = PACBED_TOL[fp16], PACBED_FRACTION[fp16]
    pairs = list(zip(got["patterns"], want["patterns"]))
    same_errors = all((a.get("error") is None) == (b.get("error") is None) for a, b in pairs)
    good = [(a, b) for a, b in pairs if a.get("error") is None and b.get("error") is None]
    if not good or len(got["patterns"]) != len(want["patterns"]):
        return False, "no comparable patterns"
    diffs = {
        "center_px": [np.hypot(*np.subtract(a["center_px"], b["center_px"])) for a, b in good],
        "radius_rel": [abs(a["radius_px"] / b["radius_px"] - 1) for a, b in good],
        "rotation_deg": [abs((a["rotation_deg"] - b["rotation_deg"] + 45) % 90 - 45) for a, b in good],
        "thickness_nm": [abs(a["thickness_nm"] - b["thickness_nm"]) for a, b in good],
        "tilt_mrad": [float(np.max(np.abs(np.subtract(a["tilt_mrad"], b["tilt_mrad"])))) for a, b in good],
    }
    within = {k: float(np.mean(np.asarray(v) <= tol[k])) for k, v in diffs.items()}
    ok = same_errors and all(f >= need for f in within.values())
    detail = ", ".join(f"{k} ≤{tol[k]:g} {100 * within[k]:.0f}% (max {max(diffs[k]):.3g})" for k in diffs)
    return ok, f"{len(good)} patterns; {detail}; need ≥ {100 * need:.0f}%"


def compare_atoms(got: np.ndarray, want: np.ndarray, fp16: bool) -> tuple[bool, str]:
    from scipy.spatial import cKDTree

    max_px, need = ATOM_TOL[fp16]
    if len(want) == 0 or len(got) == 0:
        return len(got) == len(want), f"{len(got)} vs {len(want)} columns"
    dist, _ = cKDTree(want).query(got, distance_upper_bound=0.5)
    matched = dist[np.isfinite(dist)]
    frac = len(matched) / max(len(got), len(want))
    worst = float(matched.max()) if len(matched) else float("inf")
    return frac >= need and worst <= max_px, \
        f"{len(got)} vs {len(want)} columns, {100 * frac:.1f}% matched (≥ {100 * need:.0f}%), max shift {worst:.3g} px (≤ {max_px})"


# -- the TensorRT part ---------------------------------------------------------------------------
def open_platform(report: Report, args) -> trtb.GpuRuntime | None:
    """The GPU runtime, or None with the reason printed as SKIP (a crash would be a FAIL)."""
    if args.cpu_only:
        report.skip("tensorrt", f"--cpu-only given ({NOT_RUN})")
        return None
    try:
        rt = trtb.open_runtime(args.device)
    except BackendUnavailable as exc:
        report.skip("tensorrt", f"{exc} ({NOT_RUN})")
        return None
    except Exception as exc:  # noqa: BLE001 -- a GPU that is there but does not come up is a failure
        report.check("tensorrt runtime", False, f"{type(exc).__name__}: {exc}")
        return None
    p = rt.platform
    print(f"GPU {p.gpu.index}: {p.gpu.name}, compute capability {p.gpu.compute_capability[0]}."
          f"{p.gpu.compute_capability[1]}, driver for CUDA {trtb.cuda_version(p.gpu.driver_cuda)}; "
          f"TensorRT {p.tensorrt} (CUDA {p.cuda_major})", flush=True)
    return rt


def build_all(report: Report, cards, args, clock: Clock, timings: dict) -> dict:
    """Every card's engine, FP16 off then on: built once, then loaded again from the cache."""
    engines = {}
    for fp16 in (False, True):
        for card in cards:
            name = f"{card.id} fp16 {'on' if fp16 else 'off'}"
            if not clock.left(0.6):
                report.skip(f"build {name}", f"time budget: {clock.used():.0f} s of {clock.budget_s:.0f} s used")
                continue
            with report.guard(f"build {name}"):
                s = trtb.settings_for_task(card.task, trtb.EngineSettings(fp16=fp16))
                be, t_build = timed_load(card, s, args.device)
                built = be.built_now
                be.close()
                be, t_load = timed_load(card, s, args.device)
                timings[("build", card.id, fp16)], timings[("load", card.id, fp16)] = t_build, t_load
                report.check(f"{name}: second load hit the cache", built and not be.built_now,
                             f"build {t_build:.1f} s, cached load {1e3 * t_load:.0f} ms")
                engines[(card.id, fp16)] = be
    return engines


def timed_load(card, settings, device: int):
    """A load with exactly ``settings`` (the manifest ignored) and how long it took."""
    t0 = time.perf_counter()
    be = trtb.TensorRTBackend.load(card.onnx_path, settings, device=device, use_manifest=False)
    return be, time.perf_counter() - t0


def compare_random(report: Report, card, be, ref, fp16: bool, quick: bool, rng) -> None:
    tol = NETWORK_TOL[fp16]
    name = f"{card.id} fp16 {'on' if fp16 else 'off'}"
    if card.task.startswith("atoms-"):
        shapes = [(1, 1) + hw for hw in ATOM_SIZES[quick]] + [(5, 1, 32, 32)]  # 5 > the profile's 4: split
        what = f"images {ATOM_SIZES[quick][0][0]}² to {max(max(s) for s in ATOM_SIZES[quick])} px, a batch of 5"
    else:
        shapes = [(n,) + tuple(be.input_shape) for n in PACBED_BATCHES[quick]]
        what = f"batches {min(PACBED_BATCHES[quick])}-{max(PACBED_BATCHES[quick])}"
    errors = []
    for shape in shapes:
        x = rng.normal(size=shape).astype(np.float32)
        errors.append(network_error(be(x), ref(x)))
    report.check(f"{name}: random {what}", max(errors) <= tol, f"max error {max(errors):.2g} (≤ {tol:g})")
    if card.task.startswith("atoms-"):
        raised, lo, hi = [], be.profile[0][2], be.profile[2][2]
        outside = [(1, 1, lo // 2, 64), (1, 1, hi + 8, 64)]
        for shape in outside:
            try:
                be(np.zeros(shape, np.float32))
                raised.append(False)
            except ValueError:
                raised.append(True)
        report.check(f"{name}: an input outside the profile raises", all(raised),
                     " and ".join(f"{h}×{w} px" for _, _, h, w in outside))


def compare_real(report: Report, card, be, ref, fp16: bool, real: dict) -> None:
    batches = real.get(card.onnx_path.name)
    name = f"{card.id} fp16 {'on' if fp16 else 'off'}"
    if not batches:
        report.skip(f"{name}: real inputs", f"no recorded inputs (the reference inputs are {ALPHA} mrad)")
        return
    err = max(network_error(be(b), ref(b)) for b in batches)
    tol = NETWORK_TOL[fp16]
    report.check(f"{name}: real inputs ({len(batches)} batch{'es' * (len(batches) != 1)} the analyser sent)", err <= tol,
                 f"max error {err:.2g} (≤ {tol:g})")


def compare_end_to_end(report: Report, cards, engines: dict, work: Path, ref: dict, args, timings: dict) -> None:
    """Both commands with ``--backend tensorrt``, FP16 off then on (the manifest says which)."""
    if args.device != 0:
        report.skip("end to end", "the commands load on device 0; run with --device 0")
        return
    used = [c for c in cards if c.task.startswith("atoms-") or (c.task.startswith("pacbed-") and abs(c.alpha_mrad - ALPHA) < 0.1)]
    for fp16 in (False, True):
        tag = "-fp16" if fp16 else ""
        if not all((c.id, fp16) in engines for c in used):
            report.skip(f"end to end fp16 {'on' if fp16 else 'off'}", "engines missing (see above)")
            continue
        for c in used:  # the manifest makes the commands load these engines
            trtb.export_engine(c.onnx_path, engines[(c.id, fp16)].settings)
        precision = f"fp16 {'on' if fp16 else 'off'}"
        if "pacbed" in ref:
            code, out = timed(timings, f"pacbed analyze tensorrt{tag}", stemlive, pacbed_argv(work, "tensorrt", tag))
            ok, detail = (compare_pacbed(json.loads((work / f"pacbed-tensorrt{tag}.json").read_text()),
                                         ref["pacbed"], fp16) if code == 0 else (False, out[-500:]))
            report.check(f"pacbed analyze tensorrt {precision} vs onnxruntime", ok, detail)
        for contrast in ("haadf", "abf"):
            if f"atoms-{contrast}" not in ref:
                continue
            code, out = timed(timings, f"atoms find {contrast} tensorrt{tag}", stemlive,
                              atoms_argv(work, contrast, "tensorrt", tag))
            ok, detail = (compare_atoms(read_atoms(work / f"atoms-{contrast}-tensorrt{tag}.csv"),
                                        ref[f"atoms-{contrast}"], fp16) if code == 0 else (False, out[-500:]))
            report.check(f"atoms find {contrast} tensorrt {precision} vs onnxruntime", ok, detail)


def throughput(be, x: np.ndarray, repeats: int) -> float:
    """Items (batch entries) per second, median of ``repeats`` runs after one warm-up."""
    be(x)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        be(x)
        times.append(time.perf_counter() - t0)
    return len(x) / float(np.median(times))


def print_timings(cards, engines: dict, refs: dict, timings: dict, quick: bool, rng) -> None:
    print("\ntimings (build and cached load of the engine; throughput after a warm-up, median)")
    print(f"{'model':56s} {'fp16':>4s} {'build s':>8s} {'load ms':>8s} {'onnxruntime':>16s} {'tensorrt':>16s}")
    for (cid, fp16), be in sorted(engines.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        card = next(c for c in cards if c.id == cid)
        if card.task.startswith("atoms-"):
            edge = 256 if quick else 512
            x, unit, scale = rng.normal(size=(1, 1, edge, edge)).astype(np.float32), "MPix/s", edge * edge / 1e6
        else:
            x, unit, scale = rng.normal(size=(256,) + tuple(be.input_shape)).astype(np.float32), "pat/s", 1.0
        t_ort = throughput(refs[cid], x, 2 if quick else 3) * scale
        t_trt = throughput(be, x, 3 if quick else 10) * scale
        print(f"{cid:56s} {'on' if fp16 else 'off':>4s} {timings[('build', cid, fp16)]:8.1f} "
              f"{1e3 * timings[('load', cid, fp16)]:8.0f} {t_ort:10.3g} {unit:5s} {t_trt:10.3g} {unit:5s}")
    for key, value in timings.items():
        if isinstance(key, str):
            print(f"{key:56s} {value:8.1f} s")


def gpu_checks(report: Report, cards, args, clock: Clock, work: Path, real: dict, ref: dict, timings: dict,
               rng) -> None:
    """Builds, comparisons, both commands and timings; every engine closed at the end."""
    engines = build_all(report, cards, args, clock, timings)
    refs = {c.id: OnnxRuntimeBackend.load(c.onnx_path) for c in cards}
    try:
        for (cid, fp16), be in engines.items():
            card = next(c for c in cards if c.id == cid)
            if not clock.left(0.85):
                report.skip(f"{cid} fp16 {'on' if fp16 else 'off'}: comparisons", "time budget spent")
                continue
            with report.guard(f"{cid} fp16 {'on' if fp16 else 'off'}: comparisons"):
                compare_random(report, card, be, refs[cid], fp16, args.quick, rng)
                compare_real(report, card, be, refs[cid], fp16, real)
        if clock.left(0.9):
            with report.guard("end to end"):
                compare_end_to_end(report, cards, engines, work, ref, args, timings)
        else:
            report.skip("end to end", "time budget spent")
        print_timings(cards, engines, refs, timings, args.quick, rng)
    finally:
        for be in engines.values():
            be.close()


# -- main --------------------------------------------------------------------------------------
def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cpu-only", action="store_true", help="run only the checks that need no GPU")
    ap.add_argument("--quick", action="store_true", help="fewer and smaller inputs (a minute on a CPU)")
    ap.add_argument("--device", type=int, default=0, help="CUDA device index")
    ap.add_argument("--budget-s", type=float, default=270.0, help="time budget; later checks skip once spent")
    ap.add_argument("--keep", type=Path, default=None, help="keep engines, inputs and results in this folder")
    return ap.parse_args(argv)


def prepare_inputs(work: Path, quick: bool, rng) -> dict:
    """The reference inputs, in memory and as the .npy files both commands read."""
    inputs = {"pacbed": pacbed_stack(8 if quick else 48, rng)}
    np.save(work / "pacbed.npy", inputs["pacbed"])
    for contrast in ("haadf", "abf"):
        inputs[contrast] = lattice_image(128 if quick else 384, contrast, rng)
        np.save(work / f"{contrast}.npy", inputs[contrast])
    return inputs


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    report, clock, rng, timings = Report(), Clock(args.budget_s), np.random.default_rng(0), {}
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="stemlive-gpu-smoke-"))
    work.mkdir(parents=True, exist_ok=True)
    saved_cache = os.environ.get("STEMLIVE_CACHE")
    os.environ["STEMLIVE_CACHE"] = str(work / "cache")  # this run's engines only: every build is a first
    try:
        cards = find_cards(SHIPPED_DIR)
        check_cards(report, cards)
        check_onnxruntime(report, cards, rng)
        check_settings(report, cards)
        inputs = prepare_inputs(work, args.quick, rng)
        ref = run_cli_onnxruntime(report, work, timings)
        rt = open_platform(report, args)
        if rt is not None:
            real = record_real_inputs(inputs)
            gpu_checks(report, cards, args, clock, work, real, ref, timings, rng)
    finally:
        if saved_cache is None:
            os.environ.pop("STEMLIVE_CACHE", None)
        else:
            os.environ["STEMLIVE_CACHE"] = saved_cache
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    print(f"\n{report.passed} passed, {report.failed} failed, {report.skipped} skipped in {clock.used():.0f} s")
    return 0 if report.failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
