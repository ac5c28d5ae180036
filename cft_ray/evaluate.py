"""Step 5 (evaluate): the held-out accuracy of a given model on the split's test rows.

Protocols (modes), each applied to every arm alike: `generate` decodes (greedy unless configured)
the prompt the arm was trained on (`kind`: direct or cot) and parses the last [[k]], unparseable =
wrong (cft_ray.generate, with the eval section's own engine settings): the paper's protocol.
`direct` reads the direct prompt and picks the label k whose whole answer "k]]" is likeliest after
"[[" (the score stage's Scorer on the eval pool: one forward, exact for labels 10..20). `eval.mode`
is the headline protocol, `eval.extra_modes` the others reported beside it. Which model and which
prompt is the arms' decision (cft_ray.arms).
"""
from __future__ import annotations

import importlib.util
import math

import pyarrow as pa
import pyarrow.compute as pc

from cft_ray import layout, store
from cft_ray.config import CftConfig
from cft_ray.generate import GenerationSpec, generate
from cft_ray.layout import ITEM_SCHEMA, PRED_SCHEMA
from cft_ray.score import score
from cft_ray.stats import wilson

META = ["item_id", "bucket", "category", "subject", "answer"]


def eval_modes(cfg: CftConfig) -> list[str]:
    """The protocols every arm is evaluated under, the headline first."""
    return [cfg.eval.mode, *cfg.eval.extra_modes]


def predictions_dir(eval_dir: str, mode: str, cfg: CftConfig) -> str:
    """`<eval_dir>/predictions` under the headline protocol, `predictions_<mode>` under the others."""
    return store.join(eval_dir, "predictions" if mode == cfg.eval.mode else f"predictions_{mode}")


def eval_spec(cfg: CftConfig, model_dir: str, kind: str) -> GenerationSpec:
    """Generate-mode evaluation of the model in `model_dir`: the eval section's sampling, engine and
    pool, the student's dtype/device/trust settings; nothing from the teacher's section."""
    e = cfg.eval
    backend = e.backend
    if backend == "auto":
        backend = "vllm" if importlib.util.find_spec("vllm") is not None else "hf"
    return GenerationSpec(
        section="eval", backend=backend, model=cfg.student.model_copy(update={"name": model_dir}), prompt=kind,
        labels=cfg.prompt.labels, preset=cfg.prompt.preset, pool=e.pool, temperature=e.temperature, top_p=1.0, max_tokens=e.max_new_tokens,
        seed=e.seed, tensor_parallel_size=e.tensor_parallel_size, engine_kwargs=dict(e.engine_kwargs),
        accelerator_type=e.accelerator_type, cpu_kv_cache_gb=e.cpu_kv_cache_gb, hf_micro_batch=e.hf_micro_batch)


def _direct_preds(t: pa.Table) -> pa.Table:
    """Scored rows -> predictions; a row the scorer could not score is wrong, with its reason."""
    pred = t["pred_options"]
    return pa.table({"item_id": t["item_id"], "pred": pred.cast(pa.int32()),
                     "correct": pc.fill_null(pc.equal(pred, t["answer"]), False),
                     "text": t["argmax_token"], "completion_tokens": pa.array([0] * len(t), pa.int32()),
                     "error": t["error"]}, schema=PRED_SCHEMA)


def _generated_preds(t: pa.Table) -> pa.Table:
    return pa.table({"item_id": t["item_id"], "pred": t["parsed"], "correct": t["correct"], "text": t["text"],
                     "completion_tokens": t["completion_tokens"], "error": t["error"]}, schema=PRED_SCHEMA)


def evaluate(test_ds, model_dir: str, cfg: CftConfig, kind: str, mode: str):
    """Test rows -> PRED_SCHEMA rows for the model in `model_dir` under protocol `mode`, generating from
    the `kind` prompt (direct|cot). Direct mode always reads the direct prompt (a CoT arm has no single
    answer position)."""
    items = test_ds.select_columns(ITEM_SCHEMA.names)
    if mode == "direct":
        model = cfg.student.model_copy(update={"name": model_dir})
        return score(items, cfg, prompt="direct", model=model, pool=cfg.eval.pool).map_batches(
            _direct_preds, batch_format="pyarrow")
    return generate(items, eval_spec(cfg, model_dir, kind)).map_batches(_generated_preds, batch_format="pyarrow")


def accuracy(df) -> dict:
    """Accuracy with its 95% Wilson interval and binomial standard error, parse failures, and per
    bucket/category/subject."""
    def one(part) -> dict:
        n, k = len(part), int(part["correct"].sum())
        acc = k / n if n else float("nan")
        return {"n": n, "correct": k, "accuracy": acc, "ci95": list(wilson(k, n)),
                "stderr": math.sqrt(acc * (1 - acc) / n) if n else float("nan"),
                "parse_failures": int(part["pred"].isna().sum())}
    out = one(df)
    out["parse_failure_rate"] = out["parse_failures"] / out["n"] if out["n"] else float("nan")
    for g in ("bucket", "category", "subject"):
        out[f"by_{g}"] = {str(k): one(p) for k, p in df.groupby(df[g].astype(object).fillna("<none>"))}
    return out


def evaluate_on_split(cfg: CftConfig, model_dir: str, kind: str, split_dir: str, eval_dir: str, mode: str) -> dict:
    """Predict every test row once under protocol `mode` (test_balanced is a subset: one engine start),
    write its predictions dir, and return the metric sets {test, test_balanced}."""
    pdir = predictions_dir(eval_dir, mode, cfg)
    store.reset(pdir)
    evaluate(layout.load_split(split_dir, "test"), model_dir, cfg, kind, mode).write_parquet(pdir)
    preds = store.columns(pdir, [c for c in PRED_SCHEMA.names if c != "text"]).to_pandas()
    df = store.columns(store.join(split_dir, "test"), META).to_pandas().merge(preds, on="item_id", how="left")
    if len(preds) != len(df) or df["correct"].isna().any():  # every test row gets exactly one prediction
        raise RuntimeError(f"eval {eval_dir}: {len(preds)} predictions for {len(df)} test rows")
    parts = {"test": df}
    if cfg.eval.balanced:
        parts["test_balanced"] = df[df["item_id"].isin(set(layout.split_ids(split_dir, "test_balanced")))]
    sets = {}
    for name, part in parts.items():
        sets[name] = accuracy(part)
        sets[name]["generated_tokens"] = int(part["completion_tokens"].fillna(0).sum())
    return sets
