"""The library check: a compact (principal-component) library and the re-fit of a pattern against it."""
import numpy as np
import pytest
from scipy import ndimage

from stemlive.models.compact_library import CompactLibrary, build_compact
from stemlive.models.pacbed_analysis import PacbedEstimate
from stemlive.models.pacbed_check import LibraryCheck
from stemlive.simulate.library import PacbedLibrary

from .helpers import place


@pytest.fixture(scope="module")
def lib(quadrant_library):
    return PacbedLibrary.load(quadrant_library)


@pytest.fixture(scope="module")
def compact(quadrant_library, tmp_path_factory):
    c = build_compact(quadrant_library)
    path = tmp_path_factory.mktemp("compact") / "c.h5"
    c.save(path)
    return CompactLibrary.load(path)


def test_compact_library_reconstructs_every_entry(compact, quadrant_library):
    from stemlive.models.compact_library import canonical_library

    full, tilts, thick = canonical_library(PacbedLibrary.load(quadrant_library))
    win = compact.window
    t, k = np.indices(compact.coef.shape[:2]).reshape(2, -1)
    rec = compact.patterns(t, k)[:, win] * compact.entry_norm[t, k, None] + compact.entry_mean[t, k, None]
    orig = full.reshape(-1, full.shape[-1])[:, win]
    err = np.linalg.norm(rec - orig, axis=1) / np.linalg.norm(orig - orig.mean(axis=1, keepdims=True), axis=1)
    assert err.max() < 5e-3 and compact.attrs["max_relative_error"] < 5e-3
    assert np.allclose(compact.tilt_mrad, tilts) and np.allclose(compact.thickness_nm, thick)


# the tiny test library (2×2 cells, 1-4 nm) barely changes with tilt at 2 nm: blur only where it does
@pytest.mark.parametrize("thickness,tilt,rotation,blur", [(3.0, (1.0, 0.0), 12.0, 0.0), (2.0, (-1.0, 2.0), -30.0, 0.0),
                                                          (4.0, (0.0, -1.0), 0.0, 2.0), (3.0, (1.0, 1.0), 20.0, 1.0)])
def test_check_recovers_thickness_tilt_geometry_and_background(compact, lib, thickness, tilt, rotation, blur):
    a = lib.alpha_mrad / lib.mrad_per_px
    raw = place(lib.pattern(thickness, tilt), a, (100, 120), 15.0, (48.3, 61.7), rotation)
    if blur:
        raw = ndimage.gaussian_filter(raw, blur * 15.0 / 12.1)
    bg = 0.05 * raw.mean()
    raw = raw + bg
    start = PacbedEstimate(center_px=(48.9, 61.2), radius_px=15.4, rotation_deg=rotation + 1.0, thickness_nm=1.0,
                           tilt_crystal_mrad=(0.0, 0.0), flags=[], in_range=True)
    out = LibraryCheck(compact).check(raw, start)
    e = out.estimate
    assert e.thickness_nm == pytest.approx(thickness, abs=0.5)  # a parabola through a 1 nm grid
    # a 1 mrad grid that at ≤ 4 nm barely changes the pattern: sub-grid values within a third of a step
    assert np.allclose(e.tilt_crystal_mrad, tilt, atol=0.35), e
    assert abs(((e.rotation_deg - rotation) + 45) % 90 - 45) < (0.5 if blur < 2 else 1.0)
    assert np.hypot(e.center_px[0] - 48.3, e.center_px[1] - 61.7) < 0.3 and e.radius_px == pytest.approx(15, rel=0.01)
    # a wide blurred (inelastic) copy and a uniform level are not told apart on a thin specimen:
    # the fit may give a share of the uniform level to the inelastic copy, never more than is there
    assert -0.1 * bg <= e.background <= 1.3 * bg and 0 <= out.inelastic_share < 0.5
    assert out.fit_quality < 0.02 and "model-mismatch" not in e.flags
    assert abs(out.blur_px - blur) <= 0.8


def test_a_pattern_the_library_does_not_hold_is_flagged(compact, lib):
    rng = np.random.default_rng(0)
    a = lib.alpha_mrad / lib.mrad_per_px
    raw = place(lib.pattern(3.0, (1.0, 0.0)), a, (100, 120), 15.0, (48.3, 61.7), 0.0)
    yy, xx = np.indices(raw.shape)
    rings = raw.mean() * (1 + np.cos(np.hypot(yy - 48.3, xx - 61.7) / 2.0))  # no crystal gives this
    raw = np.where(np.hypot(yy - 48.3, xx - 61.7) < 15, raw, rings) + rng.random(raw.shape) * raw.mean()
    start = PacbedEstimate(center_px=(48.3, 61.7), radius_px=15.0, rotation_deg=0.0, flags=[], in_range=True)
    out = LibraryCheck(compact).check(raw, start)
    assert "model-mismatch" in out.estimate.flags and out.fit_quality > 0.08 and not out.estimate.in_range


