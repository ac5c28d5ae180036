"""Step 3 (teach): teacher chain-of-thought for the rows routed to `cot`, checked against gold.

`teach(ds, cfg, sample_idx)` runs ONE attempt per row through the configured generation backend
(cft_ray.generate: vLLM, an OpenAI-compatible endpoint, or transformers), which parses the LAST
`[[k]]` and marks correctness. `main(cfg, rows, coverage)` runs the attempts as rounds
(policy=resample: round r re-asks only the items still wrong after round r-1, up to `teach.samples`
rounds), then applies the correctness policy:

  <teach dir>/parts/r<k>/   every sample (SAMPLE_SCHEMA), one directory per round (row-level resume)
  <teach dir>/cot/          the kept CoT per item (COT_SCHEMA); text cut right after its last [[k]]
  <teach dir>/failures/     items with no kept CoT: item_id, reason, attempts
  <teach dir>/manifest.json counts, pinned sampling parameters, teacher tokens in/out, tokens/s, coverage

Every cot item ends in exactly one of cot/ and failures/. Which rows to teach is the arms' decision
(cft_ray.arms.teach_for_arms): the union of the rows the requested arms route to CoT.
"""
from __future__ import annotations

import dataclasses
import logging
import time

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from cft_ray import layout, store
from cft_ray.config import CftConfig
from cft_ray.generate import GenerationSpec, generate, text_budget
from cft_ray.layout import COT_SCHEMA, FAILURE_SCHEMA
from cft_ray.prompts import MARKER

log = logging.getLogger("cft_ray")

REASONS = ("wrong answer", "no marker", "truncated", "engine error")


def cut_after_marker(text: str) -> str:
    """The text up to and including its last [[k]]: a kept CoT ends in its answer."""
    last = None
    for last in MARKER.finditer(text or ""):
        pass
    return text[: last.end()] if last else text


def verdict(parsed, correct, finish_reason, error) -> str | None:
    """None for a correct sample, else the failure reason (one of REASONS)."""
    if error is not None:
        return "engine error"
    if parsed is not None:
        return None if correct else "wrong answer"
    return "truncated" if finish_reason == "length" else "no marker"


def teacher_spec(cfg: CftConfig) -> GenerationSpec:
    """The teacher's generation, from the teach section (and the run's label scheme) only."""
    t = cfg.teach
    spec = GenerationSpec(
        section="teach", prompt="teacher", labels=cfg.prompt.labels, preset=cfg.prompt.preset,
        **{f: getattr(t, f) for f in GenerationSpec.__dataclass_fields__ if f not in ("section", "prompt", "labels", "preset")})
    # the data's rationales are what the student trains on: count their tokens as the student sees them
    return dataclasses.replace(spec, model=cfg.student) if t.backend == "rationale" else spec


def teach(ds, cfg: CftConfig, sample_idx: int = 0):
    """One teacher attempt for every row of `ds` (main() picks the CoT-routed rows): SAMPLE_SCHEMA rows."""
    return generate(ds, teacher_spec(cfg), sample_idx)


# ---------------------------------------------------------------------------------------- policy

def apply_policy(samples, policy: str, rounds: int):
    """Apply the correctness policy to every sample of every round: (kept CoT rows, failure rows).
    Row-wise, so it streams at any scale: under resample an item reaches round r only while it
    is still wrong, hence it has at most one correct sample, and an item fails exactly when its
    last round (rounds-1) is not kept."""
    def kept(t: pa.Table):
        return pc.is_valid(t["parsed"]) if policy == "keep_all" else pc.fill_null(t["correct"], False)

    def cot(t: pa.Table) -> pa.Table:
        t = t.filter(kept(t))
        text = pa.array([cut_after_marker(x) for x in t["text"].to_pylist()], pa.string())
        return t.set_column(t.schema.get_field_index("text"), "text", text).select(COT_SCHEMA.names).cast(COT_SCHEMA)

    def failed(t: pa.Table) -> pa.Table:
        t = t.filter(pc.and_(pc.invert(kept(t)), pc.equal(t["sample_idx"], rounds - 1)))
        reasons = [verdict(*r) for r in zip(*(t[c].to_pylist() for c in ("parsed", "correct", "finish_reason", "error")))]
        return pa.table({"item_id": t["item_id"], "reason": pa.array(reasons, pa.string()),
                         "attempts": pa.array([rounds] * len(t), pa.int32())}, schema=FAILURE_SCHEMA)

    return (samples.map_batches(cot, batch_format="pyarrow", batch_size=None),
            samples.map_batches(failed, batch_format="pyarrow", batch_size=None))


# ---------------------------------------------------------------------------------------- stage

def _only(ds, ids: pa.Array):
    """Rows of `ds` whose item_id is in `ids` (the items a resample round asks again)."""
    import ray

    ref = ray.put(ids)
    return ds.map_batches(lambda t: t.filter(pc.is_in(t["item_id"], value_set=ray.get(ref))), batch_format="pyarrow")


