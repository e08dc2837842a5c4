"""What the page draws, as plain functions of the store's fields: derived maps, palettes, doubt,
colour ranges, region statistics.  No Bokeh models here, so each piece is tested on its own.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np

# Flags that say "do not trust this block's thickness" (the PACBED check's `ambiguous` and
# `model-mismatch` among them); the same set the accuracy benchmarks count as a warned miss.
DOUBT_FLAGS = ("ambiguous", "model-mismatch", "low-confidence", "vacuum", "not-on-zone",
               "thickness-at-range-edge", "saturated", "error")
# A thickness σ above this is doubtful whatever the flags say (the benchmarks' "silent" limit).
DOUBT_SIGMA_NM = 5.0
MAX_DISPLAY = 512  # maps with more blocks per side are block-averaged on the server for display


def _cmap(name: str, n: int = 256) -> tuple[str, ...]:
    """A matplotlib colour map as n hex colours (no pyplot import)."""
    import matplotlib
    from matplotlib.colors import to_hex

    cmap = matplotlib.colormaps[name]
    return tuple(to_hex(cmap(i / (n - 1))) for i in range(n))


SEQUENTIAL = _cmap("viridis")
SIGMA = _cmap("cividis")
DIVERGING = _cmap("RdBu_r")  # continuous: 256 steps (an 11-step palette showed 0.33 mrad per colour)
CYCLIC = _cmap("twilight_shifted")  # azimuth: -180° and +180° are the same colour, no false seam
GREY = _cmap("gray")


@dataclass(frozen=True)
class MapSpec:
    key: str
    title: str
    unit: str
    sigma: str | None
    palette: tuple[str, ...]
    kind: str  # "sequential", "symmetric" (centred on 0), "cyclic" (fixed -180..180), "fixed01", "count"


MAPS = (
    MapSpec("thickness", "Thickness", "nm", "thickness_sigma", SEQUENTIAL, "sequential"),
    MapSpec("thickness_sigma", "Thickness σ", "nm", None, SIGMA, "sequential"),
    MapSpec("tilt0", "Tilt t0 (detector axis 0)", "mrad", "tilt0_sigma", DIVERGING, "symmetric"),
    MapSpec("tilt1", "Tilt t1 (detector axis 1)", "mrad", "tilt1_sigma", DIVERGING, "symmetric"),
    MapSpec("tilt100", "Tilt [100] (crystal)", "mrad", "tilt0_sigma", DIVERGING, "symmetric"),
    MapSpec("tilt010", "Tilt [010] (crystal)", "mrad", "tilt1_sigma", DIVERGING, "symmetric"),
    MapSpec("tilt_magnitude", "|Tilt|", "mrad", "tilt_magnitude_sigma", SEQUENTIAL, "sequential"),
    MapSpec("tilt_azimuth", "Tilt azimuth (axis 1 → 0; blank where |tilt| < σ)", "deg", None, CYCLIC, "cyclic"),
    MapSpec("out_of_range", "Outside the models' range", "", None, ("#dddddd", "#d62728"), "fixed01"),
    MapSpec("flags", "Flags raised (hover: names)", "", None, _cmap("magma_r", 16), "count"),
)
MAP_BY_KEY = {m.key: m for m in MAPS}
# The maps in tabs: the browser repaints only the plots on show, and with a block update
# patching every map, ten repaints per update held each update up (2 cores, two browsers).
MAP_TABS = (
    ("Thickness and tilt", ("thickness", "thickness_sigma", "tilt_magnitude", "tilt_azimuth")),
    ("Tilt components", ("tilt0", "tilt1", "tilt100", "tilt010")),
    ("Flags", ("flags", "out_of_range")),
)
VIRTUAL = (("bf", "BF"), ("abf", "ABF"), ("adf", "ADF"), ("haadf", "HAADF"))
# a run with --com (live/com_maps.py): CoM shift from the calibrated disk centre in the scan frame, and
# its integral; (key, title, unit ("mrad" becomes px where the detector calibration is unknown), palette, kind)
COM_VIEWS = (("com_y", "CoM shift, scan axis 0", "mrad", DIVERGING, "symmetric"),
             ("com_x", "CoM shift, scan axis 1", "mrad", DIVERGING, "symmetric"),
             ("com_magnitude", "|CoM shift|", "mrad", SEQUENTIAL, "sequential"),
             ("idpc", "iDPC (integrated CoM)", "a.u.", GREY, "sequential"))


def flag_bits(names: list[str], wanted) -> int:
    """The bitmask of the ``wanted`` flag names in a store whose bit i is ``names[i]``."""
    return sum(1 << i for i, n in enumerate(names) if n in set(wanted))


def flag_text(bits, names: list[str]) -> str:
    """Flag bits as names ("" for none)."""
    b = int(bits)
    return ", ".join(n for i, n in enumerate(names) if b >> i & 1)


def _analysed(maps: dict) -> np.ndarray:
    return np.asarray(maps["in_range"]) >= 0


def derived_maps(maps: dict) -> dict[str, np.ndarray]:
    """The maps the page shows, from the store's fields (DESIGN.md conventions), as float64."""
    tilt = np.asarray(maps["tilt_mrad"], np.float64)
    sig = np.asarray(maps["tilt_sigma_mrad"], np.float64)
    crystal = np.asarray(maps["tilt_crystal_mrad"], np.float64)
    mag = np.hypot(tilt[..., 0], tilt[..., 1])
    with np.errstate(invalid="ignore", divide="ignore"):
        # σ of |t| propagated from σ(t0), σ(t1); where |t| ≈ 0 the direction is undefined
        mag_sigma = np.where(mag > 0, np.hypot(tilt[..., 0] * sig[..., 0], tilt[..., 1] * sig[..., 1]) / mag,
                             np.hypot(sig[..., 0], sig[..., 1]))
    azimuth = np.degrees(np.arctan2(tilt[..., 0], tilt[..., 1]))  # from axis 1 towards axis 0
    azimuth = np.where(mag >= mag_sigma, azimuth, np.nan)  # no direction within the noise
    analysed = _analysed(maps)
    flags = np.asarray(maps["flags"]).astype(np.uint64)
    count = np.zeros(flags.shape, np.float64)
    for bit in range(32):
        count += (flags >> np.uint64(bit)) & np.uint64(1)
    return {
        "thickness": np.asarray(maps["thickness_nm"], np.float64),
        "thickness_sigma": np.asarray(maps["thickness_sigma_nm"], np.float64),
        "tilt0": tilt[..., 0], "tilt1": tilt[..., 1], "tilt0_sigma": sig[..., 0], "tilt1_sigma": sig[..., 1],
        "tilt100": crystal[..., 0], "tilt010": crystal[..., 1],
        "tilt_magnitude": mag, "tilt_magnitude_sigma": mag_sigma, "tilt_azimuth": azimuth,
        "out_of_range": np.where(analysed, (np.asarray(maps["in_range"]) == 0) * 1.0, np.nan),
        "flags": np.where(analysed, count, np.nan),
        "flag_bits": np.where(analysed, flags.astype(np.float64), np.nan),
    }


