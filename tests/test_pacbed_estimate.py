"""Estimates and spreads from class probabilities."""
import numpy as np
import pytest

from stemlive.models.pacbed_estimate import estimate, top_classes, two_hot

BINS = np.arange(1.0, 21.0)


def test_two_hot_round_trips_continuous_values():
    v = np.array([1.0, 3.25, 7.5, 20.0, 25.0, -3.0])
    p = two_hot(v, BINS)
    assert np.allclose(p.sum(1), 1)
    est, sig = estimate(p, BINS)
    assert est == pytest.approx(np.clip(v, 1, 20))
    assert np.all(sig >= 1 / np.sqrt(12) - 1e-9)


def test_two_modes_give_a_large_sigma_and_the_stronger_mode():
    p = np.zeros((1, len(BINS)))
    p[0, 4], p[0, 15] = 0.6, 0.4  # 5 nm or 16 nm
    est, sig = estimate(p, BINS)
    assert est[0] == pytest.approx(5.0)
    assert sig[0] > 5
    assert top_classes(p, BINS)[0] == [(5.0, pytest.approx(0.6)), (16.0, pytest.approx(0.4))]


def test_sharp_distribution_gives_small_sigma():
    p = two_hot(np.array([10.4]), BINS)
    est, sig = estimate(p, BINS)
    assert est[0] == pytest.approx(10.4) and sig[0] < 0.6
