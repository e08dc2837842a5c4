"""Classical baseline for octahedral tilts from an ABF image: fit columns, then the structure.

1. Register on the cation lattice: the projected cell (its size given, as the atom finder
   gives it) is placed where the inverted ABF is strongest at the cation columns (weights
   Σ Z per column, so A(-O) columns anchor the origin), then refined by the mean offset of
   2D-Gaussian fits to the cation columns.
2. Oxygen columns: the fitted cation Gaussians are subtracted (they carry most of the
   contrast), then an elliptical 2D Gaussian is fitted at every pure-O column: its centre
   (displacement from the untilted position) and its covariance (splitting of columns whose
   octahedra turn in anti-phase along the beam).
3. Angles from the displacement pattern: for every Glazer system, least squares of the
   rigid-octahedron model (`simulate/octahedra.py`: projected O-column centroids and spreads
   for signed α, β, γ, plus a free base width²) against the fitted pattern; the system with
   the best Akaike score wins.

Everything the projection cannot carry (`octahedra.sign_visibility`) comes out as magnitudes.
The fit assumes the measured Gaussian centre is the column's projected centroid, which
dynamical ABF contrast (channelling, probe tails from neighbouring cations) breaks -- the known
weakness that motivates the network (source paper 000).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from scipy import ndimage
from scipy.optimize import least_squares

from stemlive.simulate import octahedra as oc

SYSTEMS = oc.TILT_SYSTEMS


# ---------------------------------------------------------------------------------------------
# The model: projected O columns of a tilted supercell
# ---------------------------------------------------------------------------------------------


def projection_basis(zone: str) -> np.ndarray:
    """(2, 3) unit vectors of image axes 0 and 1 in pc coordinates (as `crystals.orient`)."""
    if zone == "[001]":
        return np.array([[1.0, 0, 0], [0, 1.0, 0]])
    if zone == "[110]":
        return np.array([[0, 0, 1.0], [1 / np.sqrt(2), -1 / np.sqrt(2), 0]])
    raise ValueError(f"zone {zone!r}: choose [001] or [110]")


def projected_period(lengths, zone: str) -> np.ndarray:
    """In-plane period (axis 0, axis 1) [Å] of the projected 2×2×2 supercell."""
    lx, ly, lz = lengths
    return np.array([2 * lx, 2 * ly]) if zone == "[001]" else np.array([2 * lz, np.sqrt(2) * lx])


@dataclass(frozen=True)
class ColumnLayout:
    """Ideal (untilted) projected columns of one period [Å]: cations with their Σ Z, and the
    pure-O columns the model describes."""

    period_A: np.ndarray
    cations_A: np.ndarray  # (m, 2)
    cation_z: np.ndarray  # (m,)
    oxygen_A: np.ndarray  # (n, 2)


def _wrap(p, period):
    return np.mod(p + 1e-6, period) - 1e-6


def _group(points, period, tol=0.3):
    centres, members = [], []
    for i, p in enumerate(points):
        for k, c in enumerate(centres):
            d = p - c
            d -= np.round(d / period) * period
            if np.hypot(*d) < tol:
                members[k].append(i)
                break
        else:
            centres.append(p)
            members.append([i])
    return np.array(centres), members


def _ideal_o(structure: oc.TiltedPerovskite) -> np.ndarray:
    """Untilted position of every O (atom order of `octahedra.build`: A, B, O→x, O→y, O→z per site)."""
    pos = structure.atoms.positions
    site = structure.atoms.get_array("site")
    b = pos[site == 1]
    lengths = np.asarray(structure.pc_lengths_A)
    return np.concatenate([bp + 0.5 * lengths * np.eye(3) for bp in b])


def layout(structure: oc.TiltedPerovskite, zone: str) -> tuple[ColumnLayout, list[list[int]]]:
    """Columns of ``structure``'s projection and, per pure-O column, which O atoms it holds."""
    from ase.data import atomic_numbers

    basis = projection_basis(zone)
    period = projected_period(structure.pc_lengths_A, zone)
    pos = structure.atoms.positions
    site = structure.atoms.get_array("site")
    sym = np.array(structure.atoms.get_chemical_symbols())
    cat = _wrap(pos[site < 2] @ basis.T, period)
    cat_c, cat_m = _group(cat, period)
    z = np.array([sum(atomic_numbers[s] for s in sym[site < 2][m]) for m in cat_m], float)
    o_ideal = _wrap(_ideal_o(structure) @ basis.T, period)
    o_c, o_m = _group(o_ideal, period)
    keep = []
    for k, c in enumerate(o_c):
        d = cat_c - c
        d -= np.round(d / period) * period
        near = np.hypot(d[:, 0], d[:, 1]) < 0.5
        if near.any():  # O on a cation column (A-O in [110], B-O in [001]): adds to its weight
            z[np.argmax(near)] += 8 * len(o_m[k]) / max(1, len(cat_m[int(np.argmax(near))]))
        else:
            keep.append(k)
    return ColumnLayout(period, cat_c, z, o_c[keep]), [o_m[k] for k in keep]


