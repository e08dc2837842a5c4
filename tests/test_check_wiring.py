"""The library check wired into the commands: check data lookup, --method, JSON schema 2, the
store's method/fit fields, and the engine's second stage (never holding ingest back)."""
from __future__ import annotations

import json
import shutil
import threading
import time
from dataclasses import replace

import h5py
import numpy as np
import pytest

from stemlive.live.cli import main
from stemlive.live.store import (METHOD_CODES, STORE_FLAGS, ResultStore, StoreLayout, estimate_row, flag_names,
                                 read_store)
from stemlive.models.cards import find_cards
from stemlive.models.checked_analysis import CHECK_SUFFIX, check_data_path
from stemlive.models.compact_library import CompactLibrary, build_compact
from stemlive.models.pacbed_analysis import PacbedEstimate
from stemlive.models.pacbed_check import CheckOutcome
from stemlive.simulate.library import PacbedLibrary

from .helpers import place, two_placed_patterns

ORT = ["--backend", "onnxruntime"]


@pytest.fixture(scope="module")
def compact_file(quadrant_library, tmp_path_factory):
    path = tmp_path_factory.mktemp("compact") / "c.h5"
    build_compact(quadrant_library).save(path)
    return path


@pytest.fixture(scope="module")
def checked_models(tiny_models, compact_file, tmp_path_factory):
    """The tiny models with check data beside their thickness/tilt card."""
    d = tmp_path_factory.mktemp("checked") / "models"
    shutil.copytree(tiny_models, d)
    shutil.copy(compact_file, check_data_path(200, 13.6, d))
    return d


@pytest.fixture(scope="module")
def patterns(quadrant_library):
    return two_placed_patterns(quadrant_library, seed=1)


def analyze(tmp_path, arr, models, *extra):
    src, out = tmp_path / "in.npy", tmp_path / "out.json"
    np.save(src, arr)
    rc = main(["pacbed", "analyze", str(src), "--alpha-mrad", "13.6", "--kv", "200", "--out", str(out), "--overwrite",
               "--models", str(models), *ORT, *extra])
    return rc, (json.loads(out.read_text()) if out.exists() else None)


# -- the check data ---------------------------------------------------------------------------

def test_check_data_is_found_beside_the_card_and_the_shipped_one_is_compact():
    card = find_cards(task="pacbed-thickness-tilt")
    path = check_data_path(200, 13.6)
    assert path.name == "pacbed_SrTiO3_001_200kV_13.6mrad" + CHECK_SUFFIX
    assert path.parent == card[0].path.parent and path.exists()
    assert path.stat().st_size <= 18e6  # ≤ 30 MB for both settings in all
    with h5py.File(path, "r") as f:
        assert f["basis"].dtype == np.float16 and f["coef"].dtype == np.float16
        assert f["basis"].shape[0] == 384 and f.attrs["kv"] == 200 and np.isclose(f.attrs["alpha_mrad"], 13.6)
    assert check_data_path(200, 13.6 * 1.01).name == path.name  # within the cards' tolerance


def test_compact_library_float16_basis_round_trip(compact_file, tmp_path):
    c = CompactLibrary.load(compact_file)  # stored float16, read back float32: still orthonormal rows
    assert c.basis.dtype == np.float32
    np.testing.assert_allclose(c.basis @ c.basis.T, np.eye(len(c.basis)), atol=2e-3)
    c.save(tmp_path / "c32.h5", basis_dtype=np.float32)
    np.testing.assert_array_equal(CompactLibrary.load(tmp_path / "c32.h5").basis, c.basis)


# -- pacbed analyze --method -----------------------------------------------------------------

