"""Virtual ring images of a whole scan from its per-frame radial profiles.

The engine (`LiveState.ring_images`) and the store view (`dashboards/store_feed.py`) answer an
operator's rings with this one function, so a ring reads the same live and from
``/virtual/radial``: each ring is the profiles times a weight per bin (1 inside, the covered
fraction in an edge bin: `stemlive.udf.radial_bins.ring_bin_weights`, the linear interpolation
the engine's own ring images use).  A frame not recorded yet (NaN profile) gives NaN; a ring
beyond the last bin (the frame's half diagonal) reads what the frame holds out to there.
"""
from __future__ import annotations

import math

import numpy as np

from ..udf.radial_bins import RingScale, ring_bin_weights


def positive_or_none(v) -> float | None:
    """``v`` as a finite positive float, else None (a calibration that is not known)."""
    try:
        v = float(v)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) and v > 0 else None


def ring_scale(alpha_mrad: float | None, mrad_per_px: float | None = None,
               radius_px: float | None = None) -> RingScale:
    """How α and mrad become pixels, as the engine decides it (`BlockEngine._ring_scale`): the
    calibrated disk radius is α; without it α over the detector calibration; mrad per px is the
    calibration, else α over the disk radius.  Unknown parts stay None (a ring in that unit is
    then refused with the reason)."""
    alpha, mpp, radius = positive_or_none(alpha_mrad), positive_or_none(mrad_per_px), positive_or_none(radius_px)
    if radius is None and alpha and mpp:
        radius = alpha / mpp
    if mpp is None and alpha and radius:
        mpp = alpha / radius
    return RingScale(radius_px=radius, mrad_per_px=mpp)


def rings_px(rings: dict, scale: RingScale) -> dict[str, tuple[float, float]]:
    """{name: (inner, outer)} in detector px; ValueError when the unit's scale is not known."""
    return {name: (scale.to_px(a, unit), scale.to_px(b, unit)) for name, (a, b, unit) in rings.items()}


def ring_images_from_profiles(profiles: np.ndarray, bin_px: float, rings: dict,
                              scale: RingScale) -> dict[str, np.ndarray]:
    """{name: image} (float32, the profiles' leading shape) for ``rings`` = {name: (inner, outer,
    unit)} from ``profiles`` (..., n_bins) in bins of ``bin_px``; NaN where a frame has no profile.

    One float32 matrix product for all rings (a 256² scan of 365 bins: tens of ms)."""
    profiles = np.asarray(profiles)
    lead, nb = profiles.shape[:-1], profiles.shape[-1]
    px = rings_px(rings, scale)
    if not px:
        return {}
    weights = np.stack([ring_bin_weights(nb, lo, hi, bin_px) for lo, hi in px.values()], axis=1).astype(np.float32)
    flat = profiles.reshape(-1, nb)
    out = np.asarray(flat, np.float32) @ weights
    out[np.isnan(flat[:, 0]) if nb else slice(None)] = np.nan  # not recorded: NaN whatever BLAS makes of 0·NaN
    return {name: out[:, k].reshape(lead) for k, name in enumerate(px)}
