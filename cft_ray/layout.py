"""Where each stage writes, in what schema, and how the next stage reads it.

Stages meet only here: a stage finds its upstream's directory with `stage_dir`, checks it is finished
with `upstream`, and reads it with one of the `load_*` readers; it writes rows in the schema named
below. A stage directory is `<run_dir>/<stage>-<hash>`, the hash taken over the config sections that
decide the stage's output (STAGE_INPUTS) and nothing else, so changing a field re-runs exactly the
stages it affects. Every manifest's `config_hash` is that directory hash.

    data/    items/ errors/                     ITEM_SCHEMA, ERROR_SCHEMA
    score/   parts/ roc.json roc.png hist.png   SCORE_SCHEMA
    split/   train/ valid/ test/ test_balanced/ excluded/ split.json   SCORE_SCHEMA + LABEL_FIELDS
    teach/   parts/r<k>/ cot/ failures/         SAMPLE_SCHEMA, COT_SCHEMA, FAILURE_SCHEMA
    select/  base/ round-<r>/ selection/        RESPONSE_SCHEMA, the selection table
    train-<arm>-<hash>/ examples/ model/ adapter/   EXAMPLE_SCHEMA
    eval-<arm>-<hash>/  predictions/ metrics.json   PRED_SCHEMA
"""
from __future__ import annotations

import logging

import pyarrow as pa
import pyarrow.compute as pc

from cft_ray import store
from cft_ray.config import CftConfig, ConfigError, config_hash

log = logging.getLogger("cft_ray")

# ------------------------------------------------------------------------------------ directories

# Which config sections decide each stage's output. Where and how many actors run is left out
# (_drop_perf): it changes speed, not results. How rows are batched stays in: in bf16 a row's scores
# move with the shape of its micro-batch (up to 0.17 nats measured), so a stage re-run or resumed
# with other batching must not mix its rows with the old ones.
STAGE_INPUTS = {
    "data": ["data"],
    "warmup": ["data", "student", "prompt", "train", "warmup"],  # the run's items decide what is left out
    "score": ["data", "student", "prompt", "score"],
    "split": ["data", "student", "prompt", "score", "split"],
    "teach": ["data", "student", "prompt", "score", "split", "teach"],
    # the warm-up trains with the train section; a CoT response reads the teacher's outputs
    "select": ["data", "student", "prompt", "score", "split", "teach", "select", "train"],
}


def stage_dir(cfg: CftConfig, stage: str) -> str:
    """`<run_dir>/<stage>-<hash of the sections that decide it>`."""
    dump = cfg.model_dump(mode="json")
    dump["teach"] = {k: v for k, v in dump["teach"].items() if k not in THROTTLE}
    picked = {k: _drop_perf(dump[k]) for k in STAGE_INPUTS[stage]}
    return f"{cfg.run_dir.rstrip('/')}/{stage}-{config_hash(picked)}"


def dir_hash(out: str) -> str:
    """The hash part of a stage directory: what every manifest records as `config_hash`."""
    return out.rstrip("/").rsplit("-", 1)[-1]


THROTTLE = ("concurrency", "timeout_s", "rpm", "tpm")  # how fast an endpoint is asked, not what it answers
PLACEMENT = ("size", "num_cpus", "num_gpus", "resources", "max_restarts", "threads")  # an actor pool's


def _drop_perf(d):
    if isinstance(d, dict):
        return {k: (_drop_perf({f: x for f, x in v.items() if f not in PLACEMENT}) if k == "pool" else _drop_perf(v))
                for k, v in d.items()}
    return d


def upstream(cfg: CftConfig, stage: str, by: str) -> str:
    """The finished directory of `stage`, which `by` reads; else the one-line error naming the command."""
    d = stage_dir(cfg, stage)
    if not store.is_done(d):
        cmd = "cft-ray data prepare" if stage == "data" else f"cft-ray {stage}"
        raise ConfigError(f"{by}: the {stage} stage is not finished ({d}); run `{cmd}` with the same config first")
    return d


def finished(out: str, stage: str) -> bool:
    """A finished stage directory is skipped (said once in the log)."""
    if store.is_done(out):
        log.info("%s: %s is finished, skipping", stage, out)
        return True
    return False


