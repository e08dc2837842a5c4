"""Column patches: centred to sub-pixel, edge from the spacing, validity at the scan edge and NaN."""
from __future__ import annotations

import numpy as np
import pytest

from stemlive.models.column_patches import column_spacing, extract_patches, patch_offsets


def gaussian_columns(shape, centres, sigma=1.5):
    rr, cc = np.indices(shape, dtype=float)
    img = np.zeros(shape)
    for r0, c0 in centres:
        img += np.exp(-((rr - r0) ** 2 + (cc - c0) ** 2) / (2 * sigma ** 2))
    return img


def test_patch_is_centred_on_the_subpixel_column():
    centre = np.array([[20.3, 17.8]])
    img = gaussian_columns((40, 40), centre, sigma=3.0)
    p = extract_patches(img, centre, edge_px=12.0, size=25)  # odd size: a pixel on the centre
    patch = p.patches[0, 0]
    assert np.unravel_index(patch.argmax(), patch.shape) == (12, 12)
    assert patch[12, 12] == pytest.approx(1.0, abs=0.03)  # bilinear at the exact centre
    assert np.allclose(patch, patch[::-1, ::-1], atol=0.03)  # symmetric about the column
    assert p.valid.all() and p.complete.all()
    assert p.image_px_per_patch_px == pytest.approx(12 / 25)


def test_offsets_are_symmetric_pixel_centres():
    o = patch_offsets(8.0, 4)
    assert np.allclose(o[:, 0, 0], [-3, -1, 1, 3]) and np.allclose(o[0, :, 1], [-3, -1, 1, 3])


def test_edge_from_the_measured_spacing():
    centres = [(r, c) for r in np.arange(4.0, 60, 7.0) for c in np.arange(5.0, 60, 7.0)]
    img = gaussian_columns((64, 64), centres)
    assert column_spacing(np.array(centres)) == pytest.approx(7.0)
    p = extract_patches(img, np.array(centres), size=16)  # two spacings by default
    assert p.edge_px == pytest.approx(14.0) and p.patches.shape == (len(centres), 1, 16, 16)


def test_validity_mask_at_the_scan_edge_and_unmeasured_pixels():
    img = gaussian_columns((30, 30), [(1.0, 15.0), (15.0, 15.0)])
    img[20:, :] = np.nan  # not scanned yet (a live virtual image)
    p = extract_patches(img, np.array([[1.0, 15.0], [15.0, 15.0]]), edge_px=16.0, size=16)
    # the first column sits 1 px from the top edge: the upper half of its patch lies outside
    assert not p.valid[0, :6].any() and p.valid[0, 10:].all()
    # the second reaches into the NaN rows from row 20 (patch rows 21/2 + ... onwards)
    rows_img = 15.0 + (np.arange(16) - 7.5)
    assert (p.valid[1].all(axis=1) == (np.rint(rows_img) < 20)).all()
    assert np.isfinite(p.patches).all()  # filled, never NaN
    assert not p.complete.any()


def test_stacked_images_share_positions():
    centre = np.array([[10.0, 10.0]])
    haadf = gaussian_columns((21, 21), centre)
    abf = 1 - 0.3 * haadf
    p = extract_patches(np.stack([haadf, abf]), centre, edge_px=8.0, size=8)
    assert p.patches.shape == (1, 2, 8, 8)
    assert np.allclose(p.patches[0, 1], 1 - 0.3 * p.patches[0, 0], atol=1e-6)


def test_bad_input_is_refused():
    img = np.zeros((16, 16))
    with pytest.raises(ValueError, match="rows and columns"):
        extract_patches(img, np.zeros((3, 3)), edge_px=4.0)
    with pytest.raises(ValueError, match="NaN"):
        extract_patches(img, np.array([[np.nan, 1.0]]), edge_px=4.0)
    with pytest.raises(ValueError, match="at least 2 columns"):
        extract_patches(img, np.array([[8.0, 8.0]]))
    with pytest.raises(ValueError, match="positive"):
        extract_patches(img, np.array([[8.0, 8.0]]), edge_px=-1.0)
    with pytest.raises(ValueError, match="patch size"):
        extract_patches(img, np.array([[8.0, 8.0]]), edge_px=4.0, size=1)
    with pytest.raises(ValueError, match="stack"):
        extract_patches(np.zeros((2, 2, 8, 8)), np.array([[1.0, 1.0]]), edge_px=4.0)
