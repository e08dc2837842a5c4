"""Library building: resumable parts, parameter checks, file contents, CLI round trip."""
import json
import subprocess
import sys

import h5py
import numpy as np
import pytest

from stemlive.simulate.build import build_library, parts_dir
from stemlive.simulate.library import PacbedLibrary, expand_signed

from .conftest import tiny_params


def test_build_resumes_and_writes_library(tmp_path):
    out = tmp_path / "lib.h5"
    p = tiny_params(tilt_values_mrad=(0.0, 1.0, 2.0))
    assert build_library(p, out, workers=1, progress=False, max_jobs=2) is None  # interrupted
    parts = sorted(parts_dir(out).glob("tilt_*.npy"))
    assert len(parts) == 2 and not out.exists()
    stamps = {f.name: f.stat().st_mtime_ns for f in parts}
    build_library(p, out, workers=2, progress=False, keep_parts=True)
    for f in parts:  # finished parts were not recomputed
        assert f.stat().st_mtime_ns == stamps[f.name]
    lib = PacbedLibrary.load(out)
    assert lib.patterns.shape[:2] == (9, 4)  # 3x3 first-quadrant tilts, 0.98-3.9 nm
    with h5py.File(out) as f:
        assert f["tilt_simulated"][()].sum() == 6  # octant of the 3x3 grid
        assert f.attrs["simulator_version"] == "1.0.11"
        assert json.loads(f.attrs["params"])["alpha_mrad"] == 13.6
        for key in ("kv", "alpha_mrad", "mrad_per_px", "material", "zone", "simulator"):
            assert key in f.attrs
        assert f["phonon_seed_entropy"].shape == (6, 3)
    # diagonal-derived pattern is the transpose of the simulated one
    assert np.allclose(lib.pattern(3, (1.0, 2.0)), lib.pattern(3, (2.0, 1.0)).T)
    # same parameters: reused as is; other parameters: refused
    assert build_library(p, out, progress=False) == out
    with pytest.raises(FileExistsError):
        build_library(tiny_params(tilt_values_mrad=(0.0, 1.0)), out, progress=False)


def test_parts_from_other_parameters_are_refused(tmp_path):
    out = tmp_path / "lib.h5"
    build_library(tiny_params(), out, workers=1, progress=False, max_jobs=1)
    with pytest.raises(ValueError, match="other parameters"):
        build_library(tiny_params(seed=9), out, workers=1, progress=False)


def test_negative_quadrants_follow_by_mirrors(tmp_path):
    out = tmp_path / "lib.h5"
    build_library(tiny_params(), out, workers=1, progress=False)
    lib = PacbedLibrary.load(out)
    signed = expand_signed(lib)
    assert len(signed.tilt_mrad) == 9  # (0, ±1) x (0, ±1)
    assert np.allclose(lib.pattern(2, (-1.0, 1.0)), lib.pattern(2, (1.0, 1.0))[::-1])


def test_cli_round_trip(tmp_path):
    out = tmp_path / "cli.h5"
    cmd = [sys.executable, "-m", "stemlive.live.cli", "simulate", "pacbed", "--thickness", "1", "2", "1",
           "--tilts", "0", "--cell-extent", "8", "--sampling", "0.1", "--max-angle", "30", "--pixels", "25",
           "--pool-cells", "2", "--workers", "1", "--out", str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip().endswith(str(out))
    lib = PacbedLibrary.load(out)
    assert lib.patterns.shape == (1, 2, 25, 25)
    assert lib.mrad_per_px == pytest.approx(2 * 30 / 24)


def test_cli_bad_input_is_a_clear_error(tmp_path):
    res = subprocess.run([sys.executable, "-m", "stemlive.live.cli", "simulate", "pacbed", "--pixels", "64",
                          "--out", str(tmp_path / "x.h5")], capture_output=True, text=True, timeout=120)
    assert res.returncode == 2
    assert "must be odd" in res.stderr
