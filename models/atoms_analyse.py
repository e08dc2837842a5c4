"""`stemlive atoms analyse`: every column of one scan's HAADF/ABF pair with its species and anomaly.

The per-column networks read both images of one scan (`column_species.classifier_input`: HAADF
and ABF, each standardised), so the command takes the pair: IMAGE as a 2×H×W stack (HAADF
first) or one image plus ``--pair`` (the other detector's image of the same scan).  The columns
are found in the ``--contrast`` image with the atom finder (as `atoms find`); then

* species: the classifier on patches at the found positions (it was trained with centres 0.1 Å
  from the site, the finder's error);
* anomaly: the bulk VAE on patches at each column's *lattice site* (`column_lattice`: a lattice
  fitted to all found columns), not at its own fitted position, which follows -- and so hides --
  the displacement the anomaly should see.

Without ``--sampling-A-per-px`` the per-column networks' patch edge comes from the fitted lattice
and the material the models were trained on (their card's cell: SrTiO3 [001], a = 3.905 Å),
counting the columns per cell the contrast shows (HAADF: Sr and Ti-O, 2; ABF: 4, O included).
"""
from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

COLUMNS_PER_CELL = {"haadf": 2, "abf": 4}  # SrTiO3 [001]: Sr + Ti-O; + two O
SAMPLING_MISMATCH = 0.15  # relative: a given sampling this far from the lattice's implied one is reported


@dataclass
class AnalysedColumns:
    positions_px: np.ndarray  # (n, 2)
    confidence: np.ndarray
    intensity: np.ndarray
    sites_px: np.ndarray  # (n, 2) lattice sites (NaN without a lattice)
    classes: tuple[str, ...]
    species: np.ndarray  # (n,) int
    probabilities: np.ndarray  # (n, k)
    species_complete: np.ndarray  # (n,) bool
    anomaly_score: np.ndarray  # (n,) NaN where not scored (no lattice, too few columns, patch not inside the image)
    anomaly_flagged: np.ndarray  # (n,) bool
    anomaly_threshold: float
    sampling_A: float | None
    sampling_source: str  # "given" | "lattice" | "none"
    models: dict  # role -> card id
    notes: list[str] = field(default_factory=list)
    parts: dict = field(default_factory=dict)  # extra per-column anomaly measures (name -> (n,))
    lattice: dict = field(default_factory=dict)


def split_pair(stack: np.ndarray, pair: np.ndarray | None, contrast: str, image_name: str) -> tuple[np.ndarray, np.ndarray]:
    """(haadf, abf) from IMAGE's stack and the optional ``--pair`` stack, or a clear error."""
    if pair is None:
        if len(stack) == 2:
            return stack[0], stack[1]
        raise ValueError(f"{image_name} holds {len(stack)} image(s); species and anomaly read the HAADF and the ABF "
                         "image of one scan: give the other detector's image with --pair FILE, or IMAGE as a "
                         "2×H×W stack (HAADF first)")
    if len(stack) != 1 or len(pair) != 1:
        raise ValueError(f"with --pair, IMAGE and the pair file hold one image each (got {len(stack)} and {len(pair)})")
    if stack[0].shape != pair[0].shape:
        raise ValueError(f"IMAGE ({stack[0].shape[0]}×{stack[0].shape[1]}) and --pair ({pair[0].shape[0]}×"
                         f"{pair[0].shape[1]}) differ in size; they must be two detectors' images of one scan")
    return (stack[0], pair[0]) if contrast == "haadf" else (pair[0], stack[0])


def material_cell_A(anomaly_card) -> float:
    """The training material's cell edge [Å] from the anomaly card's patch geometry."""
    inp = anomaly_card.data["input"]
    return float(inp["patch_edge_A"]) / (float(inp["patch_spacings"]) / 2)


