"""The statistics behind the comparison table: Wilson intervals for an accuracy, and for two arms
evaluated on the same items a paired test (exact McNemar), a paired bootstrap interval of the
difference, and the smallest difference the test set could detect.

Pure numpy/scipy on 0/1 correctness vectors aligned by item; nothing here knows about arms or files.
"""
from __future__ import annotations

import math

import numpy as np

Z95 = 1.959963984540054


def wilson(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion k/n (95% by default); (nan, nan) when n = 0.
    Unlike the normal (Wald) interval it stays inside [0, 1] and is honest at 0/n and n/n."""
    if n == 0:
        return float("nan"), float("nan")
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    # clamped so the interval always holds p itself (rounding once put lo a hair above 0 at k = 0)
    return min(p, max(0.0, centre - half)), max(p, min(1.0, centre + half))


def mcnemar_exact(a: np.ndarray, b: np.ndarray) -> dict:
    """Exact McNemar test of two arms' correctness on the same items: only the discordant items count
    (a right and b wrong: n10; a wrong and b right: n01); under no difference each is a fair coin."""
    from scipy import stats as sps  # here: ~1.5 s to import, and the CLI imports this module before its checks

    a, b = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    n10, n01 = int((a & ~b).sum()), int((~a & b).sum())
    p = 1.0 if n10 + n01 == 0 else float(sps.binomtest(n10, n10 + n01, 0.5).pvalue)
    return {"n10": n10, "n01": n01, "p_value": p}


def bootstrap_diff(a: np.ndarray, b: np.ndarray, n_boot: int = 10_000, seed: int = 0,
                   level: float = 0.95) -> tuple[float, float]:
    """Percentile interval of accuracy(a) - accuracy(b), resampling items (pairs kept together)."""
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    if len(d) == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = np.empty(n_boot)
    step = max(1, 2_000_000 // len(d))  # bounded memory: a few million indices at a time
    for s in range(0, n_boot, step):
        idx = rng.integers(0, len(d), size=(min(step, n_boot - s), len(d)))
        means[s:s + len(idx)] = d[idx].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def detectable_difference(n: int, discordant: float, alpha: float = 0.05, power: float = 0.8) -> float:
    """Smallest accuracy difference a paired test on n items detects with this power, given the share of
    discordant items (normal approximation of McNemar's test: delta = (z_a/2 + z_b) * sqrt(p_disc / n))."""
    from scipy import stats as sps

    if n == 0:
        return float("nan")
    za, zb = sps.norm.ppf(1 - alpha / 2), sps.norm.ppf(power)
    return float((za + zb) * math.sqrt(max(discordant, 1.0 / n) / n))


def items_needed(delta: float, discordant: float, alpha: float = 0.05, power: float = 0.8) -> int:
    """Test items a paired comparison needs to detect an accuracy difference `delta` (same approximation)."""
    from scipy import stats as sps

    za, zb = sps.norm.ppf(1 - alpha / 2), sps.norm.ppf(power)
    return int(math.ceil((za + zb) ** 2 * discordant / (delta * delta)))


def compare(a: np.ndarray, b: np.ndarray, alpha: float = 0.05, seed: int = 0) -> dict:
    """Everything the report says about arm a vs arm b on the same items."""
    a, b = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    test = mcnemar_exact(a, b)
    n = len(a)
    lo, hi = bootstrap_diff(a, b, seed=seed)
    return {"n": n, "acc_a": float(a.mean()) if n else float("nan"), "acc_b": float(b.mean()) if n else float("nan"),
            "diff": float(a.mean() - b.mean()) if n else float("nan"), "diff_ci95": [lo, hi], **test,
            "significant": test["p_value"] < alpha, "alpha": alpha,
            "detectable_diff": detectable_difference(n, (test["n10"] + test["n01"]) / n if n else 0.0, alpha)}