def _write(ds, path: str, schema: pa.Schema) -> int:
    """Write `ds` (rewritten from scratch) and return its rows; an empty result is still a readable file."""
    store.reset(path)
    ds.write_parquet(path)
    files = store.part_files(path)
    if not files:
        fs, p = store._fs(path)
        fs.create_dir(p, recursive=True)
        pq.write_table(schema.empty_table(), f"{p}/empty.parquet", filesystem=fs)
        return 0
    fs, _ = store._fs(path)
    return sum(pq.read_metadata(f.split("://", 1)[-1], filesystem=fs).num_rows for f in files)


def main(cfg: CftConfig, rows, coverage: list[str]) -> str:
    """Stage body: teach the `rows` routed to cot (the caller, cft_ray.arms, picks them for the arms'
    `coverage`); a finished stage that covered less is re-opened and generates only the new rows."""
    from ray.data.expressions import col

    out, split_dir = layout.stage_dir(cfg, "teach"), layout.upstream(cfg, "split", by="teach")
    if store.is_done(out):  # a new arm needs rows this stage has not taught: generate only those
        log.info("teach: covers %s, needs %s: re-opening %s", sorted(layout.taught_coverage(out)), coverage, out)
        for sub in (store.SUCCESS, "cot", "failures"):
            store.reset(store.join(out, sub))
    started, t = time.time(), cfg.teach
    # every arm's CoT rows, taught once; earlier arms' rows are found done in parts/ and skipped
    items = rows.filter(expr=col("treatment") == "cot")
    ids = store.column_values(items, "item_id")
    rounds = t.samples if t.policy == "resample" and t.backend != "rationale" else 1  # a data text reads the same twice
    todo, gen_s, new_out = ids, 0.0, 0
    for r in range(rounds):
        parts = store.join(out, "parts", f"r{r}")
        if r:  # resample: ask again only the items still wrong after the previous round
            prev = layout.teach_columns(store.join(out, "parts", f"r{r - 1}"), ["item_id", "correct"])
            todo = prev.filter(pc.invert(pc.fill_null(prev["correct"], False)))["item_id"].combine_chunks()
        missing = int(pc.sum(pc.invert(pc.is_in(todo, value_set=store.done_ids(parts)))).as_py() or 0)
        log.info("teach round %d: %d items to ask, %d already done", r, missing, len(todo) - missing)
        if not missing:
            continue
        before = set(store.part_files(parts))
        pending, _ = store.pending(items if r == 0 else _only(items, todo), parts)
        t0 = time.time()
        teach(pending, cfg, sample_idx=r).write_parquet(parts)
        gen_s += time.time() - t0
        new = [f for f in store.part_files(parts) if f not in before]
        new_out += int(pc.sum(layout.teach_columns(parts, ["completion_tokens"], new)["completion_tokens"]).as_py() or 0)

    cot, failures = apply_policy(store.read_parts(store.join(out, "parts")), t.policy, rounds)
    kept = _write(cot, store.join(out, "cot"), COT_SCHEMA)
    _write(failures, store.join(out, "failures"), FAILURE_SCHEMA)
    fails = store.counts_by(store.join(out, "failures"), "reason")
    if kept + sum(fails.values()) != len(ids):  # the stage's invariant: every cot item kept or failed
        raise RuntimeError(f"teach: {len(ids)} items but {kept} kept + {sum(fails.values())} failed")
    s = layout.teach_columns(store.join(out, "parts"), ["sample_idx", "parsed", "correct", "prompt_tokens", "completion_tokens"])
    tokens_in = int(pc.sum(s["prompt_tokens"]).as_py() or 0)
    tokens_out = int(pc.sum(s["completion_tokens"]).as_py() or 0)
    counts = {"requested": len(ids), "generated": s.num_rows, "parsed": s.num_rows - s["parsed"].null_count,
              "correct": int(pc.sum(s["correct"]).as_py() or 0), "kept": kept, "rows_out": kept,
              "failed": {k: fails.get(k, 0) for k in REASONS},
              "samples_by_round": {str(r): int(pc.sum(pc.equal(s["sample_idx"], r)).as_py() or 0) for r in range(rounds)}}
    manifest = store.stage_manifest("teach", layout.dir_hash(out), started, counts, [
        ("teacher", {"backend": t.backend, "model": t.api_model or t.model.name if t.backend == "openai" else t.model.name,
                     "base_url": t.base_url if t.backend == "openai" else None}),
        ("sampling", {**{k: getattr(t, k) for k in ("temperature", "top_p", "max_tokens", "seed", "samples", "policy", "constrain_format")},
                     "constrain_max_chars": text_budget(t) if t.constrain_format else None}),
        ("labels", cfg.prompt.labels),
        ("tokens", {"in": tokens_in, "out": tokens_out, "out_this_run": new_out,
                    "out_per_s_this_run": round(new_out / gen_s, 2) if gen_s else None}),
        ("split_dir", split_dir), ("coverage", sorted(coverage))])
    store.finish(out, manifest)
    log.info("teach: %s", counts)
    return out