def test_analyze_checks_by_default_and_writes_schema_2(checked_models, patterns, tmp_path, capsys):
    rc, doc = analyze(tmp_path, patterns, checked_models)
    assert rc == 0 and doc["schema"] == 2 and doc["method"] == "check"
    assert doc["check_data"]["file"].endswith(CHECK_SUFFIX) and doc["check_data"]["kv"] == 200
    for p in doc["patterns"]:
        assert p["method"] == "check"
        assert 0 <= p["fit_quality"] < 1 and p["thickness_nm"] is not None
        assert "thickness_alt_nm" in p and "alt_delta_chi2" in p
        for key in ("center_px", "radius_px", "rotation_deg", "thickness_sigma_nm", "tilt_mrad", "flags"):
            assert key in p  # schema 1's fields keep their names
    assert "warning" not in capsys.readouterr().err
    rc, doc2 = analyze(tmp_path, patterns, checked_models, "--method", "check")
    assert rc == 0 and doc2["patterns"] == doc["patterns"]  # deterministic


def test_analyze_method_network(checked_models, patterns, tmp_path, capsys):
    rc, doc = analyze(tmp_path, patterns, checked_models, "--method", "network")
    assert rc == 0 and doc["schema"] == 2 and doc["method"] == "network" and "check_data" not in doc
    for p in doc["patterns"]:
        assert p["method"] == "network" and p["fit_quality"] is None and p["thickness_alt_nm"] is None
    assert "warning" not in capsys.readouterr().err


@pytest.mark.parametrize("method", [[], ["--method", "check"]])
def test_missing_check_data_falls_back_to_the_network_with_one_warning(tiny_models, patterns, tmp_path, capsys,
                                                                       method):
    rc, doc = analyze(tmp_path, patterns, tiny_models, *method)
    assert rc == 0 and doc["method"] == "network" and all(p["method"] == "network" for p in doc["patterns"])
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert len(warnings) == 1
    assert "stemlive simulate compact-library" in warnings[0] and f"tiny{CHECK_SUFFIX}" in warnings[0]


def _mismatched(checked_models, tmp_path, how):
    d = tmp_path / "models"
    shutil.copytree(checked_models, d)
    path = check_data_path(200, 13.6, d)
    if how == "kv":
        lib = CompactLibrary.load(path)
        replace(lib, kv=300.0).save(path)
    elif how == "alpha":
        lib = CompactLibrary.load(path)
        replace(lib, alpha_mrad=19.1).save(path)
    elif how == "frame":
        with h5py.File(path, "r+") as f:
            f.attrs["canonical_pixels"] = 32
    else:
        path.write_bytes(b"not HDF5 at all")
    return d, path


@pytest.mark.parametrize("how", ["kv", "alpha", "frame", "garbage"])
def test_mismatched_check_data_is_refused_by_name(checked_models, patterns, tmp_path, capsys, how):
    d, path = _mismatched(checked_models, tmp_path, how)
    rc, doc = analyze(tmp_path, patterns, d)
    err = capsys.readouterr().err
    assert rc == 2 and doc is None and str(path) in err and "refused" in err
    rc, doc = analyze(tmp_path, patterns, d, "--method", "network")  # the network alone never reads it
    assert rc == 0


# -- store fields ----------------------------------------------------------------------------

def _estimate(t=12.0, **kw):
    d = dict(center_px=(7.5, 7.5), radius_px=3.0, rotation_deg=0.0, thickness_nm=t, thickness_sigma_nm=1.0,
             tilt_mrad=(0.1, 0.2), tilt_sigma_mrad=(0.1, 0.1), tilt_crystal_mrad=(0.1, 0.2), background=0.0,
             in_range=True, flags=[])
    d.update(kw)
    return PacbedEstimate(**d)


def _outcome(est, flags=("ambiguous",)):
    e = replace(est, thickness_nm=est.thickness_nm + 0.5, flags=list(est.flags) + list(flags))
    return CheckOutcome(e, fit_quality=0.01, thickness_alt_nm=est.thickness_nm + 5, alt_delta_chi2=3.0, blur_px=0.8)


