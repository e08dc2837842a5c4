"""The network proposes, the library checks: the check's data for an acquisition, and the
networks' estimates checked, for every command (`pacbed analyze`, `live`, `replay`, `demo`,
`reanalyse`).

**The check's data** for a setting is a compact library (`compact_library.py`: the simulated
library in the canonical frame, compressed by principal components) beside the thickness/tilt
model card of that setting, named after it: ``<card>_check.h5``, e.g.
``models/shipped/pacbed_SrTiO3_001_200kV_13.6mrad_check.h5`` (rank 384, every tilt of the
training library, basis and coefficients float16).  :func:`check_data_path` finds it for
(kV, α) as the cards are found; a file that holds another kV or α than asked, another canonical
frame, or is no compact library is refused by name (:class:`CheckDataMismatch`).  A setting
without the file (19.1 mrad until its library is built) falls back to the networks alone with
a one-line warning naming the command that builds it, and its results say method "network".

**Methods**: ``check`` (the default where the data exists): the networks' estimate, then
`LibraryCheck` re-fits the pattern against the library; ``network``: the networks alone (raw
speed).  The check applies to estimates without an error and with a finite thickness; others
(errors, ``partial-field``) pass through as the networks gave them, method "network".
"""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .cards import ALPHA_TOLERANCE, KV_TOLERANCE, SHIPPED_DIR, ModelCard, find_cards, select, sha256_of
from .pacbed_analysis import THICKNESS_TILT_TASK, PacbedEstimate

METHODS = ("check", "network")
CHECK_SUFFIX = "_check.h5"
SHIPPED_RANK = 384  # principal components of the shipped check data (`make check-data`)
FIT_FIELDS = ("fit_quality", "thickness_alt_nm", "alt_delta_chi2")


class CheckDataMismatch(ValueError):
    """A check-data file that is not for the acquisition it was found for."""


def warn(message: str) -> None:
    """One line on stderr (the check's fall-back is worth a line, not a traceback)."""
    print(f"stemlive: warning: {message}", file=sys.stderr, flush=True)


def _card(kv: float, alpha_mrad: float, models_dir: str | Path | None) -> ModelCard:
    return select(find_cards(models_dir or SHIPPED_DIR), THICKNESS_TILT_TASK, kv, alpha_mrad)


def check_data_path(kv: float, alpha_mrad: float, models_dir: str | Path | None = None) -> Path:
    """Where the check data for this acquisition is (or belongs): beside the thickness/tilt card
    chosen for (kV, α), named after it.  A ValueError listing the models when no card fits."""
    card = _card(kv, alpha_mrad, models_dir)
    return card.path.with_name(card.path.stem + CHECK_SUFFIX)


def build_command(kv: float, alpha_mrad: float, models_dir: str | Path | None = None) -> str:
    """The command that builds the check data for this acquisition from its simulated library."""
    from ..simulate.cli import default_cache_dir

    card = _card(kv, alpha_mrad, models_dir)
    lib = card.data.get("training", {}).get("library") or f"{card.path.stem}.h5"
    src = default_cache_dir() / "libraries" / Path(lib).name
    return (f"stemlive simulate compact-library {src} --rank {SHIPPED_RANK} "
            f"--out {card.path.with_name(card.path.stem + CHECK_SUFFIX)}")


def load_check_data(path: str | Path, kv: float, alpha_mrad: float):
    """The `CompactLibrary` in ``path``, refused by name unless it is for this kV, α and canonical frame."""
    from .compact_library import CompactLibrary

    path = Path(path)
    try:
        lib = CompactLibrary.load(path)
    except FileNotFoundError:
        raise
    except (ValueError, OSError, KeyError) as exc:
        raise CheckDataMismatch(f"check data {path} refused: {exc}") from None
    if abs(lib.kv - kv) > KV_TOLERANCE or abs(lib.alpha_mrad - alpha_mrad) > ALPHA_TOLERANCE * alpha_mrad:
        raise CheckDataMismatch(
            f"check data {path} refused: it holds a library for {lib.kv:g} kV, {lib.alpha_mrad:g} mrad, not "
            f"{kv:g} kV, {alpha_mrad:g} mrad (tolerance ±{KV_TOLERANCE:g} kV, ±{ALPHA_TOLERANCE:.0%}); rebuild it "
            f"with `{build_command(kv, alpha_mrad, path.parent)}`")
    return lib


