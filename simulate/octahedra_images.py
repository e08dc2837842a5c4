"""ABF (and HAADF) images of tilted perovskites by abTEM multislice with frozen phonons.

One *run* simulates one projected supercell (`octahedra.tilted_zone_cell`) for one or more
probes: a periodic crystal, so scanning a single projected cell gives the whole image; the exit planes
give a thickness series from one propagation; frozen phonons (abTEM `FrozenPhonons`, rms
displacements of `crystals.rms_displacements`) are averaged.  Aberrations (defocus, C3, A1, B2)
and mistilt are set on the probe and so belong to a run; source size, scan noise and Poisson
dose are applied afterwards to the noise-free run image (`observe`), as are the choice of patch.

Cost on this machine (2 shared cores, one thread, `nice`; `measure_cost`, numbers in the report
and below) and the plan for a ~1e5-sample training set:

Measured (`measure_cost`, a-a-c+ 8/8/6° SrTiO3 [110], 300 kV, 24 mrad, one thread, nice, load
average 5-9 on the 2 shared cores, so wall times are 2-3x CPU times):

* production wave grid (0.05 Å, cell tiled to 23.4 x 22.1 Å = 460 x 436 px): multislice
  0.11 s wall, 0.046 s CPU per (probe position x slice x phonon configuration)
  (repro: ``measure_cost(numerics=Numerics(scan_step_A=1.0, phonon_configs=1),
  thickness_nm=1.2)`` -> 89 s for 88 positions x 9 slices).
* small grid (0.1 Å, 15.6 x 11 Å = 154 x 109 px), 330 positions x 32 slices: multislice 17 s
  wall (1.6 ms per position-slice); PRISM 26 s to build 829 plane waves x 32 slices (1.0 ms per
  beam-slice), then 1.6 s per extra aberration set (a reduction).  PRISM and multislice agree
  to 1e-6 of the beam (tested).

A full production run ([110] cell 7.8 x 11 Å at 0.2 Å steps = 2145 positions, 30 nm = 217
slices of 1.38 Å, 8 configurations) is 3.7e6 position-slices: ~117 h wall (~47 h CPU) on one
core here.  So this machine can make test sets at small settings (the benchmark's: 0.1 Å,
0.3 Å steps, 1 configuration, ~4 min per run), not a training set.

Plan for ~1e5 training samples (to run on a GPU; the lead decides):

1. Distinct runs: 1,200 structures in [110]pc (200 per tilt system, magnitudes uniform
   0.5-15° per Glazer letter with random signs, compounds from `octahedra.BOND_A` with one
   class left out for the held-out test, e.g. the A3+ Fe3+ LaFeO3), 4 frozen-phonon
   configurations each (to be confirmed against 16 on a few runs, as
   benchmarks/phonon_convergence.py does for PACBED; training adds Poisson noise of
   1e3-1e5 e/Å² on top), exit planes at 5, 10, 15, 20, 25,
   30 nm from one propagation.
2. Per run, 4 probes (defocus, C3, A1, B2 within corrector residuals, `RunRanges`): with
   multislice (mistilt included) that is 4 propagations; with PRISM the matrix is built once
   and each probe is a reduction (~1 % of the build) -- but abTEM 1.0.11's SMatrix fails with
   several exit planes (`simulate_run` builds one matrix per thickness, 3.5x the work);
   fixing that upstream makes PRISM ~3.5x cheaper than multislice here.
3. Samples per run: 6 thicknesses x 4 probes = 24 noise-free periodic images, each with 8
   B-column cells (4 distinct sign configurations); 4 observations each (`observe`: dose
   log-uniform 1e3-1e5 e/Å², source 0.3-0.8 Å FWHM, scan jitter, random field offset, the
   patch centred on a random B column) -> 96 samples per run, 1.15e5 from 1,200 runs.  For
   interfaces, cell-sized tiles of two runs at the same thickness and probe are composed side
   by side (the per-cell network sees ±1 cell, so only the boundary cells lack the dynamical
   cross-talk).
4. Why 1,200 runs are enough: the image depends smoothly on (α, β, γ); 200 runs per system
   sample its 1-3 free magnitudes at ~1° spacing (two-letter systems: √200 ≈ 14 values over
   15°), each in 4 sign configurations, and every nuisance parameter that is cheap (dose,
   source, jitter, offset; aberrations via PRISM) is drawn densely around it.  The held-out
   MAE (benchmarks/octahedra_accuracy.py) decides: where it exceeds 0.5°, add runs there.
5. Cost: 1,200 x (4 probes x 217 slices x 2145 positions x 4 configurations) = 9e9
   position-slices by multislice; at this machine's 0.046 CPU s each that is centuries, so a
   GPU it must be (unmeasured here: no device was lent to this session); ABF alone allows
   0.08 Å sampling (HAADF to 100 mrad), 2.6x fewer pixels, and 0.25 Å steps, 1.5x fewer
   positions.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from scipy import ndimage

from . import octahedra as oc
from .crystals import rms_displacements
from .phonons import layer_offset

# atomic planes per repeat along the beam of the 2×2×2 supercell's projection (one slice each)
PLANES_PER_REPEAT = {"[001]": 4, "[110]": 8}


@dataclass(frozen=True)
class Probe:
    """What a run's probe is.  Aberrations in abTEM's polar notation: defocus [Å] (abTEM's sign,
    = −C10), C3 = Cs [Å], A1 = two-fold astigmatism C12 [Å] at angle [rad], B2 = axial coma C21
    [Å] at angle [rad]; mistilt (t0, t1) [mrad] as abTEM ``Probe(tilt=...)`` (DESIGN.md)."""

    kv: float = 300.0
    alpha_mrad: float = 24.0
    defocus_A: float = 0.0
    c3_A: float = 0.0
    a1_A: float = 0.0
    a1_angle_rad: float = 0.0
    b2_A: float = 0.0
    b2_angle_rad: float = 0.0
    mistilt_mrad: tuple[float, float] = (0.0, 0.0)


@dataclass(frozen=True)
class Numerics:
    """How finely a run is computed (the cost knobs)."""

    sampling_A: float = 0.05  # wave/potential sampling; 0.05 Å keeps 167 mrad at 300 kV below the 2/3 antialias limit
    min_extent_A: float = 20.0  # the probe window: the cell is tiled to at least this
    scan_step_A: float = 0.2  # ≤ 0.2 Å: images hold up to 2α/λ = 2.4 Å⁻¹ (else aliased)
    phonon_configs: int = 8
    abf_mrad: tuple[float, float] = (12.0, 24.0)  # half to full convergence angle
    haadf_mrad: tuple[float, float] = (70.0, 160.0)


@dataclass(frozen=True)
class Structure:
    """The crystal of a run."""

    system: str = "a0a0a0"
    angles_deg: tuple[float, float, float] = (0.0, 0.0, 0.0)
    a_site: str = "Sr"
    b_site: str = "Ti"
    zone: str = "[110]"


def _to_json(obj) -> str:
    return json.dumps(asdict(obj), sort_keys=True)


@dataclass
class RunImages:
    """Noise-free images of one run over one projected cell: pixel (i, j) at (i, j)·step [Å]."""

    abf: np.ndarray  # (thickness, n0, n1) fraction of the incident beam
    haadf: np.ndarray
    thickness_nm: np.ndarray
    step_A: tuple[float, float]
    truth: oc.ProjectedTruth
    seconds: float
    meta: dict = field(default_factory=dict)


def _scan_gpts(cell: tuple[float, float], step: float) -> tuple[int, int]:
    return int(round(cell[0] / step)), int(round(cell[1] / step))


def _aberrations(probe: Probe) -> dict[str, float]:
    return {"C10": -probe.defocus_A, "C30": probe.c3_A, "C12": probe.a1_A, "phi12": probe.a1_angle_rad,
            "C21": probe.b2_A, "phi21": probe.b2_angle_rad}


METHODS = ("multislice", "prism")


@dataclass
class RunCrystal:
    """The atoms a run propagates through: the projected cell tiled to the probe window and
    stacked to the thickest exit plane (`simulate_run`; a study rebuilding a run uses the same)."""

    crystal: object  # ase.Atoms, z = depth below the entrance surface
    cell: tuple[float, float]  # projected cell [Å]
    reps: tuple[int, int]  # in-plane copies in the probe window
    repeat_A: float  # the supercell's repeat along the beam
    slice_A: float  # one atomic plane: the slice thickness
    n_z: int  # repeats along the beam


def run_crystal(structure: Structure, min_extent_A: float, thickness_nm) -> RunCrystal:
    """The crystal of ``structure`` for exit planes up to max(``thickness_nm``)."""
    built = oc.build(structure.system, structure.angles_deg, structure.a_site, structure.b_site,
                     square_xy=structure.zone == "[110]")
    zc = oc.project(built, structure.zone)
    per_repeat = PLANES_PER_REPEAT[structure.zone]
    repeat = zc.repeat_z
    atoms = zc.atoms.copy()
    atoms.positions[:, 2] += layer_offset(atoms.positions[:, 2], repeat, per_repeat)
    atoms.wrap()
    cell = tuple(zc.in_plane)
    reps = tuple(int(np.ceil(min_extent_A / c)) for c in cell)
    n_z = int(np.ceil(np.max(thickness_nm) * 10 / repeat))
    return RunCrystal(atoms * (reps[0], reps[1], n_z), cell, reps, repeat, repeat / per_repeat, n_z)


def config_seed(seed: int, config: int) -> int:
    """The random seed of frozen-phonon configuration ``config`` of a run seeded ``seed``."""
    return int(np.random.SeedSequence([int(seed), int(config)]).generate_state(1)[0])


def simulate_run(structure: Structure, probes: Probe | list[Probe] = Probe(), numerics: Numerics = Numerics(),
                 thickness_nm=(5.0, 10.0, 20.0, 30.0), seed: int = 0, method: str = "multislice") -> list[RunImages]:
    """One run: ABF and HAADF over one projected cell at every thickness, for each probe.

    ``multislice`` propagates every probe position through every frozen-phonon configuration
    (abTEM ``Probe.scan``); ``prism`` builds one scattering matrix per configuration (abTEM
    ``SMatrix``, plane waves up to the convergence angle) and reduces it for each probe's
    aberrations, so extra aberration draws cost only a reduction.  PRISM here has no beam tilt
    (abTEM 1.0.11's ``SMatrix`` takes none): a mistilted probe needs ``multislice``.
    """
    import abtem
    import dask

    probes = [probes] if isinstance(probes, Probe) else list(probes)
    if not probes:
        raise ValueError("give at least one probe")
    if method not in METHODS:
        raise ValueError(f"method {method!r}: choose one of {METHODS}")
    if len({(p.kv, p.alpha_mrad) for p in probes}) != 1:
        raise ValueError("all probes of a run must share kv and alpha_mrad")
    if method == "prism" and any(p.mistilt_mrad != (0.0, 0.0) for p in probes):
        raise ValueError("PRISM (abTEM SMatrix) has no beam tilt; simulate mistilted probes with method='multislice'")
    thick = np.sort(np.asarray(thickness_nm, float))
    if thick.size == 0 or thick.min() <= 0:
        raise ValueError(f"thickness_nm must be positive, got {thickness_nm!r}")
    kv, alpha = probes[0].kv, probes[0].alpha_mrad
    if numerics.abf_mrad[1] > alpha * 1.05:
        raise ValueError(f"ABF outer angle {numerics.abf_mrad[1]} mrad lies outside the bright field ({alpha} mrad)")
    built = oc.build(structure.system, structure.angles_deg, structure.a_site, structure.b_site,
                     square_xy=structure.zone == "[110]")
    truth = oc.projected_truth(built, structure.zone)
    rc = run_crystal(structure, numerics.min_extent_A, thick)
    crystal, cell, reps, n_z, dz = rc.crystal, rc.cell, rc.reps, rc.n_z, rc.slice_A
    per_repeat = PLANES_PER_REPEAT[structure.zone]
    # the last slice of each thickness (rounded to whole slices; the realised thickness is stored)
    planes = sorted({min(max(int(round(t * 10 / dz)) - 1, 0), n_z * per_repeat - 1) for t in thick})
    sigmas = rms_displacements(crystal)
    gpts = _scan_gpts(cell, numerics.scan_step_A)
    scan = abtem.GridScan(start=(0.0, 0.0), end=cell, gpts=gpts, endpoint=False)
    detectors = [abtem.AnnularDetector(*numerics.abf_mrad), abtem.AnnularDetector(*numerics.haadf_mrad)]
    acc = np.zeros((len(probes), 2, len(planes)) + gpts)
    t0, c0 = time.perf_counter(), time.process_time()
    for config in range(numerics.phonon_configs):
        frozen = abtem.FrozenPhonons(crystal, num_configs=1, sigmas=sigmas, seed=config_seed(seed, config))
        if method == "multislice":
            potential = abtem.Potential(frozen, sampling=numerics.sampling_A, slice_thickness=dz,
                                        projection="infinite", exit_planes=tuple(planes))
            for n, p in enumerate(probes):
                wave = abtem.Probe(energy=kv * 1e3, semiangle_cutoff=alpha, aberrations=_aberrations(p),
                                   tilt=tuple(p.mistilt_mrad))
                out = wave.scan(potential, scan=scan, detectors=detectors, lazy=True)
                # both detectors from one propagation, on this thread (the caller decides parallelism)
                arrays = dask.compute(*[m.array for m in out], scheduler="synchronous")
                for d, a in enumerate(arrays):
                    acc[n, d] += np.asarray(a, np.float64).reshape((-1,) + gpts)[-len(planes):]
            continue
        # PRISM: abTEM 1.0.11's SMatrix fails with several exit planes, so one matrix per thickness
        displaced = frozen.randomize(crystal)
        for t, plane in enumerate(planes):
            top = (plane + 1) * dz
            part = displaced[crystal.positions[:, 2] < top]  # by undisplaced depth: whole layers
            part.cell[2, 2] = top
            potential = abtem.Potential(part, sampling=numerics.sampling_A, slice_thickness=dz, projection="infinite")
            s_matrix = abtem.SMatrix(potential=potential, energy=kv * 1e3, semiangle_cutoff=alpha,
                                     downsample=False).build(lazy=False)
            for n, p in enumerate(probes):
                ctf = abtem.CTF(semiangle_cutoff=alpha, energy=kv * 1e3, **_aberrations(p))
                out = s_matrix.reduce(scan=scan, detectors=detectors, ctf=ctf)
                for d, m in enumerate(out):
                    acc[n, d, t] += np.asarray(m.array, np.float64).reshape(gpts)
    acc /= numerics.phonon_configs
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    meta = {"cpu_seconds": cpu / len(probes), "structure": asdict(structure), "numerics": asdict(numerics),
            "seed": seed, "method": method,
            "reps": list(reps), "slices": n_z * per_repeat, "slice_A": dz, "abtem": abtem.__version__}
    return [RunImages(abf=acc[n, 0].astype(np.float32), haadf=acc[n, 1].astype(np.float32),
                      thickness_nm=(np.array(planes) + 1) * dz / 10,
                      step_A=(cell[0] / gpts[0], cell[1] / gpts[1]), truth=truth, seconds=seconds / len(probes),
                      meta={**meta, "probe": asdict(p)}) for n, p in enumerate(probes)]


# ---------------------------------------------------------------------------------------------
# Observation: what the detector records of a noise-free run image
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Observation:
    """Post-run effects: incoherent source (Gaussian, FWHM [Å]), scan-line jitter (rms, along
    the fast axis 1 [Å]), dose [e/Å²] (Poisson), and the output pixel size [Å]."""

    source_fwhm_A: float = 0.5
    jitter_A: float = 0.0
    dose_e_per_A2: float = 1e4
    pixel_A: float | None = None  # None: the run's scan step


def tile_image(image: np.ndarray, shape: tuple[int, int], origin_px=(0.0, 0.0), order: int = 3) -> np.ndarray:
    """A periodic cell image sampled on an ``shape`` grid starting at ``origin_px`` (cell pixels),
    by spline interpolation with periodic wrap."""
    r, c = np.indices(shape, dtype=float)
    coords = np.array([r + origin_px[0], c + origin_px[1]])
    return ndimage.map_coordinates(image, coords, order=order, mode="grid-wrap")


def observe(image: np.ndarray, step_A: tuple[float, float], obs: Observation, rng: np.random.Generator,
            shape: tuple[int, int] | None = None, origin_A=(0.0, 0.0)) -> np.ndarray:
    """Counts per pixel of a noise-free periodic ``image`` (fraction of the beam) as recorded.

    The field (``shape`` pixels of ``obs.pixel_A``, default the cell) starts at ``origin_A``;
    each scan line (row) is shifted along axis 1 by the jitter; then the source blur, and
    Poisson counts for ``dose · pixel area`` electrons per pixel.
    """
    if obs.dose_e_per_A2 <= 0 or obs.source_fwhm_A < 0 or obs.jitter_A < 0:
        raise ValueError(f"dose must be > 0 and source size, jitter ≥ 0, got {obs}")
    px = obs.pixel_A or step_A[0]
    shape = shape or (int(round(image.shape[0] * step_A[0] / px)), int(round(image.shape[1] * step_A[1] / px)))
    scale = np.array([px / step_A[0], px / step_A[1]])
    # blur on the run's grid (periodic), then sample the field
    sigma_px = obs.source_fwhm_A / 2.3548 / np.asarray(step_A)
    blurred = ndimage.gaussian_filter(image.astype(np.float64), sigma_px, mode="wrap") if obs.source_fwhm_A else image
    r, c = np.indices(shape, dtype=float)
    jitter = rng.normal(0.0, obs.jitter_A, shape[0])[:, None] if obs.jitter_A else 0.0
    rr = r * scale[0] + origin_A[0] / step_A[0]
    cc = c * scale[1] + (origin_A[1] + jitter) / step_A[1]
    signal = ndimage.map_coordinates(blurred, np.array([rr, cc]), order=3, mode="grid-wrap")
    electrons = obs.dose_e_per_A2 * px * px
    return rng.poisson(np.clip(signal, 0, None) * electrons).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Cost
# ---------------------------------------------------------------------------------------------


def measure_cost(structure: Structure = Structure("a-a-c+", (8.0, 8.0, 6.0)), numerics: Numerics = Numerics(),
                 thickness_nm: float = 2.0, method: str = "multislice") -> dict:
    """Time one run of one probe and one thickness, and the unit cost it implies: seconds per
    (probe position · slice · configuration) for multislice, per (plane wave · slice ·
    configuration) for building a PRISM matrix.  Cost grows linearly in each, so a short
    crystal and a coarse scan on the production wave grid predict a full run."""
    import abtem

    run = simulate_run(structure, Probe(), numerics, (thickness_nm,), method=method)[0]
    positions = run.abf.shape[1] * run.abf.shape[2]
    slices = int(run.thickness_nm[-1] * 10 / run.meta["slice_A"] + 0.5)
    extent = [c * r for c, r in zip((run.step_A[0] * run.abf.shape[1], run.step_A[1] * run.abf.shape[2]),
                                    run.meta["reps"])]
    gpts = [int(np.ceil(e / numerics.sampling_A)) for e in extent]
    wavelength = abtem.core.energy.energy2wavelength(Probe().kv * 1e3)
    beams = int(np.pi * (Probe().alpha_mrad * 1e-3 / wavelength) ** 2 * extent[0] * extent[1])  # plane waves ≤ α
    units = (positions if method == "multislice" else beams) * slices * numerics.phonon_configs
    return {"method": method, "seconds": run.seconds, "cpu_seconds": run.meta["cpu_seconds"],
            "positions": positions, "slices": slices,
            "configs": numerics.phonon_configs, "gpts": gpts, "beams": beams,
            "seconds_per_unit": run.seconds / units, "cpu_seconds_per_unit": run.meta["cpu_seconds"] / units}


# ---------------------------------------------------------------------------------------------
# Random runs into HDF5 (resumable)
# ---------------------------------------------------------------------------------------------

COMPOUNDS = tuple(oc.BOND_A)  # (A, B) pairs with tabulated bonds


@dataclass(frozen=True)
class RunRanges:
    """What each run draws (uniform unless noted).  Aberration ranges are typical corrector
    residuals at 300 kV (|C3| ≤ 5 µm, |A1| ≤ 5 nm, |B2| ≤ 50 nm), defocus ±5 nm about ABF focus."""

    systems: tuple[str, ...] = oc.TILT_SYSTEMS
    max_tilt_deg: float = oc.MAX_TILT_DEG
    compounds: tuple[tuple[str, str], ...] = COMPOUNDS
    zone: str = "[110]"
    defocus_A: tuple[float, float] = (-50.0, 50.0)
    c3_A: tuple[float, float] = (-5e4, 5e4)
    a1_A: float = 50.0  # magnitude up to, random angle
    b2_A: float = 500.0
    mistilt_mrad: float = 5.0  # magnitude up to, random azimuth (multislice only)
    probes_per_run: int = 1


def draw_structure(rng: np.random.Generator, r: RunRanges) -> Structure:
    """A tilt system, its angles (letters tied, random signs per letter) and a compound."""
    system = str(r.systems[rng.integers(len(r.systems))])
    g = oc.parse_glazer(system)
    by_letter = {ch: float(rng.uniform(0.5, r.max_tilt_deg)) * rng.choice([-1.0, 1.0]) for ch in set(g.letters)}
    angles = tuple(0.0 if ph == "0" else by_letter[ch] for ph, ch in zip(g.phases, g.letters))
    a_site, b_site = r.compounds[rng.integers(len(r.compounds))]
    return Structure(system, angles, a_site, b_site, r.zone)


def draw_probe(rng: np.random.Generator, r: RunRanges, mistilt: bool) -> Probe:
    def polar(mag):
        return float(rng.uniform(0, mag)), float(rng.uniform(0, 2 * np.pi))

    a1, phi1 = polar(r.a1_A)
    b2, phi2 = polar(r.b2_A)
    tilt, azimuth = polar(r.mistilt_mrad) if mistilt else (0.0, 0.0)
    return Probe(defocus_A=float(rng.uniform(*r.defocus_A)), c3_A=float(rng.uniform(*r.c3_A)), a1_A=a1,
                 a1_angle_rad=phi1, b2_A=b2, b2_angle_rad=phi2,
                 mistilt_mrad=(tilt * float(np.cos(azimuth)), tilt * float(np.sin(azimuth))))


def write_runs(out: Path, n_runs: int, seed: int = 0, ranges: RunRanges = RunRanges(),
               numerics: Numerics = Numerics(), thickness_nm=(5.0, 10.0, 20.0, 30.0), method: str = "multislice",
               progress: bool = True) -> Path:
    """``n_runs`` random runs into OUT (HDF5, plain h5py, no pickle): ``/runs/<k>/{abf, haadf}``
    (probe, thickness, n0, n1), ``thickness_nm``, ``truth/{positions_A, angles_deg, signed,
    visible}``, attribute ``meta`` (JSON per probe); ``/done`` flags.  A run is written whole
    and then marked done, so an interrupted job continues where it stopped; a file made with
    other settings is refused."""
    import h5py
    from tqdm import tqdm

    if n_runs < 1:
        raise ValueError(f"n_runs must be ≥ 1, got {n_runs}")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    spec = json.dumps({"n_runs": n_runs, "seed": seed, "ranges": asdict(ranges), "numerics": asdict(numerics),
                       "thickness_nm": [float(t) for t in thickness_nm], "method": method}, sort_keys=True)
    try:
        f = h5py.File(out, "a")
    except OSError as e:  # h5py files are not crash-safe: a job killed before its first flush
        raise OSError(f"{out} cannot be opened ({e}); it was probably left truncated by a killed job "
                      "before its first run was written -- remove it and start again") from e
    with f:
        if "spec" in f.attrs and f.attrs["spec"] != spec:
            raise FileExistsError(f"{out} holds runs made with other settings; choose another output file")
        f.attrs["spec"] = spec
        done = f.require_dataset("done", (n_runs,), bool, fillvalue=False)
        runs = f.require_group("runs")
        for k in tqdm(np.flatnonzero(~done[()]), desc="octahedra runs", unit="run", disable=not progress):
            rng = np.random.default_rng([seed, int(k)])  # each run reproducible on its own
            structure = draw_structure(rng, ranges)
            probes = [draw_probe(rng, ranges, mistilt=method == "multislice") for _ in range(ranges.probes_per_run)]
            images = simulate_run(structure, probes, numerics, thickness_nm, seed=int(rng.integers(2**31)),
                                  method=method)
            if str(k) in runs:  # left half-written by an interrupted job
                del runs[str(k)]
            g = runs.create_group(str(k))
            g["abf"] = np.stack([r.abf for r in images])
            g["haadf"] = np.stack([r.haadf for r in images])
            g["thickness_nm"] = images[0].thickness_nm
            t = images[0].truth
            g["truth/positions_A"] = t.positions_A
            g["truth/angles_deg"] = t.angles_deg
            g["truth/signed"] = np.array(t.signed)
            g["truth/visible"] = np.array(t.visible)
            g.attrs["step_A"] = images[0].step_A
            g.attrs["cell_A"] = t.cell_A
            g.attrs["system"] = t.system
            g.attrs["meta"] = json.dumps([r.meta for r in images])
            g.attrs["seconds"] = sum(r.seconds for r in images)
            done[k] = True
            f.flush()
    return out


def read_run(path: Path, k: int, probe: int = 0) -> RunImages:
    """Run ``k`` of a file from `write_runs` back as RunImages."""
    import h5py

    with h5py.File(path, "r") as f:
        if not f["done"][k]:
            raise KeyError(f"run {k} of {path} is not done yet; run write_runs again to finish it")
        g = f["runs"][str(k)]
        meta = json.loads(g.attrs["meta"])[probe]
        t = g["truth"]
        truth = oc.ProjectedTruth(zone=meta["structure"]["zone"], system=str(g.attrs["system"]),
                                  positions_A=t["positions_A"][()], angles_deg=t["angles_deg"][()], octahedra=(),
                                  signed=tuple(bool(x) for x in t["signed"][()]),
                                  visible=tuple(bool(x) for x in t["visible"][()]),
                                  cell_A=tuple(float(x) for x in g.attrs["cell_A"]))
        return RunImages(abf=g["abf"][probe], haadf=g["haadf"][probe], thickness_nm=g["thickness_nm"][()],
                         step_A=tuple(float(x) for x in g.attrs["step_A"]), truth=truth,
                         seconds=float(g.attrs["seconds"]), meta=meta)
