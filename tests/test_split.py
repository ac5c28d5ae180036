"""Split stage: property tests of the pure cut / assignment / draw functions (many hypothesis examples,
no Ray), then the Ray path end to end on synthetic scored Parquet (a few runs)."""
from __future__ import annotations

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cft_ray import split as sp
from cft_ray import store
from cft_ray.config import ConfigError, SplitConfig, load_config
from cft_ray.layout import load_split, stage_dir

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def table(d, valid=None, unknown=None, error=None, metric="entropy", ids=None) -> pa.Table:
    n = len(d)
    d = np.asarray(d, dtype=np.float64)
    return pa.table({
        "item_id": ids if ids is not None else [f"id{i}" for i in range(n)],
        metric: pa.array(d, mask=np.isnan(d)),
        "valid": pa.array(np.ones(n, bool) if valid is None else valid),
        "unknown": pa.array(np.zeros(n, bool) if unknown is None else unknown),
        "error": pa.array([None] * n if error is None else error, pa.string()),
    })


def local_plan(t: pa.Table, cfg: SplitConfig) -> tuple[pa.Table, dict]:
    """The driver side of `split` without Ray: prepare, fit on the pool, label."""
    prepared = sp.prepare(t, cfg)
    role = prepared["_role"].to_numpy(zero_copy_only=False)
    pool = np.sort(prepared["_d"].to_numpy()[role == "pool"])
    plan = sp.fit_cuts(cfg, len(pool), pool.min() if len(pool) else None, pool.max() if len(pool) else None,
                  lambda pos: pool[pos])
    return sp.label(prepared, plan), plan


values = st.lists(st.one_of(st.floats(0, 50, allow_nan=False), st.sampled_from([0.0, 1.0, 2.5])), min_size=1, max_size=300)
methods = st.sampled_from([
    {"method": "quantiles"}, {"method": "quantiles", "quantiles": [0.1, 0.5, 0.9]}, {"method": "chunks", "chunks": 4},
    {"method": "thresholds", "thresholds": [0.2, 0.6]}])


@FAST
@given(values, methods, st.sampled_from(["max", "rank"]), st.integers(0, 3))
def test_every_row_in_exactly_one_bucket_ordered_by_metric(d, method, normalize, seed):
    cfg = SplitConfig(**method, normalize=normalize, test_fraction=0.3, seed=seed, rank_grid=16)
    if "pool" not in sp.prepare(table(d), cfg)["_role"].to_pylist():
        with pytest.raises(ValueError, match="no rows to bucket"):
            local_plan(table(d), cfg)
        return
    labelled, plan = local_plan(table(d), cfg)
    b = labelled["bucket_idx"].to_numpy(zero_copy_only=False)
    norm = labelled["norm"].to_numpy()
    names = labelled["bucket"].to_pylist()
    assert labelled["bucket_idx"].null_count == 0 and set(b) <= set(range(len(cfg.buckets())))
    assert [cfg.buckets()[i] for i in b] == names
    # both bounds: quantile cuts on the metric, fixed thresholds on norm (and the other scale up to rounding)
    exact, loose = (d, norm) if plan["quantiles"] else (norm, d)
    cuts, other = ([-np.inf, *plan[k], np.inf] for k in (("cuts_d", "cuts") if plan["quantiles"] else ("cuts", "cuts_d")))
    assert all(cuts[i] <= x < cuts[i + 1] for i, x in zip(b, exact))
    if normalize == "max":
        assert all(other[i] * (1 - 1e-9) <= x <= other[i + 1] * (1 + 1e-9) for i, x in zip(b, loose))
    order = np.argsort(np.asarray(d), kind="stable")
    assert np.all(np.diff(b[order]) >= 0)  # harder metric never in an easier bucket
    routing = cfg.treatments()
    assert labelled["treatment"].to_pylist() == [routing[x] for x in names]
    assert set(labelled["split"].to_pylist()) <= {"train", "valid", "test"}


