"""Overview figure of a synthetic scan: truth maps, virtual images and block PACBEDs.

A person checks a simulated dataset faster by eye than from numbers: are the columns visible in
HAADF, does the wedge darken BF, does the bent region show in the PACBED asymmetry?
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def ring_mask(shape: tuple[int, int], center: tuple[float, float], r_in: float, r_out: float) -> np.ndarray:
    """Annulus r_in ≤ r < r_out [px] around ``center`` (pixel centres at integer indices)."""
    k0, k1 = np.indices(shape)
    r = np.hypot(k0 - center[0], k1 - center[1])
    return (r >= r_in) & (r < r_out)


def ring_sums(frames: np.ndarray, masks: np.ndarray, block_bytes: float = 64e6) -> np.ndarray:
    """Each frame of a (scan..., H, W) array (e.g. memory-mapped) summed over each mask
    (H·W, k): (scan..., k), reading ``block_bytes`` of frames (as float32) at a time,
    never the whole scan at once (256×256 frames of 97² px are 2.5 GB as float32)."""
    scan, npix = frames.shape[:-2], int(np.prod(frames.shape[-2:]))
    flat = frames.reshape(-1, npix)
    out = np.empty((len(flat), masks.shape[1]), np.float64)
    m = np.asarray(masks, np.float32)
    step = max(1, int(block_bytes // (npix * 4)))
    for i in range(0, len(flat), step):
        out[i:i + step] = np.asarray(flat[i:i + step], np.float32) @ m
    return out.reshape(*scan, masks.shape[1])


def write_overview(scan_dir: Path, out_png: Path | None = None) -> Path:
    import h5py
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scan_dir = Path(scan_dir)
    meta = json.loads((scan_dir / "params.json").read_text())
    frames = np.load(scan_dir / "frames.npy", mmap_mode="r")
    with h5py.File(scan_dir / "truth.h5", "r") as f:
        thick, tilt = f["thickness_nm"][()], f["tilt_mrad"][()]
        cols = f["columns/position_px"][()]
    alpha_px = meta["alpha_mrad"] / meta["mrad_per_px"]
    c = meta["center_px"]
    shape = tuple(frames.shape[-2:])
    masks = np.stack([ring_mask(shape, c, 0, 0.5 * alpha_px),  # BF, HAADF
                      ring_mask(shape, c, 3 * alpha_px, 4.5 * alpha_px)], axis=-1).reshape(-1, 2)
    vbf, vhaadf = np.moveaxis(ring_sums(frames, masks), -1, 0)
    h, w = thick.shape
    n = 8 * 4  # blocks of 4x4 unit cells at 8 steps per cell
    thin = np.asarray(frames[:n, :n], np.float64).mean(axis=(0, 1))
    r0, c0 = int(meta["scan"]["bowl_center"][0] * (h - 1)), int(meta["scan"]["bowl_center"][1] * (w - 1))
    c0 = min(max(c0 + int(meta["scan"]["bowl_radius"] * w) - n // 2, 0), w - n)
    r0 = min(max(r0 - n // 2, 0), h - n)
    bent = np.asarray(frames[r0:r0 + n, c0:c0 + n], np.float64).mean(axis=(0, 1))
    fig, ax = plt.subplots(2, 3, figsize=(13, 8.5), constrained_layout=True)
    im = ax[0, 0].imshow(thick, cmap="viridis")
    fig.colorbar(im, ax=ax[0, 0], label="thickness [nm]")
    ax[0, 0].set_title("truth: thickness (wedge)")
    mag = np.linalg.norm(tilt, axis=-1)
    im = ax[0, 1].imshow(mag, cmap="magma")
    step = max(h // 16, 1)
    rr, cc = np.mgrid[0:h:step, 0:w:step]
    ax[0, 1].quiver(cc, rr, tilt[::step, ::step, 1], -tilt[::step, ::step, 0], color="w", scale=40)
    fig.colorbar(im, ax=ax[0, 1], label="|tilt| [mrad]")
    ax[0, 1].set_title("truth: tilt (arrows: (t1, t0), axis 0 down)")
    zoom = slice(0, min(64, h)), slice(0, min(64, w))
    ax[0, 2].imshow(vhaadf[zoom], cmap="gray")
    sel = (cols[:, 0] < 64) & (cols[:, 1] < 64)
    ax[0, 2].plot(cols[sel, 1], cols[sel, 0], "r+", ms=5)
    ax[0, 2].set_title("virtual HAADF 3-4.5α (zoom), + = columns (truth)")
    ax[1, 0].imshow(vbf, cmap="gray")
    ax[1, 0].set_title("virtual BF (< 0.5α)")
    ax[1, 1].imshow(np.log1p(thin), cmap="inferno")
    ax[1, 1].set_title(f"PACBED, {n}x{n} block at {thick[:n, :n].mean():.0f} nm")
    ax[1, 2].imshow(np.log1p(bent), cmap="inferno")
    t_b = tilt[r0:r0 + n, c0:c0 + n].mean(axis=(0, 1))
    ax[1, 2].set_title(f"PACBED at {thick[r0:r0+n, c0:c0+n].mean():.0f} nm, tilt ({t_b[0]:.1f}, {t_b[1]:.1f}) mrad")
    for a in ax.ravel():
        a.set_xticks([]), a.set_yticks([])
    out_png = Path(out_png or scan_dir / "overview.png")
    fig.savefig(out_png, dpi=80)
    plt.close(fig)
    return out_png
