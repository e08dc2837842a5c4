"""Synthetic 4D-STEM scans with known ground truth, composed from a position-resolved library.

numpy/scipy/h5py only (the live core and `stemlive demo` use it without abTEM).  Each frame is
the CBED at the probe's position within the unit cell for the local thickness and tilt,
interpolated linearly in thickness and bilinearly in tilt from the library, then

* inelastic scattering: a fraction 1 - exp(-t/λ_in) of the intensity is redistributed by a
  Gaussian of σ_in [mrad] (plasmon and multiple inelastic scattering; grows ∝ t when thin),
* detector point-spread (Gaussian, σ in pixels),
* dose: ``dose`` electrons per frame, Poisson noise, integer counts.

The probe grid is the library's (a/N steps, starting on the mirror origin), so scan pixel
(r, c) sits at position (r mod N0, c mod N1) in the unit cell.  Ground truth (thickness and tilt
per scan pixel, atomic column positions in scan pixels) is written beside the frames.
"""
from __future__ import annotations

import hashlib
import json
import os
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from ..models.cards import sha256_of
from .library import PacbedLibrary
from .resample import resample_pattern


@dataclass
class ScanParams:
    """Specimen fields, acquisition and detector model of a synthetic scan."""

    scan_shape: tuple[int, int] = (256, 256)
    stride: int = 1  # scan step in library positions: a/N·stride (N = 8 for the shipped library)
    frame_pixels: int | None = None  # resample frames to this odd size over the same angular range
    thickness_nm: tuple[float, float] = (10.0, 55.0)  # wedge: at column 0 and at the last column
    thickness_steps: int = 0  # >0: quantise the wedge into this many terraces
    tilt_offset_mrad: tuple[float, float] = (0.0, 0.0)  # uniform tilt of the whole field
    bowl_center: tuple[float, float] = (0.5, 0.4)  # bent region's centre (fraction of the scan)
    bowl_radius: float = 0.22  # radius of largest tilt (fraction of the scan width)
    bowl_tilt_mrad: float = 2.0  # largest tilt of the bent region
    dose: float = 5e4  # electrons per frame
    inelastic_mfp_nm: float = 150.0  # inelastic mean free path λ_in (SrTiO3, 200 kV)
    inelastic_sigma_mrad: float = 3.0
    psf_sigma_px: float = 0.5
    dtype: str = "uint16"
    seed: int = 0

    def key(self, library: Path) -> str:
        h = hashlib.sha256((json.dumps(asdict(self), sort_keys=True) + str(sha256_of(library))).encode())
        return h.hexdigest()[:12]


def thickness_field(p: ScanParams) -> np.ndarray:
    """Wedge along axis 1 [nm], optionally stepped."""
    h, w = p.scan_shape
    frac = np.linspace(0.0, 1.0, w)
    if p.thickness_steps > 0:
        frac = np.floor(frac * p.thickness_steps) / max(1, p.thickness_steps - 1)
        frac = np.clip(frac, 0, 1)
    t = p.thickness_nm[0] + (p.thickness_nm[1] - p.thickness_nm[0]) * frac
    return np.broadcast_to(t[None, :], (h, w)).astype(np.float64).copy()


def tilt_field(p: ScanParams) -> np.ndarray:
    """(H, W, 2) tilt [mrad]: a bowl-shaped bent region (tilt pointing radially, largest at
    ``bowl_radius``, the gradient of a Gaussian depression) on a uniform offset."""
    h, w = p.scan_shape
    rr, cc = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    d = np.stack([rr - p.bowl_center[0] * (h - 1), cc - p.bowl_center[1] * (w - 1)], axis=-1)
    s = max(p.bowl_radius * w, 1e-9)
    r = np.linalg.norm(d, axis=-1, keepdims=True)
    mag = p.bowl_tilt_mrad * np.exp(0.5) * np.exp(-(r**2) / (2 * s * s)) / s
    return np.asarray(p.tilt_offset_mrad, float) + d * mag


def _bracket(grid: np.ndarray, x: np.ndarray):
    """Indices i, i+1 and weight of the upper one for linear interpolation (clipped)."""
    x = np.clip(x, grid[0], grid[-1])
    i = np.clip(np.searchsorted(grid, x, side="right") - 1, 0, len(grid) - 2)
    wgt = (x - grid[i]) / (grid[i + 1] - grid[i])
    return i, np.clip(wgt, 0.0, 1.0)


