"""Step 0 (optional): warm the student up with direct answers on items of its own, before it is scored.

A student that cannot use the task's format zero-shot (SmolLM2-135M answers multiple-choice arithmetic at
chance: FEASIBILITY.md) has no difficulty signal to measure; one short direct-answer SFT on a disjoint slice
gives it graded competence, like InstructDiff's calibration model but before scoring. With `warmup.source`
set, every later stage's student is the warm-up's model (`stage_config`), so the base arm is the warmed
student and every arm fine-tunes from it.

    <warmup dir>/data/   the warm-up source's items (the data stage's reader and checks)
    <warmup dir>/        examples/, model/, train_manifest.json, manifest.json (cft_ray.train)

Warm-up items whose content (question + options) is also one of the run's items are left out and counted:
the run's train, valid and test rows never train here.
"""
from __future__ import annotations

import logging
import time

import pyarrow as pa
import pyarrow.compute as pc

from cft_ray import data, layout, store
from cft_ray.config import CftConfig, ConfigError
from cft_ray.runtime import block_partials
from cft_ray.train import train_from_rows

log = logging.getLogger("cft_ray")

BEFORE_WARMUP = ("data", "warmup", "plan")  # stages that see the configured student, not the warmed one


def stage_config(cfg: CftConfig, stage: str) -> CftConfig:
    """The config `stage` runs with: after a warm-up, the student is the warm-up's model."""
    if not cfg.warmup.source or stage in BEFORE_WARMUP:
        return cfg
    model = store.join(layout.stage_dir(cfg, "warmup"), "model")
    return cfg.model_copy(update={"student": cfg.student.model_copy(update={"name": model})})


def _content_ids(t: pa.Table) -> pa.Table:
    return pa.table({"cid": [data.content_id(q, o) for q, o in zip(t["question"].to_pylist(), t["options"].to_pylist())]})


def _rows(t: pa.Table, exclude: pa.Array) -> pa.Table:
    """Warm-up items -> routed rows: direct answers, all in train, none sharing content with the run."""
    keep = pc.invert(pc.is_in(_content_ids(t)["cid"], value_set=exclude))
    t = t.filter(keep).select(["item_id", "question", "options", "answer", "subject"])
    n = t.num_rows
    return t.append_column("bucket", pa.nulls(n, pa.string())).append_column("treatment", pa.array(["direct"] * n)) \
        .append_column("split", pa.array(["train"] * n))


def main(cfg: CftConfig) -> str:
    """Stage entry: ingest `warmup.source`, drop what the run's items share, train direct answers on the
    rest into `stage_dir(cfg, "warmup")` (skipped when finished)."""
    w = cfg.warmup
    if not w.source:
        raise ConfigError("warmup: no warmup.source configured")
    out = layout.stage_dir(cfg, "warmup")
    if store.is_done(out):
        return out
    started = time.time()
    items_dir, ddir = store.join(out, "data"), layout.upstream(cfg, "data", by="warmup")
    if not store.is_done(items_dir):
        counts = data.ingest(cfg.data.model_copy(update={"source": w.source, "limit": w.limit, "columns": None}), items_dir)
        data.require_items(counts, cfg.data.model_copy(update={"source": w.source}))
        store.write_json(store.join(items_dir, store.SUCCESS), counts)
    run_ids = pa.concat_tables(block_partials(layout.load_items(ddir).select_columns(["question", "options"]), _content_ids)
                               or [pa.table({"cid": pa.array([], pa.string())})])["cid"]
    warm = layout.load_items(items_dir)
    n_in = warm.count()
    rows = warm.map_batches(_rows, batch_format="pyarrow", batch_size=None, fn_kwargs={"exclude": run_ids}).materialize()
    n_rows = rows.count()
    if n_rows == 0:  # e.g. the run's own source with the same seed: its sample is the run's items
        raise ConfigError(f"warmup.source: all {n_in} warm-up items from {w.source} are also items of the run (same question "
                          "and options), so nothing is left to warm up on; give items of their own (another source or file)")
    wcfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={
        "schedule": "merged", "epochs": w.epochs, "lr": w.lr or cfg.train.lr, "method": w.method})})
    log.info("warmup: %d items from %s (%d shared with the run's items, left out)", n_rows, w.source, n_in - n_rows)
    return train_from_rows(rows, None, wcfg, out, stage="warmup", routed={"direct": n_rows},
                           upstream_counts={"warmup_items": n_in, "shared_with_run": n_in - n_rows},
                           extra=[("source", w.source), ("warmup_started_at", started)])
