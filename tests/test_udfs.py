"""BlockPacbedUDF and VirtualDetectorUDF against direct numpy sums, in LiberTEM Contexts."""
from __future__ import annotations

import numpy as np
import pytest
from libertem.api import Context

from stemlive.udf import BlockGrid, BlockPacbedUDF, VirtualDetectorUDF
from stemlive.udf.radial_bins import bright_disk_center, ring_signal


@pytest.fixture(scope="module")
def ctx():
    return Context.make_with("inline")


def block_sums(data, block, roi=None):
    sy, sx = data.shape[:2]
    grid = BlockGrid((sy, sx), block)
    ref = np.zeros(grid.shape + data.shape[2:])
    cnt = np.zeros(grid.shape, int)
    m = np.ones((sy, sx), bool) if roi is None else roi
    for i in range(sy):
        for j in range(sx):
            if m[i, j]:
                ref[i // block[0], j // block[1]] += data[i, j]
                cnt[i // block[0], j // block[1]] += 1
    return ref, cnt


@pytest.mark.parametrize("executor", ["inline", "threads"])
@pytest.mark.parametrize("use_roi", [False, True])
def test_block_pacbed_ragged_roi_out_of_order(executor, use_roi):
    rng = np.random.default_rng(1)
    data = rng.integers(0, 60000, (37, 29, 16, 12)).astype(np.uint16)
    roi = rng.random((37, 29)) > 0.3 if use_roi else None
    ctx = Context.make_with(executor)  # threads: partitions finish in any order
    ds = ctx.load("memory", data=data, sig_dims=2, num_partitions=7)
    res = ctx.run_udf(dataset=ds, udf=BlockPacbedUDF(block=(8, 5)), roi=roi)
    ref, cnt = block_sums(data, (8, 5), roi)
    assert res["pacbed"].data.shape == (5, 6, 16, 12)
    np.testing.assert_allclose(res["pacbed"].data, ref, rtol=1e-6)
    np.testing.assert_array_equal(res["counts"].data, cnt)
    np.testing.assert_array_equal(res["expected"].data, cnt)
    partial = res["partial"].data
    assert partial[-1].all() and partial[:, -1].all() and not partial[:-1, :-1].any()


def test_block_pacbed_signal_split_tiles_and_no_overflow(ctx):
    """Tiles that cut frames into pieces still sum right; saturated uint16 frames do not wrap."""
    data = np.full((16, 16, 24, 20), 65535, np.uint16)
    data[3, 4, 5, 6] = 7
    ds = ctx.load("memory", data=data, sig_dims=2, tileshape=(3, 8, 20), num_partitions=3)
    res = ctx.run_udf(dataset=ds, udf=BlockPacbedUDF(block=(8, 8)))
    ref, cnt = block_sums(data.astype(np.float64), (8, 8))
    np.testing.assert_allclose(res["pacbed"].data, ref, rtol=1e-6)
    assert res["pacbed"].data[0, 0, 5, 6] == pytest.approx(63 * 65535 + 7)
    np.testing.assert_array_equal(res["counts"].data, 64)


def test_block_pacbed_needs_2d_scan(ctx):
    ds = ctx.load("memory", data=np.zeros((10, 4, 4), np.float32), sig_dims=2)
    with pytest.raises(Exception, match="2D scan"):
        ctx.run_udf(dataset=ds, udf=BlockPacbedUDF(block=(2, 2)))


def smooth_frames(center, n=12, h=48, w=48, sub=8, dipole_only=False):
    """Frames of a smooth disk + ring pattern, pixel values and exact ring integrals from sub-pixels."""
    o = (np.arange(sub) + 0.5) / sub - 0.5
    rr = (np.arange(h)[:, None] + o).ravel()[:, None]
    cc = (np.arange(w)[:, None] + o).ravel()[None, :]
    r, phi = np.hypot(rr - center[0], cc - center[1]), np.arctan2(rr - center[0], cc - center[1])
    frames, fine = [], []
    for k in np.linspace(0, 6, n):
        f = 1000 / (1 + np.exp((r - 8) / 0.7)) * (1 + 0.3 * np.cos(phi + k)) + 5
        f = f + 50 * np.exp(-(r - 15) ** 2 / 8) * (1 + (0.5 * np.cos(phi - k) if dipole_only else 0.5 * np.sin(2 * phi)))
        frames.append(f.reshape(h, sub, w, sub).mean(axis=(1, 3)))
        fine.append(f)
    return np.stack(frames).astype(np.float32), np.stack(fine), r, sub


RINGS_PX = {"bf": (0.0, 4.0, "px"), "abf": (4.0, 8.0, "px"), "adf": (12.0, 24.0, "px"), "haadf": (24.0, 36.0, "px")}


def exact_rings(fine, r, sub):
    return {n: np.array([f[(r >= a) & (r < b)].sum() / sub ** 2 for f in fine]) for n, (a, b, _) in RINGS_PX.items()}


def test_virtual_rings_match_direct_integrals(ctx):
    c0 = (23.3, 24.1)
    frames, fine, r, sub = smooth_frames(c0)
    ds = ctx.load("memory", data=frames.reshape(3, 4, 48, 48), sig_dims=2)
    res = ctx.run_udf(dataset=ds, udf=VirtualDetectorUDF(center=c0, radius_px=8.0, rings=RINGS_PX))
    for name, want in exact_rings(fine, r, sub).items():
        np.testing.assert_allclose(res[name].data.ravel(), want, rtol=0.012, err_msg=name)


def test_virtual_rings_in_alpha_and_mrad_units(ctx):
    c0 = (23.3, 24.1)
    frames, *_ = smooth_frames(c0, n=4)
    ds = ctx.load("memory", data=frames.reshape(2, 2, 48, 48), sig_dims=2)
    a = ctx.run_udf(dataset=ds, udf=VirtualDetectorUDF(center=c0, alpha_mrad=16.0, mrad_per_px=2.0,
                                                        rings={"x": (0.5, 1.5, "alpha"), "y": (8.0, 24.0, "mrad")}))
    b = ctx.run_udf(dataset=ds, udf=VirtualDetectorUDF(center=c0, rings={"x": (4.0, 12.0, "px"), "y": (4.0, 12.0, "px")}))
    np.testing.assert_allclose(a["x"].data, b["x"].data, rtol=1e-6)
    np.testing.assert_allclose(a["y"].data, b["y"].data, rtol=1e-6)
    c = ctx.run_udf(dataset=ds, udf=VirtualDetectorUDF(center=c0))  # no scale yet: NaN images, bins kept
    assert np.isnan(c["haadf"].data).all() and np.isfinite(c["radial"].data).all()


def test_recentering_from_dipoles():
    """Bins recorded around a centre 0.9 px off are corrected to the true centre (the model keeps
    monopole + dipole per bin; the pattern here has only those)."""
    c0, c_off = (23.3, 24.1), (24.0, 23.5)
    frames, fine, r, sub = smooth_frames(c0, dipole_only=True)
    from stemlive.udf.radial_bins import bin_frames, bin_matrix, n_bins_for
    m = bin_matrix((48, 48), c_off, 0.5, n_bins_for((48, 48), 0.5))
    radial, dipole = bin_frames(frames, m)
    shift = np.tile(np.subtract(c0, c_off), (len(frames), 1))
    for name, want in exact_rings(fine, r, sub).items():
        lo, hi, _ = RINGS_PX[name]
        off = np.abs(ring_signal(radial, dipole, lo, hi, 0.5) / want - 1).max()
        fixed = np.abs(ring_signal(radial, dipole, lo, hi, 0.5, shift) / want - 1).max()
        assert fixed < 0.016, (name, off, fixed)
        if off > 0.01:
            assert fixed < off / 2, (name, off, fixed)


def test_centre_update_mid_run_loses_no_frame(ctx):
    """Without a centre, partitions use the bright-disk centroid; a centre passed mid-run with
    update_parameters_experimental reaches the later partitions, and every frame's rings are
    evaluated around the calibrated centre."""
    c0 = (23.3, 24.1)
    frames, fine, r, sub = smooth_frames(c0)
    ds = ctx.load("memory", data=frames.reshape(3, 4, 48, 48), sig_dims=2, num_partitions=3)
    udf = VirtualDetectorUDF(radius_px=8.0, rings=RINGS_PX)
    it = ctx.run_udf_iter(dataset=ds, udf=udf)
    first = next(it)
    used_first = first.buffers[0]["center_used"].data.reshape(-1, 2)[:4].copy()
    it.update_parameters_experimental([{"center": c0, "true_center": c0}])
    for last in it:
        pass
    used = last.buffers[0]["center_used"].data.reshape(-1, 2)
    np.testing.assert_allclose(used[4:], np.tile(c0, (8, 1)), atol=1e-5)
    assert np.abs(used_first - c0).max() < 0.6  # the provisional centroid is close already
    for name, want in exact_rings(fine, r, sub).items():
        np.testing.assert_allclose(last.buffers[0][name].data.ravel(), want, rtol=0.03, err_msg=name)


@pytest.mark.parametrize("tileshape", [(4, 11, 48), (16, 13, 48), (3, 48, 48)])
def test_provisional_centre_independent_of_tiling(ctx, tileshape):
    """Without a centre, each partition records its frames around the bright-disk centroid of its
    first frames, whatever the tiles: pieces of frames (as LiberTEM's npy reader cuts 97-px
    frames) and shallow tiles give what whole frames in one tile give (a live stream)."""
    frames, *_ = smooth_frames((21.7, 26.2), n=24)
    data = frames.reshape(4, 6, 48, 48)
    udf = dict(radius_px=8.0, rings=RINGS_PX)
    whole = ctx.run_udf(dataset=ctx.load("memory", data=data, sig_dims=2, num_partitions=2,
                                         tileshape=(12, 48, 48)), udf=VirtualDetectorUDF(**udf))
    cut = ctx.run_udf(dataset=ctx.load("memory", data=data, sig_dims=2, num_partitions=2, tileshape=tileshape),
                      udf=VirtualDetectorUDF(**udf))
    used = whole["center_used"].data.reshape(-1, 2)
    assert np.abs(used - (21.7, 26.2)).max() < 0.6 and np.abs(used - (23.5, 23.5)).max() > 1
    np.testing.assert_array_equal(cut["center_used"].data, whole["center_used"].data)
    np.testing.assert_array_equal(cut["recorded"].data, whole["recorded"].data)
    np.testing.assert_allclose(cut["radial"].data, whole["radial"].data, rtol=1e-5, atol=1e-3)
    np.testing.assert_allclose(cut["dipole"].data, whole["dipole"].data, rtol=1e-5, atol=1e-2)
    for name in RINGS_PX:
        np.testing.assert_allclose(cut[name].data, whole[name].data, rtol=1e-5, err_msg=name)


def test_bright_disk_center_ignores_hot_pixels():
    rr, cc = np.indices((64, 80))
    img = np.where(np.hypot(rr - 20.3, cc - 50.6) < 6, 1000.0, 10.0)
    img[3, 3] = 60000
    np.testing.assert_allclose(bright_disk_center(img), (20.3, 50.6), atol=0.35)


def test_readme_notebook_example(tmp_path, monkeypatch):
    """The five lines in the README run as written (on a small scan)."""
    import re
    from pathlib import Path

    readme = (Path(__file__).parent.parent / "README.md").read_text()
    code = re.search(r"```python\n(from libertem.api import Context\n.*?)```", readme, re.S).group(1)
    assert len(code.strip().splitlines()) == 5
    rng = np.random.default_rng(0)
    rr, cc = np.indices((33, 33))
    disk = np.where(np.hypot(rr - 16, cc - 16) < 4.4, 200.0, 2.0)
    np.save(tmp_path / "frames.npy", rng.poisson(disk, (32, 32, 33, 33)).astype(np.uint16))
    monkeypatch.chdir(tmp_path)
    ns: dict = {}
    exec(code, ns)
    assert ns["mean_pacbed"].shape == (2, 2, 33, 33) and ns["haadf"].shape == (32, 32)
    assert np.isfinite(ns["haadf"]).all() and ns["mean_pacbed"][0, 0, 16, 16] > 100
