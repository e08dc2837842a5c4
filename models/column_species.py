"""`SpeciesClassifier`: what each located column is (SrTiO3 [001]: Sr, Ti-O, O, vacant, partial).

A shipped network (card task ``column-species``) reads patches of the HAADF and the ABF image of
the same scan, each standardised per image as the atom finders' inputs are (ABF inverted), one
cell wide around each column (`column_patches`), and answers the probability of each class.
A card with four input channels (``reference``) also reads the *reference* of each column:
the pixelwise median of the same-sized patches of its four same-sublattice neighbours, one
cell away (`neighbour_positions`), so the network compares a column with columns of its own
kind in the same image -- what tells a partly occupied column from a full one, whose absolute
contrast varies with thickness, detector and probe.  The patch edge comes from the card (``patch_edge_A``) and the sampling; without
a sampling, from two nearest-neighbour spacings of the columns given (right when every column,
oxygen included, was located, e.g. by the ABF finder).  Patches that reach beyond the image or
into unmeasured pixels are classified too, and flagged (``complete`` False).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .atom_analysis import network_input
from .backends import load_backend
from .cards import SHIPPED_DIR, ModelCard, latest_card, verify
from .column_patches import ColumnPatches, column_spacing, extract_patches, patch_edge_px

TASK = "column-species"


@dataclass
class ColumnSpecies:
    classes: tuple[str, ...]
    label: np.ndarray  # (n,) int: index into classes
    probabilities: np.ndarray  # (n, n_classes) float32
    complete: np.ndarray  # (n,) bool: the whole patch lay in measured pixels

    def names(self) -> list[str]:
        return [self.classes[i] for i in self.label]


def classifier_input(haadf: np.ndarray, abf: np.ndarray) -> np.ndarray:
    """(2, H, W): both images standardised per image, ABF inverted (columns bright in both)."""
    haadf, abf = np.asarray(haadf), np.asarray(abf)
    if haadf.shape != abf.shape or haadf.ndim != 2:
        raise ValueError(f"HAADF and ABF must be two images of one scan (same H×W); got {haadf.shape} and {abf.shape}")
    out = []
    for img, contrast in ((haadf, "haadf"), (abf, "abf")):
        finite = np.isfinite(img)
        filled = np.where(finite, img, np.nanmean(img) if finite.any() else 0.0)
        x = network_input(filled, contrast)
        out.append(np.where(finite, x, np.nan))  # unmeasured stays unmeasured: the patches flag it
    return np.stack(out)


NEIGHBOUR_RANGE = (0.9, 1.06)  # same-sublattice pairs: within this × the cell (the next, O at 1.118 cells, is not)
SNAP = 0.15  # a predicted neighbour snaps to a located column within this × the cell


def neighbour_positions(positions_px: np.ndarray, context_px: np.ndarray, cell_px: float) -> np.ndarray | None:
    """(n, 4, 2) the four same-sublattice neighbours, one cell away, of each column.

    The square lattice's direction (mod 90°) and edge are measured from the pairs of
    ``context_px`` columns about one cell (``cell_px``) apart; each column's four neighbours are
    predicted from its own position and snapped to the located column nearest, when one lies
    within ``SNAP`` cells (a column not located -- an emptied site the finder skipped -- is
    sampled where the lattice puts it).  None when the context holds no such pair."""
    from scipy.spatial import cKDTree

    pos = np.asarray(positions_px, np.float64).reshape(-1, 2)
    ctx = np.asarray(context_px, np.float64).reshape(-1, 2)
    if len(ctx) < 2:
        return None
    tree = cKDTree(ctx)
    pairs = tree.query_pairs(NEIGHBOUR_RANGE[1] * cell_px, output_type="ndarray")
    if not len(pairs):
        return None
    d = ctx[pairs[:, 1]] - ctx[pairs[:, 0]]
    r = np.hypot(d[:, 0], d[:, 1])
    keep = r > NEIGHBOUR_RANGE[0] * cell_px
    if not keep.any():
        return None
    a = float(np.median(r[keep]))
    theta = np.angle(np.exp(4j * np.arctan2(d[keep, 1], d[keep, 0])).sum()) / 4
    turns = theta + np.arange(4) * np.pi / 2
    vec = a * np.stack([np.cos(turns), np.sin(turns)], axis=1)  # (4, 2) row, col
    pred = pos[:, None, :] + vec[None]
    dist, idx = tree.query(pred.reshape(-1, 2), distance_upper_bound=SNAP * a)
    hit = np.isfinite(dist)
    out = pred.reshape(-1, 2).copy()
    out[hit] = ctx[idx[hit]]
    return out.reshape(len(pos), 4, 2)


def species_patches(stack: np.ndarray, positions_px: np.ndarray, edge_px: float, size: int,
                    reference: bool, context_px: np.ndarray | None = None, cell_px: float | None = None
                    ) -> ColumnPatches:
    """Patches of the (C, H, W) ``stack`` around each column; with ``reference`` C more channels:
    the pixelwise median of the four neighbours' patches (`neighbour_positions` among
    ``context_px``, default the columns themselves; ``cell_px`` default ``edge_px``).  Only
    neighbour patches that lie wholly in measured pixels count; a column with none (or no lattice
    to find them) takes its own patch as reference and is flagged incomplete."""
    pos = np.asarray(positions_px, np.float64).reshape(-1, 2)
    own = extract_patches(stack, pos, edge_px=edge_px, size=size)
    if not reference:
        return own
    ctx = pos if context_px is None else np.asarray(context_px, np.float64).reshape(-1, 2)
    neigh = neighbour_positions(pos, ctx, edge_px if cell_px is None else cell_px)
    if neigh is None:
        return ColumnPatches(np.concatenate([own.patches, own.patches], axis=1), np.zeros_like(own.valid),
                             own.centres_px, own.edge_px, own.size)
    nb = extract_patches(stack, neigh.reshape(-1, 2), edge_px=edge_px, size=size)
    x = nb.patches.reshape(len(pos), 4, *nb.patches.shape[1:]).copy()
    ok = nb.complete.reshape(len(pos), 4)
    x[~ok] = np.nan
    some = ok.any(axis=1)
    ref = np.where(some[:, None, None, None], np.nanmedian(np.where(some[:, None, None, None, None], x, 0), axis=1),
                   own.patches)
    return ColumnPatches(np.concatenate([own.patches, ref.astype(np.float32)], axis=1),
                         own.valid & some[:, None, None], own.centres_px, own.edge_px, own.size)


class SpeciesClassifier:
    """The species network behind an inference backend."""

    def __init__(self, card: ModelCard, backend: str = "onnxruntime", threads: int | None = None):
        self.card = card
        verify(card)
        inp = card.data["input"]
        self.classes = tuple(card.data["classes"])
        self.size = int(inp["shape"][-1])
        self.reference = int(inp["shape"][0]) == 4  # HAADF, ABF and their neighbours' median
        self.edge_A = float(inp["patch_edge_A"])
        self.spacings = float(inp["patch_spacings"])
        self.cell_A = float(inp.get("neighbour_A", self.edge_A))  # same-sublattice neighbours this far apart
        self.cell_spacings = float(inp.get("neighbour_spacings", self.spacings))
        self.backend = load_backend(card.onnx_path, backend, threads=threads)
        verify(card, self.backend.metadata())

    @classmethod
    def shipped(cls, models_dir: str | Path = SHIPPED_DIR, **kw) -> "SpeciesClassifier":
        return cls(latest_card(models_dir, TASK, "`python -m stemlive.simulate.species_train`"), **kw)

    def edge_px(self, positions_px: np.ndarray, sampling_A: float | None) -> float:
        return patch_edge_px(self.edge_A, self.spacings, positions_px, sampling_A)

    def classify(self, haadf: np.ndarray, abf: np.ndarray, positions_px: np.ndarray,
                 sampling_A: float | None = None, batch: int = 1024,
                 context_px: np.ndarray | None = None) -> ColumnSpecies:
        """Class of every column at ``positions_px`` (row, col) of the HAADF/ABF pair
        (``context_px``: every located column, where the neighbours are looked for; default
        ``positions_px``)."""
        pos = np.asarray(positions_px, np.float64).reshape(-1, 2)
        n = len(self.classes)
        if len(pos) == 0:
            return ColumnSpecies(self.classes, np.zeros(0, int), np.zeros((0, n), np.float32), np.zeros(0, bool))
        p = self.patches(haadf, abf, pos, sampling_A, context_px)
        probs = self.probabilities(p.patches, batch)
        return ColumnSpecies(self.classes, probs.argmax(axis=1), probs.astype(np.float32), p.complete)

    def patches(self, haadf: np.ndarray, abf: np.ndarray, positions_px: np.ndarray,
                sampling_A: float | None = None, context_px: np.ndarray | None = None) -> ColumnPatches:
        """The network's input patches for the columns (separate, so many images' patches can
        share one batch: the live engine classifies all columns of an engine step at once).
        ``context_px``: every located column of the image (the neighbours are looked for among
        them and ``positions_px``; default ``positions_px`` alone)."""
        pos = np.asarray(positions_px, np.float64).reshape(-1, 2)
        ctx = pos if context_px is None else np.concatenate([np.asarray(context_px, np.float64).reshape(-1, 2), pos])
        edge = self.edge_px(ctx, sampling_A)
        cell = edge * self.cell_A / self.edge_A if sampling_A is not None else \
            self.cell_spacings * column_spacing(ctx)
        return species_patches(classifier_input(haadf, abf), pos, edge, self.size, self.reference, ctx, cell)

    def probabilities(self, patches: np.ndarray, batch: int = 1024) -> np.ndarray:
        """(n, n_classes) float32 class probabilities of (n, 2, P, P) patches."""
        if len(patches) == 0:
            return np.zeros((0, len(self.classes)), np.float32)
        return np.concatenate([self.backend(np.ascontiguousarray(patches[i:i + batch], np.float32))["probabilities"]
                               for i in range(0, len(patches), batch)]).astype(np.float32)
