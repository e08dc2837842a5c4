"""Centre-preserving resampling of diffraction patterns (numpy/scipy only).

Patterns keep the zero beam on the centre pixel of an odd-sized frame, and the total
intensity (fraction of the incident probe) is conserved, so a resampled pattern is still
"normalised to the incident probe".
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage


def centre_crop(pattern: np.ndarray, center: tuple[int, int], half: int) -> np.ndarray:
    """Odd (2·half+1)² window of the last two axes around ``center``."""
    c0, c1 = center
    if c0 - half < 0 or c1 - half < 0 or c0 + half >= pattern.shape[-2] or c1 + half >= pattern.shape[-1]:
        raise ValueError(
            f"requested ±{half} px around {center} exceeds the simulated {pattern.shape[-2:]} grid; "
            "reduce the angular range or sample the potential more finely"
        )
    return pattern[..., c0 - half : c0 + half + 1, c1 - half : c1 + half + 1]


def resample_pattern(
    pattern: np.ndarray, step_in: float | tuple[float, float], step_out: float, pixels: int
) -> np.ndarray:
    """Resample the last two axes from ``step_in`` (per axis) to ``step_out`` [mrad/px] onto ``pixels``² (odd).

    Downsampling first integrates over the output pixel (Gaussian prefilter of σ ≈ 0.42·ratio,
    the width that matches a box of one output pixel), then interpolates linearly; the result
    is scaled by the pixel-area ratio so the summed intensity is unchanged.
    """
    if pixels % 2 == 0:
        raise ValueError(f"pixels must be odd so the zero beam sits on a pixel centre, got {pixels}")
    lead = pattern.shape[:-2]
    flat = pattern.reshape((-1,) + pattern.shape[-2:]).astype(np.float32, copy=False)
    s_in = np.broadcast_to(np.asarray(step_in, float), (2,))
    ratio = step_out / s_in
    c_in = ((flat.shape[-2] - 1) / 2, (flat.shape[-1] - 1) / 2)
    c_out = (pixels - 1) / 2
    offsets = np.arange(pixels) - c_out
    g0, g1 = np.meshgrid(offsets * ratio[0] + c_in[0], offsets * ratio[1] + c_in[1], indexing="ij")
    out = np.empty((flat.shape[0], pixels, pixels), np.float32)
    sigma = [0.42 * r if r > 1 else 0.0 for r in ratio]
    for i, p in enumerate(flat):
        src = ndimage.gaussian_filter(p, sigma, mode="constant") if max(sigma) > 0 else p
        out[i] = ndimage.map_coordinates(src, [g0, g1], order=1, mode="constant", cval=0.0)
    out *= ratio[0] * ratio[1]
    return out.reshape(lead + (pixels, pixels))
