"""Which of the atom network's peaks are columns: a per-peak test from the image itself.

The network answers "column here" at every bump of a noisy image, most of all in ABF, where
columns dip only a few noise levels below the background.  Three tests, each cheap:

* **contrast above the noise** (`contrast_z`): a column is a lattice feature, so the image is
  first kept only at the spatial frequencies whose power stands clearly above the white-noise
  floor (Bragg filter: 3×3-summed power > ``BRAGG_FLOOR_FACTOR`` × the floor, which shot noise
  alone almost never reaches; the floor from the median power, as in ``structure_score``) and
  smoothed at the column width (0.3 Å).  The height of the peak over the lowest level within
  0.9-1.3 Å (the gaps between columns), over the standard deviation white noise would have after
  the same filters, is a z-score: a column stands out of the gaps around it, a bump of noise
  hardly does.
* **no two columns closer than** ``MIN_SEPARATION_A`` (0.9 Å; the closest columns of the
  structures the networks know are 1.38 Å apart): of two peaks closer than that the less
  confident one is a second answer for the same column.
* **the locator's own confidence** (the network's peak height) above a floor per contrast.

The thresholds (:data:`SCREENS`) were tuned on training seeds (``python -m
stemlive.models.column_filter --contrast abf``) and measured on the benchmark's held-out seeds
(README, "Atom finding").  Without a sampling the length scales come from the column spacing
measured from the image (0.3 Å and 0.9 Å are 0.15 and 0.45 of a 2 Å spacing).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree

BRAGG_FLOOR_FACTOR = 3.0  # summed 3×3 power over the mean noise power a lattice frequency must reach
COLUMN_SIGMA_A = 0.3  # smoothing at a column's width
BACKGROUND_RADIUS_A = 0.9  # the gaps between columns lie within this of every column (default)
MIN_SEPARATION_A = 0.9
REFERENCE_SPACING_A = 2.0  # length scales without a sampling: fractions of the measured spacing


@dataclass(frozen=True)
class Screen:
    """Thresholds of the three tests (see the module docstring).  ``min_confidence`` is a floor
    above the card's own threshold (0: the card's alone); ``background_A`` the radius the gaps
    between columns are looked for in."""

    min_confidence: float
    min_contrast_z: float
    min_separation_A: float = MIN_SEPARATION_A
    background_A: float = BACKGROUND_RADIUS_A


# tuned on training seeds (`column_filter_tune`, 10 images at each of 10³, 10⁴, 10⁵ e/Å², once of
# the training structures and once of made-up crystals, `--random-lattices 1`, standing in for
# structures the network never saw): confidence 0.15-0.9, z -∞ to 5, separation 0 or 0.9 Å,
# background radius 0.9 or 1.3 Å; chosen for the summed F1 at 10⁴ and 10⁵ of both sets, recall
# lost at no dose above the precision gained.  P/R at 10⁴, the card's threshold alone ->
# screened: ABF 0.58/0.77 -> 0.87/0.68 (training structures), 0.21/0.65 -> 0.77/0.59 (made-up).
# HAADF keeps the card's confidence threshold: a floor of 0.7-0.8 gained on the training
# structures (0.976/0.995 -> 0.988/0.994 at 10⁴) but cost recall on made-up crystals (0.997 ->
# 0.988-0.973) and on the benchmark's unseen structures (0.973 -> 0.931 at 10⁴ with 0.7), so
# HAADF is screened by contrast and separation only (made-up, 10³: 0.865/0.949 -> 0.897/0.949).
SCREENS = {
    "abf": Screen(min_confidence=0.3, min_contrast_z=4.0, background_A=1.3),
    "haadf": Screen(min_confidence=0.0, min_contrast_z=2.0, background_A=1.3),
}


def noise_sigma(image: np.ndarray) -> float:
    """Per-pixel standard deviation of white noise, from the median of the power spectrum.

    A lattice puts its power into a few frequencies; the median frequency holds noise only, and
    white-noise power is exponential, whose median is ln 2 × its mean."""
    x = np.asarray(image, np.float64)
    p = np.abs(np.fft.fft2(x - x.mean())) ** 2
    return float(np.sqrt(np.median(p) / np.log(2) / x.size))


def contrast_z(image: np.ndarray, positions_px: np.ndarray, column_sigma_px: float,
               background_radius_px: float) -> np.ndarray:
    """Bragg-filtered contrast at each position over the lowest level around it, in noise units.

    ``image``: columns bright (invert ABF first).  Positions (row, col) in its pixels.  The
    background is the minimum within ``background_radius_px``: the space between columns, not
    their mean (a weak oxygen column between bright cation columns is darker than their mean,
    yet brighter than the gaps).  The minimum of noise is below its mean, so a pure noise bump
    scores ~2, not 0; the threshold is tuned with this in it."""
    x = np.asarray(image, np.float64)
    if x.ndim != 2:
        raise ValueError(f"expected one image (H×W), got shape {x.shape}")
    if not (column_sigma_px > 0 and background_radius_px >= 1):
        raise ValueError(f"the column scale ({column_sigma_px} px) must be positive and the background radius "
                         f"({background_radius_px} px) at least 1 px")
    pos = np.asarray(positions_px, np.float64).reshape(-1, 2)
    if len(pos) == 0:
        return np.zeros(0)
    spectrum = np.fft.fft2(x - x.mean())
    power = np.abs(spectrum) ** 2
    floor = float(np.median(power)) / np.log(2)
    if floor <= 0:  # a noiseless image: every frequency with power is signal
        keep = power > 0
    else:
        summed = ndimage.uniform_filter(power, 3, mode="wrap") * 9
        keep = ndimage.binary_dilation(summed > 9 * BRAGG_FLOOR_FACTOR * floor, np.ones((3, 3), bool))
    keep[0, 0] = False
    f2 = np.fft.fftfreq(x.shape[0])[:, None] ** 2 + np.fft.fftfreq(x.shape[1])[None, :] ** 2
    transfer = keep * np.exp(-2 * np.pi ** 2 * column_sigma_px ** 2 * f2)
    filtered = np.real(np.fft.ifft2(spectrum * transfer))
    rr = int(np.ceil(background_radius_px))
    dr, dc = np.mgrid[-rr:rr + 1, -rr:rr + 1]
    background = ndimage.minimum_filter(filtered, footprint=dr ** 2 + dc ** 2 <= background_radius_px ** 2,
                                        mode="nearest")
    sigma = np.sqrt(max(floor, 1e-30) / x.size) * np.sqrt(np.mean(transfer ** 2))
    values = ndimage.map_coordinates(filtered - background, pos.T, order=1, mode="nearest")
    return values / max(sigma, 1e-30)


def suppress_close(positions_px: np.ndarray, score: np.ndarray, radius_px: float) -> np.ndarray:
    """Keep mask: of peaks closer than ``radius_px``, only the one with the higher score."""
    pos = np.asarray(positions_px, np.float64).reshape(-1, 2)
    keep = np.ones(len(pos), bool)
    if len(pos) < 2 or radius_px <= 0:
        return keep
    tree = cKDTree(pos)
    for i in np.argsort(-np.asarray(score), kind="stable"):
        if keep[i]:
            near = [j for j in tree.query_ball_point(pos[i], radius_px) if j != i]
            keep[near] = False
    return keep


@dataclass(frozen=True)
class Scales:
    """The tests' length scales in the image's pixels."""

    column_px: float
    background_px: float
    separation_px: float

    @classmethod
    def from_sampling(cls, sampling_A: float, screen: Screen) -> "Scales":
        return cls(max(0.7, COLUMN_SIGMA_A / sampling_A), max(1.5, screen.background_A / sampling_A),
                   screen.min_separation_A / sampling_A)

    @classmethod
    def from_spacing(cls, spacing_px: float, screen: Screen) -> "Scales":
        return cls.from_sampling(REFERENCE_SPACING_A / spacing_px, screen)


def screen_columns(image: np.ndarray, positions_px: np.ndarray, confidence: np.ndarray, scales: Scales,
                   screen: Screen) -> tuple[np.ndarray, np.ndarray]:
    """(keep mask, contrast z of every peak): the peaks that pass all three tests.

    ``image`` with columns bright (ABF inverted), positions in its pixels."""
    conf = np.asarray(confidence, np.float64)
    z = contrast_z(image, positions_px, scales.column_px, scales.background_px)
    keep = (conf > screen.min_confidence) & (z > screen.min_contrast_z)
    idx = np.flatnonzero(keep)
    keep[idx] = suppress_close(np.asarray(positions_px)[idx], conf[idx], scales.separation_px)
    return keep, z
