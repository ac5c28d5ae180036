"""The comparison table's statistics against values computed by hand or by textbook formulas."""
from __future__ import annotations

import numpy as np
import pytest

from cft_ray import stats


def test_wilson_matches_known_intervals():
    assert stats.wilson(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    assert stats.wilson(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)  # Wald would say [0, 0]
    assert stats.wilson(10, 10) == pytest.approx((0.7225, 1.0), abs=1e-4)
    assert all(np.isnan(stats.wilson(0, 0)))
    for n in range(1, 60):  # the interval holds the estimate itself, also at 0/n and n/n (float rounding)
        assert all(stats.wilson(k, n)[0] <= k / n <= stats.wilson(k, n)[1] for k in (0, n // 2, n))


def test_mcnemar_counts_only_discordant_items():
    a = np.array([1] * 8 + [0] * 2 + [1] * 50 + [0] * 40, bool)
    b = np.array([0] * 8 + [1] * 2 + [1] * 50 + [0] * 40, bool)
    got = stats.mcnemar_exact(a, b)
    assert (got["n10"], got["n01"]) == (8, 2)
    assert got["p_value"] == pytest.approx(0.109375)  # 2 * P(X <= 2), X ~ Bin(10, 1/2) = 2 * 56 / 1024
    assert stats.mcnemar_exact(a, a)["p_value"] == 1.0


def test_bootstrap_interval_is_paired_and_reproducible():
    rng = np.random.default_rng(1)
    a = rng.random(400) < 0.6
    b = a.copy()
    b[:40] = ~b[:40]  # 40 discordant items
    lo, hi = stats.bootstrap_diff(a, b, seed=3)
    assert lo <= a.mean() - b.mean() <= hi and hi - lo < 0.08  # paired: far narrower than two unpaired CIs
    assert stats.bootstrap_diff(a, b, seed=3) == (lo, hi)
    assert stats.bootstrap_diff(a, a) == (0.0, 0.0)


def test_detectable_difference_and_items_needed_agree():
    d = stats.detectable_difference(100, 0.2)
    assert d == pytest.approx(2.8016 * np.sqrt(0.2 / 100), rel=1e-3)
    assert stats.items_needed(d, 0.2) in (100, 101)
    assert stats.items_needed(0.10, 0.3) == 236  # (1.96 + 0.8416)^2 * 0.3 / 0.01


def test_compare_flags_significance():
    a = np.array([1] * 30 + [0] * 70, bool)
    b = np.array([0] * 30 + [0] * 70, bool)
    got = stats.compare(a, b)
    assert got["significant"] and got["diff"] == pytest.approx(0.3) and got["p_value"] < 1e-8
    assert not stats.compare(a, a)["significant"]
