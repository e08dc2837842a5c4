"""The dashboard in a real browser (headless Debian Chromium) against a live engine and simulator:
the page grows while the scan runs, survives a dashboard restart, and every control on it is
clicked once the scan is complete (tests/dashboard_controls.py), with no browser console error."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from stemlive.live.store import read_store

from .helpers import free_port

from . import browser as br
from .dashboard_controls import exercise_controls, store_ring

pytestmark = pytest.mark.skipif(br.available() is not None, reason=str(br.available()))
ARTIFACTS = Path(__file__).resolve().parent.parent / ".test-artifacts"



def stemlive(*args, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "stemlive.live.cli", *args], start_new_session=True, **kw)


def kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


HOLDER_AXIS_DEG = 30.0  # the live test's holder: region statistics give α/β too


def start_dashboard(sub, req, port) -> subprocess.Popen:
    dash = stemlive("dashboard", "--sub", sub, "--req", req, "--port", str(port),
                    "--holder-axis-deg", str(HOLDER_AXIS_DEG), stdout=subprocess.PIPE, text=True)
    assert "dashboard: http://127.0.0.1:" in dash.stdout.readline()
    return dash


def finite_count(values) -> int:
    return sum(v is not None for row in values for v in row)


def test_dashboard_live(live_scan, tmp_path):
    d, meta, _, _ = live_scan
    api, data, pub, rep, web = (free_port() for _ in range(5))
    sub_addr, req_addr = f"tcp://127.0.0.1:{pub}", f"tcp://127.0.0.1:{rep}"
    store = tmp_path / "r.h5"
    procs = []
    drivers = []
    try:
        sim = stemlive("sim-detector", str(d / "frames.npy"), "--dwell-us", "60000", "--api-port", str(api),
                       "--data-port", str(data), "--cache", str(tmp_path), stdout=subprocess.PIPE, text=True)
        procs.append(sim)
        assert "simulated DECTRIS detector" in sim.stdout.readline()
        dash = start_dashboard(sub_addr, req_addr, web)  # up before the engine: the page waits for it
        procs.append(dash)
        engine = stemlive("live", "--detector", "dectris", "--api-port", str(api), "--data-port", str(data),
                          "--scan-shape", "32", "48", "--block", "8", "8", "--alpha-mrad", "13.6", "--kv", "200",
                          "--mrad-per-px", str(meta["mrad_per_px"]), "--scan-step-nm", str(meta["scan_step_nm"]),
                          "--out", str(store), "--pub", sub_addr,
                          "--rep", req_addr, "--quiet", "--executor", "inline", "--com", "--nice", "5")
        procs.append(engine)
        url = f"http://127.0.0.1:{web}/"
        a = br.browser()
        drivers.append(a)
        a.get(url)
        br.wait_for(lambda: any(w in br.text_of(a, "status") for w in ("Scanning", "Waiting for the first frames")),
                    what="status: scanning")
        # the engine runs at the priority it was given (field 19 of /proc/PID/stat: its nice value)
        stat = Path(f"/proc/{engine.pid}/stat").read_text()
        assert int(stat[stat.rindex(")") + 2:].split()[16]) == 5
        # maps fill in as the simulator streams
        first = br.wait_for(lambda: finite_count(br.model_data(a, "source-thickness") or [[]]), what="a first block")
        br.wait_for(lambda: finite_count(br.model_data(a, "source-thickness")) > first, what="more blocks")
        # the status line in words: the browser's own measure of a block's last frame -> drawn here
        status = br.wait_for(lambda: (lambda t: t if "after its last frame reached the engine" in t else None)(
            br.text_of(a, "status")), 20, what="the last frame -> page delay in the status line")
        assert "Scanning" in status and "blocks analysed" in status and "frames/s" in status, status
        assert "— 0 frames/s" not in status, status  # measured between the frame count's changes
        frame_delays = a.execute_script("return window.stemliveFrameDelays || []")
        assert frame_delays and all(0 <= v < 60 for v in frame_delays), frame_delays
        print(f"\nmid-scan status: {status}\nlast frame -> drawn in the browser: {len(frame_delays)} updates, "
              f"median {np.median(frame_delays) * 1e3:.0f} ms, max {max(frame_delays) * 1e3:.0f} ms", flush=True)
        # the PACBED panel follows the latest block while the scan runs
        br.wait_for(lambda: a.execute_script("const m = Bokeh.documents[0].get_model_by_name('source-pacbed');"
                                             "return m.data.image.length > 0"), 20, what="a PACBED mid-scan")
        assert "following the latest block" in br.model_prop(a, "pacbed", "title.text")
        ARTIFACTS.mkdir(exist_ok=True)
        time.sleep(0.5)  # drawn
        a.save_screenshot(str(ARTIFACTS / "dashboard-midscan.png"))
        assert br.console_errors(a) == []  # the page loaded and updated without errors
        # the dashboard dies mid-scan; the engine goes on without it
        done_before = int(read_store(store)["blocks"]["done"].sum())
        assert done_before < 24, "the scan finished too early for the restart test"
        delays_before = a.execute_script("return window.stemliveFrameDelays || []")  # the page reloads below
        kill(dash)
        br.wait_for(lambda: int(read_store(store)["blocks"]["done"].sum()) > done_before, what="engine progress")
        procs.append(start_dashboard(sub_addr, req_addr, web))
        lost = br.console_errors(a)  # while the server was down: the websocket failed, as it should
        # a server that goes away mid-request shows as refused, reset or empty responses, or a failed websocket
        unexpected = [e["message"] for e in lost
                      if not any(s in e["message"] for s in ("net::ERR_", "websocket", "WebSocket"))]
        assert unexpected == [], "\n".join(unexpected)
        a.get(url)  # the old page's websocket died with the server
        b = br.browser()
        drivers.append(b)
        b.get(url)
        try:
            br.wait_for(lambda: finite_count(br.model_data(b, "source-thickness") or [[]])
                        >= int(read_store(store)["blocks"]["done"].sum()) - 2, what="the full state after a restart")
        except TimeoutError:  # what the page said instead (e.g. the engine's REP did not answer)
            print(f"\nno full state after the restart: the page says {br.text_of(b, 'status')!r}; "
                  f"{finite_count(br.model_data(b, 'source-thickness') or [[]])} blocks shown, "
                  f"{int(read_store(store)['blocks']['done'].sum())} stored", flush=True)
            raise
        # the operator moves the HAADF ring while the scan runs (on the reloaded page: the restart comes
        # first, two block rows in -- LiberTEM-live hands frames over a block row at a time, and a restart
        # one row before the end raced the engine's exit): the engine sums it from its profiles (REP),
        # and the page keeps it, asking again, as frames come
        br.wait_for(lambda: br.model_prop(a, "ring-haadf", "value") is not None, 30, what="the ring sliders")
        br.drag_slider(a, "ring-haadf", 0, 0.3)
        live_ring = br.wait_for(lambda: br.model_prop(a, "ring-haadf", "value_throttled"), 10, what="the HAADF slider let go")
        live_delay = br.wait_for(lambda: (lambda v: v[-1] if v else None)(
            a.execute_script("return window.stemliveRingDelays || []")), 20, what="the HAADF ring redrawn")
        info = br.text_of(a, "ring-info")
        print(f"\nmid-scan HAADF ring {live_ring} mrad: slider let go -> redrawn {live_delay * 1e3:.0f} ms ({info})",
              flush=True)
        assert "from the engine" in info
        shown = finite_count(br.model_data(a, "source-haadf"))
        if shown < 32 * 48:  # the last block row may have come during the restart: nothing left to grow
            br.wait_for(lambda: finite_count(br.model_data(a, "source-haadf")) > shown, 20,
                        what="the operator's ring growing with the scan")
        else:
            print("(the scan's frames were all in before the ring was set: its growth is not checked this run)")
        # a session that sets its HAADF ring after the restart keeps it to the end of the scan
        br.wait_for(lambda: br.model_prop(b, "ring-haadf", "value") is not None, 30, what="the ring sliders")
        br.drag_slider(b, "ring-haadf", 0, 0.3)
        late_ring = br.wait_for(lambda: br.model_prop(b, "ring-haadf", "value_throttled"), 10, what="the HAADF slider let go")
        assert engine.wait(timeout=120) == 0
        final = read_store(store)
        assert final["attrs"]["state"] == "complete"
        want = final["maps"]["thickness_nm"]
        def same(v):  # every block, with its final (library-checked) value: checks land after the networks'
            return v if v and finite_count(v) == want.size and np.allclose(np.array(v, float), want, rtol=1e-6) else None

        for drv in (a, b):  # both sessions show the store's numbers
            got = br.wait_for(lambda drv=drv: same(br.model_data(drv, "source-thickness")),
                              what="all blocks in the browser, as stored")
            np.testing.assert_allclose(np.array(got, float), want, rtol=1e-6)
        br.wait_for(lambda: "Finished" in br.text_of(a, "status"), what="status: finished")
        done_text = br.text_of(a, "status")
        assert "took" in done_text and ("no frames lost" in done_text or "frames lost" in done_text), done_text
        frame_delays = delays_before + [v for drv in (a, b) for v in
                                        drv.execute_script("return window.stemliveFrameDelays || []")]
        print(f"\nfinished status: {done_text}\nlast frame -> drawn in the browser over the scan (both "
              f"sessions): {len(frame_delays)} updates, median {np.median(frame_delays) * 1e3:.0f} ms, "
              f"90th pct {np.percentile(frame_delays, 90) * 1e3:.0f} ms", flush=True)
        # the CoM maps (--com) as stored, in both sessions
        for key in ("com_y", "com_x", "com_magnitude", "idpc"):
            want_com = final["virtual"][key]
            for drv in (a, b):
                got = br.wait_for(lambda drv=drv, key=key: (lambda v: v if v and finite_count(v) == want_com.size
                                                            else None)(br.model_data(drv, f"source-{key}")),
                                  what=f"the {key} map")
                np.testing.assert_allclose(np.array(got, float), want_com, rtol=1e-5, atol=1e-6, err_msg=key)
        # the atom table is drawn over the virtual images, every column of the store
        n_atoms = len(final["atoms"]["positions"])
        assert n_atoms > 0
        shown = br.wait_for(lambda: (lambda n: n if n == n_atoms else None)(a.execute_script(
            "const m = Bokeh.documents[0].get_model_by_name('source-atoms'); return m ? m.data.x.length : -1")),
            what="the atom overlay")
        assert shown == n_atoms
        # a block's PACBED as recorded (the scan's frames), then every control of the page
        br.wait_for(lambda: a.execute_script("const m = Bokeh.documents[0].get_model_by_name('source-pacbed');"
                                             "return m.data.image.length ? m.data.image[0].shape : null"), 30,
                    what="the latest block's PACBED")
        shape = a.execute_script("return Bokeh.documents[0].get_model_by_name('source-pacbed').data.image[0].shape")
        assert list(shape) == list(meta["frame_shape"])
        # a checked block: the library's fitted pattern and the difference beside its PACBED
        br.wait_for(lambda: br.model_data(a, "source-pacbed-fit") is not None, 30, what="the library fit")
        assert "Library fit" in br.text_of(a, "pacbed-fit-info")
        wide = a.execute_script("const e = document.documentElement; return [e.scrollWidth, e.clientWidth]")
        assert wide[0] <= wide[1], f"the page is {wide[0]} px wide in a {wide[1]} px window"
        a.execute_script("window.scrollTo(0, 0)")  # the page from its top, as it opens
        time.sleep(0.3)
        a.save_screenshot(str(ARTIFACTS / "dashboard-finished.png"))
        # the ring set after the restart covers the whole scan, as summed from the store's profiles
        want = store_ring(final, *late_ring, "mrad")
        assert np.isfinite(want).all()
        br.wait_for(lambda: np.allclose(np.array(br.model_data(b, "source-haadf"), float), want, rtol=1e-4), 30,
                    what="the operator's HAADF ring over the whole scan")
        exercise_controls(a, final, tmp_path / "downloads", holder_axis_deg=HOLDER_AXIS_DEG)
        # the atom overlay, ticked on by the controls' test, over the virtual images
        grid = a.execute_script("const m = Bokeh.documents[0].get_model_by_name('virtual-grid');"
                                "const v = Bokeh.index.find_one(m); v.el.scrollIntoView(); return v.el")
        grid.screenshot(str(ARTIFACTS / "dashboard-atoms.png"))
        for drv in drivers:
            assert br.console_errors(drv) == []
    finally:
        for drv in drivers:
            drv.quit()
        for p in procs:
            kill(p)


def write_blocks_slowly(store, layout, n_blocks: int, pause_s: float, rng) -> None:
    """A stand-in run writing a store block by block (synthetic estimates), then finishing it."""
    from stemlive.models.pacbed_analysis import PacbedEstimate

    ny, nx = layout.grid_shape
    sig = layout.sig_shape
    sy, sx = layout.scan_shape
    yy, xx = np.mgrid[:sig[0], :sig[1]]
    img = np.full(layout.scan_shape, np.nan, np.float32)
    for k, (i, j) in enumerate(np.ndindex(ny, nx)):
        if k >= n_blocks:
            break
        est = PacbedEstimate(center_px=(sig[0] / 2, sig[1] / 2), radius_px=sig[0] / 5, rotation_deg=0.0,
                             thickness_nm=10 + 2 * j + rng.normal(0, 0.5), thickness_sigma_nm=1.0 + 6 * ((i + j) % 5 == 0),
                             tilt_mrad=(0.3 * (i - ny / 2), 0.2 * (j - nx / 2)), tilt_sigma_mrad=(0.1, 0.1),
                             tilt_crystal_mrad=(0.3 * (i - ny / 2), 0.2 * (j - nx / 2)), background=0.0,
                             in_range=True, flags=["ambiguous"] if (i * j) % 7 == 3 else [])
        pac = 1000.0 * (np.hypot(yy - sig[0] / 2, xx - sig[1] / 2) < sig[0] / 5) + rng.poisson(5, sig)
        store.write_blocks(np.array([[i, j]]), pac[None].astype(np.float32), np.array([64]), [est],
                           np.array([False]), (k + 1) * 64)
        by, bx = layout.block_shape
        img[i * by:(i + 1) * by, j * bx:(j + 1) * bx] = rng.normal(100, 10, (by, bx))
        store.write_virtual({"bf": img, "haadf": img}, (k + 1) * 64)
        if layout.radial_bins:  # per-frame profiles: a bright disk and a tail that varies with the block
            rr, cc = np.mgrid[i * by:(i + 1) * by, j * bx:(j + 1) * bx]
            r = (np.arange(layout.radial_bins) + 0.5) * layout.radial_bin_px
            prof = (np.where(r < 8, 50.0 * r, 5.0 * r * np.exp(-r / (6 + j))) * (1 + 0.1 * i))
            prof = prof[None] * rng.uniform(0.8, 1.2, (by * bx, 1))
            store.write_radial((rr * sx + cc).ravel(), prof.astype(np.float32), (sig[0] / 2, sig[1] / 2),
                               radius_px=13.6 / 1.2)
        time.sleep(pause_s)


def test_dashboard_follows_a_store_being_written(tmp_path):
    """`stemlive dashboard RESULT.h5` on a store whose run is still writing it: the page grows with
    the store, says when it is finished, and every control works on it."""
    from stemlive.live.store import ResultStore, StoreLayout

    layout = StoreLayout(scan_shape=(48, 64), block_shape=(8, 8), sig_shape=(40, 40), virtual=("bf", "haadf"),
                         radial_bins=59)
    path = tmp_path / "r.h5"
    store = ResultStore.create(path, layout, alpha_mrad=13.6, kv=200, mrad_per_px=1.2, scan_step_nm=0.1,
                               models=[{"id": "stand-in"}], rings={"bf": [0, 0.5, "alpha"], "haadf": [3, 4.5, "alpha"]})
    rng = np.random.default_rng(1)
    write_blocks_slowly(store, layout, 4, 0.0, rng)
    web = free_port()
    dash = stemlive("dashboard", str(path), "--port", str(web), stdout=subprocess.PIPE, text=True)
    d = None
    try:
        assert "dashboard: http://127.0.0.1:" in dash.stdout.readline()
        d = br.browser()
        d.get(f"http://127.0.0.1:{web}/")
        br.wait_for(lambda: finite_count(br.model_data(d, "source-thickness") or [[]]) == 4, 30, what="the 4 blocks written")
        assert "Scanning" in br.text_of(d, "status")
        writer = threading.Thread(target=write_blocks_slowly, args=(store, layout, 48, 0.05, rng))
        writer.start()
        br.wait_for(lambda: 4 < finite_count(br.model_data(d, "source-thickness")) < 48, 30, what="the page growing")
        ARTIFACTS.mkdir(exist_ok=True)
        d.save_screenshot(str(ARTIFACTS / "dashboard-store-midscan.png"))
        writer.join()
        store.finish("complete")
        br.wait_for(lambda: "Finished" in br.text_of(d, "status"), 30, what="status: finished")
        br.wait_for(lambda: finite_count(br.model_data(d, "source-thickness")) == 48, 30, what="every block")
        final = read_store(path)
        np.testing.assert_allclose(np.array(br.model_data(d, "source-thickness"), float),
                                   final["maps"]["thickness_nm"], rtol=1e-6)
        exercise_controls(d, final, tmp_path / "downloads")
    finally:
        if d is not None:
            d.quit()
        kill(dash)
