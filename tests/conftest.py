"""Shared fixtures: tiny abTEM libraries (seconds each) built once per test session."""
from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import pytest

from stemlive.simulate.params import PacbedParams

# 2x2 unit cells, 0.1 Å sampling: ~1 s per tilt; physics is coarse but every symmetry and
# normalisation property the tests check holds exactly at any sampling.
TINY = dict(cell_extent_A=8.0, sampling_A=0.1, max_angle_mrad=30.0, pool_cells=4)


def tiny_params(**kw) -> PacbedParams:
    d = dict(TINY, thickness_nm=(1.0, 4.0, 1.0), tilt_values_mrad=(0.0, 1.0))
    d.update(kw)
    return PacbedParams(**d)


@pytest.fixture(scope="session")
def position_library(tmp_path_factory):
    """Position-resolved, signed-tilt library like the shipped demo one, but tiny."""
    from stemlive.simulate.build import build_library

    out = tmp_path_factory.mktemp("lib") / "positions.h5"
    p = tiny_params(thickness_nm=(2.0, 8.0, 2.0), tilt_values_mrad=(0.0, 1.5), tilt_signed=True,
                    positions=(8, 8), keep_positions=True, max_angle_mrad=4.5 * 13.6, pixels=21,
                    sampling_A=0.07)
    build_library(p, out, workers=1, progress=False)
    return out


@pytest.fixture(scope="session")
def quadrant_library(tmp_path_factory):
    """First-quadrant PACBED library on a 3x3 tilt grid (6 simulated orbits), for training tests."""
    from stemlive.simulate.build import build_library

    out = tmp_path_factory.mktemp("lib") / "quadrant.h5"
    build_library(tiny_params(tilt_values_mrad=(0.0, 1.0, 2.0), max_angle_mrad=3 * 13.6, pixels=33,
                              sampling_A=0.07), out, workers=1, progress=False)
    return out


@pytest.fixture(scope="session")
def tiny_models(quadrant_library, tmp_path_factory):
    """A directory with tiny (untrained-quality) alignment and thickness/tilt models + cards,
    for testing everything around the networks without the shipped ones."""
    from stemlive.simulate.train_align import train_align
    from stemlive.simulate.train_config import TrainConfig
    from stemlive.simulate.train_pacbed import train_pacbed

    out = tmp_path_factory.mktemp("models")
    work = tmp_path_factory.mktemp("work")
    cfg = TrainConfig(steps=10, batch=16, val_every=10, val_samples=16, holdout_fraction=0.17, seed=3, width=4)
    train_align(quadrant_library, out, "tiny_align", work / "a", cfg, progress=False)
    train_pacbed(quadrant_library, out, "tiny", work / "t", cfg, progress=False)
    return out


LIVE_SCAN = (32, 48)


@pytest.fixture(scope="session")
def live_scan(tmp_path_factory):
    """A small synthetic wedge scan (demo library) and its DECTRIS stream dump: (dir, params, frames, dump)."""
    import json

    from stemlive.live.demo import demo_scan
    from stemlive.live.simulator import dump_for, input_array

    d = demo_scan(tmp_path_factory.mktemp("scan"), LIVE_SCAN, progress=False)
    meta = json.loads((d / "params.json").read_text())
    data = input_array(d)
    dump = dump_for(data, d / "frames.npy", "bslz4", cache=d, progress=False)
    return d, meta, data, dump
