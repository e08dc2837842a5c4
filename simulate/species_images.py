"""Labelled column patches of SrTiO3 [001] for the species classifier: Sr, Ti-O, O, vacant, partial.

Each specimen is imaged in HAADF and ABF at once (as a 4D-STEM scan's virtual detectors are,
so at the same dose and positions), in the project's convolution approximation calibrated on
multislice (`atom_images`: HAADF exponent 1.2-2.0, ABF 0.3-1.3, source size, defocus, probe
angle, thickness 2-30 nm, background, Poisson dose): the column weights are deposited with
`convolution_image.column_map` and convolved with abTEM's probe (`probe_intensity`).
Each lattice site is labelled from `columns.project_columns`: its species ('Sr', 'Ti-O', 'O'),
``vacant`` (emptied: no atoms left; the site is where the lattice puts it) or ``partial``
(40-80 % occupied, any species).  Vacancies and partial columns are drawn more often than in
the atom-finding images (``defect_fraction``) so each class has enough examples.

Patches (`models.column_patches`) are cut around each site from both images, standardised per
image as the networks' inputs are (`network_input`, ABF inverted), one cell wide (two
nearest-neighbour spacings), with the site position displaced by ``position_error_A`` (the
finder's error) so the classifier does not rely on perfect centring.  With ``reference`` each
patch also carries the median of its four same-sublattice neighbours' patches, one cell away
(`column_species.species_patches`): what the species classifier reads.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

CLASSES = ("Sr", "Ti-O", "O", "vacant", "partial")
MATERIAL, ZONE = "SrTiO3", "[001]"
PATCH_SIZE = 24
PATCH_SPACINGS = 2.0  # patch edge in nearest-neighbour spacings of all sites: one SrTiO3 [001] cell


@dataclass
class SpeciesRanges:
    """What each specimen draws from (uniform unless noted; the atom_images ranges where shared)."""

    size_px: int = 128
    sampling_A: tuple[float, float] = (0.1, 0.3)  # log-uniform; ≥ 5 px between the closest columns
    alpha_mrad: tuple[float, float] = (18.0, 30.0)
    defocus_A: tuple[float, float] = (-40.0, 40.0)
    source_A: tuple[float, float] = (0.3, 0.8)
    thickness_nm: tuple[float, float] = (2.0, 30.0)
    haadf_exponent: tuple[float, float] = (1.2, 2.0)
    abf_exponent: tuple[float, float] = (0.3, 1.3)
    abf_depth: tuple[float, float] = (0.1, 0.5)
    abf_broadening_A: tuple[float, float] = (0.1, 0.4)
    defect_fraction: tuple[float, float] = (0.05, 0.15)  # of the sites: vacant, and as many partial
    occupancy: tuple[float, float] = (0.4, 0.8)  # of a partial column
    dose_e_per_A2: tuple[float, float] = (1e2, 1e5)  # log-uniform
    background: tuple[float, float] = (0.0, 0.3)
    rotation_deg: tuple[float, float] = (0.0, 90.0)
    position_error_A: float = 0.1  # rms per axis, the patch centre's displacement from the site
    kv: float = 200.0


@dataclass
class SpeciesImages:
    haadf: np.ndarray  # (H, W) float32 counts
    abf: np.ndarray  # (H, W) float32 counts
    sites_px: np.ndarray  # (n, 2) every lattice site in the field, vacant ones included
    label: np.ndarray  # (n,) int index into CLASSES
    meta: dict


def _u(rng, lo_hi) -> float:
    return float(rng.uniform(*lo_hi))


def _logu(rng, lo_hi) -> float:
    return float(np.exp(rng.uniform(*np.log(lo_hi))))


def specimen_lattice(rng: np.random.Generator, r: SpeciesRanges = SpeciesRanges()
                     ) -> tuple[np.ndarray, np.ndarray, float, float]:
    """(site positions (n, 2) px, cell-column index (n,), sampling Å/px, rotation rad) of one
    SrTiO3 [001] field: the lattice every specimen here -- species or point defects -- starts from."""
    from .atom_images import _columns

    n = r.size_px
    s = _logu(rng, r.sampling_A)
    theta = np.deg2rad(_u(rng, r.rotation_deg))
    cs = _columns(MATERIAL, ZONE)
    reps = (int(np.ceil(1.5 * n * s / cs.cell_A[0])) + 2, int(np.ceil(1.5 * n * s / cs.cell_A[1])) + 2)
    pos_A, index = cs.tile(reps)
    pos_A = pos_A - pos_A.mean(axis=0) + rng.uniform(0, cs.cell_A)
    rot = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    pos = pos_A @ rot.T / s + (n - 1) / 2
    inside = (pos >= -0.5).all(axis=1) & (pos <= n - 0.5).all(axis=1)
    return pos[inside], index[inside], s, theta


def render_pair(rng: np.random.Generator, r: SpeciesRanges, positions_px: np.ndarray,
                column_weight, s: float) -> tuple[dict, dict]:
    """HAADF and ABF count images of columns at ``positions_px`` ({"haadf", "abf"}, meta).

    ``column_weight(exponent, thickness_A)`` gives each column's weight (Σ Z^exponent per Å ×
    thickness × occupancy): species, vacancies, anti-sites and displaced or interstitial
    columns all go through this one image model (thickness, probe, source, background and dose
    drawn here, in this order)."""
    from .convolution_image import column_map, probe_intensity

    n = r.size_px
    thickness_A = _u(rng, r.thickness_nm) * 10
    e_haadf, e_abf = _u(rng, r.haadf_exponent), _u(rng, r.abf_exponent)
    alpha, defocus = _u(rng, r.alpha_mrad), _u(rng, r.defocus_A)
    probe = np.fft.fft2(probe_intensity(r.kv, alpha, s, n * s, defocus))
    src_A = _u(rng, r.source_A) / 2.355
    dose = _logu(rng, r.dose_e_per_A2)
    per_px = dose * s ** 2 * 0.1  # electrons per pixel on the detector at the brightest, as atom_images
    images = {}
    for contrast, exponent in (("haadf", e_haadf), ("abf", e_abf)):
        w = column_weight(exponent, thickness_A)
        blur = src_A if contrast == "haadf" else np.hypot(src_A, _u(rng, r.abf_broadening_A))
        cols = np.real(np.fft.ifft2(np.fft.fft2(column_map(positions_px, w, (n, n))) * probe))
        cols = ndimage.gaussian_filter(np.clip(cols, 0, None), blur / s, mode="wrap")
        peak = cols.max() if cols.max() > 0 else 1.0
        if contrast == "haadf":
            signal = cols / peak + _u(rng, r.background) * cols.mean() / peak
        else:
            signal = (1.0 - _u(rng, r.abf_depth) * cols / peak) * (1 + _u(rng, r.background))
        images[contrast] = rng.poisson(signal * per_px).astype(np.float32)
    meta = {"sampling_A": s, "dose_e_per_A2": dose, "thickness_nm": thickness_A / 10, "haadf_exponent": e_haadf,
            "abf_exponent": e_abf, "alpha_mrad": alpha, "defocus_A": defocus}
    return images, meta


def species_images(rng: np.random.Generator, r: SpeciesRanges = SpeciesRanges()) -> SpeciesImages:
    """One SrTiO3 [001] specimen seen in HAADF and ABF, with every site's class."""
    from .atom_images import _columns

    cs = _columns(MATERIAL, ZONE)
    pos, index, s, theta = specimen_lattice(rng, r)
    species = np.array([CLASSES.index(lab) for lab in cs.labels()])[index]
    label = species.copy()
    frac = _u(rng, r.defect_fraction)
    draw = rng.random(len(pos))
    vacant, partial = draw < frac, (draw >= frac) & (draw < 2 * frac)
    occupancy = np.where(vacant, 0.0, np.where(partial, rng.uniform(*r.occupancy, len(pos)), 1.0))
    label[vacant], label[partial] = CLASSES.index("vacant"), CLASSES.index("partial")
    images, meta = render_pair(rng, r, pos, lambda e, t: cs.z_weight(e)[index] * t * occupancy, s)
    meta["rotation_deg"] = float(np.rad2deg(theta))
    return SpeciesImages(images["haadf"], images["abf"], pos.astype(np.float32), label.astype(np.int64), meta)


