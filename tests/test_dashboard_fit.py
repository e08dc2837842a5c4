"""The PACBED panel's library fit: the engine's REP answer, a store's (computed in the dashboard
process), the words where there is no check, and the panel drawing it."""
from __future__ import annotations

import numpy as np
import pytest

from stemlive.live.store import MAP_FIELDS, ResultStore, StoreLayout

SIG = (96, 96)
LAYOUT = StoreLayout(scan_shape=(8, 8), block_shape=(4, 4), sig_shape=SIG)


@pytest.fixture(scope="module")
def checked():
    """The shipped 13.6 mrad check, a disk pattern and its checked estimate."""
    from stemlive.models.checked_analysis import check_one, open_checker
    from stemlive.models.pacbed_analysis import PacbedAnalyzer

    checker = open_checker("check", 200, 13.6)
    yy, xx = np.indices(SIG) - 47.5
    disk = ((np.hypot(yy, xx) < 11) * 100.0 + 1.0).astype(np.float32)
    done = check_one(checker, disk, PacbedAnalyzer.for_acquisition(200, 13.6).analyze([disk])[0])
    assert done.method == "check"
    return checker, disk, done


def _rows(done, method: int) -> dict:
    from stemlive.live.store import estimate_row

    row = estimate_row(done.estimate, False, check=done.outcome)
    row["method"] = np.uint8(method)
    return {k: np.asarray(row[k])[None] for k in MAP_FIELDS}


def test_live_feed_draws_a_checked_block_with_its_library_fit(checked):
    """The engine answers with the block's pattern, estimates and the run's meta; the dashboard
    process draws the library fit from them (the engine's cores and its check stay its own)."""
    from stemlive.dashboards.feed import LiveFeed
    from stemlive.live.publisher import Publisher
    from stemlive.live.state import LiveState
    from stemlive.models.checked_analysis import render_check

    checker, disk, done = checked
    meta = {"alpha_mrad": 13.6, "kv": 200, "method": "check", "check": checker.info}
    state = LiveState(LAYOUT, meta)
    state.apply_blocks(np.array([[0, 1]]), _rows(done, 2), disk[None] * 16, np.array([16]), np.array([False]))
    state.apply_blocks(np.array([[1, 1]]), _rows(done, 1), disk[None] * 16, np.array([16]), np.array([False]))
    header, arrays = state.block_pacbed(0, 1)
    assert set(arrays) == {"pacbed"} and header["meta"]["check"]["sha256"] == checker.info["sha256"]
    pub = Publisher(state, "tcp://127.0.0.1:0", "tcp://127.0.0.1:0")
    feed = LiveFeed(pub.pub_address, pub.rep_address, timeout_s=5)
    try:
        header, pac = feed.block_pacbed(0, 1)
        fit, images = header["fit"], header["fit_images"]
        assert fit["available"] and fit["thickness_nm"] == pytest.approx(done.estimate.thickness_nm, rel=1e-5)
        want = render_check(checker, disk, done.estimate)
        np.testing.assert_allclose(images["model"], want["model"], rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(images["residual"], images["observed"] - images["model"], atol=1e-5)
        # a block the networks alone have read (the check lags): the words, no images
        header, pac = feed.block_pacbed(1, 1)
        assert not header["fit"]["available"] and "has not read this block" in header["fit"]["reason"]
        assert header["fit_images"] == {}
    finally:
        feed.close()
        pub.close()


def test_fitter_refuses_check_data_other_than_the_runs(checked):
    from stemlive.dashboards.store_feed import fitter_for

    checker, disk, done = checked
    est = {k: np.asarray(v).tolist() for k, v in _rows(done, 2).items()}
    est = {k: v[0] for k, v in est.items()}
    fit, images = fitter_for({"kv": 200, "alpha_mrad": 13.6, "method": "check", "check": {"sha256": "0" * 64}}).fit(disk, est)
    assert not fit["available"] and "another sha256" in fit["reason"] and images == {}
    fit, images = fitter_for({"kv": 200, "alpha_mrad": 13.6, "method": "network"}).fit(disk, est)
    assert "networks alone" in fit["reason"]
    fit, images = fitter_for({"kv": 200, "alpha_mrad": 13.6, "method": "check", "check": checker.info}).fit(disk, est)
    assert fit["available"] and images["model"].shape == (64, 64)


@pytest.mark.parametrize("kv,method,words", [(200, "check", None), (200, "network", "networks alone"),
                                             (300, "check", "no library check")])
def test_store_block_gets_its_library_fit_in_the_dashboard_process(checked, tmp_path, kv, method, words):
    from stemlive.dashboards.feed import StoreFeed

    checker, disk, done = checked
    store = ResultStore.create(tmp_path / "r.h5", LAYOUT, alpha_mrad=13.6, kv=kv, models=[{"id": "m"}], method=method)
    store.write_blocks(np.array([[1, 0]]), disk[None] * 4, np.array([4]), [done.estimate], np.array([False]), 4)
    store.write_maps(np.array([[1, 0]]), _rows(done, 2 if method == "check" else 1))
    store.finish("complete")
    feed = StoreFeed(tmp_path / "r.h5")
    header, pac = feed.block_pacbed(1, 0)
    if words is None:
        assert header["fit"]["available"] and np.isfinite(header["fit_images"]["model"]).sum() > 1000
    else:
        assert not header["fit"]["available"] and words in header["fit"]["reason"], header["fit"]
    feed.close()


def test_panel_draws_the_fit_beside_the_pattern_or_says_why_not(checked):
    from stemlive.dashboards.pacbed_panel import PacbedPanel
    from stemlive.dashboards.store_feed import fitter_for
    from stemlive.live.state import LiveState

    checker, disk, done = checked
    state = LiveState(LAYOUT, {"alpha_mrad": 13.6, "kv": 200, "method": "check"})
    state.apply_blocks(np.array([[0, 0]]), _rows(done, 2), disk[None], np.array([1]), np.array([False]))
    header, arrays = state.block_pacbed(0, 0)
    header["fit"], header["fit_images"] = fitter_for(header["meta"]).fit(arrays["pacbed"], header["estimate"])
    panel = PacbedPanel(200, lambda: None)
    panel.show((0, 0), True, header, arrays["pacbed"], "text")
    assert len(panel.fit_image.data["image"]) == 1 and len(panel.diff_image.data["image"]) == 1
    assert "Library fit</b> at thickness" in panel.fit_info.text
    half = 31.5 * 13.6 / header["fit"]["alpha_px"]  # the canonical frame spans ±2.6 α in mrad
    assert panel.fit_figures[0].x_range.end == pytest.approx(half + 13.6 / header["fit"]["alpha_px"] / 2)
    assert panel.diff_mapper.low == -panel.diff_mapper.high
    panel.scale.active = 2  # gamma: the fit is redrawn on the same scale, in [0, 1]
    shown = panel.fit_image.data["image"][0]
    assert np.nanmin(shown) == 0 and np.nanmax(shown) == pytest.approx(1)
    header["fit"], header["fit_images"] = {"available": False, "reason": "no check here"}, {}
    panel.show((0, 0), True, header, arrays["pacbed"], "text")
    assert panel.fit_image.data["image"] == [] and "no check here" in panel.fit_info.text
