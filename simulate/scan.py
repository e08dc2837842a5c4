"""Synthetic 4D-STEM scans with known ground truth, composed from a position-resolved library.

numpy/scipy/h5py only (the live core and `stemlive demo` use it without abTEM).  The specimen is
a FIB wedge: terraces of constant thickness whose edges are irregularly spaced (their levels on
the library's exit planes when the library is given, so a terrace's frames are simulated CBEDs,
not blends of two thicknesses), with a bowl-shaped bent region giving tilt.  Each frame is the
CBED at the probe's position within the unit cell for the local thickness and tilt,
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
    thickness_steps: int = 12  # >0: this many terraces (FIB wedge, ~3.9 nm apart); 0: a smooth wedge
    terrace_jitter: float = 0.4  # terrace edges moved by up to ±jitter/2 of the mean terrace width
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


def terrace_edges(p: ScanParams) -> np.ndarray:
    """Columns where terraces 1..n-1 begin [px]: evenly spaced, each moved at random by up to
    ±``terrace_jitter``/2 of the mean width (a FIB wedge's terraces are not regular)."""
    n, w = p.thickness_steps, p.scan_shape[1]
    if not 0 <= p.terrace_jitter < 1:
        raise ValueError(f"terrace_jitter {p.terrace_jitter} must lie in [0, 1) (edges keep their order)")
    edges = np.arange(1, n) * w / n
    rng = np.random.default_rng([p.seed, 1])  # not the noise's stream: the same specimen at any dose
    return edges + rng.uniform(-0.5, 0.5, n - 1) * p.terrace_jitter * w / n


def thickness_field(p: ScanParams, planes: np.ndarray | None = None) -> np.ndarray:
    """Wedge along axis 1 [nm]: terraces (``thickness_steps`` > 0) or smooth.  With the library's
    exit ``planes`` each terrace sits on the nearest plane."""
    h, w = p.scan_shape
    if p.thickness_steps > 0:
        n = p.thickness_steps
        levels = p.thickness_nm[0] + (p.thickness_nm[1] - p.thickness_nm[0]) * np.arange(n) / max(1, n - 1)
        if planes is not None:
            levels = np.asarray(planes, float)[np.argmin(np.abs(levels[:, None] - np.asarray(planes)[None]), axis=1)]
        t = levels[np.searchsorted(terrace_edges(p), np.arange(w), side="right")]
    else:
        t = p.thickness_nm[0] + (p.thickness_nm[1] - p.thickness_nm[0]) * np.linspace(0.0, 1.0, w)
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
    wgt = np.clip((x - grid[i]) / (grid[i + 1] - grid[i]), 0.0, 1.0)
    return i, np.where(wgt < 1e-9, 0.0, np.where(wgt > 1 - 1e-9, 1.0, wgt))  # on a plane: one pattern


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


class _TiltFrames:
    """Per-position CBEDs of one library tilt, derived (and resampled) once while rows need it.

    float16 like the library: 25 derived tilts of a 97-px library would take 0.8 GB in float32,
    and a row needs only the few around its tilts, so the others are dropped row by row."""

    def __init__(self, lib: PacbedLibrary, p: ScanParams, mrad_per_px: float):
        from .symmetry import apply_to_position_grid

        self._derive = lambda i: apply_to_position_grid(lib.position_patterns[lib.tilt_source[i]], lib.tilt_op[i])
        self.lib, self.p, self.mrad_per_px = lib, p, mrad_per_px
        self.cache: dict[int, np.ndarray] = {}

    def __getitem__(self, index: int) -> np.ndarray:
        if index not in self.cache:
            arr = self._derive(index)
            if self.p.frame_pixels is not None:
                arr = resample_pattern(arr, self.lib.mrad_per_px, self.mrad_per_px, self.p.frame_pixels)
            self.cache[index] = arr.astype(np.float16, copy=False)
        return self.cache[index]

    def keep_only(self, indices: set[int]) -> None:
        for i in set(self.cache) - indices:
            del self.cache[i]


def _check_ranges(lib: PacbedLibrary, thick: np.ndarray, tilt: np.ndarray, t0_grid, t1_grid) -> None:
    """Refuse fields the library does not cover (clipping would make the truth lie)."""
    if np.any(np.abs(tilt[..., 0]) > t0_grid.max() + 1e-9) or np.any(np.abs(tilt[..., 1]) > t1_grid.max() + 1e-9):
        raise ValueError(
            f"tilt field reaches {np.abs(tilt).max():.2f} mrad, beyond the library's "
            f"±{min(t0_grid.max(), t1_grid.max()):.2f} mrad"
        )
    lo, hi = lib.thickness_nm[0], lib.thickness_nm[-1]
    if thick.min() < lo - 1e-6 or thick.max() > hi + 1e-6:
        raise ValueError(f"thickness field spans {thick.min():.2f}-{thick.max():.2f} nm, beyond the library's "
                         f"{lo:.2f}-{hi:.2f} nm")


def compose_frames(lib: PacbedLibrary, p: ScanParams, progress: bool = True,
                   out: np.ndarray | None = None) -> np.ndarray:
    """All frames (H, W, k, k) as integer counts, into ``out`` if given (e.g. a memory-mapped
    .npy: a 256² scan of 97² frames is 1.2 GB)."""
    from tqdm.auto import tqdm

    if lib.position_patterns is None:
        raise ValueError("the library has no per-position CBED; build it with --keep-positions")
    h, w = p.scan_shape
    n0, n1 = lib.position_patterns.shape[2:4]
    tilts = lib.tilt_mrad
    t0_grid, t1_grid = np.unique(tilts[:, 0]), np.unique(tilts[:, 1])
    if len(t0_grid) * len(t1_grid) != len(tilts):
        raise ValueError("the library's tilts must form a full grid (simulate with --signed-tilts)")
    lut = {(a, b): i for i, (a, b) in enumerate(map(tuple, tilts))}
    mrad_per_px = frame_sampling(lib, p)
    k = p.frame_pixels or lib.position_patterns.shape[-1]
    per_tilt = _TiltFrames(lib, p, mrad_per_px)
    thick = thickness_field(p, lib.thickness_nm)
    tilt = tilt_field(p)
    _check_ranges(lib, thick, tilt, t0_grid, t1_grid)
    th_lo, th_w = _bracket(lib.thickness_nm, thick)
    a_lo, a_w = _bracket(t0_grid, tilt[..., 0])
    b_lo, b_w = _bracket(t1_grid, tilt[..., 1])
    if p.stride < 1 or n0 % p.stride or n1 % p.stride:
        raise ValueError(f"stride {p.stride} must divide the library's {n0}x{n1} positions per cell")
    pr = (np.arange(h)[:, None] * p.stride) % n0 + np.zeros((1, w), int)
    pc = (np.arange(w)[None, :] * p.stride) % n1 + np.zeros((h, 1), int)
    rng = np.random.default_rng(p.seed)
    if out is None:
        out = np.empty((h, w, k, k), np.dtype(p.dtype))
    elif out.shape != (h, w, k, k) or out.dtype != np.dtype(p.dtype):
        raise ValueError(f"out must be {(h, w, k, k)} {p.dtype}, got {out.shape} {out.dtype}")
    sig_in = p.inelastic_sigma_mrad / mrad_per_px
    limit = np.iinfo(out.dtype).max
    saturated = 0
    for r in tqdm(range(h), desc="scan rows", disable=not progress, unit="row"):
        acc = np.zeros((w, k, k), np.float32)
        corners = []
        for da, db, dt in np.ndindex(2, 2, 2):
            wgt = ((a_w[r] if da else 1 - a_w[r]) * (b_w[r] if db else 1 - b_w[r])
                   * (th_w[r] if dt else 1 - th_w[r])).astype(np.float32)
            ia = np.minimum(a_lo[r] + da, len(t0_grid) - 1)
            ib = np.minimum(b_lo[r] + db, len(t1_grid) - 1)
            key = np.array([lut[(t0_grid[i], t1_grid[j])] for i, j in zip(ia, ib)])
            corners.append((wgt, key, np.minimum(th_lo[r] + dt, len(lib.thickness_nm) - 1)))
        per_tilt.keep_only({int(i) for wgt, key, _ in corners for i in key[wgt > 0]})
        for wgt, key, it in corners:  # gather per library tilt: tilts vary along the row
            for i in np.unique(key[wgt > 0]):
                sel = np.flatnonzero((key == i) & (wgt > 0))
                acc[sel] += wgt[sel, None, None] * per_tilt[int(i)][it[sel], pr[r, sel], pc[r, sel]]
        out[r] = _detect(acc, thick[r], p, sig_in, rng, limit)
        saturated += int(np.count_nonzero(out[r] == limit))
    if saturated:
        warnings.warn(f"{saturated} pixels saturated at {limit} counts ({p.dtype}); lower the dose or use "
                      "a wider dtype", stacklevel=2)
    return out


def _detect(acc: np.ndarray, thick: np.ndarray, p: ScanParams, sig_in: float, rng, limit: int) -> np.ndarray:
    """One row of frames as recorded: inelastic background, detector blur, Poisson counts."""
    f_in = (1.0 - np.exp(-thick / p.inelastic_mfp_nm)).astype(np.float32)[:, None, None]
    blurred = ndimage.gaussian_filter(acc, (0, sig_in, sig_in), mode="constant")
    acc = (1 - f_in) * acc + f_in * blurred
    if p.psf_sigma_px > 0:
        acc = ndimage.gaussian_filter(acc, (0, p.psf_sigma_px, p.psf_sigma_px), mode="constant")
    return np.minimum(rng.poisson(np.clip(acc, 0, None) * p.dose), limit)


def write_scan(lib_path: Path, p: ScanParams, out_dir: Path, formats=("npy", "h5"),
               progress: bool = True) -> Path:
    """Compose the scan and write frames (npy/HDF5), ground truth and parameters to ``out_dir``."""
    import h5py

    lib = PacbedLibrary.load(lib_path, positions=True)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    npy = out_dir / "frames.npy"
    npy_tmp = npy.with_name(npy.name + ".tmp.npy")
    frames = None
    if "npy" in formats:  # composed straight into the file: the frames need not fit in memory twice
        k = p.frame_pixels or lib.position_patterns.shape[-1]
        frames = np.lib.format.open_memmap(npy_tmp, mode="w+", dtype=np.dtype(p.dtype), shape=(*p.scan_shape, k, k))
    frames = compose_frames(lib, p, progress=progress, out=frames)
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
        frames.flush()
        os.replace(npy_tmp, npy)
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
            f["thickness_nm"] = thickness_field(p, lib.thickness_nm)
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


def pack_library(src: Path, dst: Path, drop_bits: int = 6) -> Path:
    """A position-resolved library re-stored small enough to ship; PacbedLibrary reads it as is.

    Per-position CBEDs keep 5 significant bits (float16 rounded, ±1.6 %), and below float16's
    normal range (6·10⁻⁵ of the probe per pixel) a step of 3.8·10⁻⁶: at the demo's 5·10⁴ e per
    frame the rounding is ≤ 0.1 e, under a quarter of the Poisson σ of any pixel it touches (the
    brightest, ~900 e, has ±3.3 %), and a block's PACBED averages the independent roundings of 64
    positions.  PACBEDs stay as built (8 bits), stored as float16 (the same values).  Shuffle +
    gzip 9: 1.7x smaller than the build's output (97-px demo library: 24 MB).
    """
    import h5py

    from .build import round_float16

    src, dst = Path(src), Path(dst)
    if src.resolve() == dst.resolve():
        raise ValueError("pack_library writes a new file beside its input, not over it")
    tmp = dst.with_name(dst.name + ".tmp")
    with h5py.File(src, "r") as f, h5py.File(tmp, "w") as g:
        for name, ds in f.items():
            if name in ("position_patterns", "patterns"):
                data = ds[()]
                data = round_float16(data, drop_bits) if name == "position_patterns" else data.astype(np.float16)
                chunks = (1, 1) + data.shape[2:] if name == "position_patterns" else (1,) + data.shape[1:]
                g.create_dataset(name, data=data, chunks=chunks, compression="gzip", compression_opts=9, shuffle=True)
            else:
                f.copy(ds, g, name)
        g.attrs.update(dict(f.attrs))
        g.attrs["position_patterns_significant_bits"] = 11 - drop_bits
    os.replace(tmp, dst)
    return dst