def test_store_flags_keep_their_bits_and_know_the_check_flags():
    assert STORE_FLAGS[:8] == ("vacuum", "not-on-zone", "thickness-at-range-edge", "low-confidence", "saturated",
                               "partial-field", "error", "partial")
    assert {"ambiguous", "model-mismatch"} <= set(STORE_FLAGS) and len(STORE_FLAGS) <= 32


def test_estimate_row_and_store_record_the_method_and_the_fit(tmp_path):
    est = _estimate()
    assert estimate_row(None, False)["method"] == METHOD_CODES["none"]
    net = estimate_row(est, False)
    assert net["method"] == 1 and np.isnan(net["fit_quality"]) and np.isnan(net["thickness_alt_nm"])
    chk = estimate_row(est, True, check=_outcome(est, ("ambiguous", "model-mismatch")))
    assert chk["method"] == 2 and chk["thickness_nm"] == pytest.approx(12.5)
    assert chk["fit_quality"] == pytest.approx(0.01) and chk["thickness_alt_nm"] == pytest.approx(17.0)
    assert set(flag_names(chk["flags"])) == {"ambiguous", "model-mismatch", "partial"}
    layout = StoreLayout((8, 8), (4, 4), (16, 16), virtual=("bf",))
    s = ResultStore.create(tmp_path / "s.h5", layout, alpha_mrad=13.6, kv=200, method="check",
                           check={"file": "x_check.h5"})
    idx = np.array([[0, 0], [1, 1]])
    s.write_blocks(idx, np.ones((2, 16, 16), np.float32), np.array([16, 16]), [est, est], np.array([False, False]), 32)
    s.write_maps(idx[:1], {k: v[None] for k, v in chk.items()})
    s.finish("complete", checks_done=1, checks_unfinished=1, checks_failed=0)
    r = read_store(tmp_path / "s.h5")
    assert r["attrs"]["schema"] == 2 and r["attrs"]["method"] == "check" and r["attrs"]["check"]["file"] == "x_check.h5"
    assert r["maps"]["method"].tolist() == [[2, 0], [0, 1]]
    assert r["maps"]["thickness_nm"][0, 0] == pytest.approx(12.5) and r["maps"]["thickness_nm"][1, 1] == 12.0
    assert r["maps"]["fit_quality"][0, 0] == pytest.approx(0.01) and np.isnan(r["maps"]["fit_quality"][1, 1])
    assert r["blocks"]["done"][0, 0] and r["attrs"]["checks_unfinished"] == 1


# -- the engine's second stage ---------------------------------------------------------------

class FakeAnalyzer:
    """The block mean's level as thickness: deterministic per block, instant."""

    cards = []

    def analyze(self, means):
        return [_estimate(float(m.mean())) for m in means]


class GatedChecker:
    """A check that waits for ``release`` (a slow check), then adds 0.5 nm and flags 'ambiguous'."""

    def __init__(self, delay=0.0, fail_at=None):
        self.release = threading.Event()
        self.delay, self.fail_at, self.calls = delay, fail_at, 0

    def __call__(self, pattern, est):
        self.release.wait(30)
        time.sleep(self.delay)
        self.calls += 1
        if self.fail_at is not None and abs(est.thickness_nm - self.fail_at) < 1e-6:
            raise RuntimeError("no fit")
        return _outcome(est)


class RecordingPublisher:
    def __init__(self):
        self.messages = []
        self.completed = []  # when the newest block of each message had its last frame (wall clock)

    def blocks(self, seq, indices, rows, stage="network", completed=None):
        self.messages.append((seq, stage, np.asarray(indices).copy(), {k: np.array(v) for k, v in rows.items()}))
        self.completed.append(completed)

    def status(self, status):
        pass


