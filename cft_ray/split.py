"""Step 2: cut scored items into difficulty buckets, hold out test sets, route buckets to treatments.

Order (docs/method.md, step 2): a seeded random test hold-out first; the normaliser and the cut points are
fitted on the rest (the *pool*: scored, valid, known-answer, non-test rows) and applied unchanged to
the test rows. `split.fit_on: all` fits on every bucketable row, test included, as the reference
implementation did (its max, and so every normalised threshold, then moves with no hold-out draw).
Scores come from the score stage, or per item from a file (`split.scores`, `external_scores`). Every random choice is a keyed hash of (seed, item_id), so a row's fate does not
depend on file order, block layout or cluster size.

Difficulty is the metric (entropy, entropy_options, ce_gold) or 1 - metric for confidences
(max_prob, margin): bucket 0 is always the easiest. Cut points are exact order statistics of the
pool's difficulty, from one global Ray Data sort streamed through the driver a block at a time (the
driver keeps only the requested values): quantile buckets have exact sizes, except for rows tied at
a cut value. The normalisation max is the sort's last value (a Ray Data Max aggregate when fixed
thresholds need no sort). Bucket i holds cuts[i-1] <= x < cuts[i], x = difficulty for quantile
cuts (exact), x = norm for fixed thresholds: both bounds, every bucketed row in exactly one bucket.

Output (stage dir): train/ valid/ test/ test_balanced/ excluded/ Parquet, split.json,
distribution.png, manifest.json. Rows = the scored columns + norm, bucket, bucket_idx, split,
treatment; excluded/ adds `reason`. rows in = train + valid + test + excluded, always.
"""
from __future__ import annotations

import functools
import hashlib
import logging
import math
import time
from typing import Callable, Iterable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from cft_ray import layout, store
from cft_ray.config import CftConfig, ConfigError, SplitConfig
from cft_ray.layout import LABEL_FIELDS
from cft_ray.layout import SPLIT_OUTPUTS as OUTPUTS
from cft_ray.prompts import label_to_index
from cft_ray.runtime import block_partials

log = logging.getLogger("cft_ray")

CONFIDENCE_METRICS = ("max_prob", "margin")
_NEEDED = ("item_id", "valid", "unknown", "error")
_BINS = 50


def is_confidence(cfg: SplitConfig) -> bool:
    return cfg.direction == "confidence" or (cfg.direction == "auto" and cfg.metric in CONFIDENCE_METRICS)


def unit_hashes(ids: Iterable[str], seed: int) -> np.ndarray:
    """(n, 3) independent uniforms in [0, 1) per item_id (test draw, valid draw, keep order): a keyed
    BLAKE2b of the id alone, so the same seed gives the same split however the rows are blocked."""
    key = f"cft-ray/split/{seed}".encode()
    buf = b"".join(hashlib.blake2b(i.encode("utf-8", "surrogatepass"), digest_size=24, key=key).digest() for i in ids)
    return (np.frombuffer(buf, dtype="<u8").reshape(-1, 3) >> np.uint64(11)).astype(np.float64) * 2.0 ** -53


def seeded_subset(ids: list[str], n: int, seed: int) -> set[str]:
    """A seeded random subset of exactly n ids (lowest keyed hash first: independent of row order).
    The random-routing CoT rows, InstructDiff's warm-up sample, the random_select arm."""
    if n <= 0:
        return set()
    h = unit_hashes(ids, seed)[:, 0]
    return {ids[i] for i in np.argsort(h, kind="stable")[:n]}


def _floats(col) -> np.ndarray:
    return pc.fill_null(col.cast(pa.float64()), float("nan")).to_numpy()


def _bools(col) -> np.ndarray:
    return pc.fill_null(col, False).to_numpy(zero_copy_only=False)


def prepare(t: pa.Table, cfg: SplitConfig) -> pa.Table:
    """Per batch: difficulty `_d`, exclusion `reason`, `_role` (test / pool / excluded) and the draws."""
    raw = _floats(t[cfg.metric])
    d = 1.0 - raw if is_confidence(cfg) else raw
    reason = np.full(t.num_rows, None, dtype=object)
    # Later checks win: a scoring error explains more than the invalid answer it also produced.
    for on, mask, why in (("unknown" in cfg.exclude, _bools(t["unknown"]), "unknown answer"),
                          ("invalid" in cfg.exclude, ~_bools(t["valid"]), "invalid answer"),
                          (True, ~np.isfinite(d), "metric is null or not finite"),
                          (True, t["error"].is_valid().to_numpy(zero_copy_only=False), "score error")):
        if on:
            reason[mask] = why
    u = unit_hashes(t["item_id"].to_pylist(), cfg.seed)
    role = np.where(reason == None, np.where(u[:, 0] < cfg.test_fraction, "test", "pool"), "excluded")  # noqa: E711
    for name, arr in (("_d", pa.array(d)), ("reason", pa.array(reason, pa.string())), ("_role", pa.array(role, pa.string())),
                      ("_u_valid", pa.array(u[:, 1])), ("_u_keep", pa.array(u[:, 2]))):
        t = t.append_column(name, arr)
    return t


