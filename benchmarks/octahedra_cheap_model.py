"""Viability study: can a cheap, calibrated convolution model stand in for multislice ABF of
tilted perovskites ([110]pc) as the training data of a tilt network?  Answer on these data: no,
not at the pm level tilt reading needs (numbers below).

    OMP_NUM_THREADS=1 nice -n 15 .venv/bin/python benchmarks/octahedra_cheap_model.py [--no-baseline]

Run time (2 shared cores, one thread, nice 15, 2026-12-03): the six untilted multislice twins
once, 490 s CPU in all (cached in .bench-cache/octahedra/cheap_model/); then 406 s wall, 399 s
CPU, 218 s of them the classical baseline's fits (--no-baseline skips those).

What is compared.  For each cached held-out multislice run (benchmarks/octahedra_accuracy.py:
one per tilt system, random compound, aberrations and mistilt, 5 and 10 nm, 0.12 Å potential
grid, 8 Å probe window, 0.2 Å scan step, ONE frozen-phonon configuration) the cheap image is a
sum over every atom of the same simulation box (the run's own frozen-phonon draw is reproduced,
`scene`) of an element kernel (A, B, O) at the atom's projected position, so a tilted O column
whose atoms sit at different lateral positions along the beam becomes a split / elongated blob.
Two kernel families, rendered as an exact periodic Fourier sum:

* gauss: per element an elliptical plus a round Gaussian at a fitted offset (18 shape
  parameters, 7 amplitudes) -- the convolution approximation as simulate/convolution_image.py
  uses it for HAADF, with free (signed) ABF amplitudes;
* transfer: per element the weak-object ABF image with the run's own probe (abTEM aperture and
  aberrations, the 12-24 mrad annulus): phase and amplitude transfer and the probe intensity,
  the probe refocused to each atom's depth and shifted by depth × mistilt; per element a width,
  an offset and 3 amplitudes (9 + 10 parameters).  It follows the probe, so a calibration can
  move to another probe.

Calibration (never fitted and scored on the same image): "twin" = least squares against an
untilted (a0a0a0) multislice run of the same compound with the same probe, numerics and
thickness (`twin`); "cross" = against another held-out (tilted) run, other probe and compound
(median over the 5 others); "in-sample" (fitted on the scored image) is shown only as the bound
on the model family.  Scores: NCC of the images; intensity-weighted moments of the inverted ABF
in a 0.55 Å disc at each of the 8 pure-O columns per cell (the same procedure on both images):
centroid (Δc), rms widths (Δw), elongation (Δe); and the tilt response, feature(tilted) −
feature(untilted twin), which is what a network must read: its size in multislice, the cheap
model's error on it, and the geometric truth.  Lastly the classical baseline's O-column fits and
readings on both images (`models/octahedra_baseline.py`, cation lattice given).

Measured (this command), per run and thickness, twin calibration, pm:

| model | run | t nm | NCC | Δc | Δw | Δe | resp c MS | err | true c | resp w MS | err | true w |
|---|---|---|---|---|---|---|---|---|---|---|---|---|
| gauss | a0a0c- | 4.9 | 0.934 | 3.0 | 2.4 | 4.8 | 4.3 | 4.0 | 0.0 | 1.3 | 1.1 | 12.5 |
| gauss | a0a0c- | 10.0 | 0.840 | 7.5 | 1.8 | 4.3 | 2.8 | 3.0 | 0.0 | 1.4 | 0.8 | 12.5 |
| gauss | a0a0c+ | 5.0 | 0.947 | 2.9 | 0.9 | 1.5 | 4.0 | 2.6 | 0.3 | 0.6 | 0.5 | 5.6 |
| gauss | a0a0c+ | 10.1 | 0.959 | 2.3 | 0.6 | 1.2 | 4.0 | 4.0 | 0.2 | 0.6 | 0.5 | 5.6 |
| gauss | a-a-a- | 5.0 | 0.723 | 7.4 | 2.2 | 1.9 | 7.7 | 7.6 | 15.0 | 2.0 | 2.3 | 10.6 |
| gauss | a-a-a- | 9.9 | 0.761 | 15.0 | 1.9 | 2.5 | 7.9 | 15.5 | 15.0 | 1.8 | 4.8 | 10.6 |
| gauss | a-a-c+ | 5.0 | 0.862 | 3.0 | 1.2 | 2.1 | 10.8 | 3.6 | 17.9 | 1.8 | 1.4 | 5.3 |
| gauss | a-a-c+ | 9.9 | 0.911 | 2.8 | 0.7 | 0.9 | 8.7 | 3.6 | 17.9 | 1.5 | 0.8 | 5.3 |
| gauss | a0b-b- | 5.0 | 0.802 | 5.2 | 4.2 | 6.3 | 2.6 | 5.3 | 0.6 | 0.2 | 0.8 | 1.1 |
| gauss | a0b-b- | 10.1 | 0.866 | 2.8 | 1.7 | 3.1 | 3.7 | 3.5 | 0.6 | 0.4 | 0.5 | 1.1 |
| gauss | a+b-b- | 5.0 | 0.892 | 5.5 | 2.0 | 4.1 | 2.7 | 4.3 | 3.7 | 0.9 | 1.0 | 8.2 |
| gauss | a+b-b- | 10.0 | 0.844 | 2.4 | 2.5 | 3.8 | 1.6 | 2.5 | 3.7 | 0.8 | 0.7 | 8.2 |
| transfer | a0a0c- | 4.9 | 0.964 | 1.3 | 0.6 | 0.6 | 4.3 | 1.5 | 0.0 | 1.3 | 0.7 | 12.5 |
| transfer | a0a0c- | 10.0 | 0.901 | 2.7 | 2.2 | 2.6 | 2.8 | 1.6 | 0.0 | 1.4 | 1.1 | 12.5 |
| transfer | a0a0c+ | 5.0 | 0.919 | 2.2 | 0.8 | 1.0 | 4.0 | 2.8 | 0.3 | 0.6 | 0.5 | 5.6 |
| transfer | a0a0c+ | 10.1 | 0.934 | 3.0 | 0.6 | 0.9 | 4.0 | 3.4 | 0.2 | 0.6 | 0.6 | 5.6 |
| transfer | a-a-a- | 5.0 | 0.713 | 3.7 | 2.4 | 2.3 | 7.7 | 5.0 | 15.0 | 2.0 | 2.7 | 10.6 |
| transfer | a-a-a- | 9.9 | 0.634 | 9.5 | 2.1 | 1.4 | 7.9 | 8.2 | 15.0 | 1.8 | 2.2 | 10.6 |
| transfer | a-a-c+ | 5.0 | 0.872 | 3.2 | 1.2 | 1.5 | 10.8 | 2.4 | 17.9 | 1.8 | 1.1 | 5.3 |
| transfer | a-a-c+ | 9.9 | 0.922 | 1.9 | 0.8 | 1.5 | 8.7 | 2.0 | 17.9 | 1.5 | 1.3 | 5.3 |
| transfer | a0b-b- | 5.0 | 0.937 | 1.2 | 1.3 | 1.5 | 2.6 | 1.7 | 0.6 | 0.2 | 0.2 | 1.1 |
| transfer | a0b-b- | 10.1 | 0.894 | 3.0 | 2.3 | 1.7 | 3.7 | 3.0 | 0.6 | 0.4 | 0.8 | 1.1 |
| transfer | a+b-b- | 5.0 | 0.935 | 1.6 | 0.7 | 1.3 | 2.7 | 1.5 | 3.7 | 0.9 | 0.7 | 8.2 |
| transfer | a+b-b- | 10.0 | 0.895 | 2.8 | 1.2 | 1.7 | 1.6 | 2.0 | 3.7 | 0.8 | 0.7 | 8.2 |

Pooled (mean over the 12 cases):

| model | calib. | NCC | Δc | Δw | Δe | resp c MS | err | true c | resp w MS | err | true w |
|---|---|---|---|---|---|---|---|---|---|---|---|
| gauss | twin | 0.862 | 5.0 | 1.8 | 3.0 | 5.1 | 4.9 | 6.2 | 1.1 | 1.3 | 7.2 |
| gauss | cross | 0.051 | 7.7 | 5.7 | 3.4 | 5.1 | 6.4 | 6.2 | 1.1 | 1.4 | 7.2 |
| gauss | in-sample | 0.881 | 4.3 | 1.7 | 3.0 | 5.1 | 4.1 | 6.2 | 1.1 | 1.1 | 7.2 |
| transfer | twin | 0.877 | 3.0 | 1.3 | 1.5 | 5.1 | 2.9 | 6.2 | 1.1 | 1.0 | 7.2 |
| transfer | cross | 0.566 | 5.6 | 1.9 | 2.7 | 5.1 | 3.1 | 6.2 | 1.1 | 1.1 | 7.2 |
| transfer | in-sample | 0.912 | 2.2 | 0.9 | 1.2 | 5.1 | 2.1 | 6.2 | 1.1 | 0.9 | 7.2 |

O-centroid response pooled over all columns: cheap on multislice slope / r = 0.40 / 0.43 (gauss,
twin), 0.75 / 0.81 (transfer, twin), 0.54 / 0.77 (transfer, cross), 0.88 / 0.92 (transfer,
in-sample); multislice on the geometric truth 0.34 / 0.57 (the windowed centroid sees a third
of the true displacement: window-limited, and pulled by the B columns 1.4 Å away).  The
classical baseline reads the same tilt system from multislice and from the twin-calibrated cheap image in 6 (gauss) and 7
(transfer) of 12 cases, fails to fit any O column on 2 transfer images, and its fitted O
displacements differ by 8-40 pm rms between the two (it is unstable on both; see
octahedra_accuracy.py).

Verdict.  No: a calibrated convolution model is not close enough to this multislice to train a
tilt network on and test on multislice.  The better (transfer) model, calibrated on an untilted
twin with the same probe, puts the O-column centroids within 3.0 pm rms of multislice (widths
1.3 pm, elongation 1.5 pm) -- "a few pm" -- but the tilt signal in these features is itself only
a few pm: multislice's O-centroid response to the tilt is 5.1 pm rms and the cheap model gets it
wrong by 2.9 pm (slope 0.75, r 0.81); the width response that carries γ in a0a0c± is 1.1 pm and
the error on it 1.0 pm.  With ~1.2 pm of response per degree (0.34 × ~3.4 pm of true O shift per
degree), 3 pm is ~2.5° of systematic error against a 0.5° target.  The Gaussian kernel is worse
(4.9 pm, slope 0.40), and one calibration does not carry to another probe (gauss NCC 0.05; the
probe-aware transfer model keeps 0.57).  Even fitted on the scored image itself the model family
reaches only NCC 0.91 and 2.1 pm response error: the limit is the model, not its calibration.

What limits it: (1) ABF at 5-10 nm is dynamical (channelling, cross-talk between the O column
and the B column 1.4 Å away, the probe's aberrations acting through the crystal); a sum of
per-atom kernels, even with the probe's own weak-object transfer, misses that, worst for
a-a-a- LaTiO3 (NCC 0.63-0.71).  (2) The references: one frozen-phonon configuration, an 8 Å
probe window and 0.2 Å images, so the multislice response moves O centroids by 2.6-4.3 pm where
the geometric centroid moves < 1 pm (a0a0c±, a0b-b-: different phonon draws of run and twin,
and whatever the symmetric splitting does dynamically -- this set cannot tell them apart); the
study cannot resolve agreement below ~2-3 pm, and a production test set needs ≥4-8
configurations.  (3) Six runs, two thicknesses, noise-free images: a small sample.
A training set for the pm-level signal should rest on multislice per structure (GPU), or on
multislice patches per unit-cell tilt state composed into fields; this cheap model could at most
pre-train, with its ~3 pm O-column error as the domain gap to close on multislice.
"""
from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage
from scipy.optimize import least_squares

