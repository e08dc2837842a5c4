"""Rings the operator sets: the request and its checks, ring images summed from per-frame radial
profiles (live state, publisher, result store) against the UDF's own `ring_images`, and the
page asking for them off the event loop."""
from __future__ import annotations

import json
import time

import numpy as np
import pytest

from stemlive.live.publisher import Publisher
from stemlive.live.state import LiveState
from stemlive.live.store import ResultStore, StoreLayout, read_store
from stemlive.protocol import RequestError, decode, parse_request
from stemlive.protocol.requests import MAX_RINGS, check_rings, rings_request
from stemlive.protocol.rings import ring_images_from_profiles, ring_scale
from stemlive.udf.radial_bins import RingScale
from stemlive.udf.virtual_detector import frame_profiles, ring_images

SCAN, SIG, BIN = (6, 7), (24, 24), 0.5
NB = 36
ALPHA, MPP = 13.6, 1.7  # α = 8 px
CENTER = (11.3, 12.1)
RINGS = {"bf": (0.0, 0.5, "alpha"), "abf": (0.5, 1.0, "alpha"), "adf": (1.5, 3.0, "alpha"),
         "haadf": (3.0, 4.5, "alpha"), "custom": (9.9, 22.3, "mrad"), "px": (1.26, 3.74, "px")}


def record(seed: int = 0) -> dict:
    """A VirtualDetectorUDF record of frames binned around the calibrated centre."""
    rng = np.random.default_rng(seed)
    radial = (rng.gamma(2.0, 50.0, (*SCAN, NB)) * np.exp(-np.arange(NB) / 15)).astype(np.float32)
    return {"radial": radial, "dipole": np.zeros((*SCAN, 1, 2), np.float32),
            "center_used": np.broadcast_to(np.float32(CENTER), (*SCAN, 2)).copy(),
            "recorded": np.full(SCAN, 2, np.uint8)}


def test_ring_requests_are_checked():
    assert parse_request(json.dumps(rings_request({"bf": (0, 0.5, "alpha")})).encode()) == \
        ("rings", ({"bf": (0.0, 0.5, "alpha")},))
    bad = [({}, "non-empty"), ([1, 2], "non-empty"), ({"bf": (0.5, 0.5, "alpha")}, "inner < outer"),
           ({"bf": (-1, 0.5, "alpha")}, "inner < outer"), ({"bf": (0, 1, "nm")}, "unit must be"),
           ({"bf": ("0", 1, "alpha")}, "finite number"), ({"bf": (0, float("nan"), "alpha")}, "finite number"),
           ({"bf": (True, 2, "px")}, "finite number"), ({"bf": (0, 1)}, r"\[inner, outer, unit\]"),
           ({"b f": (0, 1, "px")}, "ring name"), ({f"r{k}": (0, 1, "px") for k in range(MAX_RINGS + 1)}, "at most")]
    for rings, why in bad:
        with pytest.raises(RequestError, match=why):
            check_rings(rings)
        with pytest.raises(RequestError, match=why):
            parse_request(json.dumps({"type": "rings", "rings": rings}).encode())
    with pytest.raises(RequestError, match="non-empty"):
        parse_request(b'{"type": "rings"}')


def test_rings_from_profiles_match_the_udf_rings():
    rec = record()
    scale = RingScale(radius_px=ALPHA / MPP, mrad_per_px=MPP)
    want = ring_images(rec, RINGS, scale, BIN, CENTER)
    got = ring_images_from_profiles(frame_profiles(rec, BIN, CENTER), BIN, RINGS, scale)
    for k in RINGS:
        np.testing.assert_allclose(got[k], want[k], rtol=2e-5, err_msg=k)
    assert ring_scale(ALPHA, MPP).radius_px == pytest.approx(8.0)  # α from the calibration
    assert ring_scale(ALPHA, None, 8.0).mrad_per_px == pytest.approx(MPP)  # mrad/px from the disk
    assert ring_scale(ALPHA, float("nan"), None).radius_px is None
    with pytest.raises(ValueError, match="mrad_per_px"):
        ring_images_from_profiles(rec["radial"], BIN, {"x": (1, 2, "mrad")}, ring_scale(ALPHA))


