"""Centre-of-mass (CoM / DPC) maps and their integral (iDPC) from LiberTEM's `CoMUDF`.

The live path runs LiberTEM's own `CoMUDF` (whole-frame centre of mass, ``raw_com`` per frame in
detector pixels); the engine turns each frame's CoM into its shift from the calibrated disk
centre and into the scan frame with LiberTEM's `apply_correction` (scan rotation: LiberTEM's
convention, a positive angle turns the shift clockwise; ``flip_y`` for detectors whose first row
is at the bottom).  Shifts are in mrad where the detector calibration is known, else px.

iDPC integrates the shift field: the CoM of a thin specimen moves with the gradient of its
projected potential (the beam is pulled towards the nuclei), so the field's integral is the
potential, columns bright -- light ones (oxygen) included, which HAADF does not show.
"""
from __future__ import annotations

import numpy as np

COM_IMAGES = ("com_y", "com_x", "com_magnitude", "idpc")  # virtual images of a run with CoM on
COM_UNITS = "mrad (px where mrad_per_px is unknown)"


def com_shifts(raw_com: np.ndarray, center_px: tuple[float, float], scan_rotation_deg: float = 0.0,
               flip_y: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(dy, dx) in the scan frame: the CoM ``raw_com`` (..., 2) (row, col, detector px) minus the
    disk centre, rotated and flipped as LiberTEM's CoM analysis does."""
    from libertem.udf.com import apply_correction

    raw = np.asarray(raw_com, np.float64)
    dy, dx = raw[..., 0] - center_px[0], raw[..., 1] - center_px[1]
    return apply_correction(dy, dx, scan_rotation=scan_rotation_deg, flip_y=flip_y)


def idpc(field_y: np.ndarray, field_x: np.ndarray) -> np.ndarray:
    """The potential whose gradient is the field (scan grid, NaN where not scanned yet).

    Fourier integration, F[φ] = (k_y F[E_y] + k_x F[E_x]) / (2πi |k|²) with the k = 0 term 0,
    over the field mirrored to four times its area (an even continuation: no jump at the
    edges, so no ramp or edge ringing); unscanned pixels count as the mean field (zero after
    its removal) and stay NaN in the result.  Units: field units × scan steps.
    """
    fy, fx = np.asarray(field_y, np.float64), np.asarray(field_x, np.float64)
    have = np.isfinite(fy) & np.isfinite(fx)
    out = np.full(fy.shape, np.nan, np.float32)
    if have.sum() < 4:
        return out
    fy = np.where(have, fy - fy[have].mean(), 0.0)
    fx = np.where(have, fx - fx[have].mean(), 0.0)
    h, w = fy.shape
    # mirrored: y-component odd across horizontal edges, even across vertical ones (and vice versa)
    ey = np.block([[fy, fy[:, ::-1]], [-fy[::-1], -fy[::-1, ::-1]]])
    ex = np.block([[fx, -fx[:, ::-1]], [fx[::-1], -fx[::-1, ::-1]]])
    ky = np.fft.fftfreq(2 * h)[:, None]
    kx = np.fft.fftfreq(2 * w)[None, :]
    k2 = ky ** 2 + kx ** 2
    k2[0, 0] = 1.0
    phi_k = (ky * np.fft.fft2(ey) + kx * np.fft.fft2(ex)) / (2j * np.pi * k2)
    phi_k[0, 0] = 0.0
    phi = np.real(np.fft.ifft2(phi_k))[:h, :w]
    out[have] = phi[have]
    return out


def com_images(raw_com: np.ndarray, center_px: tuple[float, float], mrad_per_px: float | None,
               scan_rotation_deg: float = 0.0, flip_y: bool = False, integrate: bool = True) -> dict[str, np.ndarray]:
    """The four CoM images of a scan from its per-frame ``raw_com`` (scan_y, scan_x, 2; NaN for
    frames not yet recorded); ``integrate=False``: the shifts alone (no iDPC)."""
    raw = np.asarray(raw_com, np.float64)
    dy, dx = com_shifts(raw, center_px, scan_rotation_deg, flip_y)
    k = mrad_per_px or 1.0
    dy, dx = dy * k, dx * k
    out = {"com_y": dy.astype(np.float32), "com_x": dx.astype(np.float32),
           "com_magnitude": np.hypot(dy, dx).astype(np.float32)}
    if integrate:
        out["idpc"] = idpc(dy, dx)
    return out
