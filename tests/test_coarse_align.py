"""Coarse disk finding on raw recordings of every kind the issue names."""
import numpy as np
import pytest

from stemlive.models.coarse_align import coarse_disk
from stemlive.simulate.library import PacbedLibrary
from stemlive.simulate.scan_cli import SHIPPED_LIBRARY

from .helpers import place


@pytest.fixture(scope="module")
def pacbed():
    lib = PacbedLibrary.load(SHIPPED_LIBRARY)
    return lib.pattern(30, (1.5, 0.0)), lib.alpha_mrad / lib.mrad_per_px  # 41 px, α ≈ 4.4 px


CASES = [
    # frame, disk radius, centre, what
    ((256, 256), 0.4 * 256 / 2.3, (128.0, 128.0), "disk fills most of the frame"),
    ((2048, 2048), 0.05 * 2048 / 2, (700.0, 1500.0), "small disk, off-centre, 2k frame"),
    ((1024, 1280), 40.0, (300.0, 900.0), "non-square frame"),
    ((512, 512), 60.0, (90.0, 420.0), "near the corner"),
]


@pytest.mark.parametrize("frame,radius,center,what", CASES)
def test_centre_and_radius_linear_16bit(pacbed, frame, radius, center, what):
    p, a = pacbed
    img = place(p, a, frame, radius, center, rotation=20)
    counts = np.random.default_rng(0).poisson(img / img.max() * 4000).astype(np.uint16)
    d = coarse_disk(counts)
    # tilt makes the disk edge lopsided in this coarse (3 mrad/px) library: coarse means ≤ 6 % of
    # the radius here; the alignment network refines it
    assert np.hypot(*np.subtract(d.center_px, center)) < max(1.5, 0.06 * radius), what
    assert d.radius_px == pytest.approx(radius, rel=0.05), what


def test_8bit_gamma_hot_and_saturated_pixels(pacbed):
    p, a = pacbed
    img = place(p, a, (1024, 1024), 80.0, (400.0, 600.0))
    rng = np.random.default_rng(1)
    x = rng.poisson(img / img.max() * 3000).astype(float)
    x = np.clip(x / 1500.0, 0, 1) ** 0.45 * 255  # saturated disk, gamma display scaling
    x[rng.integers(0, 1024, 200), rng.integers(0, 1024, 200)] = 255  # hot pixels
    d = coarse_disk(x.astype(np.uint8))
    assert np.hypot(*np.subtract(d.center_px, (400, 600))) < 0.08 * 80
    assert d.radius_px == pytest.approx(80, rel=0.2)  # coarse: see models/coarse_align.py step 4


@pytest.mark.parametrize("bad,msg", [(np.zeros((4, 64, 64)), "must be 2D"), (np.zeros((8, 8)), "too small"),
                                     (np.full((64, 64), np.nan), "NaN"), (np.ones((64, 64)), "constant")])
def test_bad_input_is_named(bad, msg):
    with pytest.raises(ValueError, match=msg):
        coarse_disk(bad)
