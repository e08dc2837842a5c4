"""The dashboard in a real browser (headless Debian Chromium) against a live engine and simulator:
the page grows while the scan runs, survives a dashboard restart, and every control on it is
clicked once the scan is complete (tests/dashboard_controls.py), with no browser console error."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from stemlive.live.store import read_store

from .helpers import free_port

from . import browser as br
from .dashboard_controls import exercise_controls

pytestmark = pytest.mark.skipif(br.available() is not None, reason=str(br.available()))
ARTIFACTS = Path(__file__).resolve().parent.parent / ".test-artifacts"



def stemlive(*args, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "stemlive.live.cli", *args], start_new_session=True, **kw)


def kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def start_dashboard(sub, req, port) -> subprocess.Popen:
    dash = stemlive("dashboard", "--sub", sub, "--req", req, "--port", str(port), stdout=subprocess.PIPE, text=True)
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
        sim = stemlive("sim-detector", str(d / "frames.npy"), "--dwell-us", "10000", "--api-port", str(api),
                       "--data-port", str(data), "--cache", str(tmp_path), stdout=subprocess.PIPE, text=True)
        procs.append(sim)
        assert "simulated DECTRIS detector" in sim.stdout.readline()
        dash = start_dashboard(sub_addr, req_addr, web)  # up before the engine: the page waits for it
        procs.append(dash)
        engine = stemlive("live", "--detector", "dectris", "--api-port", str(api), "--data-port", str(data),
                          "--scan-shape", "32", "48", "--block", "8", "8", "--alpha-mrad", "13.6", "--kv", "200",
                          "--mrad-per-px", str(meta["mrad_per_px"]), "--scan-step-nm", str(meta["scan_step_nm"]),
                          "--out", str(store), "--pub", sub_addr,
                          "--rep", req_addr, "--quiet", "--executor", "inline")
        procs.append(engine)
        url = f"http://127.0.0.1:{web}/"
        a = br.browser()
        drivers.append(a)
        a.get(url)
        br.wait_for(lambda: any(w in br.text_of(a, "status") for w in ("Scanning", "Waiting for the first frames")),
                    what="status: scanning")
        # maps fill in as the simulator streams
        first = br.wait_for(lambda: finite_count(br.model_data(a, "source-thickness") or [[]]), what="a first block")
        br.wait_for(lambda: finite_count(br.model_data(a, "source-thickness")) > first, what="more blocks")
        ARTIFACTS.mkdir(exist_ok=True)
        a.save_screenshot(str(ARTIFACTS / "dashboard-midscan.png"))
        assert br.console_errors(a) == []  # the page loaded and updated without errors
        # the dashboard dies mid-scan; the engine goes on without it
        done_before = int(read_store(store)["blocks"]["done"].sum())
        assert done_before < 24, "the scan finished too early for the restart test"
        kill(dash)
        br.wait_for(lambda: int(read_store(store)["blocks"]["done"].sum()) > done_before, what="engine progress")
        procs.append(start_dashboard(sub_addr, req_addr, web))
        lost = br.console_errors(a)  # while the server was down: the websocket failed, as it should
        assert all(any(s in e["message"] for s in ("ERR_CONNECTION_REFUSED", "websocket", "WebSocket")) for e in lost), lost
        a.get(url)  # the old page's websocket died with the server
        b = br.browser()
        drivers.append(b)
        b.get(url)
        br.wait_for(lambda: finite_count(br.model_data(b, "source-thickness") or [[]])
                    >= int(read_store(store)["blocks"]["done"].sum()) - 2, what="the full state after a restart")
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
        a.save_screenshot(str(ARTIFACTS / "dashboard-finished.png"))
        exercise_controls(a, final, tmp_path / "downloads")
        for drv in drivers:
            assert br.console_errors(drv) == []
    finally:
        for drv in drivers:
            drv.quit()
        for p in procs:
            kill(p)
