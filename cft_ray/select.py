"""InstructDiff (docs/method.md, B): differential-entropy data selection, the alternative to entropy routing.

    pool (the split's train rows, or instruction data with `instruction`/`response` columns)
      --warm-up: the train stage on a seeded alpha sample-->  calibrated model
      --respond(): teacher-forced on the gold response, under the base and the calibrated model-->
        per item: response-token NLL L and mean full-vocabulary entropy H (length-normalised)
      dNLL = L_cal - L_base, dH = H_base - H_cal
      --choose(): drop dNLL below its gamma / above its 1-gamma quantile, keep the lowest dH up to
        beta of the pool (items, or response tokens)-->  selection
    iterations > 1: the selection trains the next calibrated model (base scores are reused).

Scoring batches like the score stage (length-sorted micro-batches, left padding, explicit
positions); the model's own forward computes the logits of the response positions only
(`logits_to_keep`), so logit soft-capping and scaling of any architecture apply; only scalars leave
the actor. Every pass resumes by row; every round's training resumes from its checkpoints.
Outputs: `base/`, `round-<r>/{train,scores,selection.parquet}`, `selection/` (item_id, selected,
reason, dnll, dh, the four scores), `select.png`, `manifest.json`.
"""
from __future__ import annotations

import inspect
import logging
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from cft_ray import layout, metrics, models, prompts, store
from cft_ray.arms import rewrite_treatment
from cft_ray.batching import MicroBatcher, left_pad
from cft_ray.config import CftConfig, ConfigError
from cft_ray.layout import IGNORE, RESPONSE_SCHEMA
from cft_ray.split import seeded_subset
from cft_ray.train import template_tail, tokenize_examples, train_from_rows

log = logging.getLogger("cft_ray")

PROMPT_COLUMNS = ["item_id", "question", "options", "answer", "subject", "text", "instruction", "response"]


class ResponseScorer:
    """Ray Data actor: rows -> RESPONSE_SCHEMA under the model in `model_dir`. `kind` is the gold
    response of a multiple-choice row (direct | cot); rows with an `instruction` column use it."""

    def __init__(self, cfg: CftConfig, model_dir: str, kind: str):
        import torch

        mcfg = cfg.student.model_copy(update={"name": model_dir})
        self.device = models.device_of(mcfg)
        if self.device == "cpu":
            torch.set_num_threads(cfg.select.pool.cpu_threads())
        self.tok, self.model = models.load(mcfg, self.device)
        self.kind, self.scheme, self.preset = kind, cfg.prompt.labels, cfg.prompt.preset
        s = cfg.select
        self.max_tokens = s.max_tokens
        # the full-vocabulary logits of every response position in a micro-batch exist at once
        self.batcher = MicroBatcher(s.token_budget, device=self.device,
                                    fits=lambda chunk: len(chunk) * max(r[2] for r in chunk) <= s.logit_tokens)
        self.keep_arg = "logits_to_keep" in inspect.signature(self.model.forward).parameters

    def __call__(self, t: pa.Table) -> pa.Table:
        rows = t.to_pylist()
        res = [{"item_id": r["item_id"], "resp_tokens": None, "nll": None, "entropy": None, "error": None} for r in rows]
        pairs, todo = [], []
        for i, r in enumerate(rows):
            try:
                pairs.append(prompts.example(r, "instruction" if r.get("instruction") is not None else self.kind, self.scheme, self.preset))
                todo.append(i)
            except (ValueError, KeyError, TypeError) as e:
                res[i]["error"] = f"no gold response: {e}"
        enc = []
        built = tokenize_examples(self.tok, pairs, self.max_tokens, "assistant", "keep_end") if pairs else []
        tails = template_tail(self.tok, pairs) if pairs else []
        for i, got, tail in zip(todo, built, tails):
            if isinstance(got, ValueError):
                res[i]["error"] = f"cannot tokenise: {got}"
                continue
            ids, labels, _ = got
            # the assistant turn ends the example (truncation keeps the end); the response is that turn
            # less the template's closing tokens, which every response shares and which measure nothing
            n = sum(x != IGNORE for x in labels[1:])
            enc.append((i, ids, n, min(tail, n - 1)))
        for (i, *_), reason in self.batcher.run(enc, lambda chunk: self._score(chunk, res)):
            res[i]["error"] = reason
        return pa.Table.from_pylist(res, schema=RESPONSE_SCHEMA)

    def _score(self, chunk: list[tuple[int, list[int], int, int]], res: list[dict]) -> None:
        """Each row: (index, ids, assistant-turn tokens, of which the template's closing tokens)."""
        import torch

        width, longest = len(chunk[0][1]), max(n for _, _, n, _ in chunk)
        ids, mask, position_ids = left_pad([t for _, t, _, _ in chunk], self.tok.pad_token_id)  # turns end last
        dev = self.model.device
        kw = {"logits_to_keep": longest + 1} if self.keep_arg else {}
        with torch.inference_mode():
            logits = self.model(input_ids=ids.to(dev), attention_mask=mask.to(dev),
                                position_ids=position_ids.to(dev), use_cache=False, **kw).logits
            logits = logits[:, -(longest + 1):-1]  # position p predicts token p + 1
            target = ids[:, width - longest:].to(dev)
            pos = torch.arange(longest)[None, :]
            scored = ((pos >= torch.tensor([longest - n for _, _, n, _ in chunk])[:, None])
                      & (pos < torch.tensor([longest - tail for _, _, _, tail in chunk])[:, None])).to(dev)
            h, nll = metrics.entropy(logits[scored]), metrics.nll(logits[scored], target[scored])
            row = torch.arange(len(chunk), device=dev)[:, None].expand_as(scored)[scored]
            n = torch.tensor([n - tail for _, _, n, tail in chunk], dtype=torch.float32, device=dev)
            h_mean = torch.zeros(len(chunk), device=dev).index_add_(0, row, h) / n
            nll_mean = torch.zeros(len(chunk), device=dev).index_add_(0, row, nll) / n
        for (i, _, k, tail), hj, lj in zip(chunk, h_mean.tolist(), nll_mean.tolist()):
            res[i].update(resp_tokens=k - tail, nll=lj, entropy=hj)


