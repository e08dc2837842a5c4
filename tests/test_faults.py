"""Faults on the detector stream become clear errors in bounded time, and the store keeps every
block analysed before the fault (state aborted, with the reason)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from stemlive.live.store import read_store

from .helpers import free_port

from .faulty_dectris import FaultyDetector

AT = 1000  # the fault strikes at this frame: two block rows (2 × 8 × 48 frames) are complete before it


def calibration(meta: dict | None) -> list[str]:
    """The scan's detector calibration as options (its meta, params.json); none without a scan."""
    return [] if meta is None else ["--mrad-per-px", str(meta["mrad_per_px"])]


def run_live(tmp_path, api_port, data_port, *extra, meta=None, timeout=120):
    out = tmp_path / "r.h5"
    cmd = [sys.executable, "-m", "stemlive.live.cli", "live", "--detector", "dectris", "--api-port", str(api_port),
           "--data-port", str(data_port), "--scan-shape", "32", "48", "--block", "8", "8", "--alpha-mrad", "13.6",
           "--kv", "200", *calibration(meta), "--out", str(out), "--stall-timeout", "6",
           "--pub", "tcp://127.0.0.1:0", "--rep", "tcp://127.0.0.1:0", "--quiet", "--executor", "inline", *extra]
    t = time.monotonic()
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    return res, time.monotonic() - t, out


def assert_aborted_keeping_blocks(out, min_blocks: int, reason_part: str):
    r = read_store(out)
    assert r["attrs"]["state"] == "aborted", r["attrs"]["state"]
    assert reason_part in r["attrs"]["reason"], r["attrs"]["reason"]
    done = r["blocks"]["done"]
    assert done.sum() >= min_blocks and done[:2].all()  # the block rows completed before the fault
    assert np.isfinite(r["maps"]["thickness_nm"][:2]).all()


@pytest.mark.parametrize("fault, message", [
    ("malformed-json", "deserialization failed"),
    ("wrong-shape", "decode failed"),
    ("wrong-dtype", "decode failed"),
    ("truncated", "decode failed"),
    ("out-of-order", "frame id mismatch"),
    ("missing-frame", "frame id mismatch"),
])
def test_protocol_faults_become_clear_errors(live_scan, tmp_path, fault, message):
    _, meta, data, _ = live_scan
    with FaultyDetector(data, fault, at=AT) as det:
        res, took, out = run_live(tmp_path, det.api_port, det.data_port, meta=meta)
    assert res.returncode == 1, res.stderr[-2000:]
    assert "acquisition aborted" in res.stderr and message in res.stderr
    assert took < 60
    assert_aborted_keeping_blocks(out, 12, message)


def test_detector_that_stops_mid_scan(live_scan, tmp_path):
    _, meta, data, _ = live_scan
    with FaultyDetector(data, "stops", at=AT) as det:
        res, took, out = run_live(tmp_path, det.api_port, det.data_port, meta=meta)
    assert res.returncode == 1 and "no frames for 6 s after" in res.stderr, res.stderr[-2000:]
    assert took < 60
    assert_aborted_keeping_blocks(out, 12, "detector stopped")