def order_stats(batches: Iterable[np.ndarray], positions: np.ndarray) -> np.ndarray:
    """Values at 0-based `positions` of a sorted stream of batches, holding one batch at a time."""
    positions = np.asarray(positions, dtype=np.int64)
    out = np.full(len(positions), np.nan)
    offset, last = 0, -np.inf
    for v in batches:
        if len(v) == 0:
            continue
        if v[0] < last or np.any(np.diff(v) < 0):
            raise RuntimeError("split: the sorted stream arrived out of order")
        sel = (positions >= offset) & (positions < offset + len(v))
        out[sel] = v[positions[sel] - offset]
        offset, last = offset + len(v), v[-1]
    if np.isnan(out).any():
        raise RuntimeError(f"split: positions beyond the {offset} sorted rows")
    return out


def normalise(d: np.ndarray, cuts_fit: dict) -> np.ndarray:
    """Difficulty -> norm: d / (pool max), or the pool rank in [0, 1] (fraction of the pool below d),
    interpolated between exact order statistics. NaN stays NaN."""
    d = np.asarray(d, dtype=np.float64)
    if cuts_fit["normalize"] == "max":
        return d / cuts_fit["scale"]
    g, r = np.asarray(cuts_fit["grid"]), np.asarray(cuts_fit["grid_ranks"])
    lo = np.searchsorted(g, d, side="left")  # first grid value >= d
    hi, prev = np.minimum(lo, len(g) - 1), np.maximum(lo - 1, 0)
    span = g[hi] - g[prev]
    frac = np.divide(d - g[prev], span, out=np.zeros_like(d), where=span > 0)
    out = np.where(g[hi] == d, r[hi], r[prev] + np.clip(frac, 0, 1) * (r[hi] - r[prev]))
    out = np.where(lo == 0, 0.0, np.where(lo == len(g), 1.0, out))
    return np.where(np.isnan(d), np.nan, out)


def fit_cuts(cfg: SplitConfig, n: int, dmin: float, dmax: float, sorted_at: Callable[[np.ndarray], np.ndarray]) -> dict:
    """The fit (normaliser + cut points on the normalised metric) from pool statistics;
    `sorted_at(positions)` gives the pool's sorted difficulty at 0-based positions (called once)."""
    if n < 1:
        raise ValueError("split: no rows to bucket (every row is excluded or held out)")
    if cfg.normalize == "max" and dmin < 0:
        raise ValueError(f"split: normalize=max needs a non-negative difficulty; {cfg.metric} reaches {dmin} "
                         "(use normalize=rank, or direction=confidence only for metrics in [0, 1])")
    names = cfg.buckets()
    scale = cfg.norm_scale or (dmax if dmax > 0 else 1.0)
    cuts_fit = {"normalize": cfg.normalize, "scale": scale, "n_pool": n, "fit_on": cfg.fit_on, "min": dmin, "max": dmax,
            "buckets": names, "routing": cfg.treatments(), "valid_fraction": cfg.valid_fraction,
            "cap_u": [math.inf] * len(names), "balanced_u": [math.inf] * len(names)}
    qs = {"quantiles": cfg.quantiles, "chunks": [i / cfg.chunks for i in range(1, cfg.chunks)], "thresholds": []}[cfg.method]
    # floor(q n) rows lie strictly below the value at that position (no ties): exact bucket sizes.
    cut_pos = np.minimum(np.floor(np.asarray(qs, dtype=np.float64) * n + 1e-9).astype(np.int64), n - 1)
    grid_pos = np.zeros(0, np.int64)
    if cfg.normalize == "rank":
        grid_pos = np.unique(np.round(np.linspace(0, n - 1, min(cfg.rank_grid, n - 1) + 1)).astype(np.int64))
    wanted = np.concatenate([cut_pos, grid_pos])
    vals = sorted_at(wanted) if len(wanted) else np.zeros(0)
    if cfg.normalize == "rank":
        cuts_fit["grid"], cuts_fit["grid_ranks"] = vals[len(cut_pos):].tolist(), (grid_pos / max(n - 1, 1)).tolist()
        cuts_fit["rank_error"] = float(np.diff(grid_pos).max(initial=1) - 1) / max(n - 1, 1)
    cuts_fit["quantiles"] = list(qs) if qs else None
    if qs:
        cuts_fit["cuts_d"] = vals[:len(cut_pos)].tolist()
        cuts_fit["cuts"] = normalise(vals[:len(cut_pos)], cuts_fit).tolist()
    else:  # fixed thresholds are on the normalised scale; their difficulty values are for reading
        cuts_fit["cuts"] = list(cfg.thresholds)
        cuts_fit["cuts_d"] = (np.asarray(cfg.thresholds) * cuts_fit["scale"] if cfg.normalize == "max"
                          else np.interp(cfg.thresholds, cuts_fit["grid_ranks"], cuts_fit["grid"])).tolist()
    cuts_fit["cuts_metric"] = [1.0 - c for c in cuts_fit["cuts_d"]] if is_confidence(cfg) else cuts_fit["cuts_d"]
    return cuts_fit