def respond(ds, cfg: CftConfig, model_dir: str, kind: str):
    """Rows -> RESPONSE_SCHEMA rows under `model_dir` (teacher-forced on the gold response)."""
    pool = cfg.select.pool
    schema = ds.schema(fetch_if_missing=False)
    if schema is not None:
        ds = ds.select_columns([c for c in PROMPT_COLUMNS if c in schema.names])
    ds = ds.repartition(target_num_rows_per_block=pool.batch_size)
    return ds.map_batches(ResponseScorer, fn_constructor_kwargs={"cfg": cfg, "model_dir": model_dir, "kind": kind},
                          batch_size=pool.batch_size, batch_format="pyarrow",
                          **pool.map_args())


def choose(ids, resp_tokens, dnll, dh, gamma: float, beta: float, budget_by: str = "items") -> tuple[list[str], dict]:
    """The InstructDiff rule on arrays (NaN = unscored): per row a reason in {unscored, dnll_low,
    dnll_high, over_budget, selected}, and the cut values. The budget is beta of the whole pool, in
    items or in response tokens; ties in dH go to the lower id (reproducible)."""
    ids, tok = np.asarray(ids, dtype=object), np.asarray(resp_tokens, dtype="float64")
    dnll, dh = np.asarray(dnll, dtype="float64"), np.asarray(dh, dtype="float64")
    reason = np.full(len(ids), "unscored", dtype=object)
    ok = ~(np.isnan(dnll) | np.isnan(dh))
    lo, hi = (np.quantile(dnll[ok], [gamma, 1 - gamma]) if ok.any() else (np.nan, np.nan))
    reason[ok & (dnll < lo)], reason[ok & (dnll > hi)] = "dnll_low", "dnll_high"
    kept = np.flatnonzero(ok & (dnll >= lo) & (dnll <= hi))
    kept = kept[np.lexsort((ids[kept].astype(str), dh[kept]))]  # lowest dH first
    if budget_by == "items":
        limit = int(np.floor(beta * len(ids)))
        take = kept[:limit]
    else:
        limit = beta * float(np.nansum(tok))
        take = kept[np.cumsum(tok[kept]) <= limit]
    reason[kept] = "over_budget"
    reason[take] = "selected"
    return list(reason), {"dnll_low": float(lo), "dnll_high": float(hi), "budget": limit,
                          "dh_max_selected": float(dh[take].max()) if len(take) else None}


