"""`AnomalyDetector`: how unlike bulk each atomic column looks (point defects, seed 002).

A shipped convolutional VAE (card task ``column-anomaly``), trained on bulk SrTiO3 [001]
patches only, reconstructs each column's two-channel patch -- HAADF and ABF of one scan, each
standardised per image, ABF inverted, exactly the species classifier's input
(`column_species.classifier_input`, `column_patches`, here 2.5 cells wide) -- from its
latent mean.  What the bulk
model cannot reproduce is the anomaly:

* ``error``: the mean squared difference between the patch and its reconstruction over the
  valid pixels of both channels, weighted by a Gaussian window on the column (σ from the card,
  0.2 cell: the patch is 2.5 cells wide so that the column's same-kind neighbours, its
  reference, are in it, but a uniform mean over ~25 columns drowns one column's misfit in the
  others' shot noise -- measured on validation specimens, see `simulate/anomaly_train.py`).
  The reconstruction error, not the VAE's negative
  ELBO: the ELBO's KL term grows with how unusual the *imaging* is (thickness, defocus,
  rotation, dose all move the latent code of perfectly good bulk), and the seed's measure is
  the input-minus-prediction difference too.
* ``score``: the error standardised over the image's own columns, (error − median) / (1.4826 ×
  median absolute deviation).  Shot noise adds its variance to every column's error and that
  variance changes a hundredfold between 10³ and 10⁵ e/Å² (and with sampling and thickness), so
  raw errors of two images are not comparable; nearly every column of an image is bulk, so its
  median and spread are the bulk's.  Needs ≥ ``MIN_COLUMNS`` complete patches in the image, or
  a ``reference`` (centre, scale) from an earlier image of the same acquisition.
* ``flagged``: score above the card's threshold -- the mean + 1.5 standard deviations of the
  scores of bulk columns in held-out validation images, as the seed sets it.  The card also
  holds the scores at 1 % and 3 % false alarms on the same columns (``threshold_at``).

Patches should be centred on the lattice sites (the positions a lattice fit to the located
columns gives, to a few pm): an off-centred column (a ferroelectric Ti displacement of 5-20
pm) is seen against its site, and a centre that follows each column's own fit (~10 pm error)
would hide it.  The network was trained with centres 0.02 Å rms from the site.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .backends import load_backend
from .cards import SHIPPED_DIR, ModelCard, ModelMismatch, latest_card, verify
from .column_patches import ColumnPatches, extract_patches, patch_edge_px
from .column_species import classifier_input

TASK = "column-anomaly"
MIN_COLUMNS = 16
MAD_TO_SD = 1.4826  # a normal distribution's sd over its median absolute deviation
# v2 geometry (cells of the material): the template window on a column and the neighbourhood a
# displacement is measured against; a card's ``anomaly.v2`` overrides them
V2_DEFAULTS = {"template_radius_cells": 0.3, "template_sigma_cells": 0.2, "neighbour_radius_cells": 3.0}
# the parts whose maximum is the score, as chosen on validation specimens (simulate/anomaly_train.py);
# a card's anomaly.v2.combine names its own
COMBINE = ("haadf", "displacement", "haadf_amplitude")


@dataclass
class ColumnAnomaly:
    error: np.ndarray  # (n,) per-pixel mean squared reconstruction error of the normalised patch
    score: np.ndarray  # (n,) error standardised over the image's complete patches
    flagged: np.ndarray  # (n,) bool: score above threshold
    threshold: float
    complete: np.ndarray  # (n,) bool: the whole patch lay in measured pixels
    reference: tuple[float, float]  # (centre, scale) the scores were standardised with
    parts: dict = field(default_factory=dict)  # name -> (n,) the measures the score combines


def error_window(size: int, spacings: float, sigma_cells: float | None) -> np.ndarray | None:
    """(size, size) Gaussian weights centred on the column (σ in SrTiO3-like cells of two
    nearest-neighbour spacings; the patch spans ``spacings`` of them): the error then weighs
    the column itself, and its neighbours serve as the reference the VAE reconstructs it from.
    None: uniform weights."""
    if sigma_cells is None:
        return None
    px_per_cell = size / (spacings / 2)
    o = np.arange(size) - (size - 1) / 2
    g = np.exp(-0.5 * (o / (sigma_cells * px_per_cell)) ** 2)
    return np.outer(g, g)


def reconstruction_error(patches: np.ndarray, reconstruction: np.ndarray, valid: np.ndarray | None = None,
                         window: np.ndarray | None = None) -> np.ndarray:
    """(n,) mean over valid pixels (all channels) of (patch − reconstruction)², weighted by
    ``window`` (P, P; None: uniform): how much of the patch the bulk model cannot reproduce.
    ``valid`` (n, P, P); None: every pixel."""
    sq = (np.asarray(patches, np.float64) - np.asarray(reconstruction, np.float64)) ** 2
    w = np.ones(sq.shape[-2:]) if window is None else np.asarray(window, np.float64)
    w = np.broadcast_to(w, (len(sq), *sq.shape[-2:]))
    if valid is not None:
        w = w * np.asarray(valid, bool)
    total = w.sum(axis=(1, 2)) * sq.shape[1]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, (sq * w[:, None]).sum(axis=(1, 2, 3)) / total, np.nan)


def image_reference(error: np.ndarray, use: np.ndarray | None = None,
                    min_columns: int = MIN_COLUMNS) -> tuple[float, float]:
    """(median, 1.4826 × MAD) of the errors of ``use`` columns: one image's bulk level and spread."""
    e = np.asarray(error, np.float64)
    e = e[np.asarray(use, bool)] if use is not None else e
    e = e[np.isfinite(e)]
    if len(e) < min_columns:
        raise ValueError(f"standardising anomaly scores needs at least {min_columns} complete column patches in "
                         f"the image, got {len(e)}; pass reference=(centre, scale) from a larger image of the "
                         "same acquisition")
    centre = float(np.median(e))
    scale = MAD_TO_SD * float(np.median(np.abs(e - centre)))
    if not scale > 0:
        raise ValueError("the column errors have no spread (identical patches?); the scores cannot be standardised")
    return centre, scale