def model_features(system: str, angles_deg, zone: str) -> np.ndarray:
    """Per pure-O column: centroid displacement (2) and spread (var0, var1, cov) [Å, Å²] of the
    SrTiO3-scaled model with signed ``angles_deg`` (tied letters may take their own signs)."""
    return _model_features(system, tuple(float(a) for a in angles_deg), zone)


@lru_cache(maxsize=8)
def _members(zone: str) -> tuple[tuple[int, ...], ...]:
    """O atoms per pure-O column: the same for every angle (grouped by untilted positions, and
    `octahedra.build` orders atoms alike for every system)."""
    return tuple(tuple(m) for m in layout(oc.build("a0a0a0", square_xy=zone == "[110]"), zone)[1])


@lru_cache(maxsize=65536)
def _model_features(system: str, angles: tuple, zone: str) -> np.ndarray:
    g = oc.parse_glazer(system)
    ang = np.array([0.0 if ph == "0" else (a if abs(a) >= 1e-3 else 1e-3) for ph, a in zip(g.phases, angles)])
    ang = np.clip(ang, -oc.MAX_TILT_DEG, oc.MAX_TILT_DEG)
    s = oc.build(system, ang, square_xy=zone == "[110]")
    o = s.atoms.positions[s.atoms.get_array("site") == 2]
    disp = (o - _ideal_o(s)) @ projection_basis(zone).T
    d = disp[np.array(_members(zone))]  # (columns, atoms per column, 2); columns hold equally many O
    mu = d.mean(axis=1)
    c = d - mu[:, None]
    return np.column_stack([mu, (c[..., 0] ** 2).mean(1), (c[..., 1] ** 2).mean(1), (c[..., 0] * c[..., 1]).mean(1)])


@lru_cache(maxsize=8)
def reference_layout(zone: str) -> ColumnLayout:
    """Untilted SrTiO3 columns of one projected period."""
    return layout(oc.build("a0a0a0", square_xy=zone == "[110]"), zone)[0]


# ---------------------------------------------------------------------------------------------
# The image: registration and Gaussian fits
# ---------------------------------------------------------------------------------------------


def _gauss(params, r, c):
    a, r0, c0, s00, s11, s01, bg = params
    det = s00 * s11 - s01 * s01
    dr, dc = r - r0, c - c0
    q = (s11 * dr * dr - 2 * s01 * dr * dc + s00 * dc * dc) / det
    return a * np.exp(-0.5 * q) + bg


def fit_gaussian(signal: np.ndarray, centre_px, radius_px: float, sigma0_px: float) -> np.ndarray | None:
    """Elliptical 2D Gaussian + constant fitted in a disc around ``centre_px``:
    (amplitude, row, col, var_rr, var_cc, cov_rc, background) [px, px²], or None if it fails
    (off the image, or the peak leaves the window)."""
    r0, c0 = centre_px
    rr, cc = np.indices(signal.shape)
    mask = (rr - r0) ** 2 + (cc - c0) ** 2 <= radius_px ** 2
    if mask.sum() < 9 or not (0 <= r0 < signal.shape[0] and 0 <= c0 < signal.shape[1]):
        return None
    r, c, y = rr[mask].astype(float), cc[mask].astype(float), signal[mask]
    bg0 = float(np.percentile(y, 10))
    p0 = [float(y.max() - bg0), r0, c0, sigma0_px ** 2, sigma0_px ** 2, 0.0, bg0]
    lo = [0.0, r0 - radius_px, c0 - radius_px, 0.05, 0.05, -np.inf, -np.inf]
    hi = [np.inf, r0 + radius_px, c0 + radius_px, 4 * radius_px ** 2, 4 * radius_px ** 2, np.inf, np.inf]
    try:
        res = least_squares(lambda p: _gauss(p, r, c) - y, p0, bounds=(lo, hi), max_nfev=200)
    except ValueError:
        return None
    p = res.x
    if p[3] * p[4] - p[5] ** 2 <= 0 or np.hypot(p[1] - r0, p[2] - c0) > 0.8 * radius_px:
        return None
    return p


