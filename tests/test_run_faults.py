"""Replay, reanalyse and the run options under bad input: clear refusals (exit 2) before any work,
outputs that never destroy an input or an earlier result, honest summaries when blocks fail, and
servers that listen on loopback only."""
from __future__ import annotations

import hashlib
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from stemlive.live.cli import main
from stemlive.live.store import read_store

ALPHA, KV = "13.6", "200"


def stemlive(*args, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "stemlive.live.cli", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout)


def digest(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def replay_args(src, out, mrad_per_px, *extra, block=("8", "8"), alpha=ALPHA, kv=KV):
    return ["replay", str(src), "--block", *block, "--alpha-mrad", alpha, "--kv", kv, "--mrad-per-px", str(mrad_per_px),
            "--out", str(out), "--no-publish", "--quiet", *map(str, extra)]


@pytest.fixture(scope="module")
def frames(live_scan):
    return live_scan[0] / "frames.npy"


@pytest.fixture(scope="module")
def mpp(live_scan):
    """The demo scan's detector calibration (its meta, params.json)."""
    return live_scan[1]["mrad_per_px"]


def leftovers(directory: Path, keep: set[str]) -> list[str]:
    """Files a refused or failed run left behind (temporary or half-written)."""
    return sorted(p.name for p in Path(directory).iterdir() if p.name not in keep)


# -- outputs -------------------------------------------------------------------------------------
def test_replay_refuses_to_write_over_its_input(frames, mpp, tmp_path):
    src = tmp_path / "x.npy"
    src.write_bytes(frames.read_bytes())
    before = digest(src)
    for extra in ([], ["--overwrite"]):
        res = stemlive(*replay_args(src, src, mpp, *extra))
        assert res.returncode == 2 and "is the input" in res.stderr, res.stderr[-1500:]
    link = tmp_path / "link.npy"
    link.symlink_to(src)
    res = stemlive(*replay_args(src, link, mpp, "--overwrite"))
    assert res.returncode == 2 and "is the input" in res.stderr
    assert digest(src) == before and leftovers(tmp_path, {"x.npy", "link.npy"}) == []


def test_overwrite_keeps_the_earlier_store_when_the_run_is_refused(frames, mpp, tmp_path):
    """--overwrite, then the publisher's port is taken: the earlier store is untouched, no new
    file, no temporary file; without --overwrite nothing is written either."""
    out = tmp_path / "r.h5"
    assert main(replay_args(frames, out, mpp)) == 0
    before = digest(out)
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = busy.getsockname()[1]
    try:
        args = [a for a in replay_args(frames, out, mpp, "--overwrite") if a != "--no-publish"]
        res = stemlive(*args, "--pub", f"tcp://127.0.0.1:{port}", "--rep", "tcp://127.0.0.1:0")
        assert res.returncode == 2 and "cannot bind" in res.stderr, res.stderr[-1500:]
        fresh = tmp_path / "fresh.h5"
        args = [a for a in replay_args(frames, fresh, mpp) if a != "--no-publish"]
        res = stemlive(*args, "--pub", f"tcp://127.0.0.1:{port}", "--rep", "tcp://127.0.0.1:0")
        assert res.returncode == 2 and not fresh.exists()
    finally:
        busy.close()
    assert digest(out) == before and read_store(out)["attrs"]["state"] == "complete"
    assert leftovers(tmp_path, {"r.h5"}) == []
    res = stemlive(*replay_args(frames, out, mpp))  # no --overwrite: refused, says how
    assert res.returncode == 2 and "--overwrite" in res.stderr and digest(out) == before


def test_overwrite_replaces_only_a_successful_run(frames, mpp, tmp_path):
    out = tmp_path / "r.h5"
    assert main(replay_args(frames, out, mpp)) == 0
    first = read_store(out)["attrs"]["started"]
    assert main(replay_args(frames, out, mpp, "--overwrite")) == 0
    r = read_store(out)
    assert r["attrs"]["state"] == "complete" and r["attrs"]["frames_dropped"] == 0
    assert leftovers(tmp_path, {"r.h5"}) == [] and r["attrs"]["started"] >= first


def test_reanalyse_refuses_its_own_input(frames, mpp, tmp_path):
    out = tmp_path / "r.h5"
    assert main(replay_args(frames, out, mpp)) == 0
    before = digest(out)
    res = stemlive("reanalyse", out, "--out", out, "--overwrite")
    assert res.returncode == 2 and "is the input" in res.stderr and digest(out) == before
    res = stemlive("reanalyse", frames, "--out", tmp_path / "x.h5")  # not a store
    assert res.returncode == 2 and "not an HDF5 file" in res.stderr, res.stderr[-1500:]


# -- shapes and options ---------------------------------------------------------------------------
def test_scan_shape_must_hold_the_files_frames(frames, mpp, tmp_path):
    res = stemlive(*replay_args(frames, tmp_path / "a.h5", mpp, "--scan-shape", "16", "16"))
    assert res.returncode == 2 and "holds 256 frames" in res.stderr and "has 1536" in res.stderr, res.stderr[-1500:]
    for bad in (["0", "0"], ["-1", "4"], ["x", "4"]):
        res = stemlive(*replay_args(frames, tmp_path / "b.h5", mpp, "--scan-shape", *bad))
        assert res.returncode == 2 and "--scan-shape" in res.stderr and "Traceback" not in res.stderr
    out = tmp_path / "c.h5"
    for opt, args in (("--block", replay_args(frames, out, mpp, block=("0", "8"))),
                      ("--alpha-mrad", replay_args(frames, out, mpp, alpha="nan")),
                      ("--kv", replay_args(frames, out, mpp, kv="-200")),
                      ("--workers", replay_args(frames, out, mpp, "--workers", "0"))):
        res = stemlive(*args)
        assert res.returncode == 2 and opt in res.stderr and "Traceback" not in res.stderr, (opt, res.stderr[-800:])
    assert leftovers(tmp_path, set()) == []


def test_raw_files_replay_from_the_command_line(live_scan, mpp, tmp_path):
    data = live_scan[2]
    raw = tmp_path / "scan.raw"
    data.tofile(raw)
    res = stemlive(*replay_args(raw, tmp_path / "r.h5", mpp, "--scan-shape", "32", "48"))
    assert res.returncode == 2 and "--sig-shape" in res.stderr and "--dtype" in res.stderr, res.stderr[-1500:]
    res = stemlive(*replay_args(raw, tmp_path / "r.h5", mpp, "--scan-shape", "32", "48", "--sig-shape",
                                *data.shape[2:], "--dtype", "uint16"))
    assert res.returncode == 0, res.stderr[-1500:]
    assert read_store(tmp_path / "r.h5")["blocks"]["done"].all()


def test_weak_tokens_are_refused(frames, mpp, tmp_path):
    from stemlive.live.publisher import Publisher
    from stemlive.live.state import LiveState
    from stemlive.live.store import StoreLayout

    res = stemlive(*replay_args(frames, tmp_path / "r.h5", mpp, "--token", "a"))
    assert res.returncode == 2 and "too weak" in res.stderr and not (tmp_path / "r.h5").exists()
    state = LiveState(StoreLayout((8, 8), (4, 4), (16, 16)), {})
    with pytest.raises(ValueError, match="too weak"):
        Publisher(state, "tcp://0.0.0.0:0", "tcp://0.0.0.0:0", token="aaaaaaaaaaaaaaaaaaaa")


# -- inputs that give nothing ---------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["nan", "zero", "saturated"])
def test_input_with_nothing_to_analyse_is_not_reported_as_success(tmp_path, kind):
    fill = {"nan": np.nan, "zero": 0.0, "saturated": 65535.0}[kind]
    src = tmp_path / f"{kind}.npy"
    np.save(src, np.full((16, 16, 48, 48), fill, np.float32))
    res = stemlive(*replay_args(src, tmp_path / "r.h5", 3.06))  # any calibration: nothing to analyse
    assert res.returncode == 1, (res.returncode, res.stderr[-1500:])
    assert "4 of 4 blocks could not be analysed" in res.stderr and "nothing useful" in res.stderr
    r = read_store(tmp_path / "r.h5")  # every block keeps its place, flagged
    assert r["blocks"]["done"].all() and r["attrs"]["blocks_failed"] == 4


# -- servers --------------------------------------------------------------------------------------
def listening(procs) -> list[tuple[str, int]]:
    import psutil

    found = []
    for p in procs:
        try:
            found += [(c.laddr.ip, c.laddr.port) for c in p.net_connections(kind="inet") if c.status == "LISTEN"]
        except psutil.Error:
            pass
    return found


def test_local_dask_cluster_listens_on_loopback_only():
    """Dask's protocol carries pickles: a scheduler or worker reachable from the network runs code."""
    import psutil

    from stemlive.live.replay import make_context

    me = psutil.Process()
    before = set(listening([me]))  # other tests' servers in this process are not the cluster's
    ctx = make_context("dask", workers=1)
    try:
        addresses = [a for a in listening([me]) if a not in before] + listening(me.children(recursive=True))
    finally:
        ctx.close()
    assert len(addresses) >= 3  # scheduler, its dashboard, nanny + worker
    assert all(ip in ("127.0.0.1", "::1") for ip, _ in addresses), addresses