def label(t: pa.Table, cuts_fit: dict) -> pa.Table:
    """Per batch: norm, bucket, treatment, split (train/valid/test), over-cap rows -> excluded, and
    `_balanced` (in the balanced test set)."""
    d, role = t["_d"].to_numpy(), t["_role"].to_numpy(zero_copy_only=False)
    u_keep, u_valid = t["_u_keep"].to_numpy(), t["_u_valid"].to_numpy()
    unassigned = role == "excluded"
    norm = normalise(d, cuts_fit)
    # Quantile cuts decide on the difficulty itself (a division could merge nearby values and move
    # a row across an order statistic); fixed thresholds are defined on the normalised scale.
    b = (np.searchsorted(np.asarray(cuts_fit["cuts_d"]), np.nan_to_num(d), side="right") if cuts_fit["quantiles"]
         else np.searchsorted(np.asarray(cuts_fit["cuts"]), np.nan_to_num(norm), side="right"))
    names = np.array(cuts_fit["buckets"], dtype=object)
    treat = np.array([cuts_fit["routing"][x] for x in cuts_fit["buckets"]], dtype=object)
    pool, test = role == "pool", role == "test"
    over = pool & (u_keep > np.asarray(cuts_fit["cap_u"])[b])
    split = np.where(test, "test", np.where(pool & ~over, np.where(u_valid < cuts_fit["valid_fraction"], "valid", "train"), None))
    reason = t["reason"].to_numpy(zero_copy_only=False).copy()
    reason[over] = "over cap_per_bucket"
    cols = {"norm": pa.array(norm, mask=unassigned),
            "bucket": pa.array(np.where(unassigned, None, names[b]), pa.string()),
            "bucket_idx": pa.array(b.astype(np.int32), mask=unassigned),
            "split": pa.array(split, pa.string()),
            "treatment": pa.array(np.where(unassigned, None, treat[b]), pa.string()),
            "reason": pa.array(reason, pa.string()),
            "_balanced": pa.array(test & (u_keep <= np.asarray(cuts_fit["balanced_u"])[b]))}
    for name, arr in cols.items():
        i = t.schema.get_field_index(name)
        t = t.set_column(i, name, arr) if i >= 0 else t.append_column(name, arr)
    return t


def _counts(t: pa.Table, keys: list[str]) -> pa.Table:
    return t.select(keys).group_by(keys).aggregate([([], "count_all")])


def _merge(grouped: Iterable[pa.Table], keys: list[str]) -> dict[tuple, int]:
    out: dict[tuple, int] = {}
    for t in grouped:
        for row in t.to_pylist():
            k = tuple(row[c] for c in keys)
            out[k] = out.get(k, 0) + row["count_all"]
    return out


def _nothing_to_bucket(narrow, cfg: SplitConfig) -> ConfigError:
    """The one-line error when no row can be bucketed, with the counts that say why and what to change."""
    by = _merge(block_partials(narrow, functools.partial(_counts, keys=["_role", "reason"])), ["_role", "reason"])
    why = {r: c for (_, r), c in by.items() if r}
    held = sum(c for (role, _), c in by.items() if role == "test")
    parts = [f"{sum(by.values()):,} scored", *(f"{c:,} {r}" for r, c in sorted(why.items(), key=lambda x: -x[1])),
             f"{held:,} held out for test"]
    hint = ("the student never answered with an option label: check prompt.labels, the chat template "
            "(student.chat_template; plain for a base model) and the score stage's roc.json"
            if why.get("invalid answer", 0) + why.get("unknown answer", 0) > sum(why.values()) / 2
            else "lower split.test_fraction, or see the score stage's errors" if held else "see the score stage's errors")
    return ConfigError(f"split: no row to bucket ({', '.join(parts)}); {hint}")


