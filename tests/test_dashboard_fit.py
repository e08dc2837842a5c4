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


def test_live_state_answers_a_checked_block_with_its_library_fit(checked):
    from stemlive.live.publisher import Publisher
    from stemlive.live.state import LiveState
    from stemlive.dashboards.feed import LiveFeed
    from stemlive.models.checked_analysis import render_check

    checker, disk, done = checked
    state = LiveState(LAYOUT, {"alpha_mrad": 13.6, "kv": 200, "method": "check"})
    state.checker = checker
    state.apply_blocks(np.array([[0, 1]]), _rows(done, 2), disk[None] * 16, np.array([16]), np.array([False]))
    state.apply_blocks(np.array([[1, 1]]), _rows(done, 1), disk[None] * 16, np.array([16]), np.array([False]))
    header, arrays = state.block_pacbed(0, 1)
    fit = header["fit"]
    assert fit["available"] and fit["thickness_nm"] == pytest.approx(done.estimate.thickness_nm, rel=1e-5)
    want = render_check(checker, disk, done.estimate)
    np.testing.assert_allclose(arrays["fit/model"], want["model"], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(arrays["fit/residual"], arrays["fit/observed"] - arrays["fit/model"], atol=1e-5)
    # a block the networks alone have read: the words, no images
    header, arrays = state.block_pacbed(1, 1)
    assert not header["fit"]["available"] and "has not read this block" in header["fit"]["reason"]
    assert not any(k.startswith("fit/") for k in arrays)
    # over the wire (JSON + raw arrays), as the dashboard gets it
    pub = Publisher(state, "tcp://127.0.0.1:0", "tcp://127.0.0.1:0")
    feed = LiveFeed(pub.pub_address, pub.rep_address, timeout_s=5)
    try:
        header, pac = feed.block_pacbed(0, 1)
        assert header["fit"]["available"] and header["fit_images"]["model"].shape == (64, 64)
        np.testing.assert_allclose(header["fit_images"]["model"], want["model"], rtol=1e-4, atol=1e-5)
    finally:
        feed.close()
        pub.close()
    # a run without a checker says why
    net = LiveState(LAYOUT, {"alpha_mrad": 13.6, "kv": 200, "method": "network"})
    net.apply_blocks(np.array([[0, 0]]), _rows(done, 1), disk[None], np.array([1]), np.array([False]))
    assert "networks alone" in net.block_pacbed(0, 0)[0]["fit"]["reason"]


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
    from stemlive.live.state import LiveState

    checker, disk, done = checked
    state = LiveState(LAYOUT, {"alpha_mrad": 13.6, "kv": 200, "method": "check"})
    state.checker = checker
    state.apply_blocks(np.array([[0, 0]]), _rows(done, 2), disk[None], np.array([1]), np.array([False]))
    header, arrays = state.block_pacbed(0, 0)
    header["fit_images"] = {k[4:]: v for k, v in arrays.items() if k.startswith("fit/")}
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