# ------------------------------------------------------------------------------------ schemas

ITEM_SCHEMA = pa.schema([
    pa.field("item_id", pa.string(), nullable=False),
    pa.field("question", pa.string(), nullable=False),
    pa.field("options", pa.list_(pa.string()), nullable=False),
    pa.field("answer", pa.int32(), nullable=False),  # 0-based; prompts render 1..N
    pa.field("subject", pa.string()),
    pa.field("category", pa.string()),
    pa.field("source", pa.string()),  # "<file>:<row>" provenance
    pa.field("rationale", pa.string()),  # a worked solution ending in [[k]], where the source has one
    pa.field("level", pa.int32()),  # a known difficulty level, where the source has one (higher = harder)
])
ERROR_SCHEMA = pa.schema([
    pa.field("item_id", pa.string()),
    pa.field("source", pa.string()),
    pa.field("reason", pa.string(), nullable=False),
    pa.field("raw", pa.string()),  # the offending record, truncated
])
SCORE_FIELDS = [
    pa.field("entropy", pa.float32()),          # full-vocabulary entropy at the first generated position, nats
    pa.field("entropy_options", pa.float32()),  # entropy renormalised over the option labels' first tokens
    pa.field("ce_gold", pa.float32()),          # -log p(gold label's first token), full-vocabulary softmax
    pa.field("max_prob", pa.float32()),
    pa.field("margin", pa.float32()),           # top-1 minus top-2 probability
    pa.field("argmax_id", pa.int64()),
    pa.field("argmax_token", pa.string()),
    pa.field("pred", pa.int32()),               # 0-based option; -1 = "0" (unknown) under fallback; null = invalid
    pa.field("pred_options", pa.int32()),       # 0-based argmax over the option labels only (never invalid)
    pa.field("valid", pa.bool_()),              # pred is an option or unknown
    pa.field("unknown", pa.bool_()),
    pa.field("correct", pa.bool_()),
    pa.field("label_collision", pa.bool_()),    # this item's labels share first tokens (score.py's doc)
    pa.field("prompt_tokens", pa.int32()),
    pa.field("padded_tokens", pa.int32()),      # length of the micro-batch the row ran in (padding accounting)
    pa.field("error", pa.string()),             # why the row was not scored; null when scored
]
SCORE_SCHEMA = pa.schema([*ITEM_SCHEMA, *SCORE_FIELDS])
SPLIT_OUTPUTS = ("train", "valid", "test", "test_balanced", "excluded")
LABEL_FIELDS = [pa.field("norm", pa.float64()), pa.field("bucket", pa.string()), pa.field("bucket_idx", pa.int32()),
                pa.field("split", pa.string()), pa.field("treatment", pa.string())]
SAMPLE_SCHEMA = pa.schema([
    pa.field("item_id", pa.string(), nullable=False),
    pa.field("sample_idx", pa.int32(), nullable=False),  # attempt number (= round) of this item
    pa.field("text", pa.string()),                       # the generated text
    pa.field("parsed", pa.int32()),                      # 0-based option of the last [[k]]; null = none valid
    pa.field("correct", pa.bool_()),
    pa.field("prompt_tokens", pa.int32()),
    pa.field("completion_tokens", pa.int32()),
    pa.field("finish_reason", pa.string()),              # stop / length / forced (hf constraint) / error
    pa.field("error", pa.string()),                      # engine error after retries; null otherwise
])
COT_SCHEMA = pa.schema([SAMPLE_SCHEMA.field(n) for n in
                        ("item_id", "text", "sample_idx", "correct", "parsed", "completion_tokens")])
FAILURE_SCHEMA = pa.schema([pa.field("item_id", pa.string()), pa.field("reason", pa.string()),
                            pa.field("attempts", pa.int32())])