def _tally(ds, keys: list[str]) -> dict[tuple, int]:
    """Row counts by `keys` in one Ray Data pass (only per-block partial counts reach the driver);
    the key `_bin` is the histogram bin of `norm` over [0, 1], values outside clipped into the ends."""
    def part(t: pa.Table) -> pa.Table:
        norm = _floats(t["norm"])
        bins = np.clip(np.floor(np.nan_to_num(norm) * _BINS), 0, _BINS - 1).astype(np.int32)
        return _counts(t.append_column("_bin", pa.array(bins, mask=np.isnan(norm))), keys)

    return _merge(block_partials(ds, part), keys)


def _count_min_max(ds) -> tuple[int, float | None, float | None]:
    """Rows, min and max of `_d` in one pass from per-block partials."""
    def part(t: pa.Table) -> pa.Table:
        mm = pc.min_max(t["_d"])
        return pa.table({"n": [t.num_rows], "min": [mm["min"].as_py()], "max": [mm["max"].as_py()]},
                        schema=pa.schema([("n", pa.int64()), ("min", pa.float64()), ("max", pa.float64())]))

    parts = block_partials(ds, part)
    if not parts:
        return 0, None, None
    t = pa.concat_tables(parts)
    mm = pc.min_max(pa.concat_arrays([t["min"].combine_chunks(), t["max"].combine_chunks()]))
    return int(pc.sum(t["n"]).as_py() or 0), mm["min"].as_py(), mm["max"].as_py()


def _cutoffs(ds, want: dict[tuple[str, int], tuple[int, int]]) -> dict[tuple[str, int], float]:
    """Per (role, bucket_idx) with (k, n): the k-th smallest `_u_keep` of its n rows, so that
    `u <= cutoff` keeps exactly k. The draws are uniform, so a pre-filter u < k/n + 6 sd ships only
    ~k values per group to the driver; a group that comes up short is redone unfiltered (~1e-9)."""
    out = {g: (math.inf if k >= n else -1.0) for g, (k, n) in want.items() if k >= n or k == 0}
    todo = {g: min(1.0, (k + 6 * math.sqrt(k) + 10) / n) for g, (k, n) in want.items() if g not in out}
    while todo:
        def pick(t: pa.Table, limits=dict(todo)) -> pa.Table:
            role, b, u = (t[c].to_numpy(zero_copy_only=False) for c in ("_role", "bucket_idx", "_u_keep"))
            keep = np.zeros(t.num_rows, bool)
            for (r, bi), lim in limits.items():
                keep |= (role == r) & (b == bi) & (u < lim)
            return t.select(["_role", "bucket_idx", "_u_keep"]).filter(pa.array(keep))

        got = block_partials(ds, pick)
        got = pa.concat_tables(got) if got else None
        for (r, bi), lim in list(todo.items()):
            k = want[(r, bi)][0]
            u = np.sort(got.filter(pc.and_(pc.equal(got["_role"], r), pc.equal(got["bucket_idx"], bi)))["_u_keep"]
                        .to_numpy()) if got is not None else np.zeros(0)
            if len(u) >= k:
                out[(r, bi)] = float(u[k - 1])
                del todo[(r, bi)]
            elif lim >= 1.0:
                raise RuntimeError(f"split: {len(u)} rows of {r} bucket {bi}, counted {want[(r, bi)][1]}")
            else:
                todo[(r, bi)] = 1.0
    return out


