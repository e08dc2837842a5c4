"""Held-out raw PACBED patterns with their truth, for benchmarks and accuracy tests (torch).

Patterns come from the held-out simulations of a library (tilts, hence phonon seeds, the
training never saw), through the same experiment model as training, with a random
misalignment as a raw recording has it: centre anywhere within ±5 px of the frame centre, disk
radius ±20 %, rotation anywhere in ±45°.  Each is a 64×64 detector frame (α ≈ 12 px) in counts.
Truth follows DESIGN.md: ``tilt_mrad`` in the detector frame, ``tilt_crystal_mrad`` = R(θ)·tilt.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np

from ..models import canonical
from .library import PacbedLibrary
from .pacbed_data import Augment, PacbedSampler, sample_heldout

RAW_MISALIGNMENT = dict(shift_px=5.0, scale=0.2, rotation_deg=45.0)


def heldout_raw_patterns(library: str | Path | PacbedLibrary, n: int, dose: float, seed: int = 0,
                         holdout_fraction: float = 0.1, sampler_seed: int = 0,
                         aug: Augment | None = None) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """(patterns (n, 64, 64) float32 counts, truth).  The held-out split is the one training used
    with the same ``holdout_fraction`` and ``sampler_seed`` (TrainConfig.holdout_fraction, .seed).
    The same ``seed`` at another dose gives the same patterns and misalignments, other noise."""
    lib = library if isinstance(library, PacbedLibrary) else PacbedLibrary.load(library)
    sampler = PacbedSampler(lib, holdout_fraction, seed=sampler_seed)
    aug = replace(aug or Augment(), **RAW_MISALIGNMENT)
    _, lab = sample_heldout(sampler, n, seed, aug, dose=dose, subtract_background=False)
    c = (canonical.PIXELS - 1) / 2
    rot = lab["rotation_deg"].numpy().astype(float)
    tilt = lab["tilt_mrad"].numpy().astype(float)
    tilt_c = np.einsum("nij,nj->ni", np.stack([canonical.rotation_matrix(t) for t in rot]), tilt)
    truth = {
        "center_px": c + lab["center_offset_px"].numpy().astype(float),
        "radius_px": canonical.ALPHA_PX * lab["radius_ratio"].numpy().astype(float),
        "rotation_deg": rot, "thickness_nm": lab["thickness_nm"].numpy().astype(float),
        "tilt_mrad": tilt, "tilt_crystal_mrad": tilt_c,
        "background_units_of_mean": lab["background_total"].numpy().astype(float),
    }
    return lab["counts"][:, 0].numpy().astype(np.float32), truth
