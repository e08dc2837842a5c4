"""SrTiO3 [001] specimens with known point defects, for the column anomaly detector (seed 002).

The lattice and the image model are the species set's (`species_images.specimen_lattice`,
`species_images.render_pair`: HAADF and ABF of one scan, the convolution approximation
calibrated on multislice, Poisson dose), so bulk here is exactly the bulk the detector is
trained on.  Defects change the projected columns before rendering; each defect column is a
lattice site with its type (`DEFECT_TYPES`):

* ``antisite_Sr_on_Ti`` / ``antisite_Ti_on_Sr``: a fraction (``antisite_fraction``) of the
  column's cations swapped for the other cation;
* ``vacancy_Sr`` / ``vacancy_Ti`` / ``vacancy_O``: the column's Sr, Ti or O atoms reduced to
  ``vacancy_remaining`` of full (a partly emptied column; O vacancies show in ABF only);
* ``Ti_displaced``: the Ti of a Ti-O column moved by ``displacement_pm`` (5-20 pm) in a random
  in-plane direction, its O left on the site (a ferroelectric off-centring);
* ``interstitial``: an extra Sr or Ti column (``interstitial_occupancy`` of a full one) near a
  quarter-cell position ((¼, ¼) of the cell from a Sr site, ± ``interstitial_jitter_cells``);
  it belongs to the lattice site nearest to it (that column's patch holds it off-centre).

Defects are at least ``min_separation_cells`` apart and 0.75 cell inside the field, so no patch
holds two and every defect column's patch is complete; about one site in ``sites_per_defect``
is a defect.  ``near`` marks the other sites within ``NEAR_CELLS`` of a defect (their one-cell
patches show it off-centre): they are neither defect nor clean bulk in the counts.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

from .species_images import MATERIAL, ZONE, SpeciesRanges, render_pair, specimen_lattice

DEFECT_TYPES = ("antisite_Sr_on_Ti", "antisite_Ti_on_Sr", "vacancy_Sr", "vacancy_Ti", "vacancy_O",
                "Ti_displaced", "interstitial")
ELEMENTS = ("Sr", "Ti", "O")
Z = np.array([38.0, 22.0, 8.0])
HOST = {"antisite_Sr_on_Ti": "Ti-O", "antisite_Ti_on_Sr": "Sr", "vacancy_Sr": "Sr", "vacancy_Ti": "Ti-O",
        "vacancy_O": "O", "Ti_displaced": "Ti-O", "interstitial": "Sr"}
NEAR_CELLS = 0.8  # sites this close (in cells) to a defect see it in their patch


def bulk_ranges(**kw) -> SpeciesRanges:
    """The specimen ranges of the anomaly detector: the species set's, with no defects, 256²
    fields (≥ 6 cells across, so every image has enough columns to normalise its scores), and
    patches centred within 0.02 Å of the site (a lattice reference, not a single column's fit)."""
    base = dict(size_px=256, defect_fraction=(0.0, 0.0), dose_e_per_A2=(3e2, 3e5), position_error_A=0.02)
    return replace(SpeciesRanges(), **{**base, **kw})


@dataclass
class DefectRanges:
    image: SpeciesRanges = field(default_factory=bulk_ranges)
    sites_per_defect: float = 60.0
    max_defects: int = 12
    min_separation_cells: float = 2.0
    antisite_fraction: tuple[float, float] = (0.5, 1.0)
    vacancy_remaining: tuple[float, float] = (0.0, 0.5)
    displacement_pm: tuple[float, float] = (5.0, 20.0)
    interstitial_occupancy: tuple[float, float] = (0.25, 0.5)
    interstitial_jitter_cells: float = 0.08
    types: tuple[str, ...] = DEFECT_TYPES


@dataclass
class DefectImages:
    haadf: np.ndarray  # (H, W) float32 counts
    abf: np.ndarray  # (H, W) float32 counts
    sites_px: np.ndarray  # (n, 2) every lattice site (row, col)
    kind: np.ndarray  # (n,) str: 'Sr', 'Ti-O', 'O' (the undisturbed site's column)
    defect: np.ndarray  # (n,) int: index into DEFECT_TYPES, -1 for no defect
    near: np.ndarray  # (n,) bool: not a defect, but within NEAR_CELLS of one
    defects: list  # per defect: {"type", "site", "value"} (fraction, remaining, pm or occupancy)
    meta: dict


def _composition(cs) -> np.ndarray:
    """(columns, len(ELEMENTS)) atoms per cell repeat of each column of the cell."""
    return np.array([[c.get(e, 0) for e in ELEMENTS] for c in cs.composition], float)


def defect_images(rng: np.random.Generator, r: DefectRanges = DefectRanges()) -> DefectImages:
    """One SrTiO3 [001] specimen with point defects, seen in HAADF and ABF, with the truth."""
    from .atom_images import _columns

    cs = _columns(MATERIAL, ZONE)
    pos, index, s, theta = specimen_lattice(rng, r.image)
    kind = np.array(cs.labels())[index]
    comp = _composition(cs)[index]
    cell_px = cs.cell_A[0] / s
    rot = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    n = r.image.size_px
    margin = 0.75 * cell_px
    inner = ((pos >= margin) & (pos <= n - 1 - margin)).all(axis=1)
    n_def = int(min(r.max_defects, max(1, round(len(pos) / r.sites_per_defect)))) if r.types else 0  # () : bulk
    order = rng.permutation(len(r.types))
    types = [r.types[order[k % len(order)]] for k in range(n_def)]
    extra_pos: list[np.ndarray] = []
    extra_comp: list[np.ndarray] = []
    defect = np.full(len(pos), -1)
    taken: list[np.ndarray] = []  # positions affected so far
    defects = []
    for t in types:
        far = np.ones(len(pos), bool)
        for p in taken:
            far &= np.hypot(*(pos - p).T) >= r.min_separation_cells * cell_px
        cand = np.flatnonzero(inner & far & (kind == HOST[t]) & (defect < 0))
        if len(cand) == 0:
            continue
        site = int(rng.choice(cand))
        row = comp[site].copy()
        where = pos[site]
        if t.startswith("antisite"):
            value = float(rng.uniform(*r.antisite_fraction))
            a, b = (1, 0) if t == "antisite_Sr_on_Ti" else (0, 1)  # Ti→Sr, Sr→Ti
            row[b] += value * row[a]
            row[a] *= 1 - value
        elif t.startswith("vacancy"):
            value = float(rng.uniform(*r.vacancy_remaining))
            row[ELEMENTS.index(t.split("_")[1])] *= value
        elif t == "Ti_displaced":
            value = float(rng.uniform(*r.displacement_pm))
            phi = rng.uniform(0, 2 * np.pi)
            row[1] = 0.0
            extra_pos.append(pos[site] + value / 100 / s * np.array([np.cos(phi), np.sin(phi)]))
            extra_comp.append(np.array([0.0, 1.0, 0.0]))
        else:  # interstitial
            value = float(rng.uniform(*r.interstitial_occupancy))
            quarter = (rng.choice([-1, 1], 2) * 0.25 + rng.uniform(-1, 1, 2) * r.interstitial_jitter_cells)
            where = pos[site] + rot @ (quarter * np.array(cs.cell_A)) / s
            site = int(np.argmin(np.hypot(*(pos - where).T)))
            if not inner[site] or not all(np.hypot(*(pos[site] - p)) >= r.min_separation_cells * cell_px
                                          for p in taken):
                continue
            extra_pos.append(where)
            extra_comp.append(np.eye(3)[rng.integers(0, 2)] * value)  # Sr or Ti
        comp[site] = row
        defect[site] = DEFECT_TYPES.index(t)
        taken.append(pos[site])
        defects.append({"type": t, "site": site, "value": value, "at_px": [float(where[0]), float(where[1])]})
    all_pos = np.concatenate([pos, np.array(extra_pos).reshape(-1, 2)])
    all_comp = np.concatenate([comp, np.array(extra_comp).reshape(-1, 3)])
    images, meta = render_pair(rng, r.image, all_pos,
                               lambda e, thick: all_comp @ Z ** e / cs.repeat_A * thick, s)
    near = np.zeros(len(pos), bool)
    for d in defects:
        near |= np.hypot(*(pos - pos[d["site"]]).T) < NEAR_CELLS * cell_px
        near |= np.hypot(*(pos - np.array(d["at_px"])).T) < NEAR_CELLS * cell_px
    near &= defect < 0
    meta.update(rotation_deg=float(np.rad2deg(theta)), cell_px=float(cell_px))
    return DefectImages(images["haadf"], images["abf"], pos.astype(np.float32), kind, defect, near, defects, meta)