def sigma_calibration_path(check_data: str | Path) -> Path:
    """Where the check's per-setting σ calibration lies: beside its check data."""
    from .cards import NOT_CARDS

    check_data = Path(check_data)
    return check_data.with_name(check_data.name.removesuffix(CHECK_SUFFIX) + NOT_CARDS[0])


def load_sigma_calibration(check_data: str | Path):
    """The σ calibration fitted for this check data (`SigmaCalibration`), or the defaults (fitted
    on 13.6 mrad) when none ships beside it; an unreadable file is refused by name."""
    from .pacbed_check import SigmaCalibration

    path = sigma_calibration_path(check_data)
    return SigmaCalibration.load(path) if path.exists() else SigmaCalibration()


def applies(est: PacbedEstimate | None) -> bool:
    """Whether the check has something to re-fit: an estimate without error, with a thickness."""
    return (est is not None and est.error is None and est.thickness_nm is not None
            and math.isfinite(est.thickness_nm) and est.center_px is not None and est.radius_px is not None)


@dataclass
class Checker:
    """The library check of one acquisition (build once per process: seconds to set up)."""

    check: object  # LibraryCheck
    path: Path
    info: dict

    @classmethod
    def open(cls, path: str | Path, kv: float, alpha_mrad: float) -> "Checker":
        from .pacbed_check import LibraryCheck

        path = Path(path)
        lib = load_check_data(path, kv, alpha_mrad)
        info = {"file": path.name, "sha256": sha256_of(path), "kv": lib.kv, "alpha_mrad": lib.alpha_mrad,
                "rank": int(lib.basis.shape[0]), "entries": int(np.prod(lib.coef.shape[:2])),
                "thickness_nm": [float(lib.thickness_nm.min()), float(lib.thickness_nm.max())],
                "source_sha256": lib.attrs.get("source_sha256")}
        sigma = load_sigma_calibration(path)
        info["sigma_calibration"] = sigma.fitted_on
        return cls(LibraryCheck(lib, sigma=sigma), path, info)

    def __call__(self, pattern: np.ndarray, est: PacbedEstimate):
        """The check's `CheckOutcome` for one raw pattern and its networks' estimate.

        The pattern goes to the check in units of its peak (float64 division, then float32, as
        it goes to the networks), so its intensity scale never matters (×3e38 would overflow the
        fit, ×1e-40 underflow it); the background comes back in the input's units."""
        from dataclasses import replace

        from .coarse_align import intensity_scale

        raw = np.asarray(pattern, np.float64)
        scale = intensity_scale(raw)
        bg = est.background
        est = replace(est, background=None if bg is None else bg / scale)
        out = self.check.check((raw / scale).astype(np.float32), est)
        if out.estimate.background is not None:
            out = replace(out, estimate=replace(out.estimate, background=out.estimate.background * scale))
        return out


def render_check(checker: Checker, pattern: np.ndarray, est: PacbedEstimate) -> dict[str, np.ndarray]:
    """`LibraryCheck.render` of a raw pattern (scaled as `Checker` scales it for the check): the
    canonical crop, the library's fitted model at the reading, their difference."""
    from .coarse_align import intensity_scale

    raw = np.asarray(pattern, np.float64)
    return checker.check.render((raw / intensity_scale(raw)).astype(np.float32), est)


def open_checker(method: str | None, kv: float, alpha_mrad: float,
                 models_dir: str | Path | None = None) -> Checker | None:
    """The checker a run uses, or None for the networks alone.

    ``method`` "network": None.  "check" or None (the default: check where the data exists):
    the check data for (kV, α); missing, a one-line warning naming the command that builds it,
    and None.  A file for another setting is refused (CheckDataMismatch)."""
    if method not in (None, *METHODS):
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if method == "network":
        return None
    path = check_data_path(kv, alpha_mrad, models_dir)
    if not path.exists():
        warn(f"no library-check data for {kv:g} kV, {alpha_mrad:g} mrad ({path.name} is not in {path.parent}): "
             f"the networks alone (method network); build it with `{build_command(kv, alpha_mrad, models_dir)}`")
        return None
    return Checker.open(path, kv, alpha_mrad)