def paced_run_to_first_block(d, tmp_path, *extra, executor="inline", dwell_us=5000):
    """`stemlive sim-detector` (paced, own process group) and `stemlive live` against it, returned
    once the first block row is in the store: (simulator, live process).  ``d``: the scan's
    directory (frames.npy, and params.json with its calibration)."""
    meta = json.loads((d / "params.json").read_text())
    api, data_port = free_port(), free_port()
    sim = subprocess.Popen([sys.executable, "-m", "stemlive.live.cli", "sim-detector", str(d / "frames.npy"),
                            "--dwell-us", str(dwell_us), "--api-port", str(api), "--data-port", str(data_port),
                            "--cache", str(tmp_path)], stdout=subprocess.PIPE, text=True, start_new_session=True)
    assert "simulated DECTRIS detector" in sim.stdout.readline()
    proc = subprocess.Popen([sys.executable, "-m", "stemlive.live.cli", "live", "--detector", "dectris",
                             "--api-port", str(api), "--data-port", str(data_port),
                             "--scan-shape", "32", "48", "--block", "8", "8", "--alpha-mrad", "13.6", "--kv", "200",
                             *calibration(meta), "--out", str(tmp_path / "r.h5"), "--stall-timeout", "6",
                             "--pub", "tcp://127.0.0.1:0", "--rep", "tcp://127.0.0.1:0", "--quiet",
                             "--executor", executor, *extra], stderr=subprocess.PIPE, text=True,
                            # a test run started in the background (`cmd &`) ignores SIGINT, and so
                            # would the child: give it the default, as an interactive shell would
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    t = time.monotonic()
    while time.monotonic() - t < 180 and proc.poll() is None:
        time.sleep(0.2)
        try:
            if read_store(tmp_path / "r.h5")["blocks"]["done"].any():
                return sim, proc
        except (OSError, KeyError, ValueError):
            pass
    kill_group(sim)
    proc.kill()
    raise AssertionError(f"no block stored within {time.monotonic() - t:.0f} s: {proc.communicate()[1][-2000:]}")


def kill_group(proc) -> None:
    os.killpg(proc.pid, signal.SIGKILL)  # the simulator and its REST process, without warning
    proc.wait()


def test_killed_simulator(live_scan, tmp_path):
    """`stemlive sim-detector`, paced, killed (SIGKILL) part-way through the scan."""
    sim, proc = paced_run_to_first_block(live_scan[0], tmp_path)
    kill_group(sim)
    t = time.monotonic()
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 1, err[-2000:]
    assert "no frames for 6 s" in err and time.monotonic() - t < 30
    r = read_store(tmp_path / "r.h5")
    assert r["attrs"]["state"] == "aborted" and 0 < r["blocks"]["done"].sum() < 24


def test_stream_that_never_starts_active(live_scan, tmp_path):
    _, meta, data, _ = live_scan
    with FaultyDetector(data, "never-starts", at=0) as det:
        res, took, out = run_live(tmp_path, det.api_port, det.data_port, meta=meta)
    assert res.returncode == 1 and "no frames for 6 s after 0" in res.stderr, res.stderr[-2000:]
    assert read_store(out)["attrs"]["state"] == "aborted"


def test_stream_that_never_starts_passive(live_scan, tmp_path):
    _, meta, data, _ = live_scan
    with FaultyDetector(data, "never-starts", at=0) as det:
        res, took, out = run_live(tmp_path, det.api_port, det.data_port, "--mode", "passive", "--arm-timeout", "3",
                                  meta=meta)
    assert res.returncode == 1 and "no acquisition was armed within 3 s" in res.stderr, res.stderr[-2000:]


def test_no_detector_there(tmp_path):
    res, took, out = run_live(tmp_path, 1, 2, "--arm-timeout", "3")
    assert res.returncode == 1 and "cannot connect" in res.stderr, res.stderr[-2000:]


def test_ctrl_c_leaves_an_honest_store(live_scan, tmp_path):
    """SIGINT mid-scan: exit 130 within seconds, state aborted with the reason, completed blocks kept."""
    sim, proc = paced_run_to_first_block(live_scan[0], tmp_path)
    try:
        proc.send_signal(signal.SIGINT)
        t = time.monotonic()
        _, err = proc.communicate(timeout=30)
        assert time.monotonic() - t < 15
    finally:
        kill_group(sim)
    assert proc.returncode == 130, err[-2000:]
    r = read_store(tmp_path / "r.h5")
    assert r["attrs"]["state"] == "aborted" and "Ctrl-C" in r["attrs"]["reason"]
    assert 0 < r["blocks"]["done"].sum() < 24


def assert_no_survivors(pids: list[int], within: float = 15.0) -> None:
    """None of these processes (a run's workers, resource tracker, ...) is alive after ``within`` s."""
    import psutil

    t = time.monotonic()
    alive = pids
    while time.monotonic() - t < within:
        alive = [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
        if not alive:
            return
        time.sleep(0.2)
    cmds = []
    for p in alive:
        try:
            cmds.append(" ".join(psutil.Process(p).cmdline())[:120])
        except psutil.Error:
            pass
    raise AssertionError(f"{len(alive)} processes outlived stemlive: {cmds}")


@pytest.mark.parametrize("how", ["SIGINT", "SIGTERM", "SIGKILL", "stall"])
def test_every_abort_ends_the_whole_process_tree(live_scan, tmp_path, how):
    """Pipelined executor: Ctrl-C, SIGTERM, SIGKILL of `stemlive live`, or the detector dying
    mid-scan -- no worker or resource tracker outlives it; SIGINT/SIGTERM leave an honest store."""
    import psutil

    sim, proc = paced_run_to_first_block(live_scan[0], tmp_path, "--workers", "2", executor="pipelined",
                                         dwell_us=20000)
    try:
        children = [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
        assert len(children) >= 2, "the pipelined workers should be running"
        if how == "stall":
            kill_group(sim)
        else:
            proc.send_signal(getattr(signal, how))
        _, err = proc.communicate(timeout=60)
    finally:
        if sim.poll() is None:
            kill_group(sim)
    assert_no_survivors(children)
    if how == "SIGKILL":
        return
    code = {"SIGINT": 130, "SIGTERM": 143, "stall": 1}[how]
    assert proc.returncode == code, (proc.returncode, err[-2000:])
    r = read_store(tmp_path / "r.h5")
    reason = {"SIGINT": "Ctrl-C", "SIGTERM": "SIGTERM", "stall": "no frames for 6 s"}[how]
    assert r["attrs"]["state"] == "aborted" and reason in r["attrs"]["reason"], (r["attrs"]["state"], err[-3000:])
    assert 0 < r["blocks"]["done"].sum() < 24


def test_a_slow_healthy_stream_is_never_aborted(live_scan, tmp_path):
    """One block spanning the whole scan: no UDF result until the end, while frames arrive at
    200/s.  The watchdog counts frames received, so a 3 s stall timeout never fires."""
    api, data_port = free_port(), free_port()
    sim = subprocess.Popen([sys.executable, "-m", "stemlive.live.cli", "sim-detector",
                            str(live_scan[0] / "frames.npy"), "--dwell-us", "5000", "--api-port", str(api),
                            "--data-port", str(data_port), "--cache", str(tmp_path / "new" / "cache")],
                           stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert "simulated DECTRIS detector" in sim.stdout.readline()  # and --cache NEWDIR was created
        out = tmp_path / "slow.h5"
        res = subprocess.run([sys.executable, "-m", "stemlive.live.cli", "live", "--detector", "dectris",
                              "--api-port", str(api), "--data-port", str(data_port), "--scan-shape", "32", "48",
                              "--block", "32", "48", "--alpha-mrad", "13.6", "--kv", "200", *calibration(live_scan[1]),
                              "--out", str(out), "--stall-timeout", "3", "--no-publish", "--quiet",
                              "--executor", "inline", "--atoms", "off"], capture_output=True, text=True, timeout=120)
    finally:
        kill_group(sim)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "complete: 1/1 blocks, 1536 frames" in res.stdout


def test_a_detector_api_that_never_answers(tmp_path):
    """A REST endpoint that accepts the connection and never answers: a clear error in bounded time."""
    import socket

    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    try:
        res, took, out = run_live(tmp_path, srv.getsockname()[1], free_port(), timeout=90)
    finally:
        srv.close()
    assert res.returncode == 1 and "did not answer within" in res.stderr, res.stderr[-2000:]
    assert took < 40 and not out.exists()


def test_record_never_replaces_a_file(tmp_path):
    rec = tmp_path / "p.npy"
    rec.write_bytes(b"raw frames of an earlier acquisition")
    res, _, out = run_live(tmp_path, free_port(), free_port(), "--record", str(rec))
    assert res.returncode == 2 and "--record" in res.stderr and "exists" in res.stderr, res.stderr[-2000:]
    assert rec.read_bytes() == b"raw frames of an earlier acquisition" and not out.exists()


def test_an_aborted_overwrite_keeps_the_earlier_store(live_scan, tmp_path):
    """--overwrite and the detector stops mid-scan: the earlier store is as it was; this run's
    blocks are beside it (r.incomplete.h5, aborted); the dropped frames and blocks are counted."""
    _, meta, data, _ = live_scan
    out = tmp_path / "r.h5"
    out.write_bytes(b"an earlier result")
    with FaultyDetector(data, "stops", at=AT) as det:
        res, took, _ = run_live(tmp_path, det.api_port, det.data_port, "--overwrite", meta=meta)
    assert res.returncode == 1, res.stderr[-2000:]
    assert out.read_bytes() == b"an earlier result"
    assert "r.incomplete.h5" in res.stderr
    assert_aborted_keeping_blocks(tmp_path / "r.incomplete.h5", 12, "left as it was")
    r = read_store(tmp_path / "r.incomplete.h5")
    assert r["attrs"]["frames_dropped"] == 32 * 48 - int(r["progress"][0]) > 0
    assert r["attrs"]["blocks_dropped"] == 24 - r["blocks"]["done"].sum()


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGKILL"])
def test_the_simulator_leaves_no_process_behind(live_scan, tmp_path, sig):
    import psutil

    sim = subprocess.Popen([sys.executable, "-m", "stemlive.live.cli", "sim-detector", str(live_scan[0] / "frames.npy"),
                            "--api-port", "0", "--data-port", "0", "--cache", str(tmp_path)],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert "simulated DECTRIS detector" in sim.stdout.readline()
    children = [c.pid for c in psutil.Process(sim.pid).children(recursive=True)]
    assert children, "the REST API runs in a child process"
    sim.send_signal(getattr(signal, sig))
    sim.communicate(timeout=30)
    assert_no_survivors(children)
    if sig == "SIGTERM":
        assert sim.returncode == 0