def analyse(haadf: np.ndarray, abf: np.ndarray, contrast: str, finder, classifier, detector,
            sampling_A: float | None = None) -> AnalysedColumns:
    """Columns of the ``contrast`` image, their species and anomaly (see the module docstring)."""
    haadf = np.asarray(haadf, np.float64)
    abf = np.asarray(abf, np.float64)
    for name, img in (("HAADF", haadf), ("ABF", abf)):
        if not np.isfinite(img).all():
            raise ValueError(f"the {name} image has NaN or infinite pixels")
    image = haadf if contrast == "haadf" else abf
    found = finder.find(image, sampling_A, require_structure=True)
    plan = plan_columns(haadf, abf, found.positions_px, contrast, classifier, detector, sampling_A)
    if found.note:
        plan.notes.insert(0, found.note)
    (probs, rec), = run_networks([plan], classifier, detector)
    r = finish_columns(plan, classifier, detector, probs, rec)
    models = {"finder": finder.card.id, "species": classifier.card.id, "anomaly": detector.card.id}
    return AnalysedColumns(plan.positions_px, found.confidence, found.intensity, plan.sites_px,
                           tuple(classifier.classes), r["species"], r["probabilities"], r["species_complete"],
                           r["anomaly_score"], r["anomaly_flagged"], float(detector.threshold), plan.sampling_A,
                           plan.sampling_source, models, plan.notes, r["parts"], plan.lattice)


@dataclass
class ColumnPlan:
    """One image's columns ready for the per-column networks: lattice sites, sampling, patches.

    :func:`plan_columns` makes it, :func:`run_networks` puts the patches of any number of plans
    through each network in one batch, :func:`finish_columns` turns the outputs into species and
    anomaly -- so `atoms analyse` (one image) and the live engine (every block window analysed
    in one step) share one code path."""

    haadf: np.ndarray
    abf: np.ndarray
    positions_px: np.ndarray  # (n, 2)
    classify: np.ndarray  # (m,) indices of the columns classified
    sites_px: np.ndarray  # (n, 2) NaN without a lattice
    sublattice: np.ndarray | None
    sampling_A: float | None
    sampling_source: str
    notes: list
    lattice: dict
    species_patches: object = None  # ColumnPatches of the classified columns, or None (no sampling)
    anomaly_prep: tuple | None = None  # AnomalyDetector.prepare's answer at the sites, or None


def plan_columns(haadf: np.ndarray, abf: np.ndarray, positions_px: np.ndarray, contrast: str, classifier,
                 detector, sampling_A: float | None = None, classify: np.ndarray | None = None) -> ColumnPlan:
    """Lattice sites of all ``positions_px`` (the lattice and the anomaly's per-image
    standardisation use every column of the image), the sampling (given, else from the lattice
    and the models' material), the species patches of the ``classify`` columns (default all)."""
    from .column_lattice import lattice_sites

    pos = np.asarray(positions_px, np.float64).reshape(-1, 2)
    n = len(pos)
    cls_idx = np.arange(n) if classify is None else np.asarray(classify, np.int64)
    notes: list = []
    sites = np.full((n, 2), np.nan)
    lat_info: dict = {}
    ls = None
    if n:
        try:
            ls = lattice_sites(pos)
            sites = ls.sites_px
            lat_info = {"origin_px": ls.lattice.origin.tolist(), "basis_px": ls.lattice.basis.tolist(),
                        "rms_residual_px": ls.rms_residual_px, "on_lattice": int(ls.on_lattice.sum())}
        except ValueError as exc:
            notes.append(f"no lattice fitted ({exc}): no anomaly scores")
    cell_A = material_cell_A(detector.card)
    source = "given" if sampling_A is not None else "none"
    s = sampling_A
    if ls is not None:
        implied = cell_A / np.sqrt(ls.lattice.cell_area_px2 * COLUMNS_PER_CELL[contrast])
        if s is None:
            s, source = float(implied), "lattice"
        elif abs(implied / s - 1) > SAMPLING_MISMATCH:
            notes.append(f"the fitted lattice implies {implied:.4g} Å/px for {detector.card.data['training']['material']} "
                         f"(cell {cell_A:g} Å, {COLUMNS_PER_CELL[contrast]} {contrast.upper()} columns per cell), "
                         f"not the {s:g} Å/px given: another material or zone than the models were trained on?")
    plan = ColumnPlan(haadf, abf, pos, cls_idx, sites, None if ls is None else ls.sublattice, s, source, notes,
                      lat_info)
    if len(cls_idx) and s is not None:
        plan.species_patches = classifier.patches(haadf, abf, pos[cls_idx], sampling_A=s, context_px=pos)
    elif len(cls_idx):
        notes.append("no sampling and no lattice to take it from: no species")
    if ls is not None and s is not None:
        short = _too_few_inside(sites, ls.sublattice, detector, s, np.shape(haadf))
        if short is None:
            plan.anomaly_prep = detector.prepare(haadf, abf, sites, sampling_A=s)
        else:  # the standardisation would refuse it: spare the patches and the network (live: most windows)
            notes.append(_too_small_note(detector, short))
    return plan