def patch_input(haadf: np.ndarray, abf: np.ndarray) -> np.ndarray:
    """The two channels the classifier reads: each image standardised as the finders' inputs are
    (zero mean, unit deviation per image; ABF inverted so columns are bright in both)."""
    from ..models.atom_analysis import network_input

    return np.stack([network_input(haadf, "haadf"), network_input(abf, "abf")])


def labelled_patches(rng: np.random.Generator, r: SpeciesRanges = SpeciesRanges(),
                     border_px: float = 0.0, size: int = PATCH_SIZE, spacings: float = PATCH_SPACINGS,
                     prefilter: bool = False, reference: bool = False) -> tuple[np.ndarray, np.ndarray, dict]:
    """(patches (k, C, P, P) float32, labels (k,), meta) of one specimen: the sites whose whole
    patch lies in the image (displaced by the position error).  ``size``, ``spacings``,
    ``prefilter``: the patch geometry (`extract_patches`); ``reference``: C = 4, the HAADF and
    ABF patches followed by their neighbours' median (`column_species.species_patches`, the
    neighbours among all displaced sites; a column needs one whole neighbour patch)."""
    from ..models.column_patches import column_spacing, extract_patches
    from ..models.column_species import species_patches

    sp = species_images(rng, r)
    edge = spacings * column_spacing(sp.sites_px)
    centres = sp.sites_px + rng.normal(0, r.position_error_A / sp.meta["sampling_A"], sp.sites_px.shape)
    if reference:
        cell = 2 * column_spacing(sp.sites_px)  # one SrTiO3 [001] cell: same-sublattice neighbours
        p = species_patches(patch_input(sp.haadf, sp.abf), centres, edge, size, True, centres, cell)
    else:
        p = extract_patches(patch_input(sp.haadf, sp.abf), centres, edge_px=edge, size=size, prefilter=prefilter)
    keep = p.complete
    return p.patches[keep], sp.label[keep], {**sp.meta, "edge_px": edge}