@FAST
@given(st.lists(st.floats(0, 1e6, allow_nan=False), min_size=1, max_size=400, unique=True),
       st.sampled_from([[0.25, 0.75], [0.1, 0.5, 0.9], [0.33]]), st.sampled_from(["max", "rank"]))
def test_quantile_buckets_have_exact_sizes_on_distinct_values(d, qs, normalize):
    cfg = SplitConfig(quantiles=qs, normalize=normalize, test_fraction=0.0, rank_grid=8,
                      bucket_names=[f"q{i}" for i in range(len(qs) + 1)])
    labelled, plan = local_plan(table(d), cfg)
    n = len(d)
    sizes = np.bincount(labelled["bucket_idx"].to_numpy(), minlength=len(qs) + 1)
    expected = np.diff([0, *np.floor(np.asarray(qs) * n + 1e-9).astype(int).clip(max=n - 1), n])
    assert sizes.tolist() == expected.tolist()  # the stated error is zero rows without ties


@FAST
@given(st.lists(st.sampled_from([0.0, 0.5, 1.0, 1.5, 3.0]), min_size=4, max_size=300))
def test_quantile_sizes_with_ties_err_only_by_rows_tied_at_a_cut(d):
    labelled, plan = local_plan(table(d), SplitConfig(test_fraction=0.0))
    n, d = len(d), np.asarray(d)
    sizes = np.bincount(labelled["bucket_idx"].to_numpy(), minlength=3)
    below = np.floor(np.array([0.25, 0.75]) * n + 1e-9).astype(int)
    cut_d = np.asarray(plan["cuts_metric"])
    ties = [(d == c).sum() for c in cut_d]
    realized_below = np.cumsum(sizes)[:2]
    assert all(abs(r - e) <= t for r, e, t in zip(realized_below, below, ties))


@FAST
@given(st.lists(st.floats(-1e3, 1e3, allow_nan=False), min_size=1, max_size=200), st.data())
def test_order_stats_match_a_full_sort_for_any_batching(x, data):
    s = np.sort(np.asarray(x))
    cuts = sorted(data.draw(st.lists(st.integers(0, len(s)), max_size=6)))
    batches = np.split(s, cuts)
    pos = np.asarray(data.draw(st.lists(st.integers(0, len(s) - 1), min_size=1, max_size=10)))
    assert np.array_equal(sp.order_stats(iter(batches), pos), s[pos])


def test_order_stats_refuses_an_unsorted_stream():
    with pytest.raises(RuntimeError, match="out of order"):
        sp.order_stats(iter([np.array([1.0, 2.0]), np.array([1.5])]), np.array([0]))


@FAST
@given(st.lists(st.floats(0, 100, allow_nan=False), min_size=2, max_size=300), st.integers(2, 40))
def test_rank_norm_within_the_stated_error(d, grid):
    cfg = SplitConfig(normalize="rank", test_fraction=0.0, rank_grid=grid)
    labelled, plan = local_plan(table(d), cfg)
    s = np.sort(d)
    exact = np.searchsorted(s, d, side="left") / (len(d) - 1)  # fraction of the pool below, ties at their lowest
    assert np.all(np.abs(labelled["norm"].to_numpy() - exact) <= plan["rank_error"] + 1e-9)
    if len(d) <= grid + 1:
        assert plan["rank_error"] == 0


@FAST
@given(st.lists(st.text(min_size=1, max_size=12), min_size=1, max_size=200, unique=True), st.integers(0, 5), st.data())
def test_draws_depend_only_on_seed_and_item_id(ids, seed, data):
    cfg = SplitConfig(seed=seed, test_fraction=0.5)
    t = table(np.arange(len(ids), dtype=float), ids=ids)
    whole = sp.prepare(t, cfg)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(ids)), max_size=5)))
    pieces = [sp.prepare(t.slice(a, b - a), cfg) for a, b in zip([0, *cuts], [*cuts, len(ids)])]
    assert pa.concat_tables(pieces).equals(whole)
    other = sp.prepare(t, SplitConfig(seed=seed + 1, test_fraction=0.5))
    if len(ids) >= 40:  # a new seed is a new draw
        assert other["_u_keep"].to_pylist() != whole["_u_keep"].to_pylist()