def _too_few_inside(sites: np.ndarray, groups: np.ndarray, detector, sampling_A: float, shape) -> str | None:
    """Why the anomaly's per-kind standardisation must fail here (a kind with fewer than
    MIN_COLUMNS sites whose whole patch lies in the image -- complete patches are a subset), or None."""
    from .column_anomaly import MIN_COLUMNS

    half = (detector.size - 1) / 2 * detector.edge_A / sampling_A / detector.size
    lim = np.asarray(shape[-2:], float) - 0.5
    inside = ((sites - half >= -0.5) & (sites + half <= lim)).all(axis=1)
    counts = {int(g): int(inside[groups == g].sum()) for g in np.unique(groups)}
    few = {g: c for g, c in counts.items() if c < MIN_COLUMNS}
    return f"{min(few.values())} in one kind of column" if few else None


def _too_small_note(detector, why: str) -> str:
    from .column_anomaly import MIN_COLUMNS

    return (f"anomaly not scored: the image is too small for the per-image standardisation (it needs "
            f"{MIN_COLUMNS} columns whose whole {detector.edge_A:.1f} Å patch lies in the image): {why}")


def run_networks(plans: list[ColumnPlan], classifier, detector) -> list[tuple]:
    """[(species probabilities or None, anomaly reconstruction or None)] per plan: every plan's
    patches through each network in one batch (one backend call per network and 1024 patches)."""
    sp = [p.species_patches.patches for p in plans if p.species_patches is not None]
    an = [p.anomaly_prep[1].patches for p in plans if p.anomaly_prep is not None]
    probs = iter(_split(classifier.probabilities(np.concatenate(sp)), [len(x) for x in sp]) if sp else [])
    recs = iter(_split(detector.reconstruct(np.concatenate(an)), [len(x) for x in an]) if an else [])
    return [(next(probs) if p.species_patches is not None else None,
             next(recs) if p.anomaly_prep is not None else None) for p in plans]


def _split(a: np.ndarray, sizes: list[int]) -> list[np.ndarray]:
    return np.split(a, np.cumsum(sizes)[:-1])


