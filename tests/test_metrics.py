"""Uncertainty metrics on hand-built logits, and the ROC diagnostics on hand-built scores."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from cft_ray import metrics


def test_entropy_uniform_peaked_and_known():
    v = 1000
    assert metrics.entropy(torch.zeros(v)).item() == pytest.approx(math.log(v), rel=1e-6)
    peaked = torch.zeros(v)
    peaked[3] = 100.0
    assert metrics.entropy(peaked).item() == pytest.approx(0.0, abs=1e-6)
    p = torch.tensor([0.5, 0.25, 0.125, 0.125])
    assert metrics.entropy(p.log()).item() == pytest.approx(-(p * p.log()).sum().item(), abs=1e-6)


def test_entropy_matches_torch_categorical_any_shape_and_dtype():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 500, generator=g) * 3
    ref = torch.distributions.Categorical(logits=logits).entropy()
    out = metrics.entropy(logits)
    assert out.shape == (2, 3)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    # bf16 logits are upcast: the result is float32 and close to the fp32 entropy of the same bf16 values
    b = logits.bfloat16()
    assert metrics.entropy(b).dtype == torch.float32
    torch.testing.assert_close(metrics.entropy(b), torch.distributions.Categorical(logits=b.float()).entropy(),
                               atol=1e-5, rtol=0)


def test_subset_entropy_renormalises_and_ignores_padding():
    logits = torch.full((2, 50), -5.0)
    # row 0: three option tokens with probabilities 0.5, 0.25, 0.25 after renormalisation
    logits[0, [7, 8, 9]] = torch.tensor([0.5, 0.25, 0.25]).log()
    # row 1: two options with equal logits -> ln 2, whatever the rest of the vocabulary holds
    logits[1, [11, 12]] = 3.0
    logits[1, 13] = 10.0  # not an option of row 1: must not count
    ids = torch.tensor([[7, 8, 9, 0], [11, 12, 13, 0]])
    mask = torch.tensor([[True, True, True, False], [True, True, False, False]])
    h = metrics.subset_entropy(logits, ids, mask)
    assert h[0].item() == pytest.approx(-(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25)), abs=1e-6)
    assert h[1].item() == pytest.approx(math.log(2), abs=1e-6)


def test_nll_and_top2():
    p = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.1, 0.8]])
    logits = p.log() + 7.0  # a shift must not matter
    ce = metrics.nll(logits, torch.tensor([1, 2]))
    torch.testing.assert_close(ce, -torch.tensor([0.3, 0.8]).log(), atol=1e-6, rtol=0)
    torch.testing.assert_close(ce, torch.nn.functional.cross_entropy(logits, torch.tensor([1, 2]), reduction="none"))
    pmax, margin, arg = metrics.top2(logits)
    torch.testing.assert_close(pmax, torch.tensor([0.5, 0.8]), atol=1e-6, rtol=0)
    torch.testing.assert_close(margin, torch.tensor([0.2, 0.7]), atol=1e-6, rtol=0)
    assert arg.tolist() == [0, 2]


def test_confidence_normalisation_and_auc_direction():
    correct = np.array([True, True, False, False])
    ent = np.array([0.1, 0.2, 0.9, 1.0])  # low entropy on correct rows: perfect uncertainty signal
    np.testing.assert_allclose(metrics.confidence(ent, "uncertainty"), [0.9, 0.8, 0.1, 0.0])
    assert metrics.roc_auc(correct, ent, "uncertainty") == 1.0
    prob = np.array([0.9, 0.8, 0.3, 0.2])  # high max-prob on correct rows: perfect confidence signal
    assert metrics.roc_auc(correct, prob, "confidence") == 1.0
    assert metrics.roc_auc(correct, prob, "uncertainty") == 0.0  # the direction matters
    assert metrics.roc_auc(np.ones(4, bool), ent, "uncertainty") is None


def _scores(n=200, seed=0):
    rng = np.random.default_rng(seed)
    correct = rng.random(n) < 0.4
    ent = rng.random(n) + np.where(correct, 0.0, 0.5)  # informative, not perfect
    return pd.DataFrame({
        "correct": correct, "entropy": ent, "entropy_options": ent / 2, "ce_gold": rng.random(n),
        "max_prob": 1 - ent / 2, "margin": rng.random(n),
        "subject": rng.choice(["a", "b", None], n), "category": "all"})


def test_roc_report_overall_and_groups():
    df = _scores()
    rep = metrics.roc_report(df)
    ov = rep["overall"]
    assert ov["n"] == 200 and ov["n_correct"] == int(df.correct.sum())
    assert 0.7 < ov["auc"]["entropy"] < 1.0
    assert ov["auc"]["entropy"] == ov["auc"]["entropy_options"] == ov["auc"]["max_prob"]  # monotone transforms
    assert 0.35 < ov["auc"]["ce_gold"] < 0.65  # noise
    assert set(rep["by_subject"]) == {"a", "b", "<none>"}
    assert sum(g["n"] for g in rep["by_subject"].values()) == 200
    assert rep["by_category"]["all"]["auc"] == ov["auc"]
    assert rep["confidence"]["entropy"] == "1 - m/max(m)"


def test_roc_report_against_a_known_level():
    """With a level column: the AUC of each metric for telling the levels up to the cut nearest an even split of the
    rows from the rest
    (sklearn on that label, by hand), per-level summaries keyed 1, 2, ... (not 1.0 where a null made the
    column float), and no level section where every row has the same level or none."""
    from sklearn.metrics import roc_auc_score

    df = _scores()
    rng = np.random.default_rng(1)
    level = np.where(df.entropy > 0.9, rng.integers(3, 5, len(df)), rng.integers(1, 3, len(df))).astype(float)
    level[:5] = np.nan
    rep = metrics.roc_report(df.assign(level=level))
    known = df.assign(level=level)[~np.isnan(level)]
    want = roc_auc_score(known.level <= 2.0, 1 - known.entropy / known.entropy.max())
    assert rep["vs_level"]["auc"]["entropy"] == pytest.approx(want, abs=1e-4) and want > 0.8
    assert rep["vs_level"]["easy"] == "level <= 2" and rep["vs_level"]["n"] == len(df) - 5
    assert set(rep["by_level"]) == {"1", "2", "3", "4", "<none>"}
    assert "vs_level" not in metrics.roc_report(df.assign(level=2)) and "vs_level" not in metrics.roc_report(df)
    # a pool skewed across levels: 7% / 36% / 36% / 20% at levels 1-4. The median level (3) would call 79% of the rows
    # easy; "<= 2" (43%) is the cut nearest an even split
    lopsided = np.repeat([1.0, 2.0, 3.0, 4.0], [14, 72, 74, 40])
    assert metrics.roc_report(df.assign(level=lopsided))["vs_level"]["easy"] == "level <= 2"


def test_plots_write_png(tmp_path):
    df = _scores(50)
    metrics.plot_roc(df, tmp_path / "roc.png")
    metrics.plot_hist(df, tmp_path / "hist.png")
    for name in ("roc.png", "hist.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_top2_ties_break_like_greedy_decoding():
    logits = torch.zeros(2, 300, dtype=torch.bfloat16)
    logits[:, [250, 17, 120]] = 5.0  # a three-way tie: greedy decoding takes the lowest id
    pmax, margin, arg = metrics.top2(logits)
    assert arg.tolist() == [17, 17] and margin.tolist() == [0.0, 0.0]
