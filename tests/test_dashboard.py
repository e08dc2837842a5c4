"""The dashboard's server side without a browser: feeds, access control, display helpers."""
from __future__ import annotations

import time
import urllib.error
import urllib.request

import numpy as np
import pytest

from stemlive.dashboards.display import crystal_correction, derived_maps, downsample
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


def _maps(**over):
    maps = {"tilt_mrad": np.array([[[1.0, 0.0], [0.05, 0.0]]]), "tilt_crystal_mrad": np.zeros((1, 2, 2)),
            "thickness_nm": np.array([[20.0, 30.0]]), "thickness_sigma_nm": np.array([[1.0, 8.0]]),
            "tilt_sigma_mrad": np.full((1, 2, 2), 0.1), "in_range": np.array([[1, 1]], np.int8),
            "flags": np.zeros((1, 2), np.uint32)}
    maps.update(over)
    return maps


def test_azimuth_is_blank_where_the_tilt_is_within_its_sigma_and_doubt_is_flags_or_sigma():
    from stemlive.dashboards.display import doubtful

    d = derived_maps(_maps())
    assert d["tilt_azimuth"][0, 0] == pytest.approx(90.0) and np.isnan(d["tilt_azimuth"][0, 1])
    names = ["vacuum", "error", "ambiguous", "model-mismatch"]
    assert doubtful(_maps(), names).tolist() == [[False, True]]  # σ 8 nm > 5 nm
    flagged = _maps(flags=np.array([[1 << 3, 0]], np.uint32), thickness_sigma_nm=np.ones((1, 2)))
    assert doubtful(flagged, names).tolist() == [[True, False]]  # model-mismatch
    assert derived_maps(flagged)["flags"][0, 0] == 1.0  # the flags map counts the flags raised


def test_palettes_are_continuous_and_azimuth_cyclic():
    from stemlive.dashboards.display import CYCLIC, DIVERGING

    assert len(DIVERGING) == 256 and len(set(DIVERGING)) > 200
    first, last = (np.array([int(c[k:k + 2], 16) for k in (1, 3, 5)]) for c in (CYCLIC[0], CYCLIC[-1]))
    assert np.abs(first - last).max() <= 8  # -180° and +180° look the same


def test_region_stats_and_status_words():
    from stemlive.dashboards.display import region_stats, status_text

    v = {"a": np.array([[1.0, 3.0, np.nan], [5.0, 7.0, 9.0]])}
    (s,) = region_stats(v, [("a", "A", "nm")], slice(0, 2), slice(0, 2))
    assert (s.mean, s.count) == (4.0, 4) and s.sd == pytest.approx(np.std([1, 3, 5, 7], ddof=1))
    running = status_text({"state": "running", "blocks_done": 3, "blocks_total": 8, "frames_seen": 100,
                           "frames_total": 400, "frames_per_s": 50.0}, 0.12, 0)
    assert "Scanning" in running and "3 of 8 blocks" in running and "50 frames/s" in running and "120 ms" in running
    done = status_text({"state": "complete", "blocks_done": 8, "blocks_total": 8, "frames_seen": 400,
                        "frames_total": 400, "frames_per_s": 50.0, "frames_dropped": 12}, None, 0)
    assert "Finished" in done and "took 8.0 s" in done and "12 frames lost" in done and "frames/s" not in done
    # the browser's own measure, last frame -> drawn here, wins over publish -> here; the recent rate
    # over the engine's average since it started
    live = status_text({"state": "running", "blocks_done": 3, "blocks_total": 8, "frames_seen": 100,
                        "frames_total": 400, "frames_per_s": 50.0}, 0.12, 0, frame_delay_s=0.85, recent_fps=98.6)
    assert "99 frames/s" in live and "850 ms after its last frame reached the engine" in live and "120 ms" not in live
    assert "no frames lost" in status_text({"state": "complete", "frames_dropped": 0}, None, 0)
    assert "no frames lost so far" in running
    assert "7 frames lost so far" in status_text({"state": "running", "frames_seen": 50, "frames_dropped": 7}, None, 0)
    assert "no new frames for 12.0 s" in status_text({"state": "running", "frames_seen": 5}, None, 0, quiet_s=12)
    assert "no new frames" not in status_text({"state": "running", "frames_seen": 5}, None, 0, quiet_s=3)