from octahedra_accuracy import CACHE, NUMERICS, SYSTEMS, THICKNESS_NM
from stemlive.simulate import octahedra as oc
from stemlive.simulate import octahedra_images as oi
from stemlive.simulate.crystals import rms_displacements

ROLES = ("A", "B", "O")  # octahedra.build's site codes 0, 1, 2


# ---------------------------------------------------------------------------------------------
# Multislice references: the cached held-out runs and their untilted twins
# ---------------------------------------------------------------------------------------------


def heldout_path(system: str, cache: Path = CACHE) -> Path:
    return cache / f"heldout_{system}.h5"


def twin(system: str, cache: Path = CACHE) -> dict:
    """The untilted twin of held-out run ``system``: a0a0a0 of the same compound with the same
    probe (aberrations and mistilt), numerics and thicknesses, by multislice (cached; 0.5-3 min
    CPU each here).  It is the calibration image: untilted, so never the image that is scored."""
    out = cache / "cheap_model" / f"twin_{system}.npz"
    if out.exists():
        z = np.load(out)
        return {k: z[k] for k in z.files}
    run = oi.read_run(heldout_path(system, cache), 0)
    st, pr = run.meta["structure"], dict(run.meta["probe"])
    pr["mistilt_mrad"] = tuple(pr["mistilt_mrad"])
    structure = oi.Structure("a0a0a0", (0.0, 0.0, 0.0), st["a_site"], st["b_site"], st["zone"])
    seed = int(run.meta["seed"]) + 1
    img = oi.simulate_run(structure, oi.Probe(**pr), NUMERICS, THICKNESS_NM, seed=seed)[0]
    out.parent.mkdir(parents=True, exist_ok=True)
    data = {"abf": img.abf, "haadf": img.haadf, "thickness_nm": img.thickness_nm, "step_A": np.array(img.step_A),
            "cell_A": np.array(img.truth.cell_A), "seed": np.array(seed), "seconds": np.array(img.seconds),
            "cpu_seconds": np.array(img.meta["cpu_seconds"])}
    np.savez(out.with_suffix(".tmp.npz"), **data)
    out.with_suffix(".tmp.npz").rename(out)
    return data