def _engine(tmp_path, checker, publisher=None, **kw):
    from stemlive.live.engine import BlockEngine
    from stemlive.live.state import LiveState
    from stemlive.udf.block_grid import BlockGrid

    grid = BlockGrid((8, 12), (4, 4))  # 2 × 3 blocks
    layout = StoreLayout((8, 12), (4, 4), (16, 16), virtual=("bf",))
    state = LiveState(layout, {})
    store = ResultStore.create(tmp_path / "s.h5", layout, alpha_mrad=13.6, kv=200, method="check")
    engine = BlockEngine(grid, FakeAnalyzer(), state, store, publisher, alpha_mrad=13.6, mrad_per_px=1.0,
                         checker=checker, **kw)
    return engine, state, store


def _feed(engine, rows=slice(None)):
    counts = np.zeros((2, 3), np.int64)
    counts[rows] = 16
    level = np.arange(1, 7, dtype=np.float32).reshape(2, 3)  # thickness of each block: 1..6
    pac = (level[..., None, None] * np.ones((16, 16), np.float32) * 16).astype(np.float32)
    t = time.perf_counter()
    engine.on_result({"counts": counts, "pacbed": pac}, None, np.zeros((8, 12), bool))
    return time.perf_counter() - t


def _wait(pred, timeout=10.0):
    t = time.monotonic()
    while not pred():
        assert time.monotonic() - t < timeout
        time.sleep(0.01)


def test_blocks_show_the_network_at_once_and_the_check_when_it_lands(tmp_path):
    checker, pub = GatedChecker(), RecordingPublisher()
    engine, state, store = _engine(tmp_path, checker, pub)
    assert _feed(engine, np.s_[:1]) < 0.5  # the check is held: ingest never waits for it
    _wait(lambda: state.done[0].all())
    assert (state.maps["method"][0] == 1).all() and (state.maps["method"][1] == 0).all()
    assert read_store(store.path)["maps"]["method"][0].tolist() == [1, 1, 1]  # stored with the network's values
    assert _feed(engine) < 0.5  # the second row too, while the first row's checks still wait
    _wait(lambda: state.done.all())
    assert (state.maps["method"] == 1).all() and engine.stats.checks_done == 0
    checker.release.set()
    engine.close("complete")
    r = read_store(store.path)
    assert r["attrs"]["state"] == "complete" and (r["maps"]["method"] == 2).all()
    np.testing.assert_allclose(r["maps"]["thickness_nm"], np.arange(1, 7).reshape(2, 3) + 0.5)
    assert (r["maps"]["fit_quality"] == np.float32(0.01)).all()
    assert all("ambiguous" in flag_names(b) for b in r["maps"]["flags"].ravel())
    assert r["attrs"]["checks_done"] == 6 and r["attrs"]["checks_unfinished"] == 0
    for k in r["maps"]:  # the live state and the store agree
        np.testing.assert_array_equal(state.maps[k], r["maps"][k], err_msg=k)
    # on the wire: network rows first, then the check's, in seq order, each block once per stage
    seqs = [m[0] for m in pub.messages]
    assert seqs == sorted(seqs)
    for stage, code in (("network", 1), ("check", 2)):
        got = [m for m in pub.messages if m[1] == stage]
        assert sum(len(m[2]) for m in got) == 6 and all((m[3]["method"] == code).all() for m in got)


def test_blocks_messages_say_when_their_newest_block_completed(tmp_path):
    """The dashboard measures last frame -> its page from this (one machine, one clock)."""
    checker, pub = GatedChecker(), RecordingPublisher()
    checker.release.set()
    engine, state, store = _engine(tmp_path, checker, pub)
    t0 = time.time()
    _feed(engine)
    t1 = time.time()  # on_result has seen every block complete by now
    _wait(lambda: state.done.all())
    engine.close("complete")
    assert len(pub.completed) == len(pub.messages) >= 2 and {m[1] for m in pub.messages} == {"network", "check"}
    assert all(t0 - 0.01 <= c <= t1 + 0.01 for c in pub.completed), (t0, pub.completed, t1)


