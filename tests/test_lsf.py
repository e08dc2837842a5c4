"""The least-squares baseline finds library patterns back through geometry and mirrors."""
import numpy as np
import pytest

from stemlive.models.lsf import LsfAnalyzer
from stemlive.models.pacbed_analysis import PacbedEstimate
from stemlive.simulate.library import PacbedLibrary

from .helpers import place


@pytest.fixture(scope="module")
def lsf(quadrant_library):
    return LsfAnalyzer(quadrant_library, 200, 13.6)


@pytest.fixture(scope="module")
def lib(quadrant_library):
    return PacbedLibrary.load(quadrant_library)


@pytest.mark.parametrize("thickness,tilt,rotation", [(3.0, (1.0, 0.0), 12.0), (2.0, (-1.0, 2.0), -30.0),
                                                     (4.0, (0.0, -1.0), 0.0)])
def test_recovers_thickness_tilt_and_geometry(lsf, lib, thickness, tilt, rotation):
    a = lib.alpha_mrad / lib.mrad_per_px
    raw = place(lib.pattern(thickness, tilt), a, (100, 120), 15.0, (48.3, 61.7), rotation)
    raw = raw + 0.05 * raw.mean()  # a uniform background the fit must absorb
    r = lsf.analyze_one(raw)
    assert r.thickness_nm == pytest.approx(thickness, abs=0.5)
    # crystal frame = the library's frame (4-fold: the rotation is found modulo 90°)
    assert np.allclose(r.tilt_crystal_mrad, tilt, atol=0.3), r
    assert abs(((r.rotation_deg - rotation) + 45) % 90 - 45) < 1.5
    assert np.hypot(r.center_px[0] - 48.3, r.center_px[1] - 61.7) < 0.8 and r.radius_px == pytest.approx(15, rel=0.03)
    assert r.background == pytest.approx(0.05 * raw.mean() / 1.05, rel=0.3)


def test_hybrid_stays_within_the_window(lsf, lib):
    a = lib.alpha_mrad / lib.mrad_per_px
    raw = place(lib.pattern(4.0, (1.0, 1.0)), a, (100, 100), 15.0, (50.0, 50.0), 5.0)
    start = PacbedEstimate(center_px=(50.4, 49.8), radius_px=15.2, rotation_deg=4.0, thickness_nm=1.0,
                           tilt_crystal_mrad=(1.2, 0.9), flags=[], in_range=True)
    (r,) = lsf.refine([raw], [start], dt_nm=1.5, dtilt_mrad=1.0)
    assert r.thickness_nm <= 2.6  # the truth (4 nm) lies outside ±1.5 nm of the network's 1 nm
    (r,) = lsf.refine([raw], [start], dt_nm=3.0, dtilt_mrad=1.0)
    assert r.thickness_nm == pytest.approx(4.0, abs=0.5) and np.allclose(r.tilt_crystal_mrad, (1, 1), atol=0.3)


def test_refuses_a_library_for_another_setting(quadrant_library):
    with pytest.raises(ValueError, match="library is for 200 kV, 13.6 mrad"):
        LsfAnalyzer(quadrant_library, 300, 13.6)


def test_intensity_scale_does_not_matter_and_degenerate_patterns_fail(lsf, lib):
    """The LSF and the hybrid read patterns in float64 units of their peak: ×1e39 (past float32)
    and ×1e-40 (below it) give the same answer, the background in the input's units."""
    a = lib.alpha_mrad / lib.mrad_per_px
    raw = place(lib.pattern(3.0, (1.0, 0.0)), a, (100, 120), 15.0, (48.3, 61.7), 12.0).astype(np.float64)
    raw = raw + 0.05 * raw.mean()
    ref = lsf.analyze_one(raw)
    for k in (1e39, 1e-40):
        r = lsf.analyze_one(raw * k)
        assert r.thickness_nm == pytest.approx(ref.thickness_nm, abs=1e-3)
        assert np.allclose(r.tilt_crystal_mrad, ref.tilt_crystal_mrad, atol=1e-3)
        assert r.background == pytest.approx(ref.background * k, rel=1e-3)
    (bad,) = lsf.analyze([-raw])
    assert bad.error and "≤ 0" in bad.error
    start = PacbedEstimate(center_px=(48.3, 61.7), radius_px=15.0, rotation_deg=12.0, thickness_nm=3.0,
                           tilt_crystal_mrad=(1.0, 0.0), flags=[], in_range=True)
    (r,) = lsf.refine([raw * 1e39], [start])
    assert r.error is None and r.thickness_nm == pytest.approx(3.0, abs=0.5)
