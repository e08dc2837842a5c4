"""Randomised HAADF and ABF images with their column positions: training and test data for atom finding.

Each image draws a structure and zone (sometimes two, meeting at a straight interface), a field
of view, the sampling (Å per px), the probe (convergence angle, defocus) and its incoherent
source size, the thickness (scales the column weights), the Z exponent, vacancies (columns
missing or thinned), scan distortion (row jitter) and linear drift (shear), the dose (10²-10⁵
e/Å², Poisson), contrast and background -- the variation the seeds' networks are trained on.
Images come from the convolution approximation (`convolution_image`):

* HAADF: column weights Σ Z^n convolved with the probe intensity -- bright columns; the truth
  is the cation-containing columns (pure oxygen/sulphur columns are barely visible).
* ABF: dark dips whose depth grows only weakly with Z (Findlay et al. 2010), on a bright
  background, the kernel a slightly broadened probe; the truth is every column, oxygen included.

The exponent ranges come from fitting this model to multislice (`contrast_calibration.py`: the
shipped frozen-phonon library of SrTiO3 [001], 8-57 nm): n falls from 1.8 to 1.2 with thickness
for a 41-61 mrad ring (channelling), and is 0.8-1.3 for ABF; training draws HAADF n from 1.2-2.0
and ABF n from 0.3-1.3.  Vacancies: a column either emptied (absent from the truth) or partly
occupied (40-80 %, still a column).

Positions are the true (distorted) column positions in pixels (pixel centres at integer indices).
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
# never in training: a new zone of a perovskite, the bulk hexagonal 2H-MoS2 along two zones
HELD_OUT_STRUCTURES = (("BaTiO3", "[110]"), ("MoS2", "[001]"), ("MoS2", "[100]"))
CONTRASTS = ("haadf", "abf")


@dataclass
class ImageRanges:
    """What each image draws from (uniform unless noted)."""

    structures: tuple = STRUCTURES
    contrast: str = "haadf"  # or "abf"
    size_px: int = 256
    sampling_A: tuple[float, float] = (0.08, 0.5)  # Å per pixel (log-uniform)
    alpha_mrad: tuple[float, float] = (18.0, 30.0)
    defocus_A: tuple[float, float] = (-40.0, 40.0)
    source_A: tuple[float, float] = (0.3, 0.8)  # FWHM of the incoherent source
    thickness_nm: tuple[float, float] = (2.0, 30.0)
    exponent: tuple[float, float] = (1.2, 2.0)  # HAADF, fitted to multislice (module docstring)
    abf_exponent: tuple[float, float] = (0.3, 1.3)
    abf_depth: tuple[float, float] = (0.1, 0.5)  # deepest dip over the background
    abf_broadening_A: tuple[float, float] = (0.1, 0.4)  # ABF dips are wider than the probe
    interface_probability: float = 0.25
    # random crystals (rectangular cell, 1-4 columns of random composition): the network must tell
    # columns by brightness, not by the lattices it has seen (2H-MoS2 [001] was missed without them)
    random_lattice_probability: float = 0.0
    wedge: tuple[float, float] = (0.0, 0.7)  # thickness change across the field (fraction), wedge-shaped specimens
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
    cation: np.ndarray  # (n,) bool: cation-containing, not vacant (the HAADF truth)
    visible: np.ndarray  # (n,) bool: not vacant (the ABF truth: every column, oxygen included)
    label: list[str] = field(default_factory=list)
    meta: dict = field(default_factory=dict)

    def target(self, contrast: str) -> np.ndarray:
        """Positions a finder should report for this contrast."""
        return self.positions_px[self.cation if contrast == "haadf" else self.visible]


_CACHE: dict = {}


def _columns(material: str, zone: str) -> ColumnSet:
    key = (material, zone)
    if key not in _CACHE:
        _CACHE[key] = project_columns(zone_cell(material, zone))
    return _CACHE[key]


def _uniform(rng, lo_hi):
    return float(rng.uniform(*lo_hi))


def _loguniform(rng, lo_hi):
    return float(np.exp(rng.uniform(*np.log(lo_hi))))


def _field_columns(rng, cs: ColumnSet, n: int, sampling: float, theta: float):
    """Columns of ``cs`` over an n×n field, rotated by theta and shifted at random [px]."""
    extent = n * sampling
    reps = (int(np.ceil(1.5 * extent / cs.cell_A[0])) + 2, int(np.ceil(1.5 * extent / cs.cell_A[1])) + 2)
    pos_A, index = cs.tile(reps)
    pos_A = pos_A - pos_A.mean(axis=0) + rng.uniform(0, cs.cell_A)
    rot = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    return pos_A @ rot.T / sampling + (n - 1) / 2, index


# cations heavy enough to stand out of the anions, as in the real structures (light cations such
# as Mg next to S would make "cation-containing" a matter of chemistry, not of the image)
RANDOM_CATIONS = ("Ti", "Ga", "Sr", "Y", "Zr", "Mo", "Ba", "La", "W", "Pb")
RANDOM_ANIONS = ("N", "O", "S")


def random_lattice(rng: np.random.Generator) -> ColumnSet:
    """A made-up crystal in projection: a rectangular cell with 1-4 columns ≥ 1.4 Å apart, each of
    1-3 atoms per repeat of a random cation, or of 1-2 N/O or one S (at least one cation column)."""
    while True:
        cell = (float(rng.uniform(2.6, 6.5)), float(rng.uniform(2.6, 6.5)))
        n = int(rng.integers(1, 5))
        frac = rng.random((n, 2))
        pos = frac * cell
        d = pos[:, None] - pos[None]
        d -= np.round(d / cell) * cell  # periodic
        dist = np.hypot(d[..., 0], d[..., 1]) + np.eye(n) * 99
        if dist.min() >= 1.4:
            break
    comp = []
    for k in range(n):
        if k == 0 or rng.random() < 0.5:
            comp.append({str(rng.choice(RANDOM_CATIONS)): int(rng.integers(1, 4))})
        else:
            el = str(rng.choice(RANDOM_ANIONS))
            comp.append({el: 1 if el == "S" else int(rng.integers(1, 3))})
    return ColumnSet(positions_A=pos, composition=tuple(comp), cell_A=cell, repeat_A=float(rng.uniform(3.0, 6.0)))


def random_image(rng: np.random.Generator, r: ImageRanges = ImageRanges()) -> tuple[np.ndarray, ImageTruth]:
    """One image (float32 counts) and its truth."""
    if r.contrast not in CONTRASTS:
        raise ValueError(f"contrast {r.contrast!r}: choose one of {CONTRASTS}")
    n = r.size_px
    sampling = _loguniform(rng, r.sampling_A)
    theta = np.deg2rad(_uniform(rng, r.rotation_deg))
    exponent = _uniform(rng, r.exponent if r.contrast == "haadf" else r.abf_exponent)
    phases = [r.structures[rng.integers(len(r.structures))]]
    if rng.random() < r.interface_probability:  # a second crystal beyond a straight interface
        phases.append(r.structures[rng.integers(len(r.structures))])
    normal = np.array([np.cos(a := rng.uniform(0, 2 * np.pi)), np.sin(a)])
    offset = rng.uniform(-0.25, 0.25) * n
    pos_list, w_list, cat_list, labels = [], [], [], []
    for k, (material, zone) in enumerate(phases):
        cs = _columns(material, zone)
        if rng.random() < r.random_lattice_probability:
            cs = random_lattice(rng)
            phases[k] = ("random", "-".join(cs.labels()))
        pos, index = _field_columns(rng, cs, n, sampling, theta + (rng.uniform(-0.2, 0.2) if k else 0.0))
        side = (pos - (n - 1) / 2) @ normal - offset
        keep = side < 0 if k == 0 and len(phases) > 1 else side >= 0 if k else np.ones(len(pos), bool)
        pos_list.append(pos[keep])
        w_list.append(cs.z_weight(exponent)[index[keep]])
        cat_list.append(cs.has_cation()[index[keep]])
        labels += [cs.labels()[i] for i in index[keep]]
    pos_px, weights, cation = np.concatenate(pos_list), np.concatenate(w_list), np.concatenate(cat_list)
    # scan distortion: each scan line (row) shifted along the fast axis; linear drift shears
    jitter = rng.normal(0, _uniform(rng, r.jitter_px), n)
    shear = _uniform(rng, r.drift)
    rows = np.clip(np.round(pos_px[:, 0]).astype(int), 0, n - 1)
    pos_px[:, 1] += jitter[rows] + shear * pos_px[:, 0]
    inside = (pos_px >= -0.5).all(axis=1) & (pos_px <= n - 0.5).all(axis=1)
    pos_px, weights, cation = pos_px[inside], weights[inside], cation[inside]
    labels = [lab for lab, i in zip(labels, inside) if i]
    thickness = _uniform(rng, r.thickness_nm) * 10
    # a wedge: thickness (and with it every column's weight) changes linearly across the field
    ramp = (pos_px - (n - 1) / 2) @ np.array([np.cos(b := rng.uniform(0, 2 * np.pi)), np.sin(b)]) / n
    weights = weights * thickness * np.clip(1 + _uniform(rng, r.wedge) * 2 * ramp, 0.2, None)
    hit = rng.random(len(weights)) < _uniform(rng, r.vacancy_fraction)
    vac = hit & (rng.random(len(weights)) < 0.5)  # emptied: no column there any more
    weights[vac] = 0.0
    weights[hit & ~vac] *= rng.uniform(0.4, 0.8, (hit & ~vac).sum())  # partly occupied: a dimmer column
    probe = probe_intensity(r.kv, _uniform(rng, r.alpha_mrad), sampling, n * sampling, _uniform(rng, r.defocus_A))
    src_A = _uniform(rng, r.source_A) / 2.355
    if r.contrast == "abf":
        src_A = np.hypot(src_A, _uniform(rng, r.abf_broadening_A))
    columns = np.real(np.fft.ifft2(np.fft.fft2(column_map(pos_px, weights, (n, n))) * np.fft.fft2(probe)))
    columns = ndimage.gaussian_filter(np.clip(columns, 0, None), src_A / sampling, mode="wrap")
    dose = _loguniform(rng, r.dose_e_per_A2) * sampling ** 2  # electrons per pixel
    if r.contrast == "haadf":
        signal = columns / columns.max() + _uniform(rng, r.background) * columns.mean() / columns.max()
        expected = signal * dose * 0.1  # ~10 % of the beam on the detector at the brightest column
    else:
        signal = 1.0 - _uniform(rng, r.abf_depth) * columns / columns.max()
        expected = signal * dose * 0.1 * (1 + _uniform(rng, r.background))
    image = rng.poisson(expected).astype(np.float32)
    truth = ImageTruth(positions_px=pos_px.astype(np.float32), cation=cation & ~vac, visible=~vac, label=labels,
                       meta={"phases": [f"{m} {z}" for m, z in phases], "contrast": r.contrast,
                             "sampling_A": sampling, "exponent": exponent, "thickness_nm": thickness / 10,
                             "dose_e_per_A2": dose / sampling ** 2, "rotation_deg": float(np.rad2deg(theta)),
                             "vacancies": int(vac.sum())})
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
        vis = f.require_group("visible")
        meta = f.require_group("meta")
        todo = np.flatnonzero(~done[()])
        for k in tqdm(todo, desc="images", unit="image", disable=not progress):
            rng = np.random.default_rng([seed, int(k)])  # each image reproducible on its own
            image, truth = random_image(rng, ranges)
            images[k] = image
            for g, v in ((pos, truth.positions_px), (cat, truth.cation), (vis, truth.visible)):
                if str(k) in g:
                    del g[str(k)]
                g[str(k)] = v
            meta.attrs[str(k)] = json.dumps(truth.meta)
            done[k] = True
            if k % chunk == 0:
                f.flush()
    return out