EXAMPLE_SCHEMA = pa.schema([
    pa.field("item_id", pa.string()),
    pa.field("bucket", pa.string()),
    pa.field("bucket_idx", pa.int32()),
    pa.field("split", pa.string()),
    pa.field("kind", pa.string()),  # direct | cot
    pa.field("input_ids", pa.list_(pa.int32())),
    pa.field("labels", pa.list_(pa.int32())),  # IGNORE = not trained
    pa.field("n_tokens", pa.int32()),
    pa.field("n_target", pa.int32()),  # trained labels (after the causal shift: position 0 never counts)
    pa.field("n_answer", pa.int32()),  # tokens of the assistant turn (the data spent), whatever train.loss_on trains
    pa.field("truncated", pa.bool_()),
    pa.field("error", pa.string()),  # null for a usable example
])
IGNORE = -100  # the label of a token that is not trained (torch's cross-entropy ignore_index)
RESPONSE_SCHEMA = pa.schema([
    pa.field("item_id", pa.string()),
    pa.field("resp_tokens", pa.int32()),  # scored response tokens (the assistant text; the template's end-of-turn excluded)
    pa.field("nll", pa.float32()),        # mean -log p(y_t | x, y_<t) over them, nats
    pa.field("entropy", pa.float32()),    # mean full-vocabulary entropy over them, nats
    pa.field("error", pa.string()),       # why the row has no score; null when scored
])
PRED_SCHEMA = pa.schema([  # one row per test item; bucket/subject come from the split at metric time
    pa.field("item_id", pa.string()), pa.field("pred", pa.int32()), pa.field("correct", pa.bool_()),
    pa.field("text", pa.string()), pa.field("completion_tokens", pa.int32()), pa.field("error", pa.string()),
])

# ------------------------------------------------------------------------------------ readers


def load_items(data_dir: str):
    """The validated items of a finished data stage, as a Ray Dataset."""
    import ray

    return ray.data.read_parquet(store.join(str(data_dir), "items"))


def load_scores(score_dir: str, include_invalid: bool = False):
    """The scored rows of a finished score stage as a Ray Dataset: by default the rows splitting
    uses (scored, valid, not unknown); include_invalid=True gives every row, errors included."""
    from ray.data.expressions import col

    ds = store.read_parts(store.join(score_dir, "parts"))
    return ds if include_invalid else ds.filter(expr=col("valid") & ~col("unknown"))


def load_split(split_dir: str, name: str):
    """One output of a finished split stage (train, valid, test, test_balanced, excluded) as a Ray Dataset."""
    import ray

    if name not in SPLIT_OUTPUTS:
        raise ValueError(f"split output {name!r}: expected one of {SPLIT_OUTPUTS}")
    return ray.data.read_parquet(store.join(split_dir, name))


def split_ids(split_dir: str, name: str) -> list[str]:
    """The item ids of one split output, read on the driver (a small column)."""
    return store.columns(store.join(split_dir, name), ["item_id"])["item_id"].to_pylist()


def split_routing(split_dir: str) -> pa.Table:
    """item_id + treatment of the split's train and valid rows, read on the driver (small columns)."""
    return pa.concat_tables(store.columns(store.join(split_dir, s), ["item_id", "treatment"]) for s in ("train", "valid"))


def load_cot(teach_dir: str):
    """The kept teacher CoT of a finished teach stage (COT_SCHEMA), as a Ray Dataset."""
    import ray

    if not store.is_done(teach_dir):
        raise ConfigError(f"teach stage not finished: {teach_dir} (run `cft-ray teach`)")
    return ray.data.read_parquet(store.join(teach_dir, "cot"))


def teach_columns(parts_dir: str, columns: list[str], files: list[str] | None = None) -> pa.Table:
    """Small columns of the teacher's complete sample parts, on the driver (ids and counters, never texts)."""
    if not (store.part_files(parts_dir) if files is None else files):
        return pa.schema([SAMPLE_SCHEMA.field(c) for c in columns]).empty_table()
    return store.columns(parts_dir, columns, files)


def taught_coverage(teach_dir: str) -> set[str]:
    """Which rows a finished teach stage covers ("all", "routed", "random"); empty if unfinished."""
    if not store.is_done(teach_dir):
        return set()
    return set(store.read_json(store.join(teach_dir, "manifest.json")).get("coverage", ["routed"]))


def selected_ids(select_dir: str) -> set[str]:
    """The item ids a finished select stage chose."""
    t = store.columns(store.join(select_dir, "selection"), ["item_id", "selected"])
    return set(pc.filter(t["item_id"], t["selected"]).to_pylist())