def test_pacbed_display_scales_and_calibration():
    from stemlive.dashboards.pacbed_panel import calibration, display_intensity, ring_radii

    pac = np.array([[0.0, 1.0], [10.0, 1000.0]])
    assert np.allclose(display_intensity(pac, "linear"), pac)
    g = display_intensity(pac, "gamma", 0.5)
    assert g.min() == 0 and g.max() == 1 and g[1, 0] == pytest.approx(0.1)
    lg = display_intensity(pac, "log")
    assert np.all(np.diff(lg.ravel()) > 0)
    with pytest.raises(ValueError, match="scale"):
        display_intensity(pac, "cubic")
    assert calibration({"mrad_per_px": 1.5}, {})[0] == 1.5
    assert calibration({"mrad_per_px": float("nan"), "alpha_mrad": 13.6}, {"radius_px": 6.8})[0] == pytest.approx(2.0)
    assert ring_radii({"bf": (0, 0.5, "alpha"), "x": (20, 40, "mrad")}, 10.0) == [("bf", 0, 5.0), ("x", 20, 40)]


def test_csv_has_every_block_and_flag_names():
    import csv
    import io

    from stemlive.dashboards.exports import maps_csv

    maps = _maps(flags=np.array([[0b101, 0]], np.uint32))
    text = maps_csv(maps, np.array([[True, False]]), ["vacuum", "error", "ambiguous"], (4, 4), 0.1)
    rows = list(csv.DictReader(io.StringIO(text)))
    assert len(rows) == 2 and rows[0]["flags"] == "vacuum, ambiguous" and rows[1]["done"] == "0"
    assert float(rows[1]["thickness_nm"]) == 30.0 and float(rows[1]["x0_nm"]) == pytest.approx(0.4)


def test_store_feed_follows_a_store_being_written(tmp_path):
    from stemlive.live.store import ResultStore
    from stemlive.models.pacbed_analysis import PacbedEstimate

    s = ResultStore.create(tmp_path / "r.h5", LAYOUT, alpha_mrad=13.6, kv=200, scan_step_nm=0.1, models=[{"id": "m"}])
    feed = StoreFeed(tmp_path / "r.h5", poll_s=0.05)
    try:
        assert feed.following and feed.snapshot.status["state"] == "running"
        v0 = feed.snapshot.version
        est = PacbedEstimate(center_px=(2.0, 2.0), radius_px=1.0, rotation_deg=0.0, thickness_nm=21.0,
                             thickness_sigma_nm=1.0, tilt_mrad=(0.1, 0.2), tilt_sigma_mrad=(0.1, 0.1),
                             tilt_crystal_mrad=(0.1, 0.2), background=0.0, in_range=True)
        s.write_blocks(np.array([[1, 2]]), np.ones((1, 5, 5), np.float32), np.array([16]), [est],
                       np.array([False]), 16)
        assert wait_for(lambda: feed.snapshot.maps["thickness_nm"][1, 2] == 21.0)
        changes = [c for v, c in feed.snapshot.dirty_rows.items() if v > v0]
        assert ("blocks", {1}) in changes and feed.latest_block == (1, 2)
        img = np.full(LAYOUT.scan_shape, np.nan, np.float32)
        img[3] = 5.0
        s.write_virtual({"bf": img}, 32)
        assert wait_for(lambda: feed.snapshot.virtual["bf"][3, 0] == 5.0)
        assert ("virtual", {3}) in feed.snapshot.dirty_rows.values()
        s.finish("complete")
        assert wait_for(lambda: feed.snapshot.status["state"] == "complete")
        assert wait_for(lambda: not feed.following)  # done: it stops polling
        assert "elapsed_s" in feed.snapshot.status
    finally:
        feed.close()