def test_checks_not_landed_within_the_timeout_keep_the_network_values(tmp_path):
    checker = GatedChecker(delay=0.3)
    engine, state, store = _engine(tmp_path, checker, check_timeout=0.5)
    _feed(engine)
    _wait(lambda: state.done.all())
    checker.release.set()
    t = time.perf_counter()
    engine.close("complete")
    assert time.perf_counter() - t < 3
    r = read_store(store.path)
    n2 = int((r["maps"]["method"] == 2).sum())
    assert r["attrs"]["state"] == "complete" and 0 < n2 < 6 and int((r["maps"]["method"] == 1).sum()) == 6 - n2
    assert r["attrs"]["checks_done"] == n2 and r["attrs"]["checks_unfinished"] == 6 - n2
    assert state.status["checks_unfinished"] == 6 - n2


def test_an_aborted_run_does_not_wait_for_the_checks(tmp_path):
    checker = GatedChecker()
    engine, state, store = _engine(tmp_path, checker)
    _feed(engine)
    _wait(lambda: state.done.all())
    t = time.perf_counter()
    engine.close("aborted", "interrupted (Ctrl-C)")
    assert time.perf_counter() - t < 2
    checker.release.set()
    r = read_store(store.path)
    assert r["attrs"]["state"] == "aborted" and (r["maps"]["method"] == 1).all()
    assert r["attrs"]["checks_unfinished"] == 6


def test_a_failing_check_leaves_the_block_to_the_network(tmp_path):
    checker = GatedChecker(fail_at=3.0)
    checker.release.set()
    engine, state, store = _engine(tmp_path, checker)
    _feed(engine)
    engine.close("complete")
    r = read_store(store.path)
    assert r["attrs"]["state"] == "complete" and r["attrs"]["checks_failed"] == 1
    assert r["maps"]["method"].tolist() == [[2, 2, 1], [2, 2, 2]]
    assert r["maps"]["thickness_nm"][0, 2] == 3.0 and engine.stats.checks_done == 5


def test_errors_and_partial_fields_are_not_checked(tmp_path):
    class Analyzer(FakeAnalyzer):
        def analyze(self, means):
            out = super().analyze(means)
            return [PacbedEstimate(error="bad") if e.thickness_nm == 2.0 else
                    replace(e, thickness_nm=float("nan"), flags=["partial-field"]) if e.thickness_nm == 4.0 else e
                    for e in out]

    checker = GatedChecker()
    checker.release.set()
    engine, state, store = _engine(tmp_path, checker)
    engine.analyzer = Analyzer()
    _feed(engine)
    engine.close("complete")
    r = read_store(store.path)
    assert r["maps"]["method"].tolist() == [[2, 1, 2], [1, 2, 2]] and checker.calls == 4
    assert r["attrs"]["checks_unfinished"] == 0


# -- the commands ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def small_store(quadrant_library, tmp_path_factory):
    """A finished store of 2×2 blocks of 64² library patterns, 200 kV and 13.6 mrad, made with the network."""
    lib = PacbedLibrary.load(quadrant_library)
    a = lib.alpha_mrad / lib.mrad_per_px
    rng = np.random.default_rng(2)
    path = tmp_path_factory.mktemp("store") / "src.h5"
    layout = StoreLayout((8, 8), (4, 4), (64, 64), virtual=("bf",))
    s = ResultStore.create(path, layout, alpha_mrad=13.6, kv=200, mrad_per_px=lib.mrad_per_px * a / 10.0)
    pats = [place(lib.pattern(t, (1.0, 0.0)), a, (64, 64), 10.0, (31.6, 32.3)) for t in (1.0, 2.0, 3.0, 4.0)]
    pac = np.stack([rng.poisson(p / p.max() * 2000).astype(np.float32) * 16 for p in pats])
    idx = np.array([[0, 0], [0, 1], [1, 0], [1, 1]])
    s.write_blocks(idx, pac, np.full(4, 16), [None] * 4, np.zeros(4, bool), 64)
    s.write_virtual({"bf": np.ones((8, 8), np.float32)}, 64)
    s.finish("complete")
    return path