def split(scored, cfg: SplitConfig) -> tuple:
    """Scored Dataset -> (labelled lazy Dataset, cuts_fit). Fitting runs three narrow Ray Data passes over
    the columns it needs: the pool's sorted difficulty (a global sort; a Max/Min aggregate instead when
    fixed thresholds need no order statistics), counts per bucket with the histogram, and the
    cap / balanced-test draws. The labelled Dataset re-reads every column and labels rows lazily;
    `write_outputs` routes its rows to the output directories."""
    from ray.data.expressions import col

    names = scored.schema().names
    missing = [c for c in (cfg.metric, *_NEEDED) if c not in names]
    if missing:
        raise ConfigError(f"split: the scores lack column(s) {missing}; split.metric must be one of "
                          f"{[c for c in names if c in ('entropy', 'entropy_options', 'ce_gold', *CONFIDENCE_METRICS)]}")
    narrow = scored.select_columns([c for c in dict.fromkeys((*_NEEDED, cfg.metric))]) \
        .map_batches(prepare, batch_format="pyarrow", fn_kwargs={"cfg": cfg})
    pool = narrow.filter(expr=col("_role") == "pool" if cfg.fit_on == "pool" else col("_role") != "excluded")
    if cfg.method == "thresholds" and cfg.normalize == "max":
        n, dmin, dmax = _count_min_max(pool)
        sorted_at = None
    else:
        # 8 bytes a row in the object store (spilled to disk beyond it), streamed to the driver by block.
        sorted_d = pool.select_columns(["_d"]).sort("_d").materialize()
        n = sorted_d.count()

        def sorted_at(pos: np.ndarray) -> np.ndarray:
            return order_stats((b["_d"] for b in sorted_d.iter_batches(batch_format="numpy", batch_size=None)), pos)

        dmin, dmax = sorted_at(np.array([0, n - 1])) if n else (None, None)
    if n < 1:
        raise _nothing_to_bucket(narrow, cfg)
    cuts_fit = fit_cuts(cfg, n, dmin, dmax, sorted_at)
    labelled = narrow.map_batches(label, batch_format="pyarrow", fn_kwargs={"cuts_fit": cuts_fit})
    cuts_fit["counts"] = _tally(labelled, ["_role", "bucket_idx", "_bin"])
    by: dict[tuple[str, int], int] = {}
    for (role, b, _), c in cuts_fit["counts"].items():
        by[(role, b)] = by.get((role, b), 0) + c
    nb = len(cuts_fit["buckets"])
    want = {}
    if cfg.cap_per_bucket is not None:
        want.update({("pool", b): (min(cfg.cap_per_bucket, by.get(("pool", b), 0)), by.get(("pool", b), 0)) for b in range(nb)})
    m = min(by.get(("test", b), 0) for b in range(nb))
    want.update({("test", b): (m, by.get(("test", b), 0)) for b in range(nb)})
    cut = _cutoffs(labelled, want)
    cuts_fit["cap_u"] = [cut.get(("pool", b), math.inf) for b in range(nb)]
    cuts_fit["balanced_u"] = [cut.get(("test", b), math.inf) for b in range(nb)]
    cuts_fit["balanced_per_bucket"] = m
    final = scored.map_batches(prepare, batch_format="pyarrow", fn_kwargs={"cfg": cfg}) \
        .map_batches(label, batch_format="pyarrow", fn_kwargs={"cuts_fit": cuts_fit})
    return final, cuts_fit


def _route(t: pa.Table, out: str, columns: list[str]) -> pa.Table:
    """Write one labelled block's rows into each output directory; returns the row counts. The file
    is named by the block's ids, so a retried task overwrites its own earlier attempt."""
    import pyarrow.parquet as pq

    fs, root = store._fs(out)
    name = hashlib.blake2b("\x1f".join(t["item_id"].to_pylist()).encode("utf-8", "surrogatepass"), digest_size=12).hexdigest()
    split = t["split"]
    masks = {"train": pc.equal(split, "train"), "valid": pc.equal(split, "valid"), "test": pc.equal(split, "test"),
             "test_balanced": t["_balanced"], "excluded": t["reason"].is_valid()}
    counts = {}
    for o, mask in masks.items():
        part = t.filter(pc.fill_null(mask, False)).select(columns + ["reason"] * (o == "excluded"))
        counts[o] = [part.num_rows]
        if part.num_rows:
            with fs.open_output_stream(f"{root}/{o}/{name}.parquet") as f:
                pq.write_table(part, f)
    return pa.table(counts)


def write_outputs(final, columns: list[str], out: str) -> dict[str, int]:
    """One pass over the labelled Dataset: every row to its output directories (test_balanced rows
    to test/ and test_balanced/); empty outputs get a zero-row file so readers see the schema."""
    import ray
    import pyarrow.parquet as pq

    fs, root = store._fs(out)
    for o in OUTPUTS:
        fs.create_dir(f"{root}/{o}", recursive=True)
    counts = dict.fromkeys(OUTPUTS, 0)
    schema = None
    for t in ray.get(final.map_batches(_route, batch_format="pyarrow", fn_kwargs={"out": out, "columns": columns})
                     .to_arrow_refs()):
        for o in OUTPUTS:
            counts[o] += sum(t[o].to_pylist())
    for o in OUTPUTS:
        if counts[o] == 0:
            if schema is None:  # any main output has a file: a fit always leaves pool rows in train or valid
                schema = pq.read_schema(next(store.part_files(store.join(out, x))[0] for x in OUTPUTS[:3] if counts[x]))
            with fs.open_output_stream(f"{root}/{o}/empty.parquet") as f:
                pq.write_table((schema.append(pa.field("reason", pa.string())) if o == "excluded" else schema).empty_table(), f)
    return counts


def _file_tally(path: str, keys: list[str]) -> dict[tuple, int]:
    """Counts by `keys` of the Parquet written under `path`, streamed on the driver (reads only `keys`)."""
    import pyarrow.dataset as pds

    return _merge((_counts(pa.Table.from_batches([b]), keys) for b in pds.dataset(path, format="parquet").to_batches(columns=keys)), keys)