@dataclass
class Registration:
    origin_px: np.ndarray  # image position of the layout's origin (an A column)
    pixel_A: float
    period_A: np.ndarray


def _positions_in_field(lay_points, reg: Registration, shape, margin_px):
    """Image positions [px] of every copy of the layout points inside the field."""
    per = reg.period_A / reg.pixel_A
    n0 = int(np.ceil(shape[0] / per[0])) + 2
    n1 = int(np.ceil(shape[1] / per[1])) + 2
    out, index = [], []
    for i in range(-2, n0):
        for j in range(-2, n1):
            p = reg.origin_px + (lay_points / reg.pixel_A) + np.array([i * per[0], j * per[1]])
            ok = (p[:, 0] >= margin_px) & (p[:, 0] < shape[0] - margin_px) & \
                 (p[:, 1] >= margin_px) & (p[:, 1] < shape[1] - margin_px)
            out.append(p[ok])
            index.append(np.flatnonzero(ok))
    return np.concatenate(out), np.concatenate(index)


def inverted(abf: np.ndarray) -> np.ndarray:
    """Column signal: how much darker than the bright background each pixel is."""
    img = ndimage.gaussian_filter(abf.astype(np.float64), 0.5)
    return np.percentile(img, 95) - img


def register(image: np.ndarray, pixel_A: float, zone: str, period_A, contrast: str = "haadf",
             origin_px=None) -> Registration:
    """Place the cation layout on the image (module docstring, step 1).  HAADF (columns bright,
    weights (ΣZ)^1.7) tells A from B columns; ABF alone (dark columns, weights ΣZ) may not, as
    their dips differ little (then the origin can land on a B column)."""
    if contrast not in ("haadf", "abf"):
        raise ValueError(f"contrast {contrast!r}: choose 'haadf' or 'abf'")
    lay = reference_layout(zone)
    period = np.asarray(period_A, float)
    scale = period / lay.period_A
    cat = lay.cations_A * scale
    weights = lay.cation_z ** (1.7 if contrast == "haadf" else 1.0)
    sig = inverted(image) if contrast == "abf" else image - np.percentile(image, 5)
    sig = ndimage.gaussian_filter(sig.astype(np.float64), 0.3 / pixel_A)
    # coarse: fold the image onto one period (1-px bins) and correlate with the weighted cations
    per_px = period / pixel_A
    bins = np.maximum(np.round(per_px).astype(int), 1)
    rr, cc = np.indices(sig.shape)
    fr = np.floor(np.mod(rr / per_px[0], 1.0) * bins[0]).astype(int) % bins[0]
    fc = np.floor(np.mod(cc / per_px[1], 1.0) * bins[1]).astype(int) % bins[1]
    folded = np.zeros(bins)
    count = np.zeros(bins)
    np.add.at(folded, (fr, fc), sig)
    np.add.at(count, (fr, fc), 1.0)
    folded /= np.maximum(count, 1.0)
    score = np.zeros(bins)
    for p, w in zip(cat / period * bins, weights):
        score += w * np.roll(folded, shift=(-int(round(p[0])), -int(round(p[1]))), axis=(0, 1))
    k = np.unravel_index(np.argmax(score), bins)
    best = Registration(np.array(k, float) / bins * per_px, pixel_A, period)
    if origin_px is not None:  # an A column given (the atom finder's lattice): only refined here
        best = Registration(np.asarray(origin_px, float), pixel_A, period)
    # refine: mean offset of the cation Gaussian fits
    p, _ = _positions_in_field(cat, best, sig.shape, 0.8 / pixel_A)
    offs = []
    raw = inverted(image) if contrast == "abf" else image - np.percentile(image, 5)
    for q in p:
        f = fit_gaussian(raw.astype(np.float64), q, 0.6 / pixel_A, 0.35 / pixel_A)
        if f is not None:
            offs.append(f[1:3] - q)
    if offs:
        best.origin_px = best.origin_px + np.median(offs, axis=0)
    return best


@dataclass
class ColumnFits:
    """Fitted pure-O columns, averaged over every copy in the field (per layout column)."""

    displacement_A: np.ndarray  # (n, 2)
    spread_A2: np.ndarray  # (n, 3) var0, var1, cov
    counts: np.ndarray  # (n,) copies fitted
    cation_error_A: float  # rms of the cation fits about the registered lattice


