"""The shipped 13.6 mrad networks on raw recordings of every kind the issue names.

Patterns: the shipped demo library (SrTiO3 [001], 200 kV, 13.6 mrad, position-averaged, a
different simulation from the training library) placed into detector frames at a known centre,
radius and rotation, then recorded in the ways real data arrive.
"""
import io

import numpy as np
import pytest

from stemlive.models.pacbed_analysis import PacbedAnalyzer
from stemlive.simulate.library import PacbedLibrary
from stemlive.simulate.scan_cli import SHIPPED_LIBRARY

from .helpers import place


@pytest.fixture(scope="module")
def analyzer():
    return PacbedAnalyzer.for_acquisition(200, 13.6, backend="onnxruntime")


@pytest.fixture(scope="module")
def lib():
    return PacbedLibrary.load(SHIPPED_LIBRARY)


def record(img, kind, rng):
    """What the camera and the export make of an ideal pattern ``img``."""
    if kind == "linear16":
        return rng.poisson(img / img.max() * 8000).astype(np.uint16)
    counts = rng.poisson(img / img.max() * 3000).astype(float)
    if kind == "gamma8":  # display-scaled 8-bit export with a saturated disk and hot pixels
        out = np.clip(counts / 1800.0, 0, 1) ** 0.5 * 255
        out[rng.integers(0, img.shape[0], 30), rng.integers(0, img.shape[1], 30)] = 255
        return out.astype(np.uint8)
    if kind == "saturated16":
        return np.minimum(counts, 0.6 * counts.max()).astype(np.uint16)
    if kind == "jpeg":
        from PIL import Image

        buf = io.BytesIO()
        Image.fromarray((np.sqrt(counts / counts.max()) * 255).astype(np.uint8)).save(buf, "JPEG", quality=80)
        return np.asarray(Image.open(io.BytesIO(buf.getvalue())))
    raise ValueError(kind)


CASES = [  # frame, radius, centre, rotation, recording
    ((2048, 2048), 51.0, (700.0, 1400.0), 20.0, "linear16"),   # disk 5 % of a 2k frame, off-centre
    ((1024, 1024), 25.6, (300.0, 800.0), -40.0, "linear16"),   # 5 % of a 1k frame
    ((256, 256), 60.0, (128.0, 128.0), 45.0, "linear16"),      # disk ~50 % of the frame
    ((512, 640), 70.0, (200.0, 420.0), -12.0, "gamma8"),
    ((512, 512), 50.0, (260.0, 250.0), 33.0, "saturated16"),
    ((400, 400), 40.0, (190.0, 215.0), 5.0, "jpeg"),
]


@pytest.mark.parametrize("frame,radius,center,rotation,kind", CASES)
def test_alignment_on_raw_recordings(analyzer, lib, frame, radius, center, rotation, kind):
    a = lib.alpha_mrad / lib.mrad_per_px
    img = place(lib.pattern(35.0, (0.0, 0.0)), a, frame, radius, center, rotation)
    raw = record(img, kind, np.random.default_rng(0))
    (r,) = analyzer.analyze([raw])
    assert r.error is None
    # measured: 1-3 % of the radius on linear data, up to 5 % on saturated / gamma-scaled exports
    assert np.hypot(*np.subtract(r.center_px, center)) <= max(1.0, 0.05 * radius), r.center_px
    assert r.radius_px == pytest.approx(radius, rel=0.06)
    assert abs(((r.rotation_deg - rotation) + 45) % 90 - 45) <= 2.0, r.rotation_deg


def test_thickness_and_tilt_across_a_grid_of_clean_patterns(analyzer, lib):
    """45 patterns (15 thicknesses × 5 signed tilts, rotated 17°) from the demo library — another
    simulation, sampled at 3 mrad/px like the demo scan.  Measured when the models were shipped:
    53 % within ±1 nm, 76 % within ±3 nm, median 0.9 nm; tilt 84 % within ±0.5 mrad.  The misses
    are confusions between distant thicknesses, which the class probabilities show (large σ)."""
    a = lib.alpha_mrad / lib.mrad_per_px
    rng = np.random.default_rng(1)
    rot = 17.0
    raws, truth = [], []
    for t in lib.thickness_nm[::3]:
        for tilt in [(0.0, 0.0), (1.5, 0.0), (0.0, -1.5), (1.5, 1.5), (-3.0, 0.0)]:
            img = place(lib.pattern(t, tilt), a, (128, 128), 30.0, (60.0, 66.0), rot)
            raws.append(rng.poisson(img / img.max() * 8000).astype(np.uint16))
            truth.append((t, tilt))
    res = analyzer.analyze(np.stack(raws))
    dt = np.array([abs(r.thickness_nm - t) for r, (t, _) in zip(res, truth)])
    sig = np.array([r.thickness_sigma_nm for r in res])
    assert np.median(dt) <= 1.5 and np.mean(dt <= 3) >= 0.7
    assert np.median(sig[dt > 3]) > 2 * np.median(sig[dt <= 1])  # σ says which estimates to doubt
    tilt_c = np.array([r.tilt_crystal_mrad for r in res])
    tilt_true = np.array([tl for _, tl in truth])
    assert np.mean(np.abs(tilt_c - tilt_true).max(axis=1) <= 0.5) >= 0.75
    # detector frame = crystal frame rotated with the pattern: R(-θ)·t (DESIGN.md)
    drot = np.abs([r.rotation_deg - rot for r in res])
    assert np.median(drot) < 1 and drot.max() < 5  # thin patterns carry little rotation information
    for r in res:
        assert "vacuum" not in r.flags
        c, s = np.cos(np.deg2rad(r.rotation_deg)), np.sin(np.deg2rad(r.rotation_deg))
        assert np.allclose(r.tilt_mrad, np.array([[c, s], [-s, c]]) @ r.tilt_crystal_mrad, atol=1e-9)


def test_vacuum_is_flagged(analyzer):
    yy, xx = np.indices((256, 256))
    disk = (np.hypot(yy - 128, xx - 128) < 40).astype(float)
    raw = np.random.default_rng(2).poisson(disk * 3000 + 2).astype(np.uint16)
    (r,) = analyzer.analyze([raw])
    assert "vacuum" in r.flags and not r.in_range