@dataclass
class Checked:
    """One pattern's result: the estimate shown, how it was made, and the check's figures."""

    estimate: PacbedEstimate
    method: str  # "check" or "network" (or "lsf", "hybrid" from `pacbed analyze`)
    outcome: object | None = None  # CheckOutcome
    check_error: str | None = None

    def to_json(self) -> dict:
        """OUT.json schema 2: the estimate's fields (schema 1's, same meaning), then
        ``fit_quality``, ``thickness_alt_nm``, ``alt_delta_chi2`` (null without the check) and ``method``."""
        d = self.estimate.to_json()
        for k in FIT_FIELDS:
            v = None if self.outcome is None else float(getattr(self.outcome, k))
            d[k] = v if v is not None and math.isfinite(v) else None
        d["method"] = self.method
        if self.check_error:
            d["check_error"] = self.check_error
        return d


def check_one(checker: Checker | None, pattern: np.ndarray, est: PacbedEstimate) -> Checked:
    """The check of one pattern where it applies; an error inside the check keeps the networks'
    estimate (method network) and says why."""
    if checker is None or not applies(est):
        return Checked(est, "network")
    try:
        out = checker(pattern, est)
    except Exception as exc:  # noqa: BLE001 -- the networks' reading stands; the failure is reported
        return Checked(est, "network", check_error=f"{type(exc).__name__}: {exc}")
    return Checked(out.estimate, "check", out)


def check_all(checker: Checker | None, patterns, estimates: list[PacbedEstimate],
              progress: bool = False) -> list[Checked]:
    """:func:`check_one` for every pattern, in order (a progress bar on request)."""
    from tqdm import tqdm

    todo = sum(applies(e) for e in estimates) if checker is not None else 0
    bar = tqdm(total=todo, unit="pattern", desc="library check", disable=not (progress and todo > 1), file=sys.stderr)
    out = []
    try:
        for p, e in zip(patterns, estimates):
            out.append(check_one(checker, p, e))
            if out[-1].method == "check" or out[-1].check_error:
                bar.update()
    finally:
        bar.close()
    return out


FIT_IMAGES = ("observed", "model", "residual")


def block_fit(checker: Checker | None, pattern: np.ndarray, estimate: dict, no_checker: str = "") -> tuple[dict, dict]:
    """What the dashboard's PACBED panel shows beside a block's pattern: the library's best
    account of it at the block's checked reading (`render_check`), or why there is none.

    ``estimate``: the block's map values as plain numbers (the store's ``/maps`` fields at the
    block, ``method`` its METHOD_CODES value: only blocks the check read, code 2, are fitted: a
    network-only reading would show a fit the run never made).  ``no_checker``: the words for a
    run without a checker.  Returns (``fit`` header: ``available``, ``reason`` or the reading and
    ``fit_quality``, the canonical frame's ``alpha_px``; arrays ``observed``, ``model``,
    ``residual`` in the canonical frame (float32, NaN outside the fitted window))."""
    from . import canonical

    header = {"available": False, "alpha_px": float(canonical.ALPHA_PX), "frame": "canonical"}
    method = int(estimate.get("method") or 0)
    if checker is None:
        header["reason"] = no_checker or "no library check for this run"
        return header, {}
    if method == 0:
        header["reason"] = "this block has not been analysed yet"
        return header, {}
    if method != 2:
        header["reason"] = ("the library check has not read this block (it lags the networks, or does not "
                            "apply to this block: an error or a partial field); the networks' reading is shown")
        return header, {}

    def pair(key):
        v = estimate.get(key)
        return None if v is None or not all(x is not None and math.isfinite(x) for x in v) else tuple(map(float, v))

    def one(key):
        v = estimate.get(key)
        return float(v) if v is not None and math.isfinite(v) else None

    est = PacbedEstimate(center_px=pair("center_px"), radius_px=one("radius_px"), rotation_deg=one("rotation_deg"),
                         thickness_nm=one("thickness_nm"), tilt_crystal_mrad=pair("tilt_crystal_mrad"))
    try:
        shown = render_check(checker, pattern, est)
    except Exception as exc:  # noqa: BLE001 -- the panel says so; the pattern itself is still shown
        header["reason"] = f"the library fit could not be drawn: {type(exc).__name__}: {exc}"
        return header, {}
    header.update(available=True, thickness_nm=est.thickness_nm, tilt_crystal_mrad=list(est.tilt_crystal_mrad),
                  fit_quality=float(shown["fit_quality"]), library=checker.info.get("file", ""))
    return header, {k: np.asarray(shown[k], np.float32) for k in FIT_IMAGES}
