"""ABF/HAADF runs of tilted perovskites (tiny abTEM settings), observation, resumable HDF5."""
import json

import h5py
import numpy as np
import pytest

from stemlive.simulate import octahedra_images as oi

# tiny but physical: 300 kV, 24 mrad probe, a 7.8 Å [001] cell, 1.2 nm, 0.15 Å sampling (44 mrad limit)
TINY = oi.Numerics(sampling_A=0.15, min_extent_A=7.0, scan_step_A=0.65, phonon_configs=1,
                   abf_mrad=(12.0, 24.0), haadf_mrad=(30.0, 42.0))
STRUCT = oi.Structure("a0a0c+", (0.0, 0.0, 10.0), "Sr", "Ti", "[001]")


@pytest.fixture(scope="module")
def runs():
    probes = [oi.Probe(), oi.Probe(defocus_A=40.0, c3_A=2e4, a1_A=20.0, a1_angle_rad=0.3)]
    return {m: oi.simulate_run(STRUCT, probes, TINY, thickness_nm=(0.8, 1.6), method=m) for m in oi.METHODS}


def test_prism_equals_multislice(runs):
    """Cross-check of the two abTEM paths (as abTEM's own test_prism does), aberrations included."""
    for a, b in zip(runs["multislice"], runs["prism"]):
        assert np.allclose(a.abf, b.abf, atol=1e-5) and np.allclose(a.haadf, b.haadf, atol=1e-6)
    r0, r1 = runs["multislice"]
    assert not np.allclose(r0.abf, r1.abf, atol=1e-3)  # the aberrated probe makes another image


def test_contrast_where_the_columns_are(runs):
    r = runs["multislice"][0]
    assert r.abf.shape == (2, 12, 12) and r.thickness_nm.shape == (2,)
    assert np.allclose(r.thickness_nm, [0.78, 1.56], atol=0.02)  # whole slices of a/2
    assert 0.5 < r.abf.mean() < 0.75  # the 12-24 mrad ring holds 3/4 of the 24 mrad disk, minus scattering
    n0, n1 = r.abf.shape[1:]

    def value(img, pos_a):
        i, j = (int(round(p / s)) % n for p, s, n in zip(pos_a, r.step_A, (n0, n1)))
        return img[i, j]

    a_sites = [(0.0, 0.0)]  # Sr at the origin; B columns in the truth
    b_sites = list(map(tuple, r.truth.positions_A))
    empty = [(p[0], p[1] - r.truth.cell_A[1] / 4) for p in b_sites]  # half-way between A and B along axis 1
    for t in range(2):
        abf, haadf = r.abf[t], r.haadf[t]
        for site in a_sites + b_sites:
            assert value(abf, site) < np.median(abf)  # ABF: columns are dark
            assert value(haadf, site) > np.median(haadf)  # HAADF: columns bright
        assert value(haadf, a_sites[0]) > np.mean([value(haadf, e) for e in empty])
    assert r.haadf[1].mean() > r.haadf[0].mean()  # more scattering out to high angles when thicker


def test_bad_input(runs):
    with pytest.raises(ValueError, match="no beam tilt"):
        oi.simulate_run(STRUCT, oi.Probe(mistilt_mrad=(2.0, 0.0)), TINY, (1.0,), method="prism")
    with pytest.raises(ValueError, match="bright field"):
        oi.simulate_run(STRUCT, oi.Probe(alpha_mrad=10.0), TINY, (1.0,))
    with pytest.raises(ValueError, match="positive"):
        oi.simulate_run(STRUCT, oi.Probe(), TINY, (0.0,))
    with pytest.raises(ValueError, match="choose one of"):
        oi.simulate_run(STRUCT, oi.Probe(), TINY, (1.0,), method="bloch")