# ---------------------------------------------------------------------------------------------
# The atoms a run's multislice saw (same construction, same frozen-phonon draw)
# ---------------------------------------------------------------------------------------------


@dataclass
class Scene:
    """Atoms of one run in its simulation box: per thickness, (positions (n, 3) [Å], role (n,));
    z is depth below the entrance surface.  The scan (and so the image) covers the first cell."""

    layers: list
    cell: np.ndarray  # projected cell [Å]
    reps: np.ndarray  # in-plane copies in the probe window
    gpts: np.ndarray  # scan points over the cell
    extent: np.ndarray  # probe window [Å] = cell · reps


def scene(structure: dict, seed: int, thickness_nm, displaced: bool = True) -> Scene:
    """As `octahedra_images.simulate_run` builds it, including the run's frozen-phonon
    configuration (abTEM ``FrozenPhonons.randomize`` with the same seed: one configuration, so
    every column's atoms sit a few pm off their sites; ``displaced=False``: the ideal sites)."""
    import abtem

    thick = np.asarray(thickness_nm, float)
    rc = oi.run_crystal(oi.Structure(**{**structure, "angles_deg": tuple(structure["angles_deg"])}),
                        NUMERICS.min_extent_A, thick)
    crystal, cell, reps, dz = rc.crystal, np.array(rc.cell), rc.reps, rc.slice_A
    if displaced:
        fp = abtem.FrozenPhonons(crystal, num_configs=1, sigmas=rms_displacements(crystal),
                                 seed=oi.config_seed(seed, 0))
        pos = fp.randomize(crystal).positions
    else:
        pos = crystal.positions.copy()
    role = crystal.get_array("site")
    depth = crystal.positions[:, 2]
    layers = []
    for t in thick:
        plane = int(round(t * 10 / dz)) - 1
        keep = depth < (plane + 1) * dz
        layers.append((pos[keep].copy(), role[keep].copy()))
    gpts = np.array(oi._scan_gpts(tuple(cell), NUMERICS.scan_step_A))
    return Scene(layers, cell, np.array(reps), gpts, cell * np.array(reps))