def finish_columns(plan: ColumnPlan, classifier, detector, probs: np.ndarray | None,
                   reconstruction: np.ndarray | None) -> dict:
    """Species of the classified columns and anomaly of every column of ``plan`` from the
    networks' outputs (:func:`run_networks`); unknown: probabilities NaN, score NaN."""
    n, m, k = len(plan.positions_px), len(plan.classify), len(classifier.classes)
    species = np.zeros(m, int)
    p_out = np.full((m, k), np.nan, np.float32)
    complete = np.zeros(m, bool)
    if probs is not None:
        species, p_out, complete = probs.argmax(axis=1), probs.astype(np.float32), plan.species_patches.complete
    score = np.full(n, np.nan)
    flagged = np.zeros(n, bool)
    parts: dict = {}
    if reconstruction is not None:
        try:
            res = detector.score(plan.haadf, plan.abf, plan.sites_px, sampling_A=plan.sampling_A,
                                 groups=plan.sublattice, prepared=plan.anomaly_prep, reconstruction=reconstruction)
            # a patch reaching beyond the image is filled at its edge: not judged
            score = np.where(res.complete, res.score, np.nan)
            flagged = res.flagged & res.complete
            parts = {name: np.where(res.complete, v, np.nan) for name, v in res.parts.items()}
        except ValueError as exc:
            if "at least" not in str(exc) and "no spread" not in str(exc):
                raise
            plan.notes.append(_too_small_note(detector, str(exc)))
    return {"species": species, "probabilities": p_out, "species_complete": complete, "anomaly_score": score,
            "anomaly_flagged": flagged, "parts": parts}


def _safe(name: str) -> str:
    return re.sub(r"[^0-9A-Za-z]+", "_", name)


def csv_header(res: AnalysedColumns, with_A: bool) -> list[str]:
    return (["row_px", "col_px", "confidence", "intensity"] + (["row_A", "col_A"] if with_A else [])
            + ["site_row_px", "site_col_px", "species"] + [f"p_{_safe(c)}" for c in res.classes]
            + ["species_complete", "anomaly_score", "anomaly_flagged"] + [f"anomaly_{p}" for p in res.parts])


def write_csv(path: Path, res: AnalysedColumns) -> None:
    """One row per column (header: :func:`csv_header`); Å columns when the sampling is known."""
    with_A = res.sampling_A is not None
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(csv_header(res, with_A))
        for i, ((r, c), conf, inten) in enumerate(zip(res.positions_px, res.confidence, res.intensity)):
            row = [f"{r:.3f}", f"{c:.3f}", f"{conf:.4f}", f"{inten:.6g}"]
            if with_A:
                row += [f"{r * res.sampling_A:.4f}", f"{c * res.sampling_A:.4f}"]
            row += [f"{res.sites_px[i, 0]:.3f}", f"{res.sites_px[i, 1]:.3f}",
                    res.classes[res.species[i]] if np.isfinite(res.probabilities[i]).all() else ""]
            row += [f"{p:.4f}" for p in res.probabilities[i]]
            row += [int(res.species_complete[i]), f"{res.anomaly_score[i]:.3f}", int(res.anomaly_flagged[i])]
            row += [f"{v[i]:.3f}" for v in res.parts.values()]
            w.writerow(row)


def write_h5(path: Path, res: AnalysedColumns, image: str, contrast: str) -> None:
    """/columns/... datasets (one row per column); attributes name the models' ids (and their
    roles), the sampling and where it came from, the anomaly threshold, the lattice, the notes."""
    import h5py
    from importlib.metadata import version

    with h5py.File(path, "w") as f:
        g = f.create_group("columns")
        g["positions_px"] = res.positions_px.astype(np.float64)
        g["confidence"] = res.confidence.astype(np.float32)
        g["intensity"] = res.intensity.astype(np.float64)
        g["sites_px"] = res.sites_px.astype(np.float64)
        g["species"] = res.species.astype(np.int16)
        g["species"].attrs["classes"] = json.dumps(list(res.classes))
        g["probabilities"] = res.probabilities.astype(np.float32)
        g["probabilities"].attrs["classes"] = json.dumps(list(res.classes))
        g["species_complete"] = res.species_complete
        g["anomaly_score"] = res.anomaly_score.astype(np.float32)
        g["anomaly_flagged"] = res.anomaly_flagged
        for name, v in res.parts.items():
            g[f"anomaly_{name}"] = np.asarray(v, np.float32)
        if res.sampling_A is not None:
            g["positions_A"] = res.positions_px * res.sampling_A
        a = f.attrs
        a["image"] = str(image)
        a["contrast"] = contrast
        a["sampling_A_per_px"] = np.nan if res.sampling_A is None else float(res.sampling_A)
        a["sampling_source"] = res.sampling_source
        a["models"] = json.dumps(res.models)
        for role, cid in res.models.items():
            a[f"{role}_model_id"] = cid
        a["anomaly_threshold"] = res.anomaly_threshold
        a["lattice"] = json.dumps(res.lattice)
        a["notes"] = json.dumps(res.notes)
        a["stemlive_version"] = version("stemlive")


