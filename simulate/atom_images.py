"""Randomised HAADF images with their column positions: training and test data for atom finding.

Each image draws a structure and zone, a field of view, the sampling (px per Å), the probe
(convergence angle, defocus, Cs) and its incoherent source size, the thickness (scales the
column weights), the Z exponent, vacancies (columns missing or thinned), scan distortion
(row jitter) and linear drift (shear), the dose (10²-10⁵ e/Å², Poisson), contrast and
background -- the variation the seeds' networks are trained on.  Images come from the
convolution approximation (`convolution_image`); positions are the true (distorted) column
positions in pixels (pixel centres at integer indices).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from scipy import ndimage

from .columns import ColumnSet, project_columns
from .convolution_image import column_map, probe_intensity
from .crystals import zone_cell

STRUCTURES = (("SrTiO3", "[001]"), ("SrTiO3", "[110]"), ("BaTiO3", "[001]"), ("MgO", "[001]"),
              ("MgO", "[110]"), ("MoS2-monolayer", "[001]"))


@dataclass
class ImageRanges:
    """What each image draws from (uniform unless noted)."""

    structures: tuple = STRUCTURES
    size_px: int = 256
    sampling_A: tuple[float, float] = (0.08, 0.25)  # Å per pixel
    alpha_mrad: tuple[float, float] = (18.0, 30.0)
    defocus_A: tuple[float, float] = (-40.0, 40.0)
    source_A: tuple[float, float] = (0.3, 0.8)  # FWHM of the incoherent source
    thickness_nm: tuple[float, float] = (2.0, 30.0)
    exponent: tuple[float, float] = (1.5, 2.0)
    vacancy_fraction: tuple[float, float] = (0.0, 0.05)
    jitter_px: tuple[float, float] = (0.0, 0.6)  # rms scan-line jitter
    drift: tuple[float, float] = (-0.03, 0.03)  # shear per line (fraction of a pixel per pixel)
    dose_e_per_A2: tuple[float, float] = (1e2, 1e5)  # log-uniform
    background: tuple[float, float] = (0.0, 0.3)  # of the mean signal
    rotation_deg: tuple[float, float] = (0.0, 90.0)
    kv: float = 200.0


@dataclass
class ImageTruth:
    positions_px: np.ndarray  # (n, 2) (row, col)
    cation: np.ndarray  # (n,) bool: cation-containing column (the HAADF truth)
    label: list[str] = field(default_factory=list)
    meta: dict = field(default_factory=dict)


_CACHE: dict = {}


def _columns(material: str, zone: str) -> ColumnSet:
    key = (material, zone)
    if key not in _CACHE:
        _CACHE[key] = project_columns(zone_cell(material, zone))
    return _CACHE[key]


def _uniform(rng, lo_hi):
    return float(rng.uniform(*lo_hi))


def random_image(rng: np.random.Generator, r: ImageRanges = ImageRanges()) -> tuple[np.ndarray, ImageTruth]:
    """One image (float32 counts) and its truth."""
    material, zone = r.structures[rng.integers(len(r.structures))]
    cs = _columns(material, zone)
    n = r.size_px
    sampling = _uniform(rng, r.sampling_A)
    extent = n * sampling
    # columns over the field, rotated about the centre and shifted at random
    reps = (int(np.ceil(1.5 * extent / cs.cell_A[0])) + 2, int(np.ceil(1.5 * extent / cs.cell_A[1])) + 2)
    pos_A, index = cs.tile(reps)
    pos_A = pos_A - pos_A.mean(axis=0) + rng.uniform(0, cs.cell_A)
    theta = np.deg2rad(_uniform(rng, r.rotation_deg))
    rot = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    pos_px = pos_A @ rot.T / sampling + (n - 1) / 2
    # scan distortion: each scan line (row) shifted along the fast axis; linear drift shears
    jitter = rng.normal(0, _uniform(rng, r.jitter_px), n)
    shear = _uniform(rng, r.drift)
    rows = np.clip(np.round(pos_px[:, 0]).astype(int), 0, n - 1)
    pos_px[:, 1] += jitter[rows] + shear * pos_px[:, 0]
    inside = (pos_px >= -0.5).all(axis=1) & (pos_px <= n - 0.5).all(axis=1)
    pos_px, index = pos_px[inside], index[inside]
    exponent = _uniform(rng, r.exponent)
    thickness = _uniform(rng, r.thickness_nm) * 10
    weights = cs.z_weight(exponent)[index] * thickness
    vac = rng.random(len(weights)) < _uniform(rng, r.vacancy_fraction)
    weights[vac] *= rng.uniform(0.0, 0.5, vac.sum())  # vacancies: a column emptied or partly
    probe = probe_intensity(r.kv, _uniform(rng, r.alpha_mrad), sampling, extent, _uniform(rng, r.defocus_A))
    src = _uniform(rng, r.source_A) / 2.355 / sampling
    signal = np.real(np.fft.ifft2(np.fft.fft2(column_map(pos_px, weights, (n, n))) * np.fft.fft2(probe)))
    signal = ndimage.gaussian_filter(np.clip(signal, 0, None), src, mode="wrap")
    signal += _uniform(rng, r.background) * signal.mean()
    # dose: electrons per pixel; HAADF collects a fraction of them, ~1e-3 per unit weight here
    dose = float(np.exp(rng.uniform(*np.log(r.dose_e_per_A2)))) * sampling ** 2
    expected = signal / signal.max() * dose * 0.1
    image = rng.poisson(expected).astype(np.float32)
    truth = ImageTruth(positions_px=pos_px.astype(np.float32), cation=cs.has_cation()[index] & ~vac,
                       label=[cs.labels()[i] for i in index],
                       meta={"material": material, "zone": zone, "sampling_A": sampling, "exponent": exponent,
                             "thickness_nm": thickness / 10, "dose_e_per_A2": dose / sampling ** 2,
                             "rotation_deg": float(np.rad2deg(theta)), "vacancies": int(vac.sum())})
    return image, truth


def write_images(out: Path, n: int, seed: int = 0, ranges: ImageRanges = ImageRanges(), chunk: int = 64,
                 progress: bool = True) -> Path:
    """``n`` images into OUT (HDF5), written in chunks: an interrupted run continues where it stopped."""
    import h5py
    from tqdm import tqdm

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    spec = json.dumps({"n": n, "seed": seed, "ranges": asdict(ranges)}, sort_keys=True, default=str)
    mode = "a" if out.exists() else "w"
    with h5py.File(out, mode) as f:
        if "spec" in f.attrs and f.attrs["spec"] != spec:
            raise FileExistsError(f"{out} holds images made with other settings; choose another --out")
        f.attrs["spec"] = spec
        m = ranges.size_px
        images = f.require_dataset("images", (n, m, m), np.float32, chunks=(1, m, m), compression="gzip")
        done = f.require_dataset("done", (n,), bool, fillvalue=False)
        pos = f.require_group("positions_px")
        cat = f.require_group("cation")
        meta = f.require_group("meta")
        todo = np.flatnonzero(~done[()])
        for k in tqdm(todo, desc="images", unit="image", disable=not progress):
            rng = np.random.default_rng([seed, int(k)])  # each image reproducible on its own
            image, truth = random_image(rng, ranges)
            images[k] = image
            for g, v in ((pos, truth.positions_px), (cat, truth.cation)):
                if str(k) in g:
                    del g[str(k)]
                g[str(k)] = v
            meta.attrs[str(k)] = json.dumps(truth.meta)
            done[k] = True
            if k % chunk == 0:
                f.flush()
    return out