def standardise(error: np.ndarray, reference: tuple[float, float]) -> np.ndarray:
    centre, scale = reference
    return (np.asarray(error, np.float64) - centre) / scale


def channel_errors(patches: np.ndarray, reconstruction: np.ndarray, valid: np.ndarray | None = None,
                   window: np.ndarray | None = None) -> np.ndarray:
    """(n, C) :func:`reconstruction_error` of each channel alone: an O vacancy changes only the
    ABF channel, and averaged with the HAADF channel's noise its misfit halves."""
    return np.stack([reconstruction_error(patches[:, c:c + 1], reconstruction[:, c:c + 1], valid, window)
                     for c in range(patches.shape[1])], axis=1)


def group_references(values: np.ndarray, groups: np.ndarray, use: np.ndarray | None = None,
                     min_columns: int = MIN_COLUMNS) -> dict:
    """{group: (median, 1.4826 MAD)} of ``values`` within each group of ``use`` columns: Sr, Ti-O
    and O columns misfit differently, and an image's mix of them (HAADF finds no O) would move a
    pooled median.  A group with too few columns raises, as :func:`image_reference`."""
    v = np.asarray(values, np.float64)
    g = np.asarray(groups)
    ok = np.ones(len(v), bool) if use is None else np.asarray(use, bool)
    return {int(k): image_reference(v[g == k], ok[g == k], min_columns) for k in np.unique(g)}


def group_scores(values: np.ndarray, groups: np.ndarray | None, use: np.ndarray | None = None,
                 min_columns: int = MIN_COLUMNS, references: dict | None = None) -> np.ndarray:
    """``values`` standardised within each group (None: one group) by :func:`group_references`
    (or the ``references`` given); a group without a reference scores NaN."""
    v = np.asarray(values, np.float64)
    g = np.zeros(len(v), int) if groups is None else np.asarray(groups)
    refs = references if references is not None else group_references(v, g, use, min_columns)
    out = np.full(len(v), np.nan)
    for k in np.unique(g):
        if int(k) in refs:
            out[g == k] = standardise(v[g == k], refs[int(k)])
    return out


def gaussian_equivalent(chi2: np.ndarray, dof: int = 2) -> np.ndarray:
    """The standard-normal score with the same upper-tail probability as ``chi2`` (``dof``
    degrees of freedom): a 2D offset and a 1D error score then flag bulk equally often."""
    from scipy.stats import chi2 as chi2_dist, norm

    return norm.isf(np.clip(chi2_dist.sf(np.asarray(chi2, np.float64), dof), 1e-300, 1.0))


def template_offsets(image: np.ndarray, centres_px: np.ndarray, groups: np.ndarray, radius_px: float,
                     sigma_px: float) -> np.ndarray:
    """(n, 2) px: each column's offset from its centre (:func:`template_fit`)."""
    return template_fit(image, centres_px, groups, radius_px, sigma_px)[0]