def read_h5(path: Path) -> dict:
    """Datasets and attributes of a file written by :func:`write_h5` (tests, notebooks)."""
    import h5py

    with h5py.File(path, "r") as f:
        out = {k: f["columns"][k][()] for k in f["columns"]}
        out["attrs"] = dict(f.attrs)
    return out


class BlockColumns:
    """Species and anomaly of the columns an `AtomStitcher` kept, live, per block window.

    Each block's window (the block and its margin, the pixels the finder read, all final) is
    one image for :func:`plan_columns`: its per-image standardisation, lattice fit and anomaly
    reference use every column found in the window, so a block's result depends on nothing but
    its window -- the same in any order the blocks complete (live = replay).  All windows of one
    engine step go through each network in one batch.  The anomaly's standardisation needs
    ``column_anomaly.MIN_COLUMNS`` complete patches of each kind in the window; a smaller
    window leaves its columns' anomaly NaN (counted in ``unscored_blocks``)."""

    def __init__(self, classifier, detector, contrast: str, sampling_A: float):
        self.classifier = classifier
        self.detector = detector
        self.contrast = contrast
        self.sampling_A = float(sampling_A)
        self.classes = tuple(classifier.classes)
        self.threshold = float(detector.threshold)
        self.unscored_blocks = 0  # blocks whose window was too small to standardise the anomaly
        self.seconds: list = []  # per engine step

    @property
    def cards(self) -> list:
        return [self.classifier.card, self.detector.card]

    def analyse(self, virtual: dict, windows: list, rows):
        """``rows`` (the `AtomRows` of ``windows``, in their order) with species and anomaly;
        ``virtual``: the scan-grid HAADF and ABF images."""
        import time

        t = time.perf_counter()
        haadf, abf = virtual["haadf"], virtual["abf"]
        plans = [plan_columns(haadf[ws], abf[ws], pos, self.contrast, self.classifier, self.detector,
                              self.sampling_A, classify=np.flatnonzero(keep)) for _, ws, pos, keep in windows]
        k = len(self.classes)
        species, probs, score, flag = [], [], [], []
        for plan, (p, rec), (_, _, _, keep) in zip(plans, run_networks(plans, self.classifier, self.detector),
                                                   windows):
            r = finish_columns(plan, self.classifier, self.detector, p, rec)
            m = len(plan.classify)
            known = np.isfinite(r["probabilities"]).all(axis=1) if m else np.zeros(0, bool)
            species.append(np.where(known, r["species"], -1).astype(np.int8))
            probs.append(r["probabilities"].reshape(m, k).astype(np.float32))
            score.append(r["anomaly_score"][keep].astype(np.float32))
            flag.append(r["anomaly_flagged"][keep].astype(bool))
            if len(plan.positions_px) and not np.isfinite(r["anomaly_score"]).any():
                self.unscored_blocks += 1
        out = type(rows)(rows.positions_px, rows.confidence, rows.intensity, rows.block)
        cat = (lambda a, shape, dt: np.concatenate(a) if a else np.zeros(shape, dt))
        out.species, out.species_prob = cat(species, 0, np.int8), cat(probs, (0, k), np.float32)
        out.anomaly, out.anomaly_flag = cat(score, 0, np.float32), cat(flag, 0, bool)
        if len(out.species) != len(rows):
            raise RuntimeError(f"column analyses: {len(out.species)} results for {len(rows)} columns")
        self.seconds.append(time.perf_counter() - t)
        return out
