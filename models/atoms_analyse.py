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
    from .column_anomaly import MIN_COLUMNS
    from .column_lattice import lattice_sites

    haadf = np.asarray(haadf, np.float64)
    abf = np.asarray(abf, np.float64)
    for name, img in (("HAADF", haadf), ("ABF", abf)):
        if not np.isfinite(img).all():
            raise ValueError(f"the {name} image has NaN or infinite pixels")
    image = haadf if contrast == "haadf" else abf
    found = finder.find(image, sampling_A, require_structure=True)
    pos = found.positions_px
    n = len(pos)
    notes = [found.note] if found.note else []
    models = {"finder": finder.card.id, "species": classifier.card.id, "anomaly": detector.card.id}
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
    k = len(classifier.classes)
    species = np.zeros(n, int)
    probs = np.full((n, k), np.nan, np.float32)
    complete = np.zeros(n, bool)
    if n and s is not None:
        sp = classifier.classify(haadf, abf, pos, sampling_A=s)
        species, probs, complete = sp.label, sp.probabilities, sp.complete
    elif n:
        notes.append("no sampling and no lattice to take it from: no species")
    score = np.full(n, np.nan)
    flagged = np.zeros(n, bool)
    parts: dict = {}
    if ls is not None and s is not None:
        try:
            res = detector.score(haadf, abf, sites, sampling_A=s, groups=ls.sublattice)
            # a patch reaching beyond the image is filled at its edge: not judged
            score = np.where(res.complete, res.score, np.nan)
            flagged = res.flagged & res.complete
            parts = {k: np.where(res.complete, v, np.nan) for k, v in res.parts.items()}
        except ValueError as exc:
            if "at least" not in str(exc) and "no spread" not in str(exc):
                raise
            notes.append(f"anomaly not scored: the image is too small for the per-image standardisation "
                         f"(it needs {MIN_COLUMNS} columns whose whole {detector.edge_A:.1f} Å patch lies in the "
                         f"image): {exc}")
    return AnalysedColumns(pos, found.confidence, found.intensity, sites, tuple(classifier.classes), species, probs,
                           complete, score, flagged, float(detector.threshold), s, source, models, notes, parts,
                           lat_info)


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