def _pass(ds, cfg: CftConfig, model_dir: str, kind: str, parts: str, n: int) -> pa.Table:
    """One resumable scoring pass over the pool; the result's small columns, read on the driver."""
    todo, n_done = store.pending(ds, parts)
    if n_done < n:
        respond(todo, cfg, model_dir, kind).write_parquet(parts, min_rows_per_file=cfg.score.rows_per_file)
    t = store.columns(parts, RESPONSE_SCHEMA.names)
    if t.num_rows != n or pc.count_distinct(t["item_id"]).as_py() != n:
        raise RuntimeError(f"select: {t.num_rows} scores for {n} pool rows under {parts} (resume mismatch)")
    return t


def _training_rows(ds, chosen: set[str], kind: str):
    """`treatment` = the response kind for chosen rows and validation rows, drop elsewhere."""
    return rewrite_treatment(ds, lambda ids, _, split, keep: [kind if (i in keep or s == "valid") else "drop"
                                                              for i, s in zip(ids, split)], chosen)


def select_instructdiff(ds, cfg: CftConfig, out: str, valid=None, cot=None) -> tuple[pa.Table, dict, dict]:
    """Pool Dataset (+ validation rows for the warm-up's valid loss, + teacher CoT rows when
    select.response=cot) -> (selection table of the last round, its cuts, timings); every round's
    table is also written under `out`. Resumable."""
    s = cfg.select
    names = ds.schema().names
    kind = "instruction" if "instruction" in names else s.response
    ids = store.column_values(ds, "item_id").to_pylist()
    n = len(ids)
    if n == 0:
        raise ConfigError("select: the pool is empty")
    scored_ds = ds
    if kind == "cot":
        if cot is None:
            raise ConfigError("select.response=cot needs the teacher's CoT (run the teach stage)")
        import ray

        scored_ds = ds.join(cot.select_columns(["item_id", "text"]), join_type="left_outer", on=("item_id",),
                            num_partitions=max(2, int(ray.cluster_resources().get("CPU", 2))))
    train_rows = ds if valid is None else ds.union(valid)
    # the warm-up (not an arm): one shuffled phase of train.epochs
    wcfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"schedule": "merged"})})
    t0 = time.time()
    base = _pass(scored_ds, cfg, models.resolve(cfg.student), kind, store.join(out, "base"), n)
    timings, rounds = {"base_scores_s": round(time.time() - t0, 2)}, []
    chosen = seeded_subset(sorted(ids), max(1, round(s.alpha * n)), s.seed)
    for r in range(1, s.iterations + 1):
        rdir = store.join(out, f"round-{r}")
        t0 = time.time()
        train_from_rows(_training_rows(train_rows, chosen, kind), cot if kind == "cot" else None, wcfg,
            store.join(rdir, "train"), stage=f"select:round-{r}")
        t1 = time.time()
        cal = _pass(scored_ds, cfg, store.join(rdir, "train", "model"), kind, store.join(rdir, "scores"), n)
        table, cuts = _table(base, cal, s)
        store.write_table(table, store.join(rdir, "selection.parquet"))
        picked = set(pc.filter(table["item_id"], table["selected"]).to_pylist())
        rounds.append({"round": r, "trained_on": len(chosen), "selected": len(picked),
                       "overlap_with_training": len(picked & chosen), "train_s": round(t1 - t0, 2),
                       "scores_s": round(time.time() - t1, 2)})
        chosen = picked
    timings["rounds"] = rounds
    return table, cuts, timings


def _table(base: pa.Table, cal: pa.Table, s) -> tuple[pa.Table, dict]:
    b = base.to_pandas().set_index("item_id")
    c = cal.to_pandas().set_index("item_id").reindex(b.index)
    dnll = (c["nll"] - b["nll"]).to_numpy(dtype="float64")
    dh = (b["entropy"] - c["entropy"]).to_numpy(dtype="float64")
    reason, cuts = choose(list(b.index), b["resp_tokens"].fillna(0), dnll, dh, s.gamma, s.beta, s.budget_by)
    def f32(x):  # NaN (unscored) -> null
        return pa.array(np.asarray(x, dtype="float64"), pa.float32(), from_pandas=True)

    t = pa.table({"item_id": pa.array(list(b.index), pa.string()), "selected": pa.array([x == "selected" for x in reason]),
                  "reason": pa.array(reason, pa.string()), "dnll": f32(dnll), "dh": f32(dh),
                  "nll_base": f32(b["nll"]), "nll_cal": f32(c["nll"]), "h_base": f32(b["entropy"]), "h_cal": f32(c["entropy"]),
                  "resp_tokens": pa.array(b["resp_tokens"], pa.int32(), from_pandas=True),
                  "error": pa.array([x if isinstance(x, str) else y if isinstance(y, str) else None
                                     for x, y in zip(b["error"], c["error"])], pa.string())})
    return t, cuts