def template_fit(image: np.ndarray, centres_px: np.ndarray, groups: np.ndarray, radius_px: float,
                 sigma_px: float) -> tuple[np.ndarray, np.ndarray]:
    """((n, 2) px offsets, (n,) amplitudes): each column fitted against its group's mean column.

    A window (radius ``radius_px``, 1-px samples, bilinear) is cut at every centre; the mean
    window of a group is its column as the image shows it (probe, thickness, tilt, neighbours:
    no model assumed); each window is fitted by least squares as a·T(x − d) + b, linearised in
    d (d ≪ the column's width), weighted by a Gaussian of σ ``sigma_px``.  The matched filter:
    near the shot-noise limit of a position, where the finder's own fit is 5-10 pm off."""
    from scipy import ndimage

    pos = np.asarray(centres_px, np.float64).reshape(-1, 2)
    if len(pos) == 0:
        return np.zeros((0, 2)), np.zeros(0)
    k = int(np.ceil(radius_px))
    o = np.arange(-k, k + 1, dtype=np.float64)
    oy, ox = np.meshgrid(o, o, indexing="ij")
    coords = pos[:, None, None, :] + np.stack([oy, ox], -1)[None]
    img = np.asarray(image, np.float64)
    win = ndimage.map_coordinates(img, coords.reshape(-1, 2).T, order=1, mode="nearest").reshape(len(pos), *oy.shape)
    w = np.exp(-0.5 * (oy ** 2 + ox ** 2) / sigma_px ** 2) * (np.hypot(oy, ox) <= radius_px)
    sw = np.sqrt(w).ravel()
    out = np.full((len(pos), 2), np.nan)
    amp = np.full(len(pos), np.nan)
    g = np.asarray(groups)
    finite = np.isfinite(win).all(axis=(1, 2))  # unmeasured pixels in the window: no offset
    for key in np.unique(g):
        m = (g == key) & finite
        if m.sum() < 3:
            continue
        t = win[m].mean(axis=0)
        gy, gx = np.gradient(t)
        a = np.stack([t.ravel(), np.ones(t.size), -gy.ravel(), -gx.ravel()], 1) * sw[:, None]
        coef, *_ = np.linalg.lstsq(a, (win[m].reshape(m.sum(), -1) * sw).T, rcond=None)
        out[m] = coef[2:].T / np.where(np.abs(coef[0]) > 1e-12, coef[0], np.nan)[:, None]
        amp[m] = coef[0]
    return out, amp


def relative_displacement(fitted_px: np.ndarray, groups: np.ndarray, radius_px: float) -> np.ndarray:
    """(n, 2) px: each fitted centre against its lattice site as its same-group neighbours put it.

    The lattice (`column_lattice.fit_lattice`) gives every column an ideal point; a column's
    residual from it, less the median residual of the other columns of its group within
    ``radius_px``, is its own displacement -- scan distortion, drift and an error of the lattice
    fit move the neighbours too and cancel."""
    from scipy.spatial import cKDTree

    from .column_lattice import fit_lattice

    pos = np.asarray(fitted_px, np.float64)
    lat = fit_lattice(pos)
    res = pos - lat.points(lat.indices(pos))
    out = np.full(pos.shape, np.nan)
    g = np.asarray(groups)
    for key in np.unique(g):
        idx = np.flatnonzero(g == key)
        tree = cKDTree(pos[idx])
        for a, nb in zip(idx, tree.query_ball_point(pos[idx], radius_px)):
            nb = [idx[b] for b in nb if idx[b] != a]
            if len(nb) >= 3:
                out[a] = res[a] - np.median(res[nb], axis=0)
    return out


def displacement_references(rel_px: np.ndarray, groups: np.ndarray, use: np.ndarray | None = None,
                            min_columns: int = MIN_COLUMNS) -> dict:
    """{group: robust per-axis sd} of relative displacements (1.4826 MAD of the components about
    zero): the image's own position precision for that kind of column."""
    d = np.asarray(rel_px, np.float64)
    g = np.asarray(groups)
    ok = np.isfinite(d).all(axis=1) & (np.ones(len(d), bool) if use is None else np.asarray(use, bool))
    refs = {}
    for key in np.unique(g):
        comp = d[(g == key) & ok].ravel()
        if len(comp) < 2 * min_columns:
            raise ValueError(f"standardising displacements needs at least {min_columns} columns of each kind, got "
                             f"{len(comp) // 2}")
        sd = MAD_TO_SD * float(np.median(np.abs(comp)))
        if not sd > 0:
            raise ValueError("the column displacements have no spread; they cannot be standardised")
        refs[int(key)] = sd
    return refs


