import numpy as np
import pytest

from stemlive.simulate.resample import centre_crop, resample_pattern


def test_resample_conserves_intensity_and_centre():
    k = np.arange(-40, 41)
    kk = np.hypot(*np.meshgrid(k, k, indexing="ij"))
    pat = (kk < 15).astype(np.float32) / np.sum(kk < 15)
    pat[50, 40] += 0.01  # off-centre feature to make the pattern asymmetric
    out = resample_pattern(pat, 1.0, 2.5, 31)
    assert out.sum() == pytest.approx(pat.sum(), rel=0.02)
    com = np.array(np.unravel_index(np.argmax(resample_pattern((kk < 3).astype(float), 1.0, 2.5, 31)), (31, 31)))
    assert tuple(com) == (15, 15)


def test_resample_requires_odd():
    with pytest.raises(ValueError, match="odd"):
        resample_pattern(np.ones((11, 11)), 1.0, 2.0, 10)


def test_crop_out_of_range_is_explained():
    with pytest.raises(ValueError, match="exceeds"):
        centre_crop(np.ones((10, 10)), (5, 5), 6)
