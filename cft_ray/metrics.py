"""Uncertainty metrics from logits (pure torch) and their ROC diagnostics against correctness.

The torch functions take logits of shape [..., vocab] and reduce the last axis, so the scorer
(one position per item) and InstructDiff (every response position) share them. They compute in
float32 whatever the model's dtype: a bf16 softmax over 150k entries loses the tail mass that
entropy is made of.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Iterable, Mapping

from cft_ray import store

if TYPE_CHECKING:  # torch is imported where it computes: the CLI reaches this module before its fast checks
    import torch

EPS = 1e-12  # the paper's h = -sum p ln(p + 1e-12)

# Score columns and their direction: "uncertainty" grows when the model is unsure (confidence =
# 1 - m/max, the paper's normalisation), "confidence" grows when it is sure (confidence = m/max).
SCORE_METRICS = {"entropy": "uncertainty", "entropy_options": "uncertainty", "ce_gold": "uncertainty",
                 "max_prob": "confidence", "margin": "confidence"}


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Full-distribution entropy in nats over the last axis."""
    import torch

    p = torch.softmax(logits.float(), dim=-1)
    return -(p * torch.log(p + EPS)).sum(-1)


def subset_entropy(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Entropy of the softmax renormalised over `ids` [..., K] (entries where `mask` is False are
    padding: rows may have different numbers of options)."""
    import torch

    sub = logits.float().gather(-1, ids).masked_fill(~mask, float("-inf"))
    p = torch.softmax(sub, dim=-1)
    return -(p * torch.log(p + EPS)).sum(-1)


def nll(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """-log softmax(logits)[target] over the full vocabulary (target has the leading shape)."""
    import torch

    x = logits.float()
    return torch.logsumexp(x, dim=-1) - x.gather(-1, target.unsqueeze(-1)).squeeze(-1)


def top2(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(max probability, top-1 minus top-2 probability, argmax id). The id comes from argmax, which
    breaks ties towards the lowest id like greedy decoding (ties are common in bf16 logits)."""
    import torch

    p = torch.softmax(logits.float(), dim=-1)
    vals = p.topk(2, dim=-1).values
    return vals[..., 0], vals[..., 0] - vals[..., 1], logits.argmax(-1)


def confidence(values, direction: str):
    """The paper's normalisation: 1 - m/max(m) for uncertainties, m/max(m) for confidences."""
    import numpy as np

    v = np.asarray(values, dtype="float64")
    top = np.nanmax(v) if len(v) else 0.0
    norm = v / top if top > 0 else v
    return 1.0 - norm if direction == "uncertainty" else norm


def roc_auc(correct, values, direction: str) -> float | None:
    """ROC AUC of confidence vs correctness (sklearn); None when one class is absent."""
    import numpy as np
    from sklearn.metrics import roc_auc_score

    y = np.asarray(correct, dtype=bool)
    if y.all() or not y.any():
        return None
    return float(roc_auc_score(y, confidence(values, direction)))


def _summary(df, metrics: Mapping[str, str], label: str) -> dict:
    y = df[label].to_numpy(dtype=bool)
    out = {"n": int(len(y)), "n_correct": int(y.sum()), "accuracy": float(y.mean()) if len(y) else None, "auc": {}}
    for m, direction in metrics.items():
        auc = roc_auc(y, df[m].to_numpy(dtype="float64"), direction)
        out["auc"][m] = None if auc is None else round(auc, 4)
    return out


def roc_report(df, metrics: Mapping[str, str] = SCORE_METRICS, label: str = "correct",
               groups: Iterable[str] = ("subject", "category")) -> dict:
    """AUCs overall and per group value. `df` is a pandas frame of scored rows (no nulls in the
    metric columns); the normalising max is taken over the rows being evaluated."""
    report = {"confidence": {m: ("1 - m/max(m)" if d == "uncertainty" else "m/max(m)") for m, d in metrics.items()},
              "overall": _summary(df, metrics, label)}
    levels = df["level"].dropna() if "level" in df else []
    if len(levels) and levels.nunique() > 1:
        # a known difficulty: how well each metric tells the easier levels from the harder ones, cut nearest an even
        # split of the rows (the median level put 80% of a pool skewed 7/36/36/20% across levels on one side), and each level on its own
        known = df[df["level"].notna()]
        share = levels.value_counts(normalize=True).sort_index().cumsum()[:-1]
        cut = float((share - 0.5).abs().idxmin())
        report["vs_level"] = {"easy": f"level <= {cut:g}", **_summary(known.assign(_easy=known["level"] <= cut), metrics, "_easy")}
        groups = [*groups, "level"]
    for g in groups:
        if g in df:
            values = df[g].astype("Int64") if g == "level" else df[g]  # 1, not 1.0, where a null made it float
            keyed = df.assign(**{g: values.astype(object).fillna("<none>")})
            report[f"by_{g}"] = {str(k): _summary(part, metrics, label) for k, part in keyed.groupby(g, sort=True)}
    return report


def plot_roc(df, path_png, metrics: Mapping[str, str] = SCORE_METRICS, label: str = "correct") -> None:
    """ROC curves of every metric (overall) into one PNG file at `path_png` (local or s3://)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_curve

    y = df[label].to_numpy(dtype=bool)
    fig, ax = plt.subplots(figsize=(5.5, 5))
    ax.plot([0, 1], [0, 1], ls=":", c="grey", lw=1)
    if y.any() and not y.all():
        for m, d in metrics.items():
            conf = confidence(df[m].to_numpy(dtype="float64"), d)
            fpr, tpr, _ = roc_curve(y, conf)
            ax.plot(fpr, tpr, lw=1.5, label=f"{m} (AUC {roc_auc(y, df[m], d):.3f})")
    ax.set(xlabel="false positive rate", ylabel="true positive rate",
           title=f"confidence vs correctness (n={len(y)}, acc={y.mean() if len(y) else float('nan'):.3f})")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    store.write_png(fig, str(path_png))


def plot_hist(df, path_png, metrics: Mapping[str, str] = SCORE_METRICS, label: str = "correct") -> None:
    """Per-metric histograms, correct vs incorrect rows overlaid (density), into a PNG at `path_png`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    y = df[label].to_numpy(dtype=bool)
    cols = 3
    rows = math.ceil(len(metrics) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3 * rows), squeeze=False)
    for ax, m in zip(axes.flat, metrics):
        v = df[m].to_numpy(dtype="float64")
        bins = np.histogram_bin_edges(v[np.isfinite(v)], bins=40) if np.isfinite(v).any() else 10
        for sel, name, c in ((y, "correct", "tab:green"), (~y, "incorrect", "tab:red")):
            if sel.any():
                ax.hist(v[sel], bins=bins, density=True, alpha=0.5, color=c, label=f"{name} ({int(sel.sum())})")
        ax.set_title(m, fontsize=10)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(metrics):]:
        ax.axis("off")
    fig.tight_layout()
    store.write_png(fig, str(path_png))