# ---------------------------------------------------------------------------------------------
# Two cheap image models: a sum of per-element kernels at every atom, rendered as a Fourier series
# over the probe window (exact periodic sum, on a grid twice as fine as the scan, then sampled)
# ---------------------------------------------------------------------------------------------


class _Grid:
    M = 2

    def _grid(self, sc: Scene):
        self.N = sc.gpts * sc.reps * self.M
        self.g = sc.gpts
        step = sc.extent / self.N
        self.f0 = np.fft.fftfreq(self.N[0], step[0])[:, None]
        self.f1 = np.fft.fftfreq(self.N[1], step[1])[None, :]
        self.k2 = self.f0 ** 2 + self.f1 ** 2
        self.scale = self.N[0] * self.N[1] / (sc.extent[0] * sc.extent[1])  # ifft2 · N / area: a Fourier series

    def _structure_factor(self, xy):
        e0 = np.exp(-2j * np.pi * np.outer(xy[:, 0], self.f0[:, 0]))
        e1 = np.exp(-2j * np.pi * np.outer(xy[:, 1], self.f1[0]))
        return e0.T @ e1

    def _image(self, spectrum):
        img = np.fft.ifft2(spectrum).real * self.scale
        return img[:: self.M, :: self.M][: self.g[0], : self.g[1]]

    def render(self, theta, coef):
        return sum(c * x for c, x in zip(coef[:-1], self.basis(theta))) + coef[-1]


class GaussModel(_Grid):
    """Per element: an elliptical Gaussian (Cholesky l00, l10, l11 [Å]) plus a round one (width
    s [Å]), both at an offset (o0, o1) [Å] from the atom; amplitudes and a background linear.
    18 shape parameters + 7 amplitudes.  Atoms are projected straight down the zone axis."""

    LO = np.tile([0.12, -0.5, 0.12, 0.7, -0.4, -0.4], 3)
    HI = np.tile([0.6, 0.5, 0.6, 3.0, 0.4, 0.4], 3)
    STARTS = (np.tile([0.3, 0.0, 0.3, 0.9, 0.0, 0.0], 3), np.tile([0.25, 0.0, 0.25, 1.5, 0.0, 0.0], 3))
    X_SCALE = 0.05

    def __init__(self, sc: Scene, ti: int, probe: dict):
        self._grid(sc)
        pos, role = sc.layers[ti]
        self.S = [self._structure_factor(pos[role == e, :2]) for e in range(3)]

    def basis(self, theta):
        out = []
        q = 2 * np.pi ** 2
        for e in range(3):
            l00, l10, l11, s, o0, o1 = theta[6 * e: 6 * e + 6]
            c00, c01, c11 = l00 * l00, l00 * l10, l10 * l10 + l11 * l11
            shifted = self.S[e] * np.exp(-2j * np.pi * (self.f0 * o0 + self.f1 * o1))
            k1 = np.exp(-q * (c00 * self.f0 ** 2 + 2 * c01 * self.f0 * self.f1 + c11 * self.f1 ** 2))
            k2 = np.exp(-q * s * s * self.k2)
            out += [self._image(shifted * k1), self._image(shifted * k2)]
        return out


