"""The convolution approximation's column weights, fitted to multislice.

The shipped position-resolved CBED library (abTEM multislice with frozen phonons; SrTiO3 [001],
200 kV, 13.6 mrad) holds, for every thickness, the diffraction pattern at 8×8 probe positions
in the unit cell -- so the exact intensity any detector ring collects there.  The convolution
approximation models that image as ``b + Σ_c w_c K(p - r_c)``: a kernel K (the probe intensity,
blurred by σ) at every column, weighted per column type (Sr, Ti-O, O).  Fitting w, b and σ per
thickness gives the weight ratios, the Z exponent n they imply (w_TiO / w_Sr = (22ⁿ + 8ⁿ) / 38ⁿ),
and how well the model reproduces multislice (correlation r).  This is the check that the
training images' exponent ranges (HAADF 1.5-2, ABF 0.3-0.8) cover what multislice gives.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
from scipy.optimize import brentq

from .convolution_image import probe_intensity

FINE = 8  # model grid points per probe step


@dataclass
class ContrastFit:
    thickness_nm: float
    weights: dict[str, float]  # per column type, in image units
    background: float
    sigma_A: float  # extra blur of the probe kernel
    r: float  # correlation of model and multislice over the probe positions
    exponent: float | None  # Z exponent implied by w_TiO / w_Sr (None: outside 0-4)


def ring_images(lib_file, inner_mrad: float, outer_mrad: float, tilt_index: int = 0) -> tuple[np.ndarray, dict]:
    """(thicknesses, 8, 8) images of a detector ring from the library's position patterns."""
    import h5py

    with h5py.File(lib_file, "r") as f:
        pats = f["position_patterns"][tilt_index].astype(np.float64)  # (T, 8, 8, H, W)
        attrs = {k: f.attrs[k] for k in ("mrad_per_px", "center_px", "columns", "plan", "kv", "alpha_mrad")}
        attrs["thickness_nm"] = f["thickness_nm"][()]
    c = json.loads(attrs["center_px"])
    h, w = pats.shape[-2:]
    rr, cc = np.indices((h, w))
    theta = np.hypot(rr - c[0], cc - c[1]) * float(attrs["mrad_per_px"])
    mask = (theta >= inner_mrad) & (theta < outer_mrad)
    return pats[..., mask].sum(axis=-1), attrs


def column_kernels(attrs: dict, n_pos: int, sigma_A: float) -> tuple[list[str], np.ndarray]:
    """Kernel images (types, n_pos, n_pos) at the probe positions, one per column type."""
    from scipy import ndimage

    cell = float(json.loads(attrs["plan"])["cell_A"][0])
    m = n_pos * FINE
    probe = probe_intensity(float(attrs["kv"]), float(attrs["alpha_mrad"]), cell / m, cell)
    if sigma_A > 0:
        probe = ndimage.gaussian_filter(probe, sigma_A / (cell / m), mode="wrap")
    cols = json.loads(attrs["columns"])
    types = sorted({col["species"] for col in cols}, key=lambda s: [col["species"] for col in cols].index(s))
    out = np.zeros((len(types), n_pos, n_pos))
    for col in cols:
        shift = (int(round(col["frac"][0] * m)), int(round(col["frac"][1] * m)))
        k = np.roll(probe, shift, axis=(0, 1))  # periodic: every cell's copy of the column
        out[types.index(col["species"])] += k[::FINE, ::FINE]
    return types, out


def fit_image(image: np.ndarray, attrs: dict, thickness_nm: float, sigmas_A=np.linspace(0.0, 0.6, 13)) -> ContrastFit:
    """Least-squares weights per column type and background, for the best kernel blur σ."""
    best = None
    y = image.ravel()
    for s in sigmas_A:
        types, k = column_kernels(attrs, image.shape[0], float(s))
        a = np.column_stack([k.reshape(len(types), -1).T, np.ones(y.size)])
        coef, *_ = np.linalg.lstsq(a, y, rcond=None)
        model = a @ coef
        err = float(np.sum((model - y) ** 2))
        if best is None or err < best[0]:
            best = (err, s, types, coef, float(np.corrcoef(model, y)[0, 1]))
    _, s, types, coef, r = best
    weights = dict(zip(types, map(float, coef[:-1])))
    return ContrastFit(thickness_nm, weights, float(coef[-1]), float(s), r, implied_exponent(weights))


def implied_exponent(weights: dict[str, float]) -> float | None:
    """n with (22ⁿ + 8ⁿ) / 38ⁿ = w(Ti-O) / w(Sr)."""
    if weights.get("Sr", 0) == 0:
        return None
    ratio = weights.get("O+Ti", 0.0) / weights["Sr"]
    f = lambda n: (22.0 ** n + 8.0 ** n) / 38.0 ** n - ratio  # noqa: E731
    try:
        return float(brentq(f, 0.0, 4.0))
    except ValueError:
        return None
