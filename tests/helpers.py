"""Test helpers shared by several test files."""
from __future__ import annotations

import numpy as np
from scipy import ndimage


def place(p, alpha_px, frame, radius_px, center, rotation=0.0):
    """A library pattern scaled so α = radius_px, rotated by ``rotation`` (DESIGN.md convention:
    the raw pixel at offset d shows the aligned pattern at R(θ)·d), centred at ``center``."""
    zoom = radius_px / alpha_px
    c = (p.shape[0] - 1) / 2
    yy, xx = np.indices(frame, dtype=float)
    t = np.deg2rad(rotation)
    dy, dx = (yy - center[0]) / zoom, (xx - center[1]) / zoom
    sy = c + np.cos(t) * dy - np.sin(t) * dx
    sx = c + np.sin(t) * dy + np.cos(t) * dx
    return ndimage.map_coordinates(p, [sy, sx], order=1, mode="constant")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def two_placed_patterns(library_path, seed: int) -> np.ndarray:
    """Two library patterns placed in 96×128 frames (rotated, off centre), Poisson at ~3000 counts
    peak, as uint16: (2, 96, 128)."""
    from stemlive.simulate.library import PacbedLibrary

    lib = PacbedLibrary.load(library_path)
    a = lib.alpha_mrad / lib.mrad_per_px
    rng = np.random.default_rng(seed)
    pats = [place(lib.pattern(3.0, (1.0, 0.0)), a, (96, 128), 14.0, (50.0, 60.0), rotation=10.0),
            place(lib.pattern(2.0, (0.0, 1.0)), a, (96, 128), 12.0, (40.0, 70.0), rotation=-20.0)]
    return np.stack([rng.poisson(p / p.max() * 3000) for p in pats]).astype(np.uint16)