class TransferModel(_Grid):
    """Per element, the weak-object ABF image of the atoms with the run's own probe: the linear
    phase transfer T(q) = i[B(q) − B*(−q)] and amplitude transfer B(q) + B*(−q), with
    B(q) = Σ_k D(k) a*(k) a(k − q) (a: abTEM's probe with the run's aberrations, D: the 12-24
    mrad annulus), plus the probe intensity (the incoherent, convolution-approximation term).
    Each atom is imaged with the probe refocused to its depth (Fresnel phase, 1 nm bins) and
    shifted by depth × mistilt (abTEM tilts the propagator: the probe drifts by z·tanθ).  Per
    element: Gaussian width σ [Å] and offset (o0, o1) [Å]; 3 amplitudes per element and a
    background linear.  9 shape parameters + 10 amplitudes; follows the probe, so a calibration
    can move to another probe."""

    LO = np.tile([0.0, -0.3, -0.3], 3)
    HI = np.tile([0.8, 0.3, 0.3], 3)
    STARTS = (np.tile([0.2, 0.0, 0.0], 3),)
    X_SCALE = 0.05
    BIN_A = 10.0

    def __init__(self, sc: Scene, ti: int, probe: dict):
        import abtem

        self._grid(sc)
        pos, role = sc.layers[ti]
        pr = oi.Probe(**{**probe, "mistilt_mrad": tuple(probe["mistilt_mrad"])})
        wave = abtem.Probe(energy=pr.kv * 1e3, semiangle_cutoff=pr.alpha_mrad, gpts=tuple(int(n) for n in self.N),
                           extent=tuple(float(e) for e in sc.extent), aberrations=oi._aberrations(pr))
        a = np.fft.fft2(np.asarray(wave.build(scan=[[0.0, 0.0]]).compute().array).reshape(tuple(self.N)))
        a /= np.sqrt(np.sum(np.abs(a) ** 2))  # Σ|a|² = 1: B and the probe transfer in beam fractions, grid-free
        lam = abtem.core.energy.energy2wavelength(pr.kv * 1e3)
        mrad = np.sqrt(self.k2) * lam * 1e3
        detector = (mrad >= NUMERICS.abf_mrad[0]) & (mrad < NUMERICS.abf_mrad[1])
        tilt = np.tan(np.asarray(pr.mistilt_mrad) * 1e-3)
        xy = pos[:, :2] - pos[:, 2:3] * tilt[None, :]
        bins = np.floor(pos[:, 2] / self.BIN_A).astype(int)

        def flip(x):  # x(-k) on the FFT grid
            return np.roll(x[::-1, ::-1], 1, axis=(0, 1))

        self.X = [[np.zeros(tuple(self.N), complex) for _ in range(3)] for _ in range(3)]
        for b in np.unique(bins):
            az = a * np.exp(-1j * np.pi * lam * (b + 0.5) * self.BIN_A * self.k2)  # refocused to the bin's depth
            B = np.fft.ifft2(np.fft.fft2(detector * np.conj(az)) * np.fft.fft2(flip(az)))
            Bm = np.conj(flip(B))
            P = np.fft.ifft2(np.fft.fft2(az) * np.fft.fft2(np.conj(flip(az))))  # FT of |probe|²
            for e in range(3):
                sel = (bins == b) & (role == e)
                if sel.any():
                    S = self._structure_factor(xy[sel])
                    for n, X in enumerate((1j * (B - Bm), B + Bm, P)):
                        self.X[e][n] += S * X

    def basis(self, theta):
        out = []
        for e in range(3):
            s, o0, o1 = theta[3 * e: 3 * e + 3]
            g = np.exp(-2 * np.pi ** 2 * s * s * self.k2 - 2j * np.pi * (self.f0 * o0 + self.f1 * o1))
            out += [self._image(X * g) for X in self.X[e]]
        return out


MODELS = {"gauss": GaussModel, "transfer": TransferModel}


@dataclass
class Calibration:
    model: str
    theta: np.ndarray
    coef: np.ndarray
    ncc: float  # on the calibration image itself


def calibrate(model, image: np.ndarray, name: str) -> Calibration:
    """Shape parameters by nonlinear least squares, amplitudes and background by linear least
    squares inside it (variable projection), against one multislice ABF image."""
    y = image.ravel().astype(np.float64)

    def linear(theta):
        a = np.column_stack([x.ravel() for x in model.basis(theta)] + [np.ones(y.size)])
        norm = np.maximum(np.abs(a).max(axis=0), 1e-300)
        coef, *_ = np.linalg.lstsq(a / norm, y, rcond=None)
        return a, coef / norm

    def resid(theta):
        a, coef = linear(theta)
        return a @ coef - y

    best = None
    for x0 in model.STARTS:
        r = least_squares(resid, np.clip(x0, model.LO, model.HI), bounds=(model.LO, model.HI),
                          x_scale=model.X_SCALE, diff_step=1e-3, max_nfev=150)
        if best is None or r.cost < best.cost:
            best = r
    _, coef = linear(best.x)
    return Calibration(name, best.x, coef, ncc(model.render(best.x, coef), image))


def ncc(a: np.ndarray, b: np.ndarray) -> float:
    a = a - a.mean()
    b = b - b.mean()
    return float(np.sum(a * b) / np.sqrt(np.sum(a * a) * np.sum(b * b)))


# ---------------------------------------------------------------------------------------------
# O-column features, the same procedure on every image
# ---------------------------------------------------------------------------------------------

UPSAMPLE = 4
WINDOW_A = 0.55  # disc radius: the nearest cation (B) is 1.38-1.43 Å away along axis 1


def ideal_o_columns(structure: dict, cell: np.ndarray) -> np.ndarray:
    """Pure-O column positions of the untilted crystal, scaled to ``cell`` [Å] (the fixed
    windows at which both images are measured)."""
    flat = oc.project(oc.build("a0a0a0", (0, 0, 0), structure["a_site"], structure["b_site"], square_xy=True),
                      structure["zone"])
    c0 = np.array(flat.in_plane)
    xy = np.mod(flat.atoms.positions[:, :2] + 1e-6, c0) - 1e-6
    site = flat.atoms.get_array("site")
    cations = xy[site < 2]
    cols = []
    for p in xy[site == 2]:
        if np.min(np.hypot(*(cations - p).T)) < 0.3 or any(np.hypot(*(p - q)) < 0.3 for q in cols):
            continue
        cols.append(p)
    cols = np.array(sorted(map(tuple, cols)))
    return cols / c0 * cell