def write_patches(out: Path, n_images: int, seed: int = 0, ranges: SpeciesRanges = SpeciesRanges(),
                  progress: bool = True, **geometry) -> Path:
    """Patches of ``n_images`` specimens into OUT (npz, no pickle), resumable per chunk of 32
    specimens (each chunk its own file beside OUT, joined at the end).  ``geometry``: size,
    spacings, prefilter of `labelled_patches` (recorded in the settings when given)."""
    from tqdm import tqdm

    out = Path(out)
    parts = out.with_name(out.stem + "_parts")
    parts.mkdir(parents=True, exist_ok=True)
    spec = json.dumps({"n": n_images, "seed": seed, "ranges": asdict(ranges), **({"geometry": geometry} if geometry else {})},
                      sort_keys=True)
    spec_file = parts / "spec.json"
    if spec_file.exists() and spec_file.read_text() != spec:
        raise FileExistsError(f"{parts} holds patches made with other settings; choose another --out")
    spec_file.write_text(spec)
    chunk = 32
    for c0 in tqdm(range(0, n_images, chunk), desc="species patches", unit="chunk", disable=not progress):
        part = parts / f"{c0:06d}.npz"
        if part.exists():
            continue
        xs, ys, ds = [], [], []
        for k in range(c0, min(n_images, c0 + chunk)):
            x, y, meta = labelled_patches(np.random.default_rng([seed, k]), ranges, **geometry)
            xs.append(x)
            ys.append(y)
            ds.append(np.full(len(y), meta["dose_e_per_A2"], np.float32))
        tmp = part.with_name(part.stem + ".tmp.npz")
        np.savez(tmp, x=np.concatenate(xs), y=np.concatenate(ys), dose=np.concatenate(ds))
        tmp.replace(part)
    files = sorted(parts.glob("[0-9]*.npz"))
    loaded = [np.load(f, allow_pickle=False) for f in files]
    np.savez(out, **{k: np.concatenate([z[k] for z in loaded]) for k in ("x", "y", "dose")},
             spec=np.array(spec))
    return out
