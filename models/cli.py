"""`stemlive pacbed analyze` and `stemlive export engines`."""
from __future__ import annotations

import json
import math
import sys
import tempfile
from pathlib import Path

import numpy as np

METHODS = ("check", "network", "lsf", "hybrid")
JSON_SCHEMA = 2  # 2: per pattern fit_quality, thickness_alt_nm, alt_delta_chi2, method
EXIT_ALL, EXIT_NONE, EXIT_USAGE, EXIT_SOME = 0, 1, 2, 3


def add_parsers(sub) -> None:
    p = sub.add_parser("pacbed", help="analyse PACBED patterns (centre, size, rotation, thickness, tilt)")
    psub = p.add_subparsers(dest="what", required=True)
    a = psub.add_parser("analyze", help="analyse the patterns of a file and write OUT.json",
                        description="INPUT: .npy (H×W or N×H×W, any dtype), TIFF (single or stack), .dm3/.dm4, PNG/JPEG (greyscale). "
                                    "Exit status: 0 all analysed, 3 some failed, 1 none, 2 usage error.")
    a.add_argument("input", type=Path, metavar="INPUT")
    a.add_argument("--alpha-mrad", type=float, required=True, help="probe convergence semi-angle [mrad]")
    a.add_argument("--kv", type=float, required=True, help="acceleration voltage [kV]")
    a.add_argument("--out", type=Path, required=True, help="result JSON (never one of the inputs)")
    a.add_argument("--overwrite", action="store_true",
                   help="replace an existing --out (only once the analysis succeeded)")
    a.add_argument("--method", choices=METHODS, default=None,
                   help="check (the default where the setting's check data exists, else network with a "
                        "warning): the networks, then a re-fit against the simulated library (fit_quality, "
                        "runner-up thickness, flags ambiguous / model-mismatch); network: the networks alone; "
                        "lsf: least-squares library search; hybrid: network, then LSF within ±3 nm and ±1 mrad "
                        "(lsf and hybrid need --library)")
    a.add_argument("--library", type=Path, default=None, help="PACBED library (HDF5) for lsf and hybrid")
    a.add_argument("--models", type=Path, default=None, help="directory of model cards (default: the shipped models)")
    a.add_argument("--backend", choices=["auto", "onnxruntime", "tensorrt"], default="auto")
    a.set_defaults(func=run_analyze)

    from argparse import BooleanOptionalAction

    e = sub.add_parser("export", help="build GPU engines for the shipped models")
    esub = e.add_subparsers(dest="what", required=True)
    en = esub.add_parser("engines", help="build (once, on the target GPU) the TensorRT engine of every model",
                         description="Needs a CUDA GPU and the tensorrt extra. Engines are cached by ONNX sha256, "
                                     "build settings, TensorRT version, CUDA major version and GPU; a rebuilt model "
                                     "gets a new engine. The settings used are recorded in a manifest beside each "
                                     "engine, and every later load of that model on that GPU uses them (no rebuild "
                                     "after a detector is armed). Exit status: 0 all built or cached, 3 some "
                                     "failed, 1 none (e.g. no GPU).")
    en.add_argument("--models", type=Path, default=None, help="directory of model cards (default: shipped)")
    en.add_argument("--fp16", action=BooleanOptionalAction, default=None,
                    help="allow FP16 kernels (default: off, results as ONNX Runtime's to FP32/TF32 rounding)")
    en.add_argument("--max-batch", type=int, default=None,
                    help="largest PACBED batch the engine takes (default 256; larger batches are split); the "
                         "atom networks take whole images, up to 4 at a time")
    en.add_argument("--device", type=int, default=0, help="CUDA device index (default 0)")
    en.set_defaults(func=run_export_engines)


def prepare_output(out: Path, inputs, overwrite: bool, what: str = "--out") -> Path:
    """The project's output rule (live/outputs.py), then a probe that the file can be written, all
    before any model is loaded or any data analysed: a refusal costs nothing and writes nothing."""
    from ..live.outputs import check_output

    out = check_output(out, inputs, overwrite=overwrite, what=what)
    where = out.absolute().parent
    while not where.exists():  # replacing() creates the missing folders below it
        where = where.parent
    try:
        with tempfile.TemporaryFile(dir=where):
            pass
    except OSError as exc:
        raise ValueError(f"{what} {out}: cannot write in {where} ({exc.strerror or exc})") from None
    return out


def strict_json(value):
    """``value`` with every non-finite float as None and numpy scalars as Python numbers: OUT.json
    must parse with any JSON reader (NaN and Infinity are not JSON)."""
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def check_frames(patterns, path: Path) -> None:
    """Frames too small for any zero disk are a property of the file: a usage error, not N failures."""
    from .coarse_align import MIN_PATTERN_PX

    h, w = patterns.shape[1:]
    if min(h, w) < MIN_PATTERN_PX:
        raise ValueError(f"{path}: patterns of {h}×{w} px are too small to hold a zero disk "
                         f"(need ≥ {MIN_PATTERN_PX}×{MIN_PATTERN_PX})")