def doubtful(maps: dict, names: list[str]) -> np.ndarray:
    """Blocks whose thickness should not be trusted: a doubt flag, or σ above DOUBT_SIGMA_NM."""
    bits = np.uint64(flag_bits(names, DOUBT_FLAGS))
    flagged = (np.asarray(maps["flags"]).astype(np.uint64) & bits) != 0
    with np.errstate(invalid="ignore"):
        wide = np.asarray(maps["thickness_sigma_nm"], np.float64) > DOUBT_SIGMA_NM
    return _analysed(maps) & (flagged | wide)


def display_factor(shape: tuple[int, int]) -> int:
    return max(1, math.ceil(max(shape) / MAX_DISPLAY))


def downsample(values: np.ndarray, f: int) -> np.ndarray:
    """Block-average by ``f`` for display (NaN-aware; unscanned stays NaN)."""
    if f == 1:
        return values
    ny, nx = values.shape
    pad = np.full((-(-ny // f) * f, -(-nx // f) * f), np.nan)
    pad[:ny, :nx] = values
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN blocks stay NaN, quietly
        blocks = pad.reshape(pad.shape[0] // f, f, pad.shape[1] // f, f)
        return np.nanmean(blocks, axis=(1, 3))


def auto_range(values: np.ndarray, kind: str) -> tuple[float, float]:
    """The colour range a map starts with: its data range (centred on 0 for signed tilts)."""
    if kind == "fixed01":
        return 0.0, 1.0
    if kind == "cyclic":
        return -180.0, 180.0
    finite = values[np.isfinite(values)]
    if kind == "count":
        return 0.0, max(1.0, float(finite.max()) if finite.size else 1.0)
    if finite.size == 0:
        return (-1.0, 1.0) if kind == "symmetric" else (0.0, 1.0)
    if kind == "symmetric":
        m = float(np.max(np.abs(finite))) or 1.0
        return -m, m
    lo, hi = float(finite.min()), float(finite.max())
    return (lo, hi) if hi > lo else (lo - 0.5, hi + 0.5)


SPECIES_PALETTE = ("#1f77b4", "#2ca02c", "#ff7f0e", "#9467bd", "#17becf", "#8c564b")
SPECIES_GREY = {"vacant": "#7f7f7f"}
UNKNOWN_COLOUR = "#d62728"  # columns without a species (analyses off, or not classified)
ANOMALY_COLOUR = "#ff00ff"


def species_colours(names: list[str]) -> list[str]:
    """One marker colour per species class, in the classifier's order."""
    return [SPECIES_GREY.get(n, SPECIES_PALETTE[k % len(SPECIES_PALETTE)]) for k, n in enumerate(names)]


def species_legend(names: list[str]) -> str:
    """The atom overlay's legend (HTML): a swatch per species, unknown, and the anomaly marker."""
    swatch = '<span style="color:{};font-size:15px">&#9711;</span>&nbsp;{}'
    items = [swatch.format(c, n) for n, c in zip(names, species_colours(names))]
    items.append(swatch.format(UNKNOWN_COLOUR, "column, species unknown" if names else "atomic column"))
    items.append(f'<span style="color:{ANOMALY_COLOUR};font-size:15px">&#9633;</span>&nbsp;'
                 "anomalous (point-defect score above the flag level)")
    return "&emsp;".join(items)


RANGE_TOLERANCE = 0.02  # an auto colour range follows its data once an end moved this much (of the span)


def settled_range(current: tuple[float | None, float | None], new: tuple[float, float],
                  tolerance: float = RANGE_TOLERANCE) -> tuple[float, float]:
    """``new`` unless both its ends lie within ``tolerance`` of the span from ``current``'s.

    A live image's data range creeps with every frame; each change of a colour mapper redraws
    its colour bar (ticks, labels, text metrics), the browser's largest cost per update, for a
    change no eye sees."""
    lo, hi = current
    if lo is None or hi is None or not (np.isfinite(lo) and np.isfinite(hi)) or hi <= lo:
        return new
    slack = tolerance * (hi - lo)
    return (lo, hi) if abs(new[0] - lo) <= slack and abs(new[1] - hi) <= slack else new


def set_range(mapper, rng: tuple[float, float]) -> None:
    """Set a colour mapper's range; untouched (no message to the browser) when it is already that."""
    if (mapper.low, mapper.high) != tuple(rng):
        mapper.low, mapper.high = rng


@dataclass(frozen=True)
class RegionStat:
    title: str
    unit: str
    mean: float
    sd: float
    count: int


def region_stats(values: dict[str, np.ndarray], specs, rows: slice, cols: slice) -> list[RegionStat]:
    """Mean ± sample sd and count of the finite values of each map inside the region."""
    out = []
    for key, title, unit in specs:
        v = np.asarray(values[key], np.float64)[rows, cols]
        v = v[np.isfinite(v)]
        mean = float(v.mean()) if v.size else math.nan
        sd = float(v.std(ddof=1)) if v.size > 1 else math.nan
        out.append(RegionStat(title, unit, mean, sd, int(v.size)))
    return out


def crystal_correction(tilt_crystal_mean: np.ndarray) -> str:
    """What brings the region onto the zone axis: the beam tilted by minus the mean crystal tilt."""
    t100, t010 = tilt_crystal_mean
    return (f"mean tilt [100] {t100:+.2f}, [010] {t010:+.2f} mrad (|{math.hypot(t100, t010):.2f}| mrad) — "
            f"to reach the zone axis tilt the beam (or specimen, opposite sign) by [100] {-t100:+.2f}, "
            f"[010] {-t010:+.2f} mrad")


def holder_correction(tilt_mrad_mean, axis_deg: float) -> tuple[float, float]:
    """(Δα, Δβ) in mrad of a double-tilt holder that bring a region with mean tilt ``t`` (DESIGN.md:
    the beam relative to the zone axis, detector frame, t0 along axis 0, t1 along axis 1) onto
    the zone axis.

    ``axis_deg`` = φ: the holder's α (long) axis on the detector, in degrees from detector axis 1
    towards axis 0 (the dashboard's azimuth convention).  With a = (sin φ, cos φ) along the α
    axis and b = (cos φ, −sin φ) at φ + 90° ((axis 0, axis 1) components), the convention is: a
    tilt of +1 mrad in α moves the zone axis by +1 mrad along b (so the measured tilt t by −1
    mrad along b), +1 mrad in β moves it along a.  A beam at +t from the zone axis is a zone axis
    at −t from the beam (DESIGN.md), so the specimen must move its zone axis by +t:
    Δα = t·b, Δβ = t·a, and Δα·b + Δβ·a = t.  As rotations in the frame (axis 0, axis 1, beam
    direction): +α is right-handed about a, +β right-handed about −b.  A holder whose positive α
    and β both go the other way: give φ + 180°.  (One reversed alone is a mirror this angle
    cannot express.)  Tested with 3-D rotations in tests/test_dashboard.py."""
    t = np.asarray(tilt_mrad_mean, np.float64)
    phi = math.radians(axis_deg)
    a = np.array([math.sin(phi), math.cos(phi)])
    b = np.array([math.cos(phi), -math.sin(phi)])
    return float(t @ b), float(t @ a)


def holder_text(tilt_mrad_mean, axis_deg: float) -> str:
    """The holder correction in words, mrad and degrees (what a holder's readout shows)."""
    da, db = holder_correction(tilt_mrad_mean, axis_deg)
    deg = 180 / math.pi / 1000
    return (f"holder (α axis at {axis_deg:g}° from detector axis 1 towards axis 0): tilt α by {da:+.2f} mrad "
            f"({da * deg:+.3f}°), β by {db:+.2f} mrad ({db * deg:+.3f}°)")


def duration_text(seconds: float) -> str:
    if not math.isfinite(seconds) or seconds < 0:
        return "—"
    if seconds < 90:
        return f"{seconds:.1f} s"
    m, s = divmod(int(round(seconds)), 60)
    return f"{m} min {s:02d} s" if m < 60 else f"{m // 60} h {m % 60:02d} min"


QUIET_S = 10.0  # the status line says when no frame has come for longer than this


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:,.0f} ms" if seconds < 10 else f"{seconds:,.0f} s"


def status_text(status: dict, delay_s: float | None, atoms: int, connected: bool = True, error: str = "",
                frame_delay_s: float | None = None, recent_fps: float | None = None,
                quiet_s: float | None = None) -> str:
    """The status line in plain words: state, blocks, speed or total time, delay, dropped frames.

    ``frame_delay_s``: the newest block's last frame (at the engine) -> drawn in this browser, as
    the browser measured it; ``delay_s`` (engine publish -> this browser) is shown only without it.
    ``recent_fps``: frames/s measured by the page over the last seconds (the engine's figure is its
    average since it started, waiting for the first frame included); ``quiet_s``: seconds since
    the frame count last grew (said above QUIET_S: frames come a partition at a time)."""
    state = status.get("state", "running")
    done, total = int(status.get("blocks_done", 0)), int(status.get("blocks_total", 0))
    seen, frames = int(status.get("frames_seen", 0)), int(status.get("frames_total", 0))
    fps = float(status.get("frames_per_s") or 0.0)
    parts = []
    if state == "running":
        parts.append("<b>Scanning</b>" if seen else "<b>Waiting for the first frames</b>")
        parts.append(f"{done} of {total} blocks analysed, {seen:,} of {frames:,} frames received")
        if seen:
            parts.append(f"{recent_fps:,.0f} frames/s" if recent_fps is not None else f"{fps:,.0f} frames/s")
            if quiet_s is not None and quiet_s > QUIET_S:
                parts.append(f"<b>no new frames for {duration_text(quiet_s)}</b>")
            lost = int(status.get("frames_dropped", 0))  # frames the scan passed that never came
            parts.append("no frames lost so far" if lost == 0 else f"<b>{lost:,} frames lost so far</b>")
    else:
        took = status.get("elapsed_s")
        if took is None and fps > 0:
            took = seen / fps  # the engine's average rate is frames over the time they took
        word = "<b>Finished</b>" if state == "complete" else "<b>Stopped early</b>"
        parts.append(f"{word}: {done} of {total} blocks analysed, {seen:,} of {frames:,} frames")
        if took is not None:
            parts.append(f"took {duration_text(float(took))}")
    if frame_delay_s is not None and state == "running":
        parts.append(f"newest block on this page {_ms(frame_delay_s)} after its last frame reached the engine")
    elif delay_s is not None and state == "running":
        parts.append(f"newest block reached this page {_ms(delay_s)} after the engine published it")
    if state != "running":
        dropped = int(status.get("frames_dropped", 0))
        parts.append("no frames lost" if dropped == 0 else f"<b>{dropped:,} frames lost</b>"
                     + (f" ({int(status.get('blocks_dropped', 0))} blocks incomplete)"
                        if status.get("blocks_dropped") else ""))
    if atoms:
        parts.append(f"{atoms:,} atomic columns found")
    waiting = int(status.get("atoms_waiting") or 0)
    if waiting and state == "running":
        parts.append(f"atom finding waits for the scan to reach the blocks around {waiting} blocks")
    if status.get("reason"):
        parts.append(f"reason: {status['reason']}")
    if not connected:
        parts.append(f"<b>the engine does not answer</b> ({error})" if error else "<b>the engine does not answer</b>")
    return " — ".join(parts)