CATION_RADIUS_A = 0.7  # fit windows (0.5 Å windows bias split O columns more)
OXYGEN_RADIUS_A = 0.7


def fit_oxygen_columns(abf: np.ndarray, reg: Registration, zone: str, sweeps: int = 3) -> ColumnFits:
    """Step 2 of the module docstring: every column (cations and O) fitted in turn on the image
    minus all the other columns' current Gaussians, ``sweeps`` times (a joint fit done column by
    column), then the pure-O fits averaged per layout column."""
    lay = reference_layout(zone)
    scale = reg.period_A / lay.period_A
    px = reg.pixel_A
    sig = inverted(abf)
    rr, cc = np.indices(sig.shape)
    cat_p, _ = _positions_in_field(lay.cations_A * scale, reg, sig.shape, 0.6 / px)
    o_p, o_idx = _positions_in_field(lay.oxygen_A * scale, reg, sig.shape, 0.5 / px)
    centres = np.concatenate([cat_p, o_p])
    radius = np.concatenate([np.full(len(cat_p), CATION_RADIUS_A / px), np.full(len(o_p), OXYGEN_RADIUS_A / px)])
    half = int(np.ceil(1.5 / px))
    boxes = [(slice(max(0, int(q[0]) - half), int(q[0]) + half + 1), slice(max(0, int(q[1]) - half), int(q[1]) + half + 1))
             for q in centres]
    params: list[np.ndarray | None] = [None] * len(centres)
    total = np.zeros_like(sig)

    def own(k):
        g = params[k].copy()
        g[6] = 0.0  # the background is shared, not a column's
        return _gauss(g, rr[boxes[k]], cc[boxes[k]])

    for _ in range(sweeps):
        for k, q in enumerate(centres):
            if params[k] is not None:
                total[boxes[k]] -= own(k)
            f = fit_gaussian(sig - total, q, radius[k], 0.3 / px)
            params[k] = f
            if f is not None:
                total[boxes[k]] += own(k)
    errs = [np.hypot(*(params[k][1:3] - q)) * px for k, q in enumerate(cat_p) if params[k] is not None]
    n = len(lay.oxygen_A)
    disp = [[] for _ in range(n)]
    spread = [[] for _ in range(n)]
    for m, (q, k) in enumerate(zip(o_p, o_idx)):
        f = params[len(cat_p) + m]
        if f is None:
            continue
        disp[k].append((f[1:3] - q) * px)
        spread[k].append(np.array([f[3], f[4], f[5]]) * px * px)
    counts = np.array([len(d) for d in disp])
    mean_d = np.array([np.mean(d, axis=0) if d else [np.nan, np.nan] for d in disp])
    mean_s = np.array([np.mean(v, axis=0) if v else [np.nan] * 3 for v in spread])
    return ColumnFits(mean_d, mean_s, counts, float(np.sqrt(np.mean(np.square(errs)))) if errs else np.nan)


# ---------------------------------------------------------------------------------------------
# Angles from the pattern
# ---------------------------------------------------------------------------------------------


@dataclass
class BaselineEstimate:
    system: str
    angles_deg: np.ndarray  # signed (α, β, γ) of the octahedron at the registered origin's B site
    signed: tuple[bool, bool, bool]
    cost: dict  # AIC per system
    registration: Registration
    fits: ColumnFits

    def reported_deg(self) -> np.ndarray:
        """Signed where the projection carries the sign, else magnitudes."""
        return np.where(np.array(self.signed), self.angles_deg, np.abs(self.angles_deg))


POS_SIGMA_A = 0.03  # weight of a centroid residual
VAR_SIGMA_A2 = 0.01  # weight of a spread residual