def displacement_scores(rel_px: np.ndarray, groups: np.ndarray, use: np.ndarray | None = None,
                        min_columns: int = MIN_COLUMNS, references: dict | None = None) -> np.ndarray:
    """Gaussian-equivalent score of each relative displacement: |d|² over its group's per-axis
    variance (:func:`displacement_references`) is χ² with 2 degrees of freedom for bulk whatever
    the dose, sampling and thickness -- the image's own precision sets the scale."""
    d = np.asarray(rel_px, np.float64)
    g = np.asarray(groups)
    refs = references if references is not None else displacement_references(d, g, use, min_columns)
    out = np.full(len(d), np.nan)
    for key in np.unique(g):
        m = g == key
        if int(key) in refs:
            out[m] = gaussian_equivalent(np.sum(d[m] ** 2, axis=1) / refs[int(key)] ** 2)
    return out


class AnomalyDetector:
    """The bulk VAE behind an inference backend, with its card's threshold."""

    def __init__(self, card: ModelCard, backend: str = "onnxruntime", threads: int | None = None):
        self.card = card
        if card.task != TASK:
            raise ModelMismatch(f"{card.path.name} is a {card.task!r} model, not {TASK!r}")
        verify(card)
        inp = card.data["input"]
        self.size = int(inp["shape"][-1])
        self.edge_A = float(inp["patch_edge_A"])
        self.spacings = float(inp["patch_spacings"])
        self.prefilter = bool(inp.get("prefilter", False))
        an = card.data.get("anomaly")
        if not isinstance(an, dict) or not np.isfinite(an.get("threshold", np.nan)):
            raise ModelMismatch(f"model card {card.path} holds no anomaly threshold ('anomaly': {{'threshold': ...}})")
        self.threshold = float(an["threshold"])
        self.threshold_at = {float(k): float(v) for k, v in an.get("threshold_at_false_alarm", {}).items()}
        # v2 (when the card holds it): per-channel, per-kind scores and the displacement, by max
        self.v2 = an.get("v2") if isinstance(an.get("v2"), dict) else None
        self.method = "v2" if self.v2 is not None else "v1"
        if self.v2 is not None:
            self.threshold = float(self.v2["threshold"])
            self.threshold_at = {float(k): float(v) for k, v in self.v2.get("threshold_at_false_alarm", {}).items()}
        self.window = error_window(self.size, self.spacings, an.get("window_sigma_cells"))
        self.backend = load_backend(card.onnx_path, backend, threads=threads)
        verify(card, self.backend.metadata())
        if "reconstruction" not in self.backend.output_names:
            raise ModelMismatch(f"{card.onnx_path} has no 'reconstruction' output (outputs: "
                                f"{', '.join(self.backend.output_names)})")

    @classmethod
    def shipped(cls, models_dir: str | Path = SHIPPED_DIR, **kw) -> "AnomalyDetector":
        return cls(latest_card(models_dir, TASK, "`stemlive train anomaly`"), **kw)

    def edge_px(self, positions_px: np.ndarray, sampling_A: float | None) -> float:
        return patch_edge_px(self.edge_A, self.spacings, positions_px, sampling_A)

    def prepare(self, haadf: np.ndarray, abf: np.ndarray, positions_px: np.ndarray,
                sampling_A: float | None = None) -> tuple[np.ndarray, ColumnPatches, float]:
        """(network input image (2, H, W), the columns' patches, patch edge px): what
        :meth:`score` feeds the network, separable so many images' patches share one batch."""
        pos = np.asarray(positions_px, np.float64).reshape(-1, 2)
        x = classifier_input(haadf, abf)
        edge = self.edge_px(pos, sampling_A)
        return x, extract_patches(x, pos, edge_px=edge, size=self.size, prefilter=self.prefilter), edge

    def reconstruct(self, patches: np.ndarray, batch: int = 1024) -> np.ndarray:
        """The bulk model's reconstruction of (n, 2, P, P) normalised patches."""
        x = np.ascontiguousarray(patches, np.float32)
        if len(x) == 0:
            return x.copy()
        return np.concatenate([self.backend(x[i:i + batch])["reconstruction"] for i in range(0, len(x), batch)])

    def score(self, haadf: np.ndarray, abf: np.ndarray, positions_px: np.ndarray, sampling_A: float | None = None,
              reference=None, threshold: float | None = None, groups: np.ndarray | None = None,
              method: str | None = None, prepared: tuple | None = None,
              reconstruction: np.ndarray | None = None) -> ColumnAnomaly:
        """Anomaly of every column at ``positions_px`` (row, col; lattice sites) of the HAADF/ABF pair.

        ``method`` "v1": the joint error of both channels, standardised over the image; "v2" (the
        default when the card calibrated it): ``parts`` "haadf" and "abf" -- each channel's error
        standardised within each kind of column (``groups``; default the sublattices of a lattice
        fitted to the positions) -- and "displacement" -- the column's template-fitted centre
        against its site as its same-kind neighbours put it, a Gaussian-equivalent score; the
        score is their maximum ("displacement_pm" holds the offset's size).
        ``reference``: the standardisation of an earlier image of the same acquisition (v1:
        (centre, scale); v2: the dict a score returns).  ``threshold``: a score to flag above
        (default: the card's; ``self.threshold_at`` holds the 1 %/3 %-false-alarm ones).
        ``prepared`` (:meth:`prepare`'s answer for these arguments) and ``reconstruction`` (the
        network's output for its patches): given, so a caller can batch many images' patches
        through the network at once (the live engine, one batch per step)."""
        method = method or self.method
        if method not in ("v1", "v2"):
            raise ValueError(f"method {method!r}: choose v1 or v2")
        pos = np.asarray(positions_px, np.float64).reshape(-1, 2)
        thr = (self.threshold if method == self.method else float(self.card.data["anomaly"]["threshold"])) \
            if threshold is None else float(threshold)
        if len(pos) == 0:
            z = np.zeros(0)
            return ColumnAnomaly(z, z, np.zeros(0, bool), thr, np.zeros(0, bool), reference or (np.nan, np.nan))
        x, p, edge = self.prepare(haadf, abf, pos, sampling_A) if prepared is None else prepared
        rec = self.reconstruct(p.patches) if reconstruction is None else reconstruction
        err = reconstruction_error(p.patches, rec, p.valid, self.window)
        if method == "v1":
            if reference is None:
                reference = image_reference(err, p.complete)
            score = standardise(err, reference)
            return ColumnAnomaly(err, score, score > thr, thr, p.complete, reference)
        cell_px = edge / (self.spacings / 2)
        if groups is None:
            groups = self.sublattices(pos)
        groups = np.asarray(groups)
        ref = dict(reference) if reference is not None else {}
        ce = channel_errors(p.patches, rec, p.valid, self.window)
        parts = {}
        for c, name in enumerate(("haadf", "abf")):
            if name not in ref:
                ref[name] = group_references(ce[:, c], groups, p.complete)
            parts[name] = group_scores(ce[:, c], groups, references=ref[name])
        v2 = self.v2 or V2_DEFAULTS
        geom = (v2["template_radius_cells"] * cell_px, v2["template_sigma_cells"] * cell_px)
        off, amp_h = template_fit(x[0], pos, groups, *geom)
        amp_a = template_fit(x[1], pos, groups, *geom)[1]
        for name, amp in (("haadf_amplitude", amp_h), ("abf_amplitude", amp_a)):
            if name not in ref:
                try:
                    ref[name] = group_references(amp, groups, p.complete & np.isfinite(amp))
                except ValueError:
                    ref[name] = {}
            z = group_scores(amp, groups, references=ref[name])
            parts[name] = gaussian_equivalent(z ** 2, 1)  # two-sided: emptied and over-full columns
        rel = np.full(pos.shape, np.nan)
        if len(pos) >= 6 and np.isfinite(off).all(axis=1).sum() >= 6:
            fin = np.isfinite(off).all(axis=1)
            try:
                rel[fin] = relative_displacement(pos[fin] + off[fin], groups[fin],
                                                 v2["neighbour_radius_cells"] * cell_px)
            except ValueError:
                pass  # no lattice among these columns: no displacement measure
        if "displacement" not in ref:
            try:
                ref["displacement"] = displacement_references(rel, groups, p.complete)
            except ValueError:
                ref["displacement"] = {}
        parts["displacement"] = displacement_scores(rel, groups, references=ref["displacement"])
        parts["displacement_pm"] = (np.hypot(*rel.T) * sampling_A * 100 if sampling_A is not None
                                    else np.full(len(pos), np.nan))
        stack = np.stack([parts[k] for k in v2.get("combine", COMBINE)])
        with np.errstate(all="ignore"):
            score = np.where(np.isfinite(stack).any(axis=0), np.nanmax(np.where(np.isfinite(stack), stack, -np.inf),
                                                                        axis=0), np.nan)
        return ColumnAnomaly(err, score, score > thr, thr, p.complete, ref, parts)

    @staticmethod
    def sublattices(positions_px: np.ndarray) -> np.ndarray:
        """(n,) the kind of column each is (sublattice of a lattice fitted to them; all 0 when none fits)."""
        from .column_lattice import lattice_sites

        try:
            return lattice_sites(positions_px, local_cells=None).sublattice
        except ValueError:
            return np.zeros(len(positions_px), np.int64)