def test_observe_dose_blur_jitter():
    rng = np.random.default_rng(0)
    image = np.full((20, 30), 0.6)
    image[5, 7] = 0.1
    obs = oi.Observation(source_fwhm_A=0.0, jitter_A=0.0, dose_e_per_A2=1e4)
    counts = oi.observe(image, (0.2, 0.2), obs, rng, shape=(200, 300))
    assert counts.dtype == np.float32
    # Poisson: mean dose · area · signal, variance = mean
    flat = counts[counts > 100]
    assert flat.mean() == pytest.approx(0.6 * 1e4 * 0.04, rel=0.01)
    assert flat.var() == pytest.approx(flat.mean(), rel=0.1)
    blurred = oi.observe(image, (0.2, 0.2), oi.Observation(source_fwhm_A=0.8, dose_e_per_A2=1e9), rng)
    assert blurred.sum() == pytest.approx(image.sum() * 1e9 * 0.04, rel=1e-3)  # blur keeps the signal
    assert blurred[5, 7] > 0.1 * 1e9 * 0.04 * 1.5  # and fills the dip
    # jitter moves whole scan lines along axis 1 only
    stripes = np.tile(np.sin(2 * np.pi * np.arange(30) / 30)[None] + 1.0, (20, 1))
    still = oi.observe(stripes, (0.2, 0.2), oi.Observation(0.0, 0.0, 1e12), rng)
    shaken = oi.observe(stripes, (0.2, 0.2), oi.Observation(0.0, 0.3, 1e12), rng)
    assert not np.allclose(still, shaken, rtol=1e-3)
    assert np.allclose(still.sum(axis=1), shaken.sum(axis=1), rtol=1e-3)
    with pytest.raises(ValueError, match="dose"):
        oi.observe(image, (0.2, 0.2), oi.Observation(dose_e_per_A2=0.0), rng)


def test_write_runs_resumes_and_refuses_other_settings(tmp_path, monkeypatch):
    out = tmp_path / "runs.h5"
    ranges = oi.RunRanges(zone="[001]", systems=("a0a0c+", "a0a0c-"), compounds=(("Sr", "Ti"), ("La", "Al")))
    calls = []
    real = oi.simulate_run

    def counting(*a, **k):
        calls.append(a[0])
        if len(calls) == 2:
            raise KeyboardInterrupt  # the job is stopped during its second run
        return real(*a, **k)

    monkeypatch.setattr(oi, "simulate_run", counting)
    kwargs = dict(n_runs=2, seed=3, ranges=ranges, numerics=TINY, thickness_nm=(0.8,), progress=False)
    with pytest.raises(KeyboardInterrupt):
        oi.write_runs(out, **kwargs)
    with h5py.File(out) as f:
        assert list(f["done"][()]) == [True, False]
    monkeypatch.setattr(oi, "simulate_run", real)
    oi.write_runs(out, **kwargs)  # continues with run 1 only
    assert len(calls) == 2
    r1 = oi.read_run(out, 1)
    assert r1.abf.shape[0] == 1 and r1.meta["structure"]["system"] in ("a0a0c+", "a0a0c-")
    assert r1.meta["structure"]["zone"] == "[001]" and r1.truth.angles_deg.shape == (4, 3)
    with h5py.File(out) as f:
        assert json.loads(f.attrs["spec"])["seed"] == 3 and all(f["done"][()])
    with pytest.raises(FileExistsError, match="other settings"):
        oi.write_runs(out, **{**kwargs, "seed": 4})


def test_draws_respect_the_glazer_system():
    rng = np.random.default_rng(1)
    r = oi.RunRanges()
    for _ in range(50):
        s = oi.draw_structure(rng, r)
        oi.oc.parse_glazer(s.system).check_angles(s.angles_deg)  # raises if letters/zeros are broken
        p = oi.draw_probe(rng, r, mistilt=True)
        assert np.hypot(*p.mistilt_mrad) <= 5.0 and abs(p.c3_A) <= 5e4 and p.a1_A <= 50 and p.b2_A <= 500


def test_truncated_file_is_explained(tmp_path):
    out = tmp_path / "runs.h5"
    out.write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 88)  # what a job killed before its first flush leaves
    with pytest.raises(OSError, match="remove it and start again"):
        oi.write_runs(out, 1, numerics=TINY, thickness_nm=(0.8,), progress=False)