def _plot(path: str, cuts_fit: dict, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    edges = np.linspace(0, 1, _BINS + 1)
    fig, ax = plt.subplots(figsize=(8, 4.5))
    bottom = np.zeros(_BINS)
    for b, name in enumerate(cuts_fit["buckets"]):
        h = np.zeros(_BINS)
        for (role, bi, k), c in cuts_fit["counts"].items():
            if role == "pool" and bi == b:
                h[k] += c
        ax.bar(edges[:-1], h, width=1 / _BINS, bottom=bottom, align="edge", label=f"pool: {name}", alpha=0.8)
        bottom += h
    test = np.zeros(_BINS)
    for (role, _, k), c in cuts_fit["counts"].items():
        if role == "test":
            test[k] += c
    ax.step(edges[:-1], test, where="post", color="black", label="test (held out)")
    for c, q in zip(cuts_fit["cuts"], cuts_fit["quantiles"] or [None] * len(cuts_fit["cuts"])):
        ax.axvline(c, color="red", ls="--")
        ax.annotate(f"{c:.3f}" + (f" (q={q:g})" if q is not None else ""), (c, ax.get_ylim()[1] * 0.95),
                    rotation=90, va="top", ha="right", fontsize=8, color="red")
    ax.set_xlabel(f"normalised difficulty ({cuts_fit['normalize']}); values > 1 in the last bin")
    ax.set_ylabel("rows")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    store.write_png(fig, path)


def _summary(cfg: SplitConfig, cuts_fit: dict, files: dict[str, dict[tuple, int]], rows_in: int) -> dict:
    """split.json: everything a reader needs to judge the split."""
    names = cuts_fit["buckets"]
    sizes = {s: {b: sum(c for (bk, *_), c in files[s].items() if bk == b) for b in names} for s in OUTPUTS if s != "excluded"}
    per_cat: dict = {}
    for s in ("train", "valid", "test", "test_balanced"):
        for (b, cat), c in files[s].items():
            per_cat.setdefault(s, {}).setdefault(cat if cat is not None else "(none)", {}).setdefault(b, 0)
            per_cat[s][cat if cat is not None else "(none)"][b] += c
    excluded: dict = {}
    for (_, _, why), c in files["excluded"].items():
        excluded[why] = excluded.get(why, 0) + c
    pool = [sum(c for (r, b, _), c in cuts_fit["counts"].items() if r == "pool" and b == i) for i in range(len(names))]
    n_test = sum(c for (r, *_), c in cuts_fit["counts"].items() if r == "test")
    qs = cuts_fit["quantiles"]
    totals = {s: sum(sizes[s].values()) for s in sizes} | {"excluded": sum(excluded.values())}
    return {
        "metric": cfg.metric,
        "difficulty": f"1 - {cfg.metric}" if is_confidence(cfg) else cfg.metric,
        "normalize": cfg.normalize,
        "normaliser": ({"max_difficulty": cuts_fit["max"], "scale": cuts_fit["scale"],
                        "rule": f"norm = difficulty / {'split.norm_scale' if cfg.norm_scale else 'the max over the fitted rows'}"}
                       if cfg.normalize == "max" else
                       {"rule": "norm = fraction of the pool below the row's difficulty, interpolated between "
                                f"{len(cuts_fit['grid'])} exact order statistics", "max_rank_error": cuts_fit["rank_error"]}),
        "method": cfg.method,
        "quantiles": qs,
        "thresholds": cuts_fit["cuts"],
        "thresholds_raw": cuts_fit["cuts_d"],
        "thresholds_metric": cuts_fit["cuts_metric"],
        "buckets": names,
        "bucket_rule": "bucket i: thresholds[i-1] <= norm < thresholds[i] (both bounds; first and last open-ended)",
        "fitted_on": (f"the pool: {cuts_fit['n_pool']} scored, valid, known-answer rows outside the test hold-out"
                      if cfg.fit_on == "pool" else
                      f"all {cuts_fit['n_pool']} scored, valid, known-answer rows, test included (fit, then hold out)"),
        "applied_to_test": "the same normaliser and thresholds label the test rows (test norm may exceed 1 under normalize=max)",
        "quantile_error": ("none: thresholds are exact order statistics of the pool (global Ray Data sort); pool bucket "
                           "sizes are exact except for rows tied at a threshold" if qs else
                           "n/a: fixed thresholds"),
        "pool_buckets": {"sizes": dict(zip(names, pool)),
                         "expected_fraction": (np.diff([0, *np.floor(np.array(qs) * cuts_fit["n_pool"] + 1e-9), cuts_fit["n_pool"]])
                                               / cuts_fit["n_pool"]).round(6).tolist() if qs else None,
                         "realized_fraction": [round(p / cuts_fit["n_pool"], 6) for p in pool]},
        "test": {"fraction": cfg.test_fraction, "rows": n_test, "seed": cfg.seed,
                 "rule": "held out first: keyed BLAKE2b(seed, item_id) < fraction, of the bucketable rows"},
        "test_balanced": {"per_bucket": cuts_fit["balanced_per_bucket"],
                          "rule": "each test bucket down-sampled to the smallest (lowest keyed hash first)"},
        "valid": {"fraction": cfg.valid_fraction, "rule": "after the cap: keyed BLAKE2b draw < fraction (seeded, per row)"},
        "cap_per_bucket": cfg.cap_per_bucket,
        "routing": cuts_fit["routing"],
        "sizes": sizes,
        "per_category": per_cat,
        "excluded": excluded,
        "counts": {"rows_in": rows_in, **totals,
                   "reconciles": rows_in == totals["train"] + totals["valid"] + totals["test"] + totals["excluded"]},
        "plot": "distribution.png",
    }


def _read_table(path: str, id_column: str) -> pa.Table:
    """A Parquet, JSONL, CSV or TSV file (local or object store), read on the driver; ids as text."""
    import pyarrow.csv as pacsv
    import pyarrow.json as pajson
    import pyarrow.parquet as pq

    fs, p = store._fs(path)
    ext = p.rsplit(".", 1)[-1].lower()
    if ext == "parquet":
        return pq.read_table(p, filesystem=fs)
    with fs.open_input_stream(p) as f:
        if ext in ("jsonl", "json", "ndjson"):
            return pajson.read_json(f)
        if ext in ("csv", "tsv"):
            return pacsv.read_csv(f, parse_options=pacsv.ParseOptions(delimiter="\t" if ext == "tsv" else ","),
                                  convert_options=pacsv.ConvertOptions(column_types={id_column: pa.string()}))
    raise ConfigError(f"split.scores: cannot tell the format of {path} (.parquet, .jsonl, .csv or .tsv)")


def _external_columns(t: pa.Table, scores: pa.Table, cfg: CftConfig) -> pa.Table:
    """Per batch of items: its row of `scores` (a broadcast left join by item id), then valid / unknown
    from the file or from the student's answer column."""
    sc = cfg.split
    at = pc.index_in(t["item_id"], value_set=scores["item_id"])  # ids are unique in `scores` (checked)
    for name in scores.column_names[1:]:  # a column of the file replaces an item column of the same name
        column = scores[name].take(at)
        t = t.set_column(t.column_names.index(name), name, column) if name in t.column_names else t.append_column(name, column)
    n = t.num_rows
    if "valid" not in t.column_names:
        if sc.scores_answer:
            idx = [None if a is None else label_to_index(str(a).strip(), len(o), cfg.prompt.labels, cfg.prompt.fallback)
                   for a, o in zip(t[sc.scores_answer].to_pylist(), t["options"].to_pylist())]
            t = t.append_column("valid", pa.array([i is not None for i in idx]))
            t = t.append_column("unknown", pa.array([i == -1 for i in idx]))
        else:
            t = t.append_column("valid", pc.is_finite(pc.fill_null(t[sc.metric].cast(pa.float64()), float("nan"))))
    if "unknown" not in t.column_names:
        t = t.append_column("unknown", pa.array([False] * n))
    return t.append_column("error", pa.array([None] * n, pa.string()))


def external_scores(cfg: CftConfig, data_dir: str):
    """The data stage's items joined with `split.scores` (left join on item id): an item without a score
    keeps a null metric and is excluded with its reason; scores without an item are counted. Returns
    (Dataset, counts)."""
    sc = cfg.split
    try:
        table = _read_table(sc.scores, sc.scores_id)
    except (OSError, pa.ArrowInvalid) as e:
        raise ConfigError(f"split.scores: cannot read {sc.scores}: {e}") from None
    need = [sc.scores_id, sc.metric, *([sc.scores_answer] if sc.scores_answer else [])]
    missing = [c for c in need if c not in table.column_names]
    if missing:
        raise ConfigError(f"split.scores: {sc.scores} has no column {missing} (split.scores_id / split.metric / "
                          f"split.scores_answer); it has {table.column_names}")
    table = table.select(need + [c for c in ("valid", "unknown") if c in table.column_names])
    table = table.rename_columns(["item_id", *table.column_names[1:]]).set_column(0, "item_id", table[0].cast(pa.string()))
    ids = pc.unique(table["item_id"])
    if len(ids) < table.num_rows:
        raise ConfigError(f"split.scores: {table.num_rows - len(ids):,} ids of {sc.scores} appear more than once; "
                          "give one score per item")
    item_ids = store.columns(store.join(data_dir, "items"), ["item_id"])["item_id"]
    matched = int(pc.sum(pc.is_in(table["item_id"], value_set=item_ids)).as_py() or 0)
    counts = {"source": sc.scores, "score_rows": table.num_rows, "matched": matched,
              "scores_without_item": table.num_rows - matched, "items_without_score": len(item_ids) - matched}
    # The table is on the driver already: Ray Data ships it once with the map function (object store) and each
    # block joins it, instead of a hash join whose shuffle actors re-ran on each of the split's five passes
    # (9-14 s a pass on 60 rows here).
    return layout.load_items(data_dir).map_batches(_external_columns, batch_format="pyarrow",
                                                   fn_kwargs={"scores": table, "cfg": cfg}), counts


def routing_quality(out: str) -> dict | None:
    """How well the routing finds what the student gets wrong, on the routed (train + valid) rows: precision =
    of the rows routed to CoT, the share the student answered wrong; recall = of the rows it answered wrong,
    the share routed to CoT. None where the rows carry no student answer (split.scores without one)."""
    parts = [store.join(out, s) for s in ("train", "valid") if store.part_files(store.join(out, s))]
    try:
        t = pa.concat_tables(store.columns(p, ["treatment", "correct"]) for p in parts)
    except pa.ArrowInvalid:  # no `correct` column, or no routed rows at all
        return None
    routed = pc.equal(t["treatment"], "cot").to_numpy(zero_copy_only=False)
    wrong = ~pc.fill_null(t["correct"], False).to_numpy(zero_copy_only=False)
    n_routed, n_wrong, hit = int(routed.sum()), int(wrong.sum()), int((routed & wrong).sum())
    return {"rows": t.num_rows, "routed_cot": n_routed, "student_wrong": n_wrong, "routed_and_wrong": hit,
            "precision": round(hit / n_routed, 4) if n_routed else None,
            "recall": round(hit / n_wrong, 4) if n_wrong else None,
            "base_rate_wrong": round(n_wrong / t.num_rows, 4) if t.num_rows else None}


def main(cfg: CftConfig) -> str:
    """Stage entry: split the score stage's rows (or the items with `split.scores`) into
    `stage_dir(cfg, "split")` (skipped when finished)."""
    upstream = layout.upstream(cfg, "data" if cfg.split.scores else "score", by="split")
    out = layout.stage_dir(cfg, "split")
    if layout.finished(out, "split"):
        return out
    started = time.time()
    store.reset(out)  # a half-written split is cheaper to redo than to trust
    external = None
    if cfg.split.scores:
        scored, external = external_scores(cfg, upstream)
    else:
        scored = layout.load_scores(upstream, include_invalid=True)
    final, cuts_fit = split(scored, cfg.split)
    written = write_outputs(final, [*scored.schema().names, *(f.name for f in LABEL_FIELDS)], out)
    keys = {s: ["bucket", "category"] for s in OUTPUTS} | {"excluded": ["bucket", "category", "reason"]}
    files = {s: _file_tally(store.join(out, s), keys[s]) for s in OUTPUTS}
    rows_in = sum(cuts_fit["counts"].values())
    summary = _summary(cfg.split, cuts_fit, files, rows_in)
    if not summary["counts"]["reconciles"] or any(written[o] != summary["counts"][o] for o in OUTPUTS):
        raise RuntimeError(f"split: counts do not reconcile: {summary['counts']}, written {written}")
    summary["scores_from"] = external or {"source": f"score stage {upstream}"}
    summary["routing_quality"] = routing_quality(out)
    store.write_json(store.join(out, "split.json"), summary)
    _plot(store.join(out, "distribution.png"), cuts_fit,
          f"{summary['difficulty']} ({cfg.split.method}), pool n={cuts_fit['n_pool']}, test n={summary['test']['rows']}")
    c = summary["counts"]
    counts = {"rows_in": rows_in, "rows_out": c["train"] + c["valid"] + c["test"], **{k: c[k] for k in OUTPUTS}}
    store.finish(out, store.stage_manifest("split", layout.dir_hash(out), started, counts,
                                           [("scores_from", summary["scores_from"]),
                                            ("thresholds", summary["thresholds"]), ("sizes", summary["sizes"]),
                                            ("routing", summary["routing"]), ("excluded", summary["excluded"])]))
    log.info("split: thresholds %s (%s), sizes %s, excluded %s", [round(x, 4) for x in summary["thresholds"]],
             summary["difficulty"], summary["sizes"], summary["excluded"])
    return out