@pytest.mark.parametrize("method,code", [("check", 2), ("network", 1), (None, 2)])
def test_reanalyse_method(small_store, checked_models, tmp_path, method, code):
    out = tmp_path / "again.h5"
    extra = ["--method", method] if method else []
    assert main(["reanalyse", str(small_store), "--out", str(out), "--models", str(checked_models), *ORT,
                 *extra]) == 0
    r = read_store(out)
    assert r["attrs"]["state"] == "complete" and r["attrs"]["method"] == ("network" if code == 1 else "check")
    assert (r["maps"]["method"] == code).all() and r["blocks"]["done"].all()
    assert np.isfinite(r["maps"]["fit_quality"]).all() == (code == 2)
    if code == 2:
        assert r["attrs"]["check"]["file"].endswith(CHECK_SUFFIX) and r["attrs"]["checks_done"] == 4


def test_reanalyse_without_check_data_warns_and_uses_the_network(small_store, tiny_models, tmp_path, capsys):
    out = tmp_path / "again.h5"
    assert main(["reanalyse", str(small_store), "--out", str(out), "--models", str(tiny_models), *ORT]) == 0
    assert "stemlive simulate compact-library" in capsys.readouterr().err
    r = read_store(out)
    assert r["attrs"]["method"] == "network" and (r["maps"]["method"] == 1).all()


