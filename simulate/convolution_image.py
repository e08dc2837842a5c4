"""STEM images in the convolution approximation: columns (weights) convolved with the probe.

An incoherent HAADF image is, to a good approximation, a map of column weights (Σ Z^n per
length along each column) convolved with the probe intensity.  This is the fast route to the
many training images of atom finding (~0.1 s per 512² image here against hours of multislice);
the weights per column type are to be fitted to multislice references (issue 6).  The probe
comes from abTEM, built at the origin (``build(scan=[[0, 0]])``: a plain ``build()`` centres it
in the cell).
"""
from __future__ import annotations

import numpy as np

from .columns import ColumnSet


def probe_intensity(kv: float, alpha_mrad: float, sampling_A: float, extent_A: float, defocus_A: float = 0.0,
                    cs_A: float = 0.0) -> np.ndarray:
    """Probe intensity on a periodic grid with the probe at pixel (0, 0), normalised to sum 1."""
    import abtem

    # the grid by its pixel count: abTEM rounds extent / sampling up, and 96 · s / s can be 96.0000001
    gpts = int(round(extent_A / sampling_A))
    probe = abtem.Probe(energy=kv * 1e3, semiangle_cutoff=alpha_mrad, gpts=gpts, extent=extent_A,
                        defocus=defocus_A, Cs=cs_A)
    waves = probe.build(scan=[[0.0, 0.0]]).compute()
    intensity = np.abs(np.asarray(waves.array)) ** 2
    intensity = intensity.reshape(intensity.shape[-2:])
    return intensity / intensity.sum()


def column_map(positions_px: np.ndarray, weights: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Weights deposited bilinearly at sub-pixel positions (row, col) on a periodic grid."""
    out = np.zeros(shape)
    r, c = positions_px[:, 0], positions_px[:, 1]
    r0, c0 = np.floor(r).astype(int), np.floor(c).astype(int)
    fr, fc = r - r0, c - c0
    for dr, dc, w in ((0, 0, (1 - fr) * (1 - fc)), (1, 0, fr * (1 - fc)), (0, 1, (1 - fr) * fc), (1, 1, fr * fc)):
        np.add.at(out, ((r0 + dr) % shape[0], (c0 + dc) % shape[1]), weights * w)
    return out


def convolution_image(columns: ColumnSet, reps: tuple[int, int], sampling_A: float, probe: np.ndarray,
                      exponent: float = 1.7, origin_A: tuple[float, float] = (0.0, 0.0)) -> tuple[np.ndarray, np.ndarray]:
    """Noise-free image of reps[0] × reps[1] cells and the column positions in pixels.

    ``probe`` must be on the image's grid (same shape, probe at pixel 0).  Pixel (i, j) is at
    (i, j) × sampling Å (pixel centres at integer indices, DESIGN.md).
    """
    shape = (int(round(reps[0] * columns.cell_A[0] / sampling_A)), int(round(reps[1] * columns.cell_A[1] / sampling_A)))
    if probe.shape != shape:
        raise ValueError(f"probe grid {probe.shape} differs from the image grid {shape}")
    pos_A, index = columns.tile(reps)
    pos_px = (pos_A + np.asarray(origin_A)) / sampling_A
    weights = columns.z_weight(exponent)[index]
    image = np.real(np.fft.ifft2(np.fft.fft2(column_map(pos_px, weights, shape)) * np.fft.fft2(probe)))
    return image, pos_px