def test_block_pacbed_requests_run_off_the_event_loop():
    """A slow REQ (here 1 s) must not hold the session's callback: the answer lands on a next tick."""
    import threading

    from bokeh.document import Document

    from stemlive.dashboards.app import Page
    from stemlive.dashboards.snapshot import Snapshot

    maps = {k: np.full((2, 3, *t), f, d) for k, (t, d, f) in __import__("stemlive.live.store", fromlist=["x"]).MAP_FIELDS.items()}
    maps["in_range"][:] = 1
    maps["thickness_nm"][:] = 10.0
    snap = Snapshot(meta={"scan_step_nm": 0.1, "alpha_mrad": 13.6, "mrad_per_px": 1.0}, status={"state": "running"},
                    scan_shape=(8, 12), block_shape=(4, 4), flag_names=["vacuum"], maps=maps,
                    virtual={"bf": np.zeros((8, 12), np.float32)}, done=np.ones((2, 3), bool),
                    counts=np.ones((2, 3), int), version=1)
    release = threading.Event()

    class SlowFeed:
        lock = threading.Lock()
        snapshot = snap
        latest_block = (0, 0)

        def block_pacbed(self, i, j):
            release.wait(5)
            return {"done": True, "frames": 16, "estimate": {"thickness_nm": 10.0, "center_px": [2, 2],
                                                             "radius_px": 1.0}, "meta": snap.meta}, np.ones((5, 5))

    doc = Document()
    page = Page(doc, SlowFeed())
    ticks = []
    doc.add_next_tick_callback = ticks.append  # what the server's loop would run on its next tick
    t = time.perf_counter()
    page.show_block(1, 2)
    assert time.perf_counter() - t < 0.5  # returned at once, the request waits on its own thread
    assert "pinned" not in page.pacbed.figure.title.text
    release.set()
    for _ in range(2):  # the latest block (asked for on the first draw), then the pinned one
        assert wait_for(lambda: ticks)
        ticks.pop(0)()
    assert page.pacbed.figure.title.text == "PACBED — pinned to block (1, 2)"
    assert page.chosen_source.data["left"] == [2 * 4 * 0.1]
    # the browser's acknowledgement carries its measured last frame -> drawn delay
    page.ack.data = {"msg": ["1 0.42"]}
    assert page.frame_delay_s == pytest.approx(0.42) and page._browser_ready()
    assert "No library fit" in page.pacbed.fit_info.text  # this feed sent none: said in words


def test_row_patches_group_runs_of_rows():
    from stemlive.dashboards.patches import row_patch, row_runs

    assert row_runs([5, 1, 2, 3, 7, 8]) == [(1, 4), (5, 6), (7, 9)]
    img = np.arange(20.0).reshape(4, 5)
    (idx, vals), = row_patch(img, [1, 2])
    assert idx == (0, slice(1, 3), slice(None)) and np.array_equal(vals, img[1:3].ravel())