def test_compact_library_command(quadrant_library, tmp_path):
    from stemlive.live.cli import main

    out = tmp_path / "c.h5"
    assert main(["simulate", "compact-library", str(quadrant_library), "--out", str(out)]) == 0
    c = CompactLibrary.load(out)
    assert c.attrs["max_relative_error"] <= 2e-3 and c.attrs["source_sha256"]
    assert main(["simulate", "compact-library", str(quadrant_library), "--out", str(quadrant_library)]) == 2
    assert main(["simulate", "compact-library", str(quadrant_library), "--out", str(out)]) == 2  # exists


def _noisy_patterns(lib, n: int, seed: int):
    """(raw patterns, networks-like starts, true thickness, true detector tilt) on the test library."""
    rng = np.random.default_rng(seed)
    a = lib.alpha_mrad / lib.mrad_per_px
    out = []
    for _ in range(n):
        t = float(rng.choice(lib.thickness_nm[1:-1]))
        tilt = tuple(float(v) for v in lib.tilt_mrad[rng.integers(len(lib.tilt_mrad))])
        clean = place(lib.pattern(t, tilt), a, (100, 120), 15.0, (48.3, 61.7), 0.0)
        raw = rng.poisson(clean / clean.mean() * 30).astype(float)  # ~30 counts per pixel: errors from noise
        start = PacbedEstimate(center_px=(48.5, 61.5), radius_px=15.2, rotation_deg=0.5, thickness_nm=t,
                               thickness_sigma_nm=1.0, tilt_crystal_mrad=tilt, tilt_mrad=tilt, tilt_sigma_mrad=(0.5, 0.5),
                               flags=[], in_range=True)
        out.append((raw, start, t, tilt))
    return out


def test_sigma_calibration_reaches_its_coverage_and_round_trips(compact, lib, tmp_path):
    from stemlive.models.checked_analysis import load_sigma_calibration, sigma_calibration_path
    from stemlive.models.pacbed_check import SigmaCalibration, calibrate_sigma

    check = LibraryCheck(compact, sigma=SigmaCalibration(thickness_floor_nm=0.0, tilt_floor_mrad=0.0))
    data = _noisy_patterns(lib, 24, seed=3)
    fits = [check.fit(raw, start) for raw, start, _, _ in data]
    starts = [d[1] for d in data]
    t_true, tilt_true = np.array([d[2] for d in data]), np.array([d[3] for d in data])
    cal = calibrate_sigma(check, fits, starts, t_true, tilt_true, "test", target=0.5)
    est = [check.outcome(f, s, cal).estimate for f, s in zip(fits, starts)]
    cover = np.mean([abs(e.thickness_nm - t) <= e.thickness_sigma_nm for e, t in zip(est, t_true)])
    assert 0.4 <= cover <= 0.65 and cal.fitted_on == "test"
    wider = replace_scale(cal, 3.0)
    assert all(check.outcome(f, s, wider).estimate.thickness_sigma_nm >= e.thickness_sigma_nm for f, s, e in
               zip(fits, starts, est))
    data_file = tmp_path / "x_check.h5"
    path = sigma_calibration_path(data_file)
    assert path.name == "x_check_sigma.json" and load_sigma_calibration(data_file) == SigmaCalibration()
    cal.save(path)
    assert load_sigma_calibration(data_file) == cal
    path.write_text('{"thickness_scale": -1}')
    with pytest.raises(ValueError, match="x_check_sigma.json"):
        load_sigma_calibration(data_file)


def replace_scale(cal, factor: float):
    from dataclasses import replace

    return replace(cal, thickness_scale=cal.thickness_scale * factor, tilt_scale=cal.tilt_scale * factor)


def test_render_shows_the_fitted_library_pattern_beside_the_pattern(compact, lib):
    a = lib.alpha_mrad / lib.mrad_per_px
    raw = place(lib.pattern(3.0, (1.0, 0.0)), a, (100, 120), 15.0, (48.3, 61.7), 12.0)
    start = PacbedEstimate(center_px=(48.9, 61.2), radius_px=15.4, rotation_deg=13.0, thickness_nm=1.0,
                           tilt_crystal_mrad=(0.0, 0.0), flags=[], in_range=True)
    check = LibraryCheck(compact)
    est = check.check(raw, start).estimate
    shown = check.render(raw, est)
    inside = np.isfinite(shown["model"])
    obs = shown["observed"][inside]
    assert shown["observed"].shape == shown["model"].shape == (64, 64) and inside.mean() > 0.5
    assert np.linalg.norm(shown["residual"][inside]) < 0.05 * np.linalg.norm(obs - obs.mean())
    # a wrong reading is visibly worse: another thickness (this tiny 1-4 nm library changes little
    # with thickness), another disk size (much worse)
    from dataclasses import replace
    right = np.linalg.norm(shown["residual"][inside])
    assert np.linalg.norm(check.render(raw, replace(est, thickness_nm=1.0))["residual"][inside]) > 1.1 * right
    assert np.linalg.norm(check.render(raw, replace(est, radius_px=est.radius_px * 1.05))["residual"][inside]) > 3 * right
    with pytest.raises(ValueError, match="render needs"):
        check.render(raw, replace(est, thickness_nm=None))