def run_analyze(args) -> int:
    from ..live.outputs import replacing
    from .cards import SHIPPED_DIR
    from .pacbed_analysis import PacbedAnalyzer
    from .readers import read_patterns

    if args.method in ("lsf", "hybrid") and args.library is None:
        print(f"stemlive pacbed analyze: error: --method {args.method} needs --library PATH", file=sys.stderr)
        return EXIT_USAGE
    prepare_output(args.out, [args.input, args.library], args.overwrite)
    patterns = read_patterns(args.input)
    check_frames(patterns, args.input)
    models_dir = args.models or SHIPPED_DIR
    models: list[dict] = []
    method = args.method
    checker = None
    if method == "lsf":
        from .lsf import LsfAnalyzer

        results = LsfAnalyzer.from_file(args.library, args.kv, args.alpha_mrad).analyze(patterns)
    else:
        analyzer = PacbedAnalyzer.for_acquisition(args.kv, args.alpha_mrad, models_dir, backend=args.backend)
        models = [{k: c.data[k] for k in ("id", "task", "onnx_file", "onnx_sha256")} for c in analyzer.cards]
        if method in (None, "check", "network"):
            from .checked_analysis import open_checker

            # before any analysis: a mismatched check-data file is refused at no cost
            checker = open_checker(method, args.kv, args.alpha_mrad, models_dir)
            method = "check" if checker is not None else "network"
        results = analyzer.analyze(patterns)
        if method == "hybrid":
            from .lsf import LsfAnalyzer

            results = LsfAnalyzer.from_file(args.library, args.kv, args.alpha_mrad).refine(patterns, results)
    from .checked_analysis import Checked, check_all

    if method in ("check", "network"):
        checked = check_all(checker, patterns, results, progress=sys.stderr.isatty())
    else:
        checked = [Checked(r, method) for r in results]
    doc = {"schema": JSON_SCHEMA, "method": method, "input": str(args.input), "models": models,
           "patterns": [c.to_json() for c in checked]}
    if method in ("lsf", "hybrid"):
        doc["library"] = str(args.library)
    if checker is not None:
        doc["check_data"] = checker.info
    results = [c.estimate for c in checked]
    text = json.dumps(strict_json(doc), indent=1, allow_nan=False)
    with replacing(args.out) as tmp:
        tmp.write_text(text)
    failed = [i for i, r in enumerate(results) if r.error]
    for i in failed[:10]:
        print(f"pattern {i}: {results[i].error}", file=sys.stderr)
    for i in [i for i, c in enumerate(checked) if c.check_error][:10]:
        print(f"pattern {i}: library check failed ({checked[i].check_error}); the networks' estimate is kept",
              file=sys.stderr)
    n_checked = sum(c.method == "check" for c in checked)
    how = f" ({n_checked} checked against the library)" if checker is not None else ""
    print(f"{len(results) - len(failed)} of {len(results)} patterns analysed{how} -> {args.out}")
    if not failed:
        return EXIT_ALL
    return EXIT_NONE if len(failed) == len(results) else EXIT_SOME


def run_export_engines(args) -> int:
    """Build or find every card's engine with the settings runtime loads will use, and record
    them in the engine manifest; a card that fails does not stop the others."""
    from dataclasses import replace

    from .backends.base import BackendUnavailable
    from .backends.tensorrt import EngineSettings, export_engine, settings_for_task
    from .cards import SHIPPED_DIR, find_cards, onnx_metadata, verify

    base = EngineSettings()
    if args.max_batch is not None:
        if args.max_batch < 1:
            print(f"stemlive export engines: error: --max-batch must be ≥ 1, got {args.max_batch}", file=sys.stderr)
            return EXIT_USAGE
        base = base.with_max_batch(args.max_batch)
    if args.fp16 is not None:
        base = replace(base, fp16=args.fp16)
    cards = find_cards(args.models or SHIPPED_DIR)
    if not cards:
        print(f"stemlive export engines: no model cards in {args.models or SHIPPED_DIR}", file=sys.stderr)
        return EXIT_NONE
    failed = 0
    for card in cards:
        settings = settings_for_task(card.task, base)
        try:
            onnx_path = verify(card, onnx_metadata(card.onnx_path))
            path, built = export_engine(onnx_path, settings, device=args.device)
        except BackendUnavailable as exc:
            print(f"stemlive export engines: {exc}; engines are built on the GPU that runs them", file=sys.stderr)
            return EXIT_NONE
        except Exception as exc:  # noqa: BLE001 -- one model's parse/build error must not hide the others
            failed += 1
            print(f"{card.id}: failed: {type(exc).__name__}: {exc}", file=sys.stderr)
            continue
        print(f"{card.id}: {'built' if built else 'cached'} {path} "
              f"(fp16 {'on' if settings.fp16 else 'off'}, batch ≤ {settings.max_batch})")
    if not failed:
        return EXIT_ALL
    return EXIT_NONE if failed == len(cards) else EXIT_SOME
