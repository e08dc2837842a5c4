"""The demo scan is sampled as a PACBED recording is, and the demo scores itself honestly."""
import json

import h5py
import numpy as np
import pytest

from stemlive.simulate.library import PacbedLibrary
from stemlive.simulate.scan import ScanParams, _check_ranges, thickness_field, tilt_field
from stemlive.simulate.scan_cli import DEMO_LIBRARY


@pytest.fixture(scope="module")
def lib():
    return PacbedLibrary.load(DEMO_LIBRARY, positions=True)


def test_frames_sampled_as_a_pacbed_recording(lib):
    """≥ 96² px, zero disk ≥ 20 px across, field to ≥ ±3.5 α (HAADF's 4.5 α here)."""
    k = lib.position_patterns.shape[-1]
    assert k >= 96 and 2 * lib.alpha_mrad / lib.mrad_per_px >= 20
    assert (k - 1) / 2 * lib.mrad_per_px >= 4.5 * lib.alpha_mrad - 1e-6
    assert lib.kv == 200 and lib.alpha_mrad == 13.6 and lib.attrs["zone"] == "[001]"
    assert json.loads(lib.attrs["plan"])["positions_per_cell"] == [8, 8]  # atomic contrast in virtual images
    assert DEMO_LIBRARY.stat().st_size <= 25e6


def test_positions_average_to_the_pacbed(lib):
    i = lib.tilt_index((-1.25, 2.5))  # a derived tilt
    pos = lib.positions_for_tilt(i)
    assert np.abs(pos.mean(axis=(1, 2)) - lib.patterns[i]).max() < 0.02 * lib.patterns[i].max()
    assert np.all(lib.patterns.sum(axis=(-1, -2)) <= 1.0)


def test_default_scan_fits_the_library(lib):
    """ScanParams' default (the demo's FIB wedge) lies inside the library, its terraces on planes."""
    p = ScanParams()
    t = thickness_field(p, lib.thickness_nm)
    assert np.all(np.isin(np.unique(t), lib.thickness_nm)) and len(np.unique(t)) == p.thickness_steps
    t0, t1 = np.unique(lib.tilt_mrad[:, 0]), np.unique(lib.tilt_mrad[:, 1])
    _check_ranges(lib, t, tilt_field(p), t0, t1)


def _fake_store(thickness, sigma, tilt, flags, done, flag_names):
    ny, nx = thickness.shape
    return {"attrs": {"block_shape": [2, 2], "flag_names": flag_names},
            "maps": {"thickness_nm": thickness, "thickness_sigma_nm": sigma, "tilt_mrad": tilt, "flags": flags},
            "blocks": {"done": done, "partial": np.zeros((ny, nx), bool)}}


def test_comparison_counts_misses_and_silent_gross_misses(tmp_path, monkeypatch):
    """2×2 blocks of 2×2 frames: one right, one 1 mrad off in tilt, one gross miss that is flagged
    and one that is silent; a block across a terrace edge; a missing estimate counts as a miss."""
    from stemlive.live import demo, store

    thick = np.array([[20.0, 20, 24, 24], [20, 20, 24, 24], [30, 34, 40, 40], [30, 34, 40, 40]])
    with h5py.File(tmp_path / "truth.h5", "w") as f:
        f["thickness_nm"] = thick
        f["tilt_mrad"] = np.zeros((4, 4, 2))
    names = ["vacuum", "low-confidence", "saturated", "partial"]
    est = np.array([[21.0, 24.5], [45.0, 55.0]])  # block truths 20, 24, 32, 40
    tilt = np.zeros((2, 2, 2))
    tilt[0, 1] = (0.2, -1.0)
    flags = np.array([[0, 0], [2, 4]], np.uint32)  # low-confidence (not silent), saturated (silent)
    res = _fake_store(est, np.full((2, 2), 1.0), tilt, flags, np.ones((2, 2), bool), names)
    monkeypatch.setattr(store, "read_store", lambda path: res)
    out = demo.compare_with_truth(tmp_path / "r.h5", tmp_path / "truth.h5", json_out=tmp_path / "c.json")
    assert out["blocks"] == 4 and out["blocks_across_terrace_edge"] == 1
    assert out["thickness_within_2nm"] == 0.5 and out["tilt_within_0.5mrad"] == 0.75
    assert out["within_2nm_and_0.5mrad"] == 0.25
    assert out["thickness_within_2nm_across_edge"] == 0.0 and out["thickness_within_2nm_one_terrace"] == 2 / 3
    assert out["gross_misses"] == 2 and out["silent_gross_misses"] == 1
    assert out["thickness_median_err_nm"] == pytest.approx(np.median([1, 0.5, 13, 15]))
    assert json.loads((tmp_path / "c.json").read_text()) == out
    est[1, 1] = np.nan  # no estimate: a miss, never silent
    out = demo.compare_with_truth(tmp_path / "r.h5", tmp_path / "truth.h5")
    assert out["blocks_without_estimate"] == 1 and out["silent_gross_misses"] == 0
    assert out["thickness_within_2nm"] == 0.5