def frame_sampling(lib: PacbedLibrary, p: ScanParams) -> float:
    """Detector sampling of the frames [mrad/px]: the library's, or resampled to ``frame_pixels``."""
    if p.frame_pixels is None:
        return lib.mrad_per_px
    k = lib.patterns.shape[-1]
    return lib.mrad_per_px * (k - 1) / (p.frame_pixels - 1)


def column_positions(lib: PacbedLibrary, scan_shape: tuple[int, int], stride: int = 1
                     ) -> tuple[np.ndarray, list[str]]:
    """Atomic columns in scan pixels (pixel centres at integer indices) and their species."""
    info = json.loads(lib.attrs["columns"])  # [{"frac": [f0, f1], "species": "Sr"}, ...]
    n0, n1 = (n / stride for n in json.loads(lib.attrs["plan"])["positions_per_cell"])
    origin = np.asarray(json.loads(lib.attrs["plan"])["position_origin_frac"], float)
    h, w = scan_shape
    pos, names = [], []
    for col in info:
        f = (np.asarray(col["frac"]) - origin) % 1.0
        for i in range(-1, int(h // n0) + 2):
            for j in range(-1, int(w // n1) + 2):
                r, c = (i + f[0]) * n0, (j + f[1]) * n1
                if -0.5 <= r <= h - 0.5 and -0.5 <= c <= w - 0.5:
                    pos.append((r, c))
                    names.append(col["species"])
    return np.array(pos, float).reshape(-1, 2), names


def compose_frames(lib: PacbedLibrary, p: ScanParams, progress: bool = True) -> np.ndarray:
    """All frames (H, W, k, k) as integer counts."""
    from tqdm.auto import tqdm

    if lib.position_patterns is None:
        raise ValueError("the library has no per-position CBED; build it with --keep-positions")
    h, w = p.scan_shape
    n0, n1 = lib.position_patterns.shape[2:4]
    k = lib.position_patterns.shape[-1]
    tilts = lib.tilt_mrad
    t0_grid, t1_grid = np.unique(tilts[:, 0]), np.unique(tilts[:, 1])
    if len(t0_grid) * len(t1_grid) != len(tilts):
        raise ValueError("the library's tilts must form a full grid (simulate with --signed-tilts)")
    lut = {(a, b): i for i, (a, b) in enumerate(map(tuple, tilts))}
    per_tilt = {}
    mrad_per_px = frame_sampling(lib, p)
    if p.frame_pixels is not None:
        k = p.frame_pixels

    def tilt_frames(i0, i1):
        key = lut[(t0_grid[i0], t1_grid[i1])]
        if key not in per_tilt:
            arr = lib.positions_for_tilt(key)
            if p.frame_pixels is not None:
                arr = resample_pattern(arr, lib.mrad_per_px, mrad_per_px, p.frame_pixels)
            per_tilt[key] = arr
        return per_tilt[key]

    thick = thickness_field(p)
    tilt = tilt_field(p)
    if np.any(np.abs(tilt[..., 0]) > t0_grid.max()) or np.any(np.abs(tilt[..., 1]) > t1_grid.max()):
        raise ValueError(
            f"tilt field reaches {np.abs(tilt).max():.2f} mrad, beyond the library's "
            f"±{min(t0_grid.max(), t1_grid.max()):.2f} mrad"
        )
    th_lo, th_w = _bracket(lib.thickness_nm, thick)
    a_lo, a_w = _bracket(t0_grid, tilt[..., 0])
    b_lo, b_w = _bracket(t1_grid, tilt[..., 1])
    if p.stride < 1 or n0 % p.stride or n1 % p.stride:
        raise ValueError(f"stride {p.stride} must divide the library's {n0}x{n1} positions per cell")
    pr = (np.arange(h)[:, None] * p.stride) % n0 + np.zeros((1, w), int)
    pc = (np.arange(w)[None, :] * p.stride) % n1 + np.zeros((h, 1), int)
    rng = np.random.default_rng(p.seed)
    out = np.empty((h, w, k, k), np.dtype(p.dtype))
    sig_in = p.inelastic_sigma_mrad / mrad_per_px
    limit = np.iinfo(out.dtype).max
    saturated = 0
    for r in tqdm(range(h), desc="scan rows", disable=not progress, unit="row"):
        acc = np.zeros((w, k, k), np.float32)
        for da in (0, 1):
            wa = a_w[r] if da else 1 - a_w[r]
            for db in (0, 1):
                wb = b_w[r] if db else 1 - b_w[r]
                for dt in (0, 1):
                    wt = th_w[r] if dt else 1 - th_w[r]
                    wgt = (wa * wb * wt).astype(np.float32)
                    if not np.any(wgt > 0):
                        continue
                    # gather per column; tilt indices vary along the row
                    for (ia, ib) in set(zip(a_lo[r] + da, b_lo[r] + db)):
                        sel = np.flatnonzero((a_lo[r] + da == ia) & (b_lo[r] + db == ib) & (wgt > 0))
                        if sel.size == 0:
                            continue
                        frames = tilt_frames(min(ia, len(t0_grid) - 1), min(ib, len(t1_grid) - 1))
                        it = np.minimum(th_lo[r, sel] + dt, len(lib.thickness_nm) - 1)
                        acc[sel] += wgt[sel, None, None] * frames[it, pr[r, sel], pc[r, sel]]
        f_in = (1.0 - np.exp(-thick[r] / p.inelastic_mfp_nm)).astype(np.float32)[:, None, None]
        blurred = ndimage.gaussian_filter(acc, (0, sig_in, sig_in), mode="constant")
        acc = (1 - f_in) * acc + f_in * blurred
        if p.psf_sigma_px > 0:
            acc = ndimage.gaussian_filter(acc, (0, p.psf_sigma_px, p.psf_sigma_px), mode="constant")
        counts = rng.poisson(np.clip(acc, 0, None) * p.dose)
        saturated += int(np.count_nonzero(counts > limit))
        out[r] = np.minimum(counts, limit)
    if saturated:
        warnings.warn(f"{saturated} pixels saturated at {limit} counts ({p.dtype}); lower the dose or use "
                      "a wider dtype", stacklevel=2)
    return out


def write_scan(lib_path: Path, p: ScanParams, out_dir: Path, formats=("npy", "h5"),
               progress: bool = True) -> Path:
    """Compose the scan and write frames (npy/HDF5), ground truth and parameters to ``out_dir``."""
    import h5py

    lib = PacbedLibrary.load(lib_path, positions=True)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    frames = compose_frames(lib, p, progress=progress)
    meta = {
        "scan": asdict(p), "library": str(lib_path), "library_sha256": sha256_of(lib_path),
        "library_params": lib.params, "kv": lib.kv, "alpha_mrad": lib.alpha_mrad,
        "mrad_per_px": frame_sampling(lib, p), "center_px": [(frames.shape[-2] - 1) / 2, (frames.shape[-1] - 1) / 2],
        "scan_step_nm": float(json.loads(lib.attrs["plan"])["cell_A"][0]) * p.stride / frames_per_cell(lib)[0] / 10,
        "frame_shape": list(frames.shape[-2:]), "scan_shape": list(p.scan_shape),
        "material": lib.attrs["material"], "zone": lib.attrs["zone"],
        "tilt_convention": lib.attrs["tilt_convention"],
    }
    if "npy" in formats:
        _atomic(out_dir / "frames.npy", lambda f: np.save(f, frames, allow_pickle=False))
    if "h5" in formats:
        def _h5(tmp):
            with h5py.File(tmp, "w") as f:
                f.create_dataset("data", data=frames, chunks=(1, min(16, frames.shape[1])) + frames.shape[2:])
                for key, val in meta.items():
                    f.attrs[key] = json.dumps(val) if isinstance(val, (dict, list, tuple)) else val
        _atomic(out_dir / "frames.h5", _h5)
    cols, species = column_positions(lib, p.scan_shape, p.stride)

    def _truth(tmp):
        with h5py.File(tmp, "w") as f:
            f["thickness_nm"] = thickness_field(p)
            f["tilt_mrad"] = tilt_field(p)
            f["columns/position_px"] = cols
            f["columns/species"] = np.array(species, dtype=h5py.string_dtype())
            for key, val in meta.items():
                f.attrs[key] = json.dumps(val) if isinstance(val, (dict, list, tuple)) else val

    _atomic(out_dir / "truth.h5", _truth)
    _atomic(out_dir / "params.json", lambda f: Path(f).write_text(json.dumps(meta, indent=2)))
    return out_dir


def frames_per_cell(lib: PacbedLibrary) -> tuple[int, int]:
    return tuple(json.loads(lib.attrs["plan"])["positions_per_cell"])


def _atomic(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp" + path.suffix)
    write(str(tmp))
    os.replace(tmp, path)