def test_holder_correction_brings_the_zone_axis_onto_the_beam():
    """DESIGN.md: tilt t is the beam relative to the zone axis (detector frame), i.e. the zone axis
    sits at -t from the beam.  The holder's Δα (right-handed about its α axis a, at φ from detector
    axis 1 towards axis 0) and Δβ (right-handed about -b, b at φ + 90°), applied as 3-D rotations
    in (axis 0, axis 1, beam), put the zone axis on the beam."""
    from scipy.spatial.transform import Rotation

    from stemlive.dashboards.display import holder_correction, holder_text

    assert holder_correction((0.5, -0.2), 0) == pytest.approx((0.5, -0.2))  # α axis along axis 1
    assert holder_correction((0.5, -0.2), 90) == pytest.approx((0.2, 0.5))  # α axis along axis 0
    assert holder_correction((0.5, -0.2), 180) == pytest.approx((-0.5, 0.2))  # both reversed
    rng = np.random.default_rng(3)
    for _ in range(50):
        t = rng.uniform(-8, 8, 2)  # mrad
        phi = rng.uniform(-180, 180)
        da, db = holder_correction(t, phi)
        p = np.radians(phi)
        a, b = np.array([np.sin(p), np.cos(p), 0]), np.array([np.cos(p), -np.sin(p), 0])
        np.testing.assert_allclose(da * b[:2] + db * a[:2], t, atol=1e-12)  # the two moves add up to t
        zone = np.array([-t[0] * 1e-3, -t[1] * 1e-3, 1.0])
        zone /= np.linalg.norm(zone)
        moved = Rotation.from_rotvec(-b * db * 1e-3).apply(Rotation.from_rotvec(a * da * 1e-3).apply(zone))
        left = moved[:2] / moved[2] * 1e3  # mrad off the beam
        assert np.hypot(*left) < 0.01 * max(1.0, np.hypot(*t)), (t, phi, left)
    text = holder_text((0.5, -0.2), 90)
    assert "α by +0.20 mrad (+0.011°)" in text and "β by +0.50 mrad (+0.029°)" in text


def test_a_ticks_changes_leave_as_one_patch_message():
    """What `one_message` sends to each browser connection: one PATCH-DOC with every change of the
    block, in order, minus the echo of a change to the connection it came from."""
    import weakref

    from bokeh.document import Document
    from bokeh.models import ColumnDataSource, Div
    from bokeh.protocol import Protocol

    from stemlive.dashboards.one_message import one_message

    class Socket:
        def __init__(self):
            self.sent = []

        def send_message(self, message):
            self.sent.append(message)
            return None

    class Connection:
        def __init__(self):
            self.protocol, self._socket = Protocol(), Socket()

    class Session:  # the parts of Bokeh's ServerSession that one_message uses
        def __init__(self, doc):
            self._subscribed_connections = [Connection(), Connection()]
            self._current_patch_connection = self._subscribed_connections[1]
            self._pending_writes = []
            self.plain = []
            doc.callbacks.on_change_dispatch_to(self)

        def _document_patched(self, event):  # Bokeh's way: a message per change
            self.plain.append(event)

    class Context:
        pass

    doc = Document()
    divs = [Div(text="a"), Div(text="b")]
    source = ColumnDataSource({"x": [0, 1, 2]})
    for m in (*divs, source):
        doc.add_root(m)
    doc.models.flush_synced()
    ctx = Context()
    ctx._session = session = Session(doc)
    doc._session_context = weakref.ref(ctx)
    echo = Div(text="e")
    doc.add_root(echo)
    doc.models.flush_synced()
    session.plain.clear()
    with one_message(doc):
        divs[0].text = "a1"
        divs[0].text = "a2"  # combined with the one before
        divs[1].text = "b1"
        source.patch({"x": [(1, 10)]})
        echo.set_from_json("text", "from the browser", setter=session)  # a change the browser on connection 1 made
    assert session.plain == []
    first, second = (c._socket.sent for c in session._subscribed_connections)
    assert len(first) == 1 and len(second) == 1 and session._pending_writes == [None, None]
    events = first[0].content["events"]
    assert [e["kind"] for e in events] == ["ModelChanged", "ModelChanged", "ColumnsPatched", "ModelChanged"]
    assert [e.get("new") for e in events if e["kind"] == "ModelChanged"] == ["a2", "b1", "from the browser"]
    assert len(second[0].content["events"]) == 3  # no echo
    # outside a server session: Bokeh's own way, a message per change
    doc._session_context = None
    with one_message(doc):
        divs[0].text = "a3"
        divs[1].text = "b3"
    assert len(session.plain) == 2
