"""Memory of the other model actors over many batches of varying shapes: evaluation's `HFGenerator` (generate
protocol) and InstructDiff's `ResponseScorer`, each in this process (as in its actor), a tiny random model so that
the model is not what grows, 60 batches of 16 MMLU items padded by 1-49 filler words (widths vary within and
across batches). Prints the RSS after the 10th batch (the allocator's and the kernels' warm-up) and the largest
RSS over the next 50. The scoring actor's own check: tests/test_score.py and bench/score.py's memory run.

    .venv/bin/python bench/actor_memory.py
"""
from __future__ import annotations

import os
import random
import tempfile

import psutil
import pyarrow as pa

from cft_ray import models
from cft_ray.config import load_config
from cft_ray.evaluate import eval_spec
from cft_ray.generate import HFGenerator
from cft_ray.layout import ITEM_SCHEMA
from cft_ray.select import ResponseScorer
from score import mmlu_items, tiny_model  # bench/score.py, beside this file


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        tiny = tiny_model(os.path.join(tmp, "tiny"), models.resolve(load_config(None, []).student))
        cfg = load_config(None, [f"student.name={tiny}", "student.dtype=float32", "eval.max_new_tokens=16",
                                 "teach.max_tokens=16"])
        items, rng = mmlu_items(960), random.Random(0)
        for it in items:
            it["question"] += " word" * rng.randint(1, 49)
        as_eval = lambda its: pa.Table.from_pylist([  # noqa: E731 - what evaluation hands its generator
            {**{k: it[k] for k in ("item_id", "question", "options", "subject", "answer")}, "sample_idx": 0} for it in its])
        for name, make, table in (
                ("HFGenerator (evaluation, generate protocol)", lambda: HFGenerator(eval_spec(cfg, tiny, "direct")), as_eval),
                ("ResponseScorer (InstructDiff)", lambda: ResponseScorer(cfg, tiny, "direct"),
                 lambda its: pa.Table.from_pylist(its, schema=ITEM_SCHEMA))):
            actor, rss = make(), []
            for b in range(60):
                assert actor(table(items[16 * b: 16 * b + 16])).num_rows == 16
                rss.append(psutil.Process().memory_info().rss / 2**20)
            print(f"{name}: RSS after batch 10 {rss[9]:.0f} MB; max over batches 11-60 {max(rss[10:]):.0f} MB "
                  f"({max(rss[10:]) - rss[9]:+.0f} MB)")
            del actor


if __name__ == "__main__":
    main()
