"""simulate/recordings.py: realistic recordings span the experiment model and their truth is right."""
from __future__ import annotations

import numpy as np
import pytest

from stemlive.models import canonical
from stemlive.models.coarse_align import coarse_disk
from stemlive.simulate import recordings as rec
from stemlive.simulate.library import PacbedLibrary

from .helpers import place


@pytest.fixture(scope="module")
def source(quadrant_library):
    return rec.HeldoutSource(quadrant_library, holdout_fraction=0.17, sampler_seed=3)


@pytest.fixture(scope="module")
def recorded(source):
    frames, truth = [], []
    for f, t in rec.iter_recordings(source, 40, seed=5):
        frames.append(f)
        truth.append(t)
    return frames, rec.stack_truth(truth)


def test_recordings_span_the_experiment_model(recorded, source):
    frames, t = recorded
    shapes = np.array([f.shape for f in frames])
    assert shapes.min() >= 64 and shapes.max() <= 1024 and (shapes[:, 0] != shapes[:, 1]).any()
    assert np.array_equal(shapes, t["shape"])
    for f, kind in zip(frames, t["export"]):
        assert f.dtype == np.dtype(kind)
    assert set(t["export"]) == {"float32", "uint16", "uint8"}
    assert np.all((t["field_alpha"] >= 1.4 - 1e-9) & (t["field_alpha"] <= 5 + 1e-9))
    rel = t["center_px"] / (shapes - 1)
    assert np.all((rel >= 0.2 - 1e-9) & (rel <= 0.8 + 1e-9))
    near = np.minimum(t["center_px"], shapes - 1 - t["center_px"]).min(axis=1)
    assert np.allclose(near / t["radius_px"], t["field_alpha"])
    assert np.all(t["radius_px"] >= rec.MIN_RADIUS_PX)
    assert np.all((t["rotation_deg"] > -45) & (t["rotation_deg"] <= 45))
    assert np.all((t["thickness_nm"] >= source.thickness[0]) & (t["thickness_nm"] <= source.thickness[-1]))
    assert np.all((t["dose"] >= 1e6) & (t["dose"] <= 1e9)) and np.all((t["gain"] >= 0.5) & (t["gain"] <= 5))
    assert np.all(t["gamma"][t["export"] == "uint8"] <= 1) and np.all(t["gamma"][t["export"] != "uint8"] == 1)
    for key in ("center_px", "radius_px", "rotation_deg", "thickness_nm", "tilt_mrad", "tilt_crystal_mrad",
                "background_units_of_mean"):  # heldout_patterns.py's keys
        assert len(t[key]) == len(frames)


def test_tilt_truth_follows_design(recorded, source):
    """Crystal-frame tilts are held-out library tilts with mirror signs; the detector-frame tilt
    is R(−θ) of it (DESIGN.md), so tilt_crystal = R(θ)·tilt."""
    _, t = recorded
    held = {(a, b) for a, b, _, _ in source.tilts}
    for tc, td, th in zip(t["tilt_crystal_mrad"], t["tilt_mrad"], t["rotation_deg"]):
        assert (abs(tc[0]), abs(tc[1])) in held
        assert np.allclose(canonical.rotation_matrix(th) @ td, tc)


def test_same_seed_same_recordings_whatever_n(source):
    a = list(rec.iter_recordings(source, 3, seed=11))
    b = list(rec.iter_recordings(source, 5, seed=11))
    for (fa, ta), (fb, tb) in zip(a, b):
        assert np.array_equal(fa, fb) and ta["thickness_nm"] == tb["thickness_nm"]
    c = next(rec.iter_recordings(source, 1, seed=12))[0]
    assert c.shape != a[0][0].shape or not np.array_equal(c, a[0][0])


def test_detector_sampling_follows_the_rotation_convention(quadrant_library):
    """Noise-free, the recorded pattern is tests/helpers.place's (DESIGN.md: the pixel at offset
    d shows the crystal-aligned pattern at R(θ)·d), per detector pixel."""
    lib = PacbedLibrary.load(quadrant_library)
    a = lib.alpha_mrad / lib.mrad_per_px
    p = lib.pattern(3.0, (2.0, 1.0)).astype(np.float64)  # lopsided: a wrong rotation or flip shows
    shape, centre, radius, rot = (120, 150), (55.3, 70.8), 14.0, 31.0
    det = rec.to_detector(rec._extended(p, p.shape[0] // 2), a, shape, centre, radius, rot)
    ref = place(p, a, shape, radius, centre, rot) / (radius / a) ** 2
    yy, xx = np.indices(shape)
    inside = np.hypot(yy - centre[0], xx - centre[1]) < (p.shape[0] // 2 - 5.5) / a * radius  # before the tail
    assert np.allclose(det[inside], ref[inside], rtol=1e-6, atol=1e-9 * ref.max())
    wrong = place(p, a, shape, radius, centre, -rot) / (radius / a) ** 2
    assert np.abs(wrong - det)[inside].max() > 0.1 * ref.max()


def test_truth_geometry_is_where_the_coarse_finder_sees_the_disk(recorded):
    """The repository's own coarse disk finder agrees with the truth on linear, unsaturated
    recordings (it is good to a few percent; the networks refine)."""
    frames, t = recorded
    checked = 0
    for i, f in enumerate(frames):
        if t["export"][i] == "uint8" or t["saturation"][i] > 0:
            continue
        d = coarse_disk(f)
        assert np.hypot(*np.subtract(d.center_px, t["center_px"][i])) < 0.15 * t["radius_px"][i], i
        assert abs(d.radius_px / t["radius_px"][i] - 1) < 0.2, i
        checked += 1
    assert checked >= 15


def test_uniform_background_truth_is_in_units_of_the_window_mean(source):
    """A noise-free linear recording: the uniform part the truth states is what lies under the
    pattern (offset + uniform background), in units of the mean inside ±2.6 α."""
    rng = np.random.default_rng(0)
    p, th, _ = source.draw(rng)
    exp = rec.Experiment(shape=(300, 300), center_px=(150.0, 150.0), radius_px=20.0, rotation_deg=0.0, psf_alpha=0.0,
                         inelastic_share=0.0, inelastic_sigma_mrad=1.0, uniform_background=0.15, offset=0.05,
                         gain=2.0, dose=1e12, export="float32", gamma=1.0, clip_top=0.0, saturation=0.0)
    frame, uniform = rec.record(p, source.alpha_px, exp, rng, 0.5, source.alpha_mrad)
    yy, xx = np.indices(frame.shape)
    win = np.hypot(yy - 150, xx - 150) <= 2.6 * 20
    clean = rec.to_detector(rec._extended(p, p.shape[0] // 2), source.alpha_px, exp.shape, exp.center_px,
                            exp.radius_px, 0.0)
    expected = 1 - exp.gain * exp.dose * clean[win].mean() / frame[win].mean()
    assert uniform == pytest.approx(expected, rel=0.02)


def test_memory_cap(source):
    with pytest.raises(MemoryError, match="iter_recordings"):
        rec.realistic_recordings(source, 3, seed=0, max_bytes=1000)