def live_state(rec, frames) -> LiveState:
    state = LiveState(StoreLayout(SCAN, (3, 7), SIG, radial_bins=NB), {"alpha_mrad": ALPHA})
    scale = RingScale(radius_px=ALPHA / MPP, mrad_per_px=MPP)
    rows = slice(0, len(frames) // SCAN[1])  # whole rows, as the engine hands them over
    bf = ring_images(rec, {"bf": RINGS["bf"]}, scale, BIN, CENTER, frames=frames)["bf"].reshape(-1, SCAN[1])
    state.apply_virtual(rows, {"bf": bf}, frames=frames,
                        profiles=frame_profiles(rec, BIN, CENTER, frames), scale=scale, bin_px=BIN)
    return state


def test_live_state_answers_rings_for_the_whole_scan_nan_where_not_recorded():
    rec = record(1)
    state = LiveState(StoreLayout(SCAN, (3, 7), SIG, radial_bins=NB), {"alpha_mrad": ALPHA})
    with pytest.raises(ValueError, match="no per-frame radial profiles yet"):
        state.ring_images({"bf": (0, 1, "alpha")})
    frames = np.arange(3 * SCAN[1])  # the first three rows
    state = live_state(rec, frames)
    header, arrays = state.ring_images(check_rings(RINGS))
    want = ring_images(rec, RINGS, RingScale(radius_px=ALPHA / MPP, mrad_per_px=MPP), BIN, CENTER)
    for k in RINGS:
        img = arrays[f"rings/{k}"]
        assert img.shape == SCAN and np.isnan(img[3:]).all()
        np.testing.assert_allclose(img[:3], want[k][:3], rtol=2e-5, err_msg=k)
    assert header["radial"] == {"bin_px": BIN, "n_bins": NB, "radius_px": pytest.approx(8.0), "mrad_per_px": MPP}
    assert state.full_state()[0]["radial"]["n_bins"] == NB
    # the same ring in α, mrad and px reads the same
    _, same = state.ring_images({"a": (0.5, 1.0, "alpha"), "m": (6.8, 13.6, "mrad"), "p": (4.0, 8.0, "px")})
    np.testing.assert_allclose(same["rings/a"], same["rings/m"], rtol=1e-6)
    np.testing.assert_allclose(same["rings/a"], same["rings/p"], rtol=1e-6)


def test_publisher_answers_ring_requests_without_pickle():
    import zmq

    state = live_state(record(2), np.arange(SCAN[0] * SCAN[1]))
    pub = Publisher(state, "tcp://127.0.0.1:0", "tcp://127.0.0.1:0")
    req = zmq.Context.instance().socket(zmq.REQ)
    req.setsockopt(zmq.RCVTIMEO, 5000)
    req.setsockopt(zmq.LINGER, 0)
    req.connect(pub.rep_address)
    try:
        req.send_json(rings_request({"adf": (1.5, 3.0, "alpha")}))
        frames = req.recv_multipart()
        assert b"pickle" not in frames[0] and frames[0].startswith(b"{")
        header, arrays = decode(frames)
        assert header["type"] == "rings" and header["source"] == "engine" and arrays["rings/adf"].shape == SCAN
        req.send_json({"type": "rings", "rings": {"adf": [3, 1, "alpha"]}})
        header, _ = decode(req.recv_multipart())
        assert header["type"] == "error" and "inner < outer" in header["error"]
    finally:
        req.close()
        pub.close()


def stored(tmp_path, rec, calibrated: bool = True):
    layout = StoreLayout(SCAN, (3, 7), SIG, virtual=("bf", "haadf"), radial_bins=NB)
    store = ResultStore.create(tmp_path / "r.h5", layout, alpha_mrad=ALPHA, kv=200, mrad_per_px=MPP,
                               models=[{"id": "m"}], rings={k: list(RINGS[k]) for k in ("bf", "haadf")})
    n = SCAN[0] * SCAN[1]
    store.write_radial(np.arange(n), frame_profiles(rec, BIN, CENTER).reshape(n, NB), CENTER,
                       radius_px=ALPHA / MPP if calibrated else None)
    return store


def test_store_rings_match_the_udf_rings(tmp_path):
    from stemlive.dashboards.feed import StoreFeed

    rec = record(3)
    stored(tmp_path, rec)
    r = read_store(tmp_path / "r.h5")["radial"]
    assert r["radius_px"] == pytest.approx(8.0) and r["bin_px"] == BIN
    feed = StoreFeed(tmp_path / "r.h5")
    try:
        assert feed.snapshot.meta["radial"] == {"bin_px": BIN, "n_bins": NB, "radius_px": pytest.approx(8.0),
                                                "mrad_per_px": MPP}
        header, images = feed.ring_images(RINGS)
        want = ring_images(rec, RINGS, RingScale(radius_px=8.0, mrad_per_px=MPP), BIN, CENTER)
        assert header["source"] == "store"
        for k in RINGS:
            np.testing.assert_allclose(images[k], want[k], rtol=2e-5, err_msg=k)
        with pytest.raises(RequestError, match="unit"):
            feed.ring_images({"bf": (0, 1, "nm")})
    finally:
        feed.close()


def test_store_page_redraws_a_ring_the_operator_moves(tmp_path):
    """`stemlive dashboard RESULT.h5`'s page: a slider let go asks for the ring on a worker thread
    (the callback returns at once), the image and its title change on the next tick."""
    from bokeh.document import Document

    from stemlive.dashboards.app import Page
    from stemlive.dashboards.feed import StoreFeed

    rec = record(4)
    stored(tmp_path, rec).finish("complete")
    feed = StoreFeed(tmp_path / "r.h5")
    doc = Document()
    ticks = []
    doc.add_next_tick_callback = ticks.append
    page = Page(doc, feed)
    try:
        assert page.rings is not None and set(page.rings.sliders) == {"bf", "haadf", "custom"}
        assert page.rings.unit == "mrad" and page.rings.sliders["haadf"].value == pytest.approx((40.8, 61.2))
        assert "40.8–61.2 mrad (3.00–4.50 α)" in page.virtual["haadf"]["figure"].title.text
        deadline = time.monotonic() + 10
        while not ticks and time.monotonic() < deadline:  # the custom annulus, asked for at build
            time.sleep(0.02)
        ticks.pop(0)()
        scale = RingScale(radius_px=8.0, mrad_per_px=MPP)
        np.testing.assert_allclose(page.virtual["custom"]["source"].data["image"][0],
                                   ring_images(rec, {"c": (1.0, 2.0, "alpha")}, scale, BIN, CENTER)["c"], rtol=2e-5)
        page.rings.unit_toggle.active = 1  # α
        assert page.rings.sliders["haadf"].value == pytest.approx((3.0, 4.5))
        t = time.perf_counter()
        page.rings.sliders["haadf"].value = (2.0, 3.5)
        page.rings._let_go("haadf", (2.0, 3.5))  # what the browser's value_throttled triggers
        assert time.perf_counter() - t < 0.5
        while not ticks and time.monotonic() < deadline:
            time.sleep(0.02)
        ticks.pop(0)()
        want = ring_images(rec, {"h": (2.0, 3.5, "alpha")}, scale, BIN, CENTER)["h"]
        np.testing.assert_allclose(page.virtual["haadf"]["source"].data["image"][0], want, rtol=2e-5)
        assert "27.2–47.6 mrad (2.00–3.50 α)" in page.virtual["haadf"]["figure"].title.text
        assert json.loads(page.rings_drawn.data["msg"][0])["rings"]["haadf"] == [2.0, 3.5]
    finally:
        feed.close()
