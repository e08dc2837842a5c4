"""Centre-of-mass (DPC) and iDPC maps: the integral, LiberTEM's conventions, and a replay that stores them."""
from __future__ import annotations

import numpy as np
import pytest

from stemlive.live.com_maps import COM_IMAGES, com_images, com_shifts, idpc
from stemlive.live.store import read_store


def bumps(shape=(48, 64), seed=0) -> np.ndarray:
    """A projected potential: Gaussian columns on a lattice, slightly irregular."""
    rng = np.random.default_rng(seed)
    yy, xx = np.indices(shape, dtype=np.float64)
    phi = np.zeros(shape)
    for r in np.arange(4, shape[0], 8.0):
        for c in np.arange(4, shape[1], 8.0):
            w = rng.uniform(0.5, 1.5)
            phi += w * np.exp(-((yy - r - rng.normal(0, 0.5)) ** 2 + (xx - c - rng.normal(0, 0.5)) ** 2) / 4.0)
    return phi


def test_idpc_integrates_a_gradient_field_columns_bright():
    phi = bumps()
    ey, ex = np.gradient(phi)
    got = idpc(ey, ex)
    corr = np.corrcoef(got.ravel(), phi.ravel())[0, 1]
    assert corr > 0.99, corr
    # columns bright: the field's integral, not its negative
    assert got[phi > np.percentile(phi, 95)].mean() > got[phi < np.percentile(phi, 20)].mean()


def test_idpc_keeps_unscanned_pixels_nan():
    phi = bumps()
    ey, ex = np.gradient(phi)
    ey[30:], ex[30:] = np.nan, np.nan  # the scan has reached row 30
    got = idpc(ey, ex)
    assert np.isnan(got[30:]).all() and np.isfinite(got[:30]).all()
    corr = np.corrcoef(got[4:26].ravel(), phi[4:26].ravel())[0, 1]
    assert corr > 0.95, corr
    assert np.isnan(idpc(np.full((4, 4), np.nan), np.full((4, 4), np.nan))).all()


@pytest.mark.parametrize("rotation, flip", [(0.0, False), (30.0, False), (-75.0, True)])
def test_shifts_follow_libertem_com_udf(rotation, flip):
    """Our shifts from ``raw_com`` equal LiberTEM's own ``field`` for the same centre, rotation and flip."""
    from libertem.api import Context
    from libertem.executor.inline import InlineJobExecutor
    from libertem.udf.com import CoMUDF

    rng = np.random.default_rng(1)
    frames = rng.poisson(5.0, size=(3, 4, 24, 20)).astype(np.float32)
    frames[..., 10:14, 8:12] += 200  # a bright disk, moved a little per frame
    frames[:, :, 9:11, :] += rng.uniform(0, 50, size=(3, 4, 1, 1))
    ctx = Context(executor=InlineJobExecutor())
    ds = ctx.load("memory", data=frames, sig_dims=2)
    center = (11.3, 9.6)
    res = ctx.run_udf(dataset=ds, udf=CoMUDF.with_params(cy=center[0], cx=center[1], scan_rotation=rotation, flip_y=flip))
    dy, dx = com_shifts(res["raw_com"].data, center, rotation, flip)
    np.testing.assert_allclose(dy, res["field"].data[..., 0], atol=1e-5)
    np.testing.assert_allclose(dx, res["field"].data[..., 1], atol=1e-5)
    img = com_images(res["raw_com"].data, center, 2.0, rotation, flip)
    np.testing.assert_allclose(img["com_magnitude"], 2.0 * np.hypot(dy, dx), rtol=1e-5)
    assert set(img) == set(COM_IMAGES)


@pytest.fixture(scope="module")
def com_store(live_scan, tmp_path_factory):
    """The test scan replayed with --com (scan rotation 12°)."""
    from stemlive.live.pipeline import Settings
    from stemlive.live.replay import replay

    d, meta, _, _ = live_scan
    out = tmp_path_factory.mktemp("com") / "com.h5"
    settings = Settings(block=(8, 8), alpha_mrad=meta["alpha_mrad"], kv=meta["kv"], out=out,
                        mrad_per_px=meta["mrad_per_px"], scan_step_nm=meta["scan_step_nm"], pub=None, rep=None,
                        progress=False, atoms=None, method="network", com=True, scan_rotation_deg=12.0)
    replay(d / "frames.npy", settings)
    return out


def test_replay_with_com_stores_the_maps(live_scan, com_store, tmp_path):
    """`replay --com`: the store holds CoM shift (mrad) and iDPC images for every frame, as
    LiberTEM's CoMUDF gives them offline around the run's calibrated centre; without --com none."""
    from libertem.api import Context
    from libertem.executor.inline import InlineJobExecutor
    from libertem.udf.com import CoMUDF

    from stemlive.live.pipeline import Settings
    from stemlive.live.replay import replay

    d, meta, data, _ = live_scan
    store = read_store(com_store)
    for k in COM_IMAGES:
        assert np.isfinite(store["virtual"][k]).all(), k
    center = tuple(store["radial"]["center_px"])  # the run's calibrated disk centre
    ctx = Context(executor=InlineJobExecutor())
    ds = ctx.load("memory", data=np.asarray(data), sig_dims=2)
    ref = ctx.run_udf(dataset=ds, udf=CoMUDF.with_params(cy=center[0], cx=center[1], scan_rotation=12.0))
    k = meta["mrad_per_px"]
    np.testing.assert_allclose(store["virtual"]["com_y"], k * ref["field"].data[..., 0], atol=2e-3 * k, rtol=1e-4)
    np.testing.assert_allclose(store["virtual"]["com_x"], k * ref["field"].data[..., 1], atol=2e-3 * k, rtol=1e-4)
    # the integral shows the lattice: beneath the wedge's slow CoM drift (thickness and tilt change
    # across the scan), iDPC's columns are the virtual HAADF's (columns bright, the sign checked)
    from scipy import ndimage

    def detail(a):
        return a - ndimage.gaussian_filter(a, 4.0)

    corr = np.corrcoef(detail(store["virtual"]["idpc"]).ravel(), detail(store["virtual"]["haadf"]).ravel())[0, 1]
    assert corr > 0.25, corr
    plain = tmp_path / "plain.h5"
    replay(d / "frames.npy", Settings(block=(8, 8), alpha_mrad=meta["alpha_mrad"], kv=meta["kv"], out=plain,
                                      mrad_per_px=meta["mrad_per_px"], pub=None, rep=None, progress=False,
                                      atoms=None, method="network"))
    assert not set(COM_IMAGES) & set(read_store(plain)["virtual"])


def test_store_page_shows_the_com_maps(com_store):
    """`stemlive dashboard R.h5` of a --com run: the four CoM maps beside the virtual detectors, in
    mrad (iDPC in a.u.), drawn from the store, not adjustable by the ring sliders."""
    from bokeh.document import Document

    from stemlive.dashboards.app import Page
    from stemlive.dashboards.feed import StoreFeed

    store = read_store(com_store)
    feed = StoreFeed(com_store)
    try:
        page = Page(Document(), feed)
        for key in COM_IMAGES:
            entry = page.virtual[key]
            np.testing.assert_allclose(entry["source"].data["image"][0], store["virtual"][key], rtol=1e-6, err_msg=key)
            assert entry["figure"] in page.figures
        assert "[mrad]" in page.virtual["com_y"]["figure"].title.text
        assert "[a.u.]" in page.virtual["idpc"]["figure"].title.text
        assert page.rings is None or not set(COM_IMAGES) & set(page.rings.sliders)
    finally:
        feed.close()