def test_draws_are_uniform_and_independent():
    u = sp.unit_hashes([f"item-{i}" for i in range(20000)], 42)
    assert np.all((u >= 0) & (u < 1))
    assert np.allclose(u.mean(axis=0), 0.5, atol=0.01)
    assert abs(np.corrcoef(u.T)[0, 1]) < 0.03 and abs(np.corrcoef(u.T)[1, 2]) < 0.03
    test = u[:, 0] < 0.1
    assert abs(test.mean() - 0.1) < 5 * np.sqrt(0.1 * 0.9 / len(u))


@FAST
@given(st.lists(st.tuples(st.booleans(), st.booleans(), st.booleans(), st.booleans()), min_size=1, max_size=80),
       st.sampled_from([["invalid", "unknown"], ["invalid"], []]))
def test_invalid_unknown_error_rows_are_counted_not_lost(flags, exclude):
    valid, unknown, error, null = (np.array(x) for x in zip(*flags))
    n = len(flags)
    d = np.where(null, np.where(np.arange(n) % 2 == 0, np.nan, np.inf), np.arange(n, dtype=float))  # null or inf
    t = table(d, valid=valid, unknown=unknown, error=np.where(error, "boom", None))
    cfg = SplitConfig(exclude=exclude, test_fraction=0.0)
    prepared = sp.prepare(t, cfg)
    reason = prepared["reason"].to_pylist()
    expect = [("score error" if e else "metric is null or not finite" if nu else "invalid answer" if ("invalid" in exclude and not v)
               else "unknown answer" if ("unknown" in exclude and u) else None)
              for v, u, e, nu in zip(valid, unknown, error, null)]
    assert reason == expect
    assert prepared.num_rows == len(flags)
    role = prepared["_role"].to_pylist()
    assert all((r == "excluded") == (x is not None) for r, x in zip(role, reason))
    if "pool" in role:
        labelled, _ = local_plan(t, cfg)
        assert labelled["bucket"].null_count == sum(x is not None for x in reason)


def test_confidence_metrics_are_turned_into_difficulty():
    mp = np.linspace(0.05, 0.95, 40)
    labelled, plan = local_plan(table(mp, metric="max_prob"), SplitConfig(metric="max_prob", test_fraction=0.0))
    b = labelled["bucket_idx"].to_numpy()
    assert b[0] == 2 and b[-1] == 0  # least confident = hardest
    assert np.all(np.diff(b) <= 0)
    assert plan["cuts_metric"][0] > plan["cuts_metric"][1]  # on the confidence scale the cuts run downwards


def test_max_normalisation_refuses_negative_difficulty():
    with pytest.raises(ValueError, match="non-negative"):
        local_plan(table([-1.0, 2.0, 3.0]), SplitConfig(test_fraction=0.0))
    labelled, _ = local_plan(table([-1.0, 2.0, 3.0]), SplitConfig(test_fraction=0.0, normalize="rank"))
    assert labelled["norm"].to_pylist() == [0.0, 0.5, 1.0]


def test_config_validation():
    assert SplitConfig().treatments() == {"easy": "direct", "medium": "direct", "hard": "cot"}
    assert SplitConfig(method="chunks", chunks=4).treatments() == {"b0": "direct", "b1": "direct", "b2": "direct", "b3": "cot"}
    for bad in ({"quantiles": [0.75, 0.25]}, {"quantiles": [0.0, 0.5]}, {"method": "thresholds"},
                {"routing": {"easy": "direct", "hard": "cot"}}, {"bucket_names": ["a", "a", "b"]}):
        with pytest.raises(ValueError):
            SplitConfig(**bad)
    with pytest.raises(ConfigError, match="bucket_names"):
        load_config(None, ["split.bucket_names=[a, b]"])


# ---------------------------------------------------------------- Ray path, on synthetic scored Parquet