def true_o_columns(sc: Scene, ti: int, centres: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Geometric centroid displacement (n, 2) and covariance (n, 3: c00, c11, c01) [Å, Å²] of the
    O atoms assigned to each pure-O column (first cell copy, projected along the zone axis)."""
    pos, role = sc.layers[ti]
    o = np.mod(pos[role == 2, :2], sc.cell)
    d = o[:, None, :] - centres[None]
    d -= np.round(d / sc.cell) * sc.cell
    dist = np.hypot(d[..., 0], d[..., 1])
    k = np.argmin(dist, axis=1)
    disp, cov = [], []
    for c in range(len(centres)):
        v = d[(k == c) & (dist[np.arange(len(k)), k] < 0.8), c]
        mu = v.mean(axis=0)
        w = v - mu
        disp.append(mu)
        cov.append([np.mean(w[:, 0] ** 2), np.mean(w[:, 1] ** 2), np.mean(w[:, 0] * w[:, 1])])
    return np.array(disp), np.array(cov)


def o_moments(image: np.ndarray, step: np.ndarray, centres: np.ndarray) -> np.ndarray:
    """Per pure-O column (n, 5): centroid offset from the window centre (2) [Å], rms widths along
    axis 0 and 1 [Å], elongation √λmax − √λmin [Å]; intensity-weighted moments of the inverted
    ABF (95th percentile − image, minus its minimum in the window) in a disc of WINDOW_A, on a
    4× spline-upsampled (periodic) image."""
    fine = ndimage.zoom(np.pad(image.astype(np.float64), 4, mode="wrap"), UPSAMPLE, order=3, grid_mode=True,
                        mode="grid-wrap")
    fine = fine[4 * UPSAMPLE: -4 * UPSAMPLE, 4 * UPSAMPLE: -4 * UPSAMPLE]
    sig = np.percentile(fine, 95) - fine
    # fine pixel (i, j) sits at ((i + 0.5) / U − 0.5) · step (grid_mode zoom keeps pixel areas)
    r = ((np.arange(fine.shape[0]) + 0.5) / UPSAMPLE - 0.5) * step[0]
    c = ((np.arange(fine.shape[1]) + 0.5) / UPSAMPLE - 0.5) * step[1]
    period = np.array([image.shape[0] * step[0], image.shape[1] * step[1]])
    out = []
    for p in centres:
        dr = r - p[0]
        dr -= np.round(dr / period[0]) * period[0]
        dc = c - p[1]
        dc -= np.round(dc / period[1]) * period[1]
        rr, cc = np.meshgrid(dr, dc, indexing="ij")
        m = rr ** 2 + cc ** 2 <= WINDOW_A ** 2
        w = sig[m] - sig[m].min()
        x, y = rr[m], cc[m]
        mu = np.array([np.sum(w * x), np.sum(w * y)]) / w.sum()
        c00 = np.sum(w * (x - mu[0]) ** 2) / w.sum()
        c11 = np.sum(w * (y - mu[1]) ** 2) / w.sum()
        c01 = np.sum(w * (x - mu[0]) * (y - mu[1])) / w.sum()
        lam = np.linalg.eigvalsh([[c00, c01], [c01, c11]])
        out.append([mu[0], mu[1], np.sqrt(c00), np.sqrt(c11), np.sqrt(max(lam[1], 0)) - np.sqrt(max(lam[0], 0))])
    return np.array(out)


# ---------------------------------------------------------------------------------------------
# The classical baseline on both images (same cation lattice given)
# ---------------------------------------------------------------------------------------------

BASELINE_PIXEL_A = 0.2


def baseline(image: np.ndarray, step: np.ndarray, cell: np.ndarray, structure: dict):
    """`octahedra_baseline.estimate` on a 2×2-cell field resampled to square 0.2 Å pixels, the A
    column at the field origin given (as octahedra_accuracy does)."""
    from stemlive.models import octahedra_baseline as bl

    built = oc.build(structure["system"], structure["angles_deg"], structure["a_site"], structure["b_site"],
                     square_xy=True)
    period = bl.projected_period(built.pc_lengths_A, structure["zone"])
    shape = tuple(int(2 * c / BASELINE_PIXEL_A) for c in cell)
    rr, cc = np.indices(shape, dtype=float)
    field = ndimage.map_coordinates(image.astype(np.float64), [rr * BASELINE_PIXEL_A / step[0],
                                                                 cc * BASELINE_PIXEL_A / step[1]],
                                    order=3, mode="grid-wrap")
    try:
        return bl.estimate(field, BASELINE_PIXEL_A, structure["zone"], period, origin_px=(0.0, 0.0))
    except ValueError:  # no O column fitted: reported as a failure
        return None


# ---------------------------------------------------------------------------------------------
# The study
# ---------------------------------------------------------------------------------------------


def evaluate(run_baseline: bool = True, log=print) -> dict:
    t_start, c_start = time.perf_counter(), time.process_time()
    runs = {}
    for s in SYSTEMS:
        run = oi.read_run(heldout_path(s), 0)
        tw = twin(s)
        st = run.meta["structure"]
        flat = {**st, "system": "a0a0a0", "angles_deg": [0.0, 0.0, 0.0]}
        runs[s] = dict(run=run, twin=tw, st=st, probe=run.meta["probe"],
                       scene=scene(st, run.meta["seed"], run.thickness_nm),
                       ideal=scene(st, run.meta["seed"], run.thickness_nm, displaced=False),
                       twin_scene=scene(flat, int(tw["seed"]), tw["thickness_nm"]),
                       step=np.array(run.step_A), tstep=np.array(tw["step_A"]),
                       centres=ideal_o_columns(st, np.array(run.truth.cell_A)),
                       tcentres=ideal_o_columns(st, np.array(tw["cell_A"])))
    log(f"scenes built ({time.process_time() - c_start:.0f} s CPU)")
    res = {}
    for name, Model in MODELS.items():
        for s, R in runs.items():
            for ti in range(len(THICKNESS_NM)):
                c0 = time.process_time()
                ms, ms_twin = R["run"].abf[ti], R["twin"]["abf"][ti]
                m_test, m_twin = Model(R["scene"], ti, R["probe"]), Model(R["twin_scene"], ti, R["probe"])
                cal_twin = calibrate(m_twin, ms_twin, name)
                cal_in = calibrate(m_test, ms, name)  # diagnostic only: fitted and scored on the same image
                res[(name, s, ti)] = dict(model=m_test, twin_model=m_twin, cal_twin=cal_twin, cal_in=cal_in,
                                          cpu=time.process_time() - c0)
                log(f"{name:8s} {s:7s} {THICKNESS_NM[ti]:4.0f} nm: twin fit ncc {cal_twin.ncc:.3f}, in-sample ncc "
                    f"{cal_in.ncc:.3f} ({time.process_time() - c0:.0f} s CPU)")
    rows = []
    for name in MODELS:
        for s, R in runs.items():
            for ti in range(len(THICKNESS_NM)):
                e = res[(name, s, ti)]
                ms = R["run"].abf[ti]
                f_ms = o_moments(ms, R["step"], R["centres"])
                f_ms_twin = o_moments(R["twin"]["abf"][ti], R["tstep"], R["tcentres"])
                true_d, true_c = true_o_columns(R["ideal"], ti, R["centres"])
                row = dict(model=name, system=s, ti=ti, thickness=float(R["run"].thickness_nm[ti]),
                           true_disp=true_d, true_cov=true_c, f_ms=f_ms, f_ms_twin=f_ms_twin)
                variants = {"twin": (e["cal_twin"], [e["cal_twin"]]), "in-sample": (e["cal_in"], [e["cal_in"]])}
                # cross: the in-sample calibration of every other held-out run (other probe and compound)
                variants["cross"] = (None, [res[(name, o, ti)]["cal_in"] for o in runs if o != s])
                for v, (_, cals) in variants.items():
                    per = []
                    for cal in cals:
                        img = e["model"].render(cal.theta, cal.coef)
                        f = o_moments(img, R["step"], R["centres"])
                        f_twin = o_moments(e["twin_model"].render(cal.theta, cal.coef), R["tstep"], R["tcentres"])
                        per.append(dict(img=img, ncc=ncc(img, ms), rel=float(np.std(img - ms) / np.std(ms)),
                                        f=f, f_twin=f_twin))
                    row[v] = per
                rows.append(row)
    base = {}
    if run_baseline:
        c0 = time.process_time()
        for s, R in runs.items():
            for ti in range(len(THICKNESS_NM)):
                cell = np.array(R["run"].truth.cell_A)
                base[("ms", s, ti)] = baseline(R["run"].abf[ti], R["step"], cell, R["st"])
                for name in MODELS:
                    row = next(r for r in rows if r["model"] == name and r["system"] == s and r["ti"] == ti)
                    base[(name, s, ti)] = baseline(row["twin"][0]["img"], R["step"], cell, R["st"])
        log(f"baseline fits: {time.process_time() - c0:.0f} s CPU")
    return dict(rows=rows, base=base, runs=runs, wall=time.perf_counter() - t_start,
                cpu=time.process_time() - c_start)


def _pm(x) -> float:
    return float(np.sqrt(np.mean(np.square(x))) * 100)


def _reads(est) -> str:
    if est is None:
        return "failed (no O column fitted)"
    return f"{est.system} ({', '.join(f'{a:.1f}' for a in est.angles_deg)})"


def summarise(out: dict) -> str:
    rows, base, runs = out["rows"], out["base"], out["runs"]
    lines = ["Per run and thickness, each cheap model calibrated on the run's untilted twin (multislice, same "
             "probe and compound), against the held-out multislice ABF (noise-free).  NCC: normalised "
             "cross-correlation over the cell.  O columns (the 8 pure-O columns of the cell), rms over columns "
             "of cheap − multislice in the windowed moments [pm]: Δc centroid (both axes), Δw rms width (both "
             "axes), Δe elongation.  Tilt response: feature of the tilted image − the same feature of the "
             "twin image, multislice (MS) rms and cheap − MS rms (err), for the centroid (c) and the widths (w); "
             "true: rms geometric O-column centroid displacement (c) and spread √var (w) [pm].", "",
             "| model | run | t nm | NCC | Δc | Δw | Δe | resp c MS | err | true c | resp w MS | err | true w |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    pooled = {}
    for r in rows:
        resp_c = r["f_ms"][:, :2] - r["f_ms_twin"][:, :2]
        resp_w = r["f_ms"][:, 2:4] - r["f_ms_twin"][:, 2:4]
        true_c, true_w = _pm(r["true_disp"]), _pm(np.sqrt(np.clip(r["true_cov"][:, :2], 0, None)))
        for v in ("twin", "cross", "in-sample"):
            per = r[v]
            vals = np.median([[p["ncc"], _pm(p["f"][:, :2] - r["f_ms"][:, :2]), _pm(p["f"][:, 2:4] - r["f_ms"][:, 2:4]),
                               _pm(p["f"][:, 4] - r["f_ms"][:, 4]), _pm(resp_c),
                               _pm((p["f"][:, :2] - p["f_twin"][:, :2]) - resp_c), true_c, _pm(resp_w),
                               _pm((p["f"][:, 2:4] - p["f_twin"][:, 2:4]) - resp_w), true_w] for p in per], axis=0)
            pooled.setdefault((r["model"], v), []).append(vals)
            if v == "twin":
                lines.append(f"| {r['model']} | {r['system']} | {r['thickness']:.1f} | {vals[0]:.3f} | "
                             + " | ".join(f"{x:.1f}" for x in vals[1:]) + " |")
    lines += ["", "Pooled: mean over the 12 run × thickness cases.  Calibration: twin = the run's untilted "
              "multislice twin; cross = fitted on another held-out (tilted) run's multislice image, other "
              "probe and compound (median over the 5 others); in-sample = fitted on the scored image itself, "
              "a bound on what the model family can do, not a score.", "",
              "| model | calib. | NCC | Δc | Δw | Δe | resp c MS | err | true c | resp w MS | err | true w |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for (m, v), vals in pooled.items():
        a = np.mean(np.array(vals), axis=0)
        lines.append(f"| {m} | {v} | {a[0]:.3f} | " + " | ".join(f"{x:.1f}" for x in a[1:]) + " |")
    # does the cheap model's tilt response follow multislice's? pooled regression over O columns
    lines.append("")
    lines.append("O-column centroid response (tilted − untilted twin), pooled over all columns, both axes, runs "
                 "and thicknesses: slope and correlation of cheap on multislice, and of multislice and cheap on "
                 "the geometric truth:")
    lines.append("")
    lines.append("| model | calib. | cheap~MS slope | r | MS~true slope | r | cheap~true slope | r |")
    lines.append("|---|---|---|---|---|---|---|---|")
    for m in MODELS:
        for v in ("twin", "cross", "in-sample"):
            xs, ys, ts = [], [], []
            for r in rows:
                if r["model"] != m:
                    continue
                resp_ms = (r["f_ms"][:, :2] - r["f_ms_twin"][:, :2]).ravel()
                for p in r[v]:
                    xs.append(resp_ms)
                    ys.append((p["f"][:, :2] - p["f_twin"][:, :2]).ravel())
                    ts.append(r["true_disp"].ravel())
            x, y, t = map(np.concatenate, (xs, ys, ts))

            def fit(a, b):
                return float(np.sum(a * b) / np.sum(a * a)), float(np.corrcoef(a, b)[0, 1])

            s1, r1 = fit(x, y)
            s2, r2 = fit(t, x)
            s3, r3 = fit(t, y)
            lines.append(f"| {m} | {v} | {s1:.2f} | {r1:.2f} | {s2:.2f} | {r2:.2f} | {s3:.2f} | {r3:.2f} |")
    if base:
        lines.append("")
        lines.append("Classical baseline (Gaussian O-column fits, cation lattice given) on multislice and on the "
                     "twin-calibrated cheap image: rms difference of its fitted O-column displacements [pm] and "
                     "spreads (√var) [pm], and the tilt system and (α, β, γ) it reads from each:")
        lines.append("")
        lines.append("| run | t nm | truth (α, β, γ) | MS reads | gauss Δfit disp / spread pm | gauss reads | "
                     "transfer Δfit disp / spread pm | transfer reads |")
        lines.append("|---|---|---|---|---|---|---|---|")
        for s, R in runs.items():
            for ti in range(len(THICKNESS_NM)):
                b = base[("ms", s, ti)]
                truth = "(" + ", ".join(f"{a:.1f}" for a in R["st"]["angles_deg"]) + ")"
                cells = [s, f"{R['run'].thickness_nm[ti]:.1f}", truth, _reads(b)]
                for m in MODELS:
                    c = base[(m, s, ti)]
                    if b is None or c is None:
                        cells += ["-", _reads(c)]
                        continue
                    ok = (b.fits.counts > 0) & (c.fits.counts > 0)
                    dd = _pm(c.fits.displacement_A[ok] - b.fits.displacement_A[ok]) if ok.any() else np.nan
                    sw = lambda f: np.sqrt(np.clip(f.spread_A2[ok][:, :2], 0, None))  # noqa: E731
                    ds = _pm(sw(c.fits) - sw(b.fits)) if ok.any() else np.nan
                    cells += [f"{dd:.1f} / {ds:.1f}", _reads(c)]
                lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--twins-only", action="store_true", help="only simulate (or finish) the untilted twins")
    ap.add_argument("--no-baseline", action="store_true", help="skip the classical baseline's fits")
    args = ap.parse_args(argv)
    for s in SYSTEMS:
        twin(s)
    if args.twins_only:
        return
    out = evaluate(not args.no_baseline, log=lambda m: print(m, flush=True))
    print(summarise(out))
    print(f"\ntotal {out['wall']:.0f} s wall, {out['cpu']:.0f} s CPU (twins cached)")


if __name__ == "__main__":
    main()