def fit_system(fits: ColumnFits, system: str, zone: str, scale: float) -> tuple[np.ndarray, float, int]:
    """Least-squares signed angles of ``system`` (best of sign-combination starts), RSS and parameter count."""
    g = oc.parse_glazer(system)
    letters = sorted({ch for ph, ch in zip(g.phases, g.letters) if ph != "0"})
    ok = fits.counts > 0
    y_d = fits.displacement_A[ok].ravel() / POS_SIGMA_A

    def angles_of(x):
        by = dict(zip(letters, x[: len(letters)]))
        return tuple(0.0 if ph == "0" else by[ch] for ph, ch in zip(g.phases, g.letters))

    def resid(x):
        f = model_features(system, angles_of(x), zone)[ok]
        var0 = x[-1]
        rd = f[:, :2].ravel() * scale / POS_SIGMA_A - y_d
        sp = f[:, 2:] * scale ** 2 + np.array([var0, var0, 0.0])
        rs = (sp - fits.spread_A2[ok]).ravel() / VAR_SIGMA_A2
        return np.concatenate([rd, rs])

    var0 = float(np.nanmin(fits.spread_A2[ok][:, :2]))
    best = None
    starts = [np.array(s, float) for s in np.ndindex(*(2,) * len(letters))] or [np.zeros(0)]
    for s in starts:
        x0 = np.concatenate([np.where(s == 1, -6.0, 6.0), [var0]])
        lo = np.concatenate([[-oc.MAX_TILT_DEG] * len(letters), [0.0]])
        hi = np.concatenate([[oc.MAX_TILT_DEG] * len(letters), [1.0]])
        res = least_squares(resid, x0, bounds=(lo, hi), diff_step=0.02, max_nfev=30)
        if best is None or res.cost < best.cost:
            best = res
    rss = 2 * float(best.cost)
    return np.array(angles_of(best.x)), rss, len(letters) + 1


def estimate(abf: np.ndarray, pixel_A: float, zone: str, period_A, haadf: np.ndarray | None = None,
             systems=SYSTEMS, origin_px=None) -> BaselineEstimate:
    """The baseline on one ABF field (and the simultaneous HAADF, for registration, if given):
    registration, O-column fits, best system and its signed angles.  ``origin_px``: an A
    column's image position when the cation lattice is known (atom finder), else searched."""
    if abf.ndim != 2 or min(abf.shape) < 8:
        raise ValueError(f"abf must be a 2D image of at least 8×8 pixels, got shape {abf.shape}")
    if pixel_A <= 0:
        raise ValueError(f"pixel_A must be positive, got {pixel_A}")
    if haadf is not None and haadf.shape != abf.shape:
        raise ValueError(f"haadf shape {haadf.shape} differs from abf {abf.shape}")
    reg = register(abf if haadf is None else haadf, pixel_A, zone, period_A, "abf" if haadf is None else "haadf",
                   origin_px)
    fits = fit_oxygen_columns(abf, reg, zone)
    if not (fits.counts > 0).any():
        raise ValueError("no oxygen column could be fitted: field too small or too noisy")
    scale = float(np.mean(np.asarray(period_A) / reference_layout(zone).period_A))
    n = 5 * int((fits.counts > 0).sum())
    costs, results = {}, {}
    for system in systems:
        angles, rss, k = fit_system(fits, system, zone, scale) if system != "a0a0a0" else (np.zeros(3), None, 1)
        if rss is None:  # untilted: only the base width is free
            ok = fits.counts > 0
            var0 = float(np.nanmean(fits.spread_A2[ok][:, :2]))
            r = np.concatenate([fits.displacement_A[ok].ravel() / POS_SIGMA_A,
                                ((fits.spread_A2[ok] - [var0, var0, 0]) / VAR_SIGMA_A2).ravel()])
            rss = float(r @ r)
        costs[system] = n * np.log(max(rss, 1e-12) / n) + 2 * k
        results[system] = angles
    system = min(costs, key=costs.get)
    angles = results[system]
    signed = oc.sign_visibility(system, angles, zone)[0] if system != "a0a0a0" else (False, False, False)
    return BaselineEstimate(system, angles, signed, costs, reg, fits)


def column_angles(est: BaselineEstimate, zone: str, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Image positions [px] of every B column in the field and the baseline's (α, β, γ) there
    (signed where the projection carries the sign, else magnitudes): the fitted structure's
    per-column truth (`octahedra.projected_truth`) placed on the registered lattice."""
    if est.system == "a0a0a0":
        s = oc.build("a0a0a0", square_xy=zone == "[110]")
    else:
        g = oc.parse_glazer(est.system)
        ang = [0.0 if ph == "0" else (a if abs(a) >= 1e-3 else 1e-3) for ph, a in zip(g.phases, est.angles_deg)]
        s = oc.build(est.system, ang, square_xy=zone == "[110]")
    truth = oc.projected_truth(s, zone)
    scale = est.registration.period_A / projected_period(s.pc_lengths_A, zone)
    reg = est.registration
    pos, idx = _positions_in_field(truth.positions_A * scale, reg, shape, 0)
    ang = truth.angles_deg[idx]
    return pos, np.where(np.array(est.signed), ang, np.abs(ang))