def scored(n: int, seed: int = 0) -> pa.Table:
    """Synthetic score-stage rows: every item column + the metric columns, ~5% invalid, 3% unknown, 2% errors."""
    rng = np.random.default_rng(seed)
    err = rng.random(n) < 0.02
    ent = rng.gamma(2.0, 0.5, n)
    valid = rng.random(n) >= 0.05
    unknown = valid & (rng.random(n) < 0.03)
    cats = np.array(["math", "law", "bio", None], dtype=object)

    def metric(x):
        return pa.array(x.astype(np.float32), mask=err)

    return pa.table({
        "item_id": [f"s{seed}-{i:06d}" for i in range(n)], "question": [f"q{i}" for i in range(n)],
        "options": pa.array([["a", "b", "c", "d"]] * n, pa.list_(pa.string())),
        "answer": pa.array(rng.integers(0, 4, n), pa.int32()),
        "subject": pa.array(cats[rng.integers(0, 4, n)], pa.string()),
        "category": pa.array(cats[rng.integers(0, 4, n)], pa.string()), "source": pa.array(["synth"] * n),
        "entropy": metric(ent), "entropy_options": metric(ent / 3), "ce_gold": metric(rng.gamma(2, 1, n)),
        "max_prob": metric(rng.random(n)), "margin": metric(rng.random(n) / 2),
        "argmax_id": pa.array(rng.integers(0, 100, n)), "argmax_token": pa.array(["1"] * n),
        "pred": pa.array(np.where(unknown, -1, rng.integers(0, 4, n)).astype(np.int32), mask=~valid | err),
        "valid": pa.array(valid & ~err), "unknown": pa.array(unknown & ~err), "correct": pa.array(rng.random(n) < 0.3),
        "prompt_tokens": pa.array(rng.integers(50, 200, n).astype(np.int32)),
        "error": pa.array(np.where(err, "prompt longer than max_prompt_tokens", None), pa.string()),
    })


def fake_score_stage(cfg, t: pa.Table, parts: int) -> None:
    out = stage_dir(cfg, "score")
    os.makedirs(f"{out}/parts", exist_ok=True)
    for k, idx in enumerate(np.array_split(np.random.default_rng(parts).permutation(t.num_rows), parts)):
        pq.write_table(t.take(pa.array(idx)), f"{out}/parts/part-{k:03d}.parquet")
    store.finish(out, {"stage": "score"})


def read(out: str, name: str) -> pa.Table:
    return pq.read_table(f"{out}/{name}")


N = 1200
CAP = ["split.cap_per_bucket=150"]


@pytest.fixture(scope="module")
def default_run(ray_local, tmp_path_factory):
    cfg = load_config(None, [f"run_dir={tmp_path_factory.mktemp('split-a')}", *CAP])
    data = scored(N)
    fake_score_stage(cfg, data, parts=3)
    return cfg, data, sp.main(cfg)


