"""Classical tilt baseline: Gaussian fits of O columns, angles from the rigid-octahedron model."""
import numpy as np
import pytest
from ase.data import atomic_numbers

from stemlive.models import octahedra_baseline as bl
from stemlive.simulate import octahedra as oc
from stemlive.simulate import octahedra_images as oi

PIXEL = 0.2


def gaussian_column_images(system, angles, zone, origin_A=(0.9, 1.7), periods=(2.3, 2.3), width_A=0.3):
    """ABF and HAADF in the convolution approximation: a Gaussian per atom at its projected
    position (ABF dips ∝ Z^0.7, HAADF peaks ∝ Z^1.7); pixel (0, 0) at ``origin_A`` of the cell."""
    s = oc.build(system, angles, square_xy=zone == "[110]")
    zc = oc.project(s, zone)
    period = bl.projected_period(s.pc_lengths_A, zone)
    shape = tuple(int(n * p / PIXEL) for n, p in zip(periods, period))
    cell = np.diag(np.asarray(zc.atoms.cell))[:2]
    z = np.array([atomic_numbers[a] for a in zc.atoms.get_chemical_symbols()], float)
    rr, cc = np.indices(shape) * PIXEL
    abf, haadf = np.zeros(shape), np.zeros(shape)
    for i in range(-1, int(shape[0] * PIXEL / cell[0]) + 2):
        for j in range(-1, int(shape[1] * PIXEL / cell[1]) + 2):
            for (r, c), w in zip(zc.atoms.positions[:, :2] + [i * cell[0], j * cell[1]] - np.asarray(origin_A), z):
                g = np.exp(-((rr - r) ** 2 + (cc - c) ** 2) / (2 * width_A ** 2))
                abf += w ** 0.7 * g
                haadf += w ** 1.7 * g
    return 1e4 * (1 - 0.3 * abf / abf.max()), haadf / haadf.max(), period, s


def _truth_columns(s, zone, origin_A, shape):
    t = oc.projected_truth(s, zone)
    per = bl.projected_period(s.pc_lengths_A, zone)
    reg = bl.Registration(-np.asarray(origin_A) / PIXEL, PIXEL, per)
    pos, idx = bl._positions_in_field(t.positions_A, reg, shape, 0)
    ang = t.angles_deg[idx]
    return pos, np.where(np.array(t.signed), ang, np.abs(ang))


def _compare(est, s, zone, shape, origin_A):
    """Per B column: estimate minus truth, matched by image position."""
    p_est, a_est = bl.column_angles(est, zone, shape)
    p_true, a_true = _truth_columns(s, zone, origin_A, shape)
    diffs = []
    for p, a in zip(p_true, a_true):
        d = np.hypot(*(p_est - p).T)
        assert d.min() < 0.3 / PIXEL  # every true B column has an estimate within 0.3 Å
        diffs.append(a_est[np.argmin(d)] - a)
    return np.array(diffs)


@pytest.mark.parametrize("system, angles, zone, tol", [("a0a0c+", (0, 0, 8), "[001]", 0.3),
                                                       ("a-a-c+", (7, 7, 5), "[110]", 1.0)])
def test_recovers_known_tilts_from_gaussian_column_images(system, angles, zone, tol):
    origin = (0.9, 1.7)
    abf, haadf, period, s = gaussian_column_images(system, angles, zone, origin)
    est = bl.estimate(abf, PIXEL, zone, period, haadf=haadf)
    assert est.system == system
    diff = _compare(est, s, zone, abf.shape, origin)
    assert np.abs(diff).max() < tol  # signs included where the projection carries them
    assert est.fits.cation_error_A < 0.05


def test_untilted_is_untilted():
    abf, haadf, period, s = gaussian_column_images("a0a0a0", (0, 0, 0), "[001]")
    est = bl.estimate(abf, PIXEL, "[001]", period, haadf=haadf)
    assert np.abs(est.fits.displacement_A).max() < 0.02
    assert est.system == "a0a0a0" or np.abs(est.angles_deg).max() < 2.0


def test_on_a_multislice_image():
    """The baseline on abTEM multislice ABF (SrTiO3, a0a0c+ 10°, [001], 1.6 nm, 0.26 Å scan)."""
    numerics = oi.Numerics(sampling_A=0.12, min_extent_A=7.0, scan_step_A=0.26, phonon_configs=1,
                           abf_mrad=(12.0, 24.0), haadf_mrad=(35.0, 55.0))
    run = oi.simulate_run(oi.Structure("a0a0c+", (0, 0, 10), "Sr", "Ti", "[001]"), oi.Probe(), numerics, (1.6,))[0]
    rng = np.random.default_rng(0)
    obs = oi.Observation(source_fwhm_A=0.3, dose_e_per_A2=1e6, pixel_A=run.step_A[0])
    shape = (2 * run.abf.shape[1] + 6, 2 * run.abf.shape[2] + 6)
    origin = (1.1, 0.5)
    abf = oi.observe(run.abf[0], run.step_A, obs, rng, shape, origin)
    haadf = oi.observe(run.haadf[0], run.step_A, obs, rng, shape, origin)
    period = np.array(run.truth.cell_A)
    est = bl.estimate(abf, run.step_A[0], "[001]", period, haadf=haadf)
    gamma = est.reported_deg()[2]
    assert est.system in ("a0a0c+", "a-a-c+") and abs(abs(gamma) - 10) < 3  # within the dynamical bias
    # the sign per column, in the image frame, is right
    p_est, a_est = bl.column_angles(est, "[001]", shape)
    t = run.truth
    for p, a in zip(t.positions_A, t.angles_deg):
        img = (p - np.asarray(origin)) / run.step_A[0]
        img = np.mod(img, period / run.step_A[0])
        d = np.hypot(*(p_est - img).T)
        if d.min() < 1.5:
            assert np.sign(a_est[np.argmin(d), 2]) == np.sign(a[2])


def test_bad_input():
    with pytest.raises(ValueError, match="2D image"):
        bl.estimate(np.zeros((4, 4)), 0.2, "[001]", (7.8, 7.8))
    with pytest.raises(ValueError, match="choose"):
        bl.projection_basis("[111]")
    with pytest.raises(ValueError, match="haadf shape"):
        bl.estimate(np.ones((40, 40)), 0.2, "[001]", (7.8, 7.8), haadf=np.ones((30, 30)))