def plot(table: pa.Table, cuts: dict, out: str) -> None:
    """dNLL histogram with the tail cuts; dNLL x dH scatter coloured by what happened to each item."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    df = table.to_pandas()
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    ok = df[df["reason"] != "unscored"]
    a.hist(ok["dnll"], bins=40, color="#888")
    for x in (cuts["dnll_low"], cuts["dnll_high"]):
        a.axvline(x, color="red", ls="--")
    a.set(title="dNLL = L_cal - L_base (tails dropped)", xlabel="dNLL (nats/token)", ylabel="items")
    colours = {"selected": "#1a7f37", "over_budget": "#9aa", "dnll_low": "#d62728", "dnll_high": "#ff7f0e"}
    for reason, c in colours.items():
        part = ok[ok["reason"] == reason]
        b.scatter(part["dnll"], part["dh"], s=6, c=c, label=f"{reason} ({len(part)})")
    if cuts.get("dh_max_selected") is not None:
        b.axhline(cuts["dh_max_selected"], color="#1a7f37", ls=":")
    b.set(title="kept: lowest dH = H_base - H_cal inside the cuts", xlabel="dNLL", ylabel="dH (nats/token)")
    b.legend(fontsize=7)
    fig.tight_layout()
    store.write_png(fig, out)


def main(cfg: CftConfig) -> str:
    """Stage entry: InstructDiff over the split's train rows into `stage_dir(cfg, "select")`."""
    out = layout.stage_dir(cfg, "select")
    if layout.finished(out, "select"):
        return out
    sdir = layout.upstream(cfg, "split", by="select")
    cot = None
    if cfg.select.response == "cot":
        teach_dir = layout.stage_dir(cfg, "teach")
        if "all" not in layout.taught_coverage(teach_dir):  # InstructDiff scores the whole pool's CoT
            raise ConfigError(f"select.response=cot: the teach stage is not finished ({teach_dir})")
        cot = layout.load_cot(teach_dir)
    started = time.time()
    table, cuts, timings = select_instructdiff(layout.load_split(sdir, "train"), cfg, out, valid=layout.load_split(sdir, "valid"), cot=cot)
    sel = store.join(out, "selection")
    store.reset(sel)
    store.write_table(table, store.join(sel, "part-0.parquet"))
    plot(table, cuts, store.join(out, "select.png"))
    reasons = pc.value_counts(table["reason"]).to_pylist()
    counts = {"rows_in": table.num_rows, **{r["values"]: r["counts"] for r in reasons}}
    counts["rows_out"] = counts.get("selected", 0)
    counts["errors"] = counts.get("unscored", 0)
    df = table.to_pandas()
    ok = df[df["reason"] != "unscored"]
    summary = {c: {q: round(float(ok[c].quantile(v)), 4) for q, v in (("p10", .1), ("p50", .5), ("p90", .9))}
               for c in ("dnll", "dh", "nll_base", "nll_cal", "h_base", "h_cal")} if len(ok) else {}
    chosen = df[df["selected"]]
    summary["selected_mean"] = {c: round(float(chosen[c].mean()), 4) for c in ("dnll", "dh", "resp_tokens")} if len(chosen) else {}
    store.finish(out, store.stage_manifest("select", layout.dir_hash(out), started, counts, [
        ("method", "instructdiff"), ("params", cfg.select.model_dump(mode="json", exclude={"pool"})),
        ("cuts", cuts), ("summary", summary), ("timings", timings),
        ("response_tokens_selected", int(chosen["resp_tokens"].sum())),
        ("response_tokens_pool", int(df["resp_tokens"].fillna(0).sum()))]))
    log.info("select: %d of %d items selected -> %s", counts["rows_out"], table.num_rows, sel)
    return out