@pytest.mark.heavy
def test_ray_split_outputs_reconcile_and_respect_every_rule(default_run):
    cfg, data, out = default_run
    outs = {name: read(out, name) for name in sp.OUTPUTS}
    # rows in = train + valid + test + excluded, each item exactly once
    ids = [i for name in ("train", "valid", "test", "excluded") for i in outs[name]["item_id"].to_pylist()]
    assert sorted(ids) == sorted(data["item_id"].to_pylist())
    train_ids = set(outs["train"]["item_id"].to_pylist()) | set(outs["valid"]["item_id"].to_pylist())
    assert not train_ids & set(outs["test"]["item_id"].to_pylist())
    for name in ("train", "valid", "test", "test_balanced"):
        t = outs[name]
        assert t.column_names == [*data.column_names, "norm", "bucket", "bucket_idx", "split", "treatment"]
        assert t["bucket"].null_count == 0 and set(t["split"].to_pylist()) <= {name.split("_")[0]}
    assert outs["excluded"].column_names[-1] == "reason"

    # invalid / unknown / error rows: counted with their reason
    summary = json.loads(open(f"{out}/split.json").read())
    err = data["error"].is_valid().to_numpy(zero_copy_only=False)
    valid, unknown = data["valid"].to_numpy(zero_copy_only=False), data["unknown"].to_numpy(zero_copy_only=False)
    assert summary["excluded"]["score error"] == err.sum()
    assert summary["excluded"]["invalid answer"] == (~valid & ~err).sum()
    assert summary["excluded"]["unknown answer"] == (unknown & valid).sum()
    assert summary["counts"]["reconciles"] and summary["counts"]["rows_in"] == N

    # thresholds = exact quantiles of the pool, fitted without the test rows
    prepared = sp.prepare(data, cfg.split)
    role = prepared["_role"].to_numpy(zero_copy_only=False)
    pool = np.sort(prepared["_d"].to_numpy()[role == "pool"])
    n = len(pool)
    assert summary["thresholds_metric"] == pytest.approx([pool[int(0.25 * n)], pool[int(0.75 * n)]])
    assert summary["thresholds"] == pytest.approx([pool[int(0.25 * n)] / pool[-1], pool[int(0.75 * n)] / pool[-1]])
    assert summary["pool_buckets"]["realized_fraction"] == pytest.approx(summary["pool_buckets"]["expected_fraction"], abs=1 / n)
    assert sorted(outs["test"]["item_id"].to_pylist()) == sorted(prepared.filter(pa.array(role == "test"))["item_id"].to_pylist())

    # balanced test set: every bucket down to the smallest; a subset of test
    tb = outs["test_balanced"]
    sizes = np.bincount(tb["bucket_idx"].to_numpy(), minlength=3)
    assert len(set(sizes)) == 1 and sizes[0] == np.bincount(outs["test"]["bucket_idx"].to_numpy(), minlength=3).min() > 0
    assert set(tb["item_id"].to_pylist()) <= set(outs["test"]["item_id"].to_pylist())

    # cap: train + valid per bucket = min(cap, pool bucket size); the rest excluded as over cap
    kept = np.bincount(np.concatenate([outs["train"]["bucket_idx"].to_numpy(), outs["valid"]["bucket_idx"].to_numpy()]), minlength=3)
    assert kept.tolist() == [min(150, s) for s in summary["pool_buckets"]["sizes"].values()]
    assert summary["excluded"]["over cap_per_bucket"] == n - kept.sum()
    assert summary["sizes"]["train"]["hard"] == outs["train"].filter(pa.compute.equal(outs["train"]["bucket"], "hard")).num_rows
    assert set(outs["train"].filter(pa.compute.equal(outs["train"]["bucket"], "hard"))["treatment"].to_pylist()) == {"cot"}

    # routing against the student's answers, counted by hand from the written rows
    tv = pa.concat_tables([outs["train"].select(["treatment", "correct"]), outs["valid"].select(["treatment", "correct"])]).to_pylist()
    routed = [r for r in tv if r["treatment"] == "cot"]
    wrong = [r for r in tv if not r["correct"]]
    rq = summary["routing_quality"]
    assert (rq["rows"], rq["routed_cot"], rq["student_wrong"]) == (len(tv), len(routed), len(wrong)) and routed and wrong
    assert rq["precision"] == round(sum(not r["correct"] for r in routed) / len(routed), 4)
    assert rq["recall"] == round(sum(r["treatment"] == "cot" for r in wrong) / len(wrong), 4)

    assert os.path.getsize(f"{out}/distribution.png") > 1000
    manifest = json.loads(open(f"{out}/manifest.json").read())
    assert manifest["counts"]["rows_in"] == N and manifest["stage"] == "split"
    assert sp.main(cfg) == out  # finished: skipped
    assert load_split(out, "test_balanced").count() == tb.num_rows


