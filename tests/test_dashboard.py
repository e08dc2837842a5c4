"""The dashboard's server side without a browser: feeds, access control, display helpers."""
from __future__ import annotations

import time
import urllib.error
import urllib.request

import numpy as np
import pytest

from stemlive.dashboards.app import crystal_correction, derived_maps, downsample
from stemlive.dashboards.feed import LiveFeed, StoreFeed
from stemlive.dashboards.server import make_server, serve_in_thread, signed_url
from stemlive.live.publisher import Publisher
from stemlive.live.state import LiveState
from stemlive.live.store import StoreLayout

LAYOUT = StoreLayout(scan_shape=(8, 12), block_shape=(4, 4), sig_shape=(5, 5))


def wait_for(pred, timeout=10.0):
    t = time.monotonic()
    while time.monotonic() - t < timeout:
        if pred():
            return True
        time.sleep(0.05)
    return False


def test_live_feed_follows_the_engine_and_resyncs_after_a_gap():
    state = LiveState(LAYOUT, {"alpha_mrad": 13.6, "models": ["m"]})
    pub = Publisher(state, "tcp://127.0.0.1:0", "tcp://127.0.0.1:0")
    feed = LiveFeed(pub.pub_address, pub.rep_address, timeout_s=2)
    try:
        assert wait_for(lambda: feed.snapshot is not None)
        time.sleep(0.3)  # subscription established
        rows = {"thickness_nm": np.array([12.0], np.float32)}
        seq = state.apply_blocks(np.array([[0, 1]]), rows, np.ones((1, 5, 5), np.float32), np.array([16]),
                                 np.array([False]))
        pub.blocks(seq, np.array([[0, 1]]), rows)
        assert wait_for(lambda: feed.snapshot.maps["thickness_nm"][0, 1] == 12.0)
        assert feed.latest_block == (0, 1) and feed.last_delay_s is not None
        # a block the feed never hears about (a gap in seq), then one it does: it asks for the full state
        state.apply_blocks(np.array([[1, 0]]), {"thickness_nm": np.array([30.0], np.float32)},
                           np.ones((1, 5, 5), np.float32), np.array([16]), np.array([False]))
        seq = state.apply_blocks(np.array([[1, 2]]), {"thickness_nm": np.array([40.0], np.float32)},
                                 np.ones((1, 5, 5), np.float32), np.array([16]), np.array([False]))
        pub.blocks(seq, np.array([[1, 2]]), {"thickness_nm": np.array([40.0], np.float32)})
        assert wait_for(lambda: feed.snapshot.maps["thickness_nm"][1, 0] == 30.0)
        assert feed.snapshot.maps["thickness_nm"][1, 2] == 40.0 and feed.snapshot.done.sum() == 3
        header, pac = feed.block_pacbed(1, 2)
        assert header["frames"] == 16 and pac.shape == (5, 5)
    finally:
        feed.close()
        pub.close()


def test_store_feed(tmp_path):
    from stemlive.live.store import ResultStore
    from stemlive.models.pacbed_analysis import PacbedEstimate

    s = ResultStore.create(tmp_path / "r.h5", LAYOUT, alpha_mrad=13.6, kv=200, models=[{"id": "m1"}])
    est = PacbedEstimate(center_px=(2.0, 2.0), radius_px=1.0, rotation_deg=0.0, thickness_nm=20.0,
                         thickness_sigma_nm=1.0, tilt_mrad=(0.1, 0.2), tilt_sigma_mrad=(0.1, 0.1),
                         tilt_crystal_mrad=(0.1, 0.2), background=0.0, in_range=True)
    s.write_blocks(np.array([[1, 1]]), np.full((1, 5, 5), 32.0, np.float32), np.array([16]), [est],
                   np.array([False]), 16)
    s.finish("complete")
    feed = StoreFeed(tmp_path / "r.h5")
    assert feed.snapshot.status["state"] == "complete" and feed.snapshot.meta["models"] == ["m1"]
    header, pac = feed.block_pacbed(1, 1)
    assert header["estimate"]["thickness_nm"] == 20.0 and np.allclose(pac, 2.0)
    with pytest.raises(ValueError, match="outside"):
        feed.block_pacbed(5, 5)


def test_dashboard_binds_loopback_and_needs_a_token_beyond(tmp_path):
    from stemlive.live.store import ResultStore

    ResultStore.create(tmp_path / "r.h5", LAYOUT, alpha_mrad=13.6, kv=200).finish("complete")
    feed = StoreFeed(tmp_path / "r.h5")
    with pytest.raises(PermissionError, match="access token"):
        make_server(feed, port=0, address="0.0.0.0")
    server, url = serve_in_thread(feed, port=0, address="0.0.0.0", token="s3cret-Qx7vL2pN9wKd")
    port = server.port
    with pytest.raises(urllib.error.HTTPError) as err:  # no signed session id: refused
        urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10)
    assert err.value.code == 403
    page = urllib.request.urlopen(url.replace("0.0.0.0", "127.0.0.1"), timeout=10).read().decode()
    assert "bokeh" in page.lower()
    bad = signed_url(port, "127.0.0.1", "wrong")
    with pytest.raises(urllib.error.HTTPError):
        urllib.request.urlopen(bad, timeout=10)
    server, url = serve_in_thread(feed, port=0)  # loopback: no token
    assert url.startswith("http://127.0.0.1:")
    assert urllib.request.urlopen(url, timeout=10).status == 200


def test_display_helpers():
    a = np.arange(16, dtype=float).reshape(4, 4)
    a[0, 0] = np.nan
    d = downsample(a, 2)
    assert d.shape == (2, 2) and d[0, 0] == pytest.approx((1 + 4 + 5) / 3)
    text = crystal_correction(np.array([0.4, -0.2]))
    assert "[100] -0.40" in text and "[010] +0.20" in text
    maps = {"tilt_mrad": np.array([[[1.0, 0.0]]]), "tilt_crystal_mrad": np.zeros((1, 1, 2)),
            "thickness_nm": np.ones((1, 1)), "thickness_sigma_nm": np.ones((1, 1)),
            "tilt_sigma_mrad": np.zeros((1, 1, 2)), "in_range": np.array([[1]], np.int8),
            "flags": np.zeros((1, 1), np.uint32)}
    assert derived_maps(maps)["tilt_azimuth"][0, 0] == pytest.approx(90.0)  # along axis 0: 90° from axis 1