def _scan_npy(quadrant_library, path):
    lib = PacbedLibrary.load(quadrant_library)
    a = lib.alpha_mrad / lib.mrad_per_px
    rng = np.random.default_rng(3)
    frames = np.empty((8, 8, 48, 48), np.float32)
    for i in range(8):
        for j in range(8):
            p = place(lib.pattern(1.0 + (j // 4) + 2 * (i // 4), (1.0, 0.0)), a, (48, 48), 8.0, (23.7, 24.2))
            frames[i, j] = rng.poisson(p / p.max() * 500)
    np.save(path, frames)
    return path


@pytest.mark.parametrize("method,code", [("check", 2), ("network", 1)])
def test_replay_method(quadrant_library, checked_models, tmp_path, method, code):
    src = _scan_npy(quadrant_library, tmp_path / "scan.npy")
    out = tmp_path / "r.h5"
    rc = main(["replay", str(src), "--block", "4", "4", "--alpha-mrad", "13.6", "--kv", "200", "--out", str(out),
               "--models", str(checked_models), "--no-publish", "--quiet", "--atoms", "off", *ORT,
               "--method", method])
    assert rc == 0
    r = read_store(out)
    assert r["attrs"]["method"] == method and (r["maps"]["method"] == code).all()


@pytest.mark.parametrize("command", [["demo"], ["live", "--detector", "dectris", "--api-port", "1", "--data-port", "2",
                                                "--scan-shape", "4", "4", "--block", "2", "2", "--alpha-mrad", "13.6",
                                                "--kv", "200", "--out", "x.h5"]])
def test_live_and_demo_take_method(command):
    from stemlive.live.cli import build_parser

    for m in ("check", "network"):
        args = build_parser().parse_args([*command, "--method", m, "--check-timeout", "5"])
        assert args.method == m and args.check_timeout == 5
    assert build_parser().parse_args(command).method is None  # check where the data exists


def test_a_store_written_live_ends_checked(live_scan, tmp_path):
    """The demo scan's 24 blocks live (shipped models and check data): every analysed block ends
    with the check's values in the store."""
    from stemlive.live.acquire import live
    from stemlive.live.pipeline import Settings
    from stemlive.live.simulator import SimDetector

    d, meta, data, dump = live_scan
    out = tmp_path / "live.h5"
    settings = Settings(block=(8, 8), alpha_mrad=meta["alpha_mrad"], kv=meta["kv"], out=out,
                        mrad_per_px=meta["mrad_per_px"], scan_step_nm=meta["scan_step_nm"], pub="tcp://127.0.0.1:0",
                        rep="tcp://127.0.0.1:0", progress=False, atoms=None, backend="onnxruntime")
    with SimDetector(dump, 0, 0) as sim:
        summary = live(settings, detector="dectris", api_host="127.0.0.1", api_port=sim.api_port,
                       data_host="127.0.0.1", data_port=sim.data_port, scan_shape=data.shape[:2], executor="inline")
    assert summary.state == "complete" and summary.method == "check"
    r = read_store(out)
    done = r["blocks"]["done"]
    assert done.all() and r["attrs"]["method"] == "check" and r["attrs"]["checks_unfinished"] == 0
    checkable = done & np.isfinite(r["maps"]["thickness_nm"]) & ~(r["maps"]["flags"] & (1 << STORE_FLAGS.index("error")))
    assert checkable.sum() >= 20 and (r["maps"]["method"][checkable] == 2).all()
    assert np.isfinite(r["maps"]["fit_quality"][checkable]).all()
    assert summary.checks_done == int(checkable.sum()) and summary.checks_per_s > 0
    print(f"live check: {summary.checks_done} blocks, {summary.check_ms_median:.0f} ms median, "
          f"{summary.checks_per_s:.2f}/s, block complete -> checked {summary.check_delay_ms_median:.0f} ms median")


def test_render_check_shows_a_shipped_setting_fit():
    """The shipped check data renders a simulated 13.6 mrad pattern's fit at its checked reading."""
    import numpy as np

    from stemlive.models.checked_analysis import check_one, open_checker, render_check
    from stemlive.models.pacbed_analysis import PacbedAnalyzer

    checker = open_checker("check", 200, 13.6)
    analyzer = PacbedAnalyzer.for_acquisition(200, 13.6)
    yy, xx = np.indices((96, 96)) - 47.5
    disk = (np.hypot(yy, xx) < 11).astype(float) * 100 + 1.0  # a plain disk: the fit shows what it can
    done = check_one(checker, disk, analyzer.analyze([disk])[0])
    assert done.method == "check", done
    est = done.estimate
    shown = render_check(checker, disk * 7.0, est)
    assert shown["model"].shape == (64, 64) and np.isfinite(shown["model"]).sum() > 1000
    assert np.all(np.isfinite(shown["residual"][np.isfinite(shown["model"])]))


def test_frames_the_scan_passed_and_never_came_are_counted_lost_while_it_runs(tmp_path, monkeypatch):
    """The running lost-frame count: a gap behind the newest frame counts once it is LOST_AFTER_S old."""
    import stemlive.live.engine as engine_module

    monkeypatch.setattr(engine_module, "LOST_AFTER_S", 0.2)
    engine, state, _ = _engine(tmp_path, None)
    engine.mrad_per_px = None  # no ring scale: the virtual images (not under test) are not computed
    counts = np.zeros((2, 3), np.int64)
    pac = np.zeros((2, 3, 16, 16), np.float32)
    bins = {"bins": np.zeros((8 * 12, 4), np.float32)}
    damage = np.zeros((8, 12), bool)
    damage.ravel()[:40] = True
    damage.ravel()[20:23] = False  # three frames of the first rows never came
    engine.on_result({"counts": counts, "pacbed": pac}, bins, damage)
    assert state.status["frames_dropped"] == 0  # too early to call them lost: a partition may still bring them
    time.sleep(0.3)
    damage.ravel()[40:60] = True
    engine.on_result({"counts": counts, "pacbed": pac}, bins, damage)
    assert state.status["frames_dropped"] == 3
    damage.ravel()[20:23] = True  # late after all (out of order): no longer counted
    time.sleep(0.3)
    engine.on_result({"counts": counts, "pacbed": pac}, bins, damage)
    assert state.status["frames_dropped"] == 0
    engine.close("aborted")