@pytest.mark.heavy
def test_ray_split_same_seed_same_split_whatever_the_block_layout(default_run, tmp_path):
    """Another block layout, through the CLI, with rank normalisation: quantile buckets are decided
    on the metric, so every row's fate is the same; norm becomes the exact pool rank."""
    from cft_ray import cli

    cfg, data, out = default_run
    over = [f"run_dir={tmp_path}", *CAP, "split.normalize=rank"]
    fake_score_stage(load_config(None, over), data, parts=7)
    (tmp_path / "defaults.yaml").write_text("{}\n")  # the field defaults, as load_config(None, ...) above
    assert cli.main(["split", "-c", str(tmp_path / "defaults.yaml"), *over]) == 0
    again = stage_dir(load_config(None, over), "split")

    def fate(d):
        rows = [r for name in ("train", "valid", "test", "excluded") for r in read(d, name).select(["item_id", "bucket", "split"]).to_pylist()]
        return sorted((r["item_id"], r["bucket"] or "", r["split"] or "") for r in rows)

    assert fate(again) == fate(out)
    assert sorted(read(again, "test_balanced")["item_id"].to_pylist()) == sorted(read(out, "test_balanced")["item_id"].to_pylist())
    prepared = sp.prepare(data, cfg.split)
    pool = np.sort(prepared["_d"].to_numpy()[prepared["_role"].to_numpy(zero_copy_only=False) == "pool"])
    train = read(again, "train")
    exact = np.searchsorted(pool, train["entropy"].to_numpy().astype(np.float64), side="left") / (len(pool) - 1)
    assert np.allclose(train["norm"].to_numpy(), exact)
    assert json.loads(open(f"{again}/split.json").read())["normaliser"]["max_rank_error"] == 0


@pytest.mark.heavy
def test_ray_split_thresholds_without_exclusions_and_empty_outputs(ray_local, tmp_path):
    over = [f"run_dir={tmp_path}", "split.method=thresholds", "split.thresholds=[0.3]", "split.exclude=[]",
            "split.test_fraction=0", "split.valid_fraction=0", "split.metric=max_prob",
            "split.routing={b0: direct, b1: drop}"]
    cfg = load_config(None, over)
    data = scored(300, seed=1)
    fake_score_stage(cfg, data, parts=2)
    out = sp.main(cfg)
    summary = json.loads(open(f"{out}/split.json").read())
    err = data["error"].is_valid().to_numpy(zero_copy_only=False)
    assert summary["excluded"] == {"score error": err.sum()}  # invalid and unknown rows are bucketed now
    assert summary["thresholds"] == [0.3] and summary["difficulty"] == "1 - max_prob"
    for name in ("valid", "test", "test_balanced"):
        assert load_split(out, name).count() == 0  # empty, but readable with the full schema
        assert "treatment" in read(out, name).column_names
    train = read(out, "train")
    assert train.num_rows == 300 - err.sum()
    d = 1 - train["max_prob"].to_numpy()
    b = train["bucket_idx"].to_numpy()
    assert np.all((d / d.max() < 0.3) == (b == 0))
    assert set(train.filter(pa.compute.equal(train["bucket"], "b1"))["treatment"].to_pylist()) == {"drop"}


def test_seeded_subset_is_exact_and_order_free():
    from cft_ray.split import seeded_subset

    ids = [f"id{k}" for k in range(200)]
    a = seeded_subset(ids, 37, seed=5)
    assert len(a) == 37 and a <= set(ids)
    assert a == seeded_subset(list(reversed(ids)), 37, seed=5)
    assert a != seeded_subset(ids, 37, seed=6)
    assert seeded_subset(ids, 0, seed=5) == set()


def test_a_student_that_never_answers_with_a_label_fails_in_one_line_with_the_counts(ray_local, tmp_path):
    cfg = load_config(None, [f"run_dir={tmp_path}"])
    data = scored(80, seed=2)
    data = data.set_column(data.column_names.index("valid"), "valid", pa.array([False] * 80))
    data = data.set_column(data.column_names.index("unknown"), "unknown", pa.array([False] * 80))
    fake_score_stage(cfg, data, parts=2)
    n_err = int(data["error"].is_valid().to_numpy(zero_copy_only=False).sum())
    with pytest.raises(ConfigError) as e:
        sp.main(cfg)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("split: no row to bucket (80 scored, ")
    assert f"{80 - n_err} invalid answer" in msg and "0 held out for test" in msg
    assert "the student never answered with an option label" in msg and "student.chat_template" in msg
    assert not store.is_done(stage_dir(cfg, "split"))
