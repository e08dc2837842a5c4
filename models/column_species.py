"""`SpeciesClassifier`: what each located column is (SrTiO3 [001]: Sr, Ti-O, O, vacant, partial).

A shipped network (card task ``column-species``) reads two-channel patches -- the HAADF and the
ABF image of the same scan, each standardised per image as the atom finders' inputs are (ABF
inverted) -- one cell wide around each column (`column_patches`), and answers the probability
of each class.  The patch edge comes from the card (``patch_edge_A``) and the sampling; without
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
from .column_patches import ColumnPatches, extract_patches, patch_edge_px

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


class SpeciesClassifier:
    """The species network behind an inference backend."""

    def __init__(self, card: ModelCard, backend: str = "onnxruntime", threads: int | None = None):
        self.card = card
        verify(card)
        inp = card.data["input"]
        self.classes = tuple(card.data["classes"])
        self.size = int(inp["shape"][-1])
        self.edge_A = float(inp["patch_edge_A"])
        self.spacings = float(inp["patch_spacings"])
        self.backend = load_backend(card.onnx_path, backend, threads=threads)
        verify(card, self.backend.metadata())

    @classmethod
    def shipped(cls, models_dir: str | Path = SHIPPED_DIR, **kw) -> "SpeciesClassifier":
        return cls(latest_card(models_dir, TASK, "`python -m stemlive.simulate.species_train`"), **kw)

    def edge_px(self, positions_px: np.ndarray, sampling_A: float | None) -> float:
        return patch_edge_px(self.edge_A, self.spacings, positions_px, sampling_A)

    def classify(self, haadf: np.ndarray, abf: np.ndarray, positions_px: np.ndarray,
                 sampling_A: float | None = None, batch: int = 1024) -> ColumnSpecies:
        """Class of every column at ``positions_px`` (row, col) of the HAADF/ABF pair."""
        pos = np.asarray(positions_px, np.float64).reshape(-1, 2)
        n = len(self.classes)
        if len(pos) == 0:
            return ColumnSpecies(self.classes, np.zeros(0, int), np.zeros((0, n), np.float32), np.zeros(0, bool))
        p = self.patches(haadf, abf, pos, sampling_A)
        probs = self.probabilities(p.patches, batch)
        return ColumnSpecies(self.classes, probs.argmax(axis=1), probs.astype(np.float32), p.complete)

    def patches(self, haadf: np.ndarray, abf: np.ndarray, positions_px: np.ndarray,
                sampling_A: float | None = None) -> ColumnPatches:
        """The network's input patches for the columns (separate, so many images' patches can
        share one batch: the live engine classifies all columns of an engine step at once)."""
        pos = np.asarray(positions_px, np.float64).reshape(-1, 2)
        return extract_patches(classifier_input(haadf, abf), pos, edge_px=self.edge_px(pos, sampling_A),
                               size=self.size)

    def probabilities(self, patches: np.ndarray, batch: int = 1024) -> np.ndarray:
        """(n, n_classes) float32 class probabilities of (n, 2, P, P) patches."""
        if len(patches) == 0:
            return np.zeros((0, len(self.classes)), np.float32)
        return np.concatenate([self.backend(np.ascontiguousarray(patches[i:i + batch], np.float32))["probabilities"]
                               for i in range(0, len(patches), batch)]).astype(np.float32)
