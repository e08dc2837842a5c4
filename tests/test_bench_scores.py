"""benchmarks/pacbed_common.row_scores: the benchmark row of issue 13, on hand-made estimates."""
from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest

from stemlive.models.pacbed_analysis import PacbedEstimate, partial_field

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from pacbed_common import arrays_to_estimates, estimates_to_arrays, row_scores  # noqa: E402


def est(t, sigma=1.0, tilt=(0.0, 0.0), centre=(50.0, 50.0), radius=10.0, rot=0.0, flags=()):
    return PacbedEstimate(center_px=centre, radius_px=radius, rotation_deg=rot, thickness_nm=t, thickness_sigma_nm=sigma,
                          tilt_mrad=tilt, tilt_sigma_mrad=(0.3, 0.3), tilt_crystal_mrad=tilt, background=0.0,
                          in_range=True, flags=list(flags))


@pytest.fixture
def case():
    truth = {"center_px": np.full((6, 2), 50.0), "radius_px": np.full(6, 10.0), "rotation_deg": np.zeros(6),
             "thickness_nm": np.array([20.0, 20, 20, 20, 5, 20]), "tilt_mrad": np.zeros((6, 2))}
    results = [est(20.5), est(21.5, tilt=(0.4, 0.0), centre=(50.3, 50.0)), est(45.0, sigma=2.0),
               est(45.0, sigma=2.0, flags=["saturated"]), est(5.2, tilt=(2.0, 0.0)),
               partial_field(50.0, 50.0, 10.0, 0.0, [])]
    return results, truth


def test_row_counts_answers_geometry_and_silent_misses(case):
    results, truth = case
    s = row_scores(results, truth)
    assert s["answered"] == pytest.approx(5 / 6) and s["partial-field"] == pytest.approx(1 / 6)
    assert s["thickness ±1 nm"] == pytest.approx(2 / 5) and s["thickness ±2 nm"] == pytest.approx(3 / 5)
    assert s["tilt ±0.25 mrad (t≥10 nm)"] == pytest.approx(3 / 4)  # the 5 nm pattern does not count
    assert s["tilt ±0.5 mrad (t≥10 nm)"] == 1.0
    assert s["centre ±0.02 α"] == pytest.approx(5 / 6)  # 0.3 px off at 10 px radius is 0.03 α; all have geometry
    assert s["gross > 10 nm"] == pytest.approx(2 / 5) and s["of them silent"] == 0.5  # "saturated" is a doubt
    assert math.isnan(row_scores([], truth)["answered"])


def test_cached_estimates_come_back(case):
    results, truth = case
    again = arrays_to_estimates(estimates_to_arrays(results))
    assert row_scores(again, truth) == pytest.approx(row_scores(results, truth), nan_ok=True)
    assert again[3].flags == ["saturated"] and again[5].flags == ["partial-field"]
