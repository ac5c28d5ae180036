"""Step 5: the experiment arms, each trained on the same train ids and evaluated on the same test sets.

An arm is a rewrite of the split's `treatment` column plus a schedule:
  base            no training
  sft             every row direct                         (one shuffled phase)
  distill         every row CoT                            (one shuffled phase)
  caft            the split's routing (hard -> CoT)         (train.schedule: paper's two phases)
  curriculum      every row direct, easy -> medium -> hard  (one phase per bucket)
  random_routing  CoT on a seeded random subset of the size of caft's CoT set, direct elsewhere
  instructdiff    only the InstructDiff selection (select.response: direct or CoT) (cft_ray/select.py)
  random_select   a seeded random subset of the selection's size, same response  (its control)
Arms share the scored data, the split and the teacher's outputs: the teach stage generates once for
the union of the rows any requested arm routes to CoT. A CoT-routed row whose teacher output was not
kept (teach.policy) makes no example in any arm: it is an error row of the arm's training manifest
("cot row without teacher text"), so CoT arms train on verified reasoning only and say how much was lost.

Evaluation modes: `direct` reads the argmax over the option labels at the first answer position
(after "[["; cheap, exact); `generate` decodes (greedy unless configured) and parses the last [[k]],
unparseable = wrong. Direct-trained arms use the direct prompt, CoT-trained arms the CoT prompt.
"""
from __future__ import annotations

import logging
import math
import time

import pyarrow as pa

from cft_ray import store
from cft_ray.config import SELECT_ARMS, CftConfig, ConfigError, config_hash, stage_dir

log = logging.getLogger("cft_ray")

COT_ARMS = {"distill", "caft", "random_routing"}  # arms whose model answers with reasoning
RECIPES = {  # arm -> train.schedule
    "sft": "merged", "distill": "merged", "caft": None, "curriculum": "curriculum",
    "random_routing": None, "instructdiff": "merged", "random_select": "merged",
}
PRED_SCHEMA = pa.schema([  # one row per test item; bucket/subject come from the split at metric time
    pa.field("item_id", pa.string()), pa.field("pred", pa.int32()), pa.field("correct", pa.bool_()),
    pa.field("text", pa.string()), pa.field("completion_tokens", pa.int32()), pa.field("error", pa.string()),
])
META = ["item_id", "bucket", "category", "subject", "answer"]


def _cot_share(cfg: CftConfig) -> bool:
    return "cot" in cfg.split.treatments().values()


def select_cot(cfg: CftConfig) -> bool:
    """InstructDiff scores (and its arms train on) teacher CoT: the teacher must cover the whole pool."""
    return cfg.selection == "instructdiff" and cfg.select.response == "cot"


def _arm_needs_teacher(cfg: CftConfig, arm: str) -> bool:
    return arm in ("distill", "random_routing") or (arm == "caft" and _cot_share(cfg)) or \
        (arm in SELECT_ARMS and select_cot(cfg))


def needs_teacher(cfg: CftConfig) -> bool:
    return select_cot(cfg) or any(_arm_needs_teacher(cfg, a) for a in cfg.arms)


def prompt_kind(cfg: CftConfig, arm: str) -> str:
    """Which prompt an arm is evaluated with: the one it was trained on."""
    if arm == "caft":
        return "cot" if _cot_share(cfg) else "direct"
    if arm in SELECT_ARMS:
        return cfg.select.response
    return "cot" if arm in COT_ARMS else "direct"


def arm_cfg(cfg: CftConfig, arm: str) -> CftConfig:
    schedule = RECIPES.get(arm)
    return cfg if schedule is None else cfg.model_copy(update={"train": cfg.train.model_copy(update={"schedule": schedule})})


def arm_dirs(cfg: CftConfig) -> dict[str, tuple[str | None, str]]:
    """arm -> (train dir or None for base, eval dir); keyed by everything upstream + train + eval."""
    out = {}
    for arm in cfg.arms:
        base = stage_dir(cfg, "select" if arm in SELECT_ARMS else "teach").rsplit("/", 1)[-1]
        tcfg = arm_cfg(cfg, arm)
        t = None if arm == "base" else store.join(cfg.run_dir, f"train-{arm}-{config_hash(base, tcfg.train, arm)}")
        e = store.join(cfg.run_dir, f"eval-{arm}-{config_hash(base, tcfg.train, cfg.eval, arm)}")
        out[arm] = (t, e)
    return out


# ------------------------------------------------------------------------------------ routing per arm

def arm_treatment(arm: str, ids: list[str], split_treatment: list[str], subsets: dict[str, set[str]],
                  select_kind: str = "direct") -> list[str]:
    """The one rule of the arms: each row's treatment under `arm`, from its id, the split's routing and
    the arm's id subset (random_routing: its CoT rows; select arms: their rows, validation included)."""
    if arm == "caft":
        return list(split_treatment)
    if arm == "distill":
        return ["cot"] * len(ids)
    if arm == "random_routing":
        return ["cot" if i in subsets[arm] else "direct" for i in ids]
    if arm in SELECT_ARMS:
        return [select_kind if i in subsets[arm] else "drop" for i in ids]
    return ["direct"] * len(ids)


def split_routing(cfg: CftConfig) -> pa.Table:
    """item_id + treatment of the split's train and valid rows, read on the driver (small columns)."""
    sdir = stage_dir(cfg, "split")
    return pa.concat_tables(store.columns(store.join(sdir, s), ["item_id", "treatment"]) for s in ("train", "valid"))


def arm_rows(rows, arm: str, cfg: CftConfig, subsets: dict[str, set[str]] | None = None):
    """The split's train+valid rows with `treatment` rewritten for `arm`."""
    import ray

    if arm == "caft":
        return rows
    ref = ray.put({arm: (subsets or {}).get(arm, set())})
    kind = cfg.select.response

    def rewrite(t: pa.Table) -> pa.Table:
        tr = arm_treatment(arm, t["item_id"].to_pylist(), t["treatment"].to_pylist(), ray.get(ref), kind)
        return t.set_column(t.schema.get_field_index("treatment"), "treatment", pa.array(tr, pa.string()))

    return rows.map_batches(rewrite, batch_format="pyarrow")


def routed_rows(cfg: CftConfig):
    """(train+valid rows of the split, {arm: its id subset}) shared by every arm: random_routing's CoT
    rows; the InstructDiff selection and a random subset of its size, each with the validation rows."""
    from cft_ray.split import load_split

    sdir = stage_dir(cfg, "split")
    if not store.is_done(sdir):
        raise ConfigError(f"arms: the split stage is not finished ({sdir}); run `cft-ray split` first")
    from cft_ray.split import seeded_subset

    rows = load_split(sdir, "train").union(load_split(sdir, "valid"))
    subsets: dict[str, set[str]] = {}
    if "random_routing" in cfg.arms:
        t = split_routing(cfg)
        n_cot = int(pa.compute.sum(pa.compute.equal(t["treatment"], "cot")).as_py() or 0)
        subsets["random_routing"] = seeded_subset(sorted(t["item_id"].to_pylist()), n_cot, cfg.split.seed + 1)
    if SELECT_ARMS & set(cfg.arms):
        from cft_ray.select import selected_ids

        chosen = selected_ids(cfg)
        pool = sorted(store.columns(store.join(sdir, "train"), ["item_id"])["item_id"].to_pylist())
        valid = set(store.columns(store.join(sdir, "valid"), ["item_id"])["item_id"].to_pylist())
        subsets["instructdiff"] = chosen | valid
        subsets["random_select"] = seeded_subset(pool, len(chosen), cfg.select.seed + 1) | valid
    return rows, subsets


def teacher_rows(cfg: CftConfig):
    """Rows the teach stage must cover (config.teacher_coverage): the union over the requested arms
    of the rows they route to CoT, as train+valid rows whose `treatment` says so."""
    rows, subsets = routed_rows(cfg.model_copy(update={"arms": [a for a in cfg.arms if a not in SELECT_ARMS]}))
    if "distill" in cfg.arms or select_cot(cfg):
        return arm_rows(rows, "distill", cfg)
    import ray

    ref = ray.put(subsets.get("random_routing", set()))
    use_caft = "caft" in cfg.arms

    def union(t: pa.Table) -> pa.Table:
        chosen = ray.get(ref)
        tr = ["cot" if (use_caft and x == "cot") or i in chosen else "direct"
              for i, x in zip(t["item_id"].to_pylist(), t["treatment"].to_pylist())]
        return t.set_column(t.schema.get_field_index("treatment"), "treatment", pa.array(tr, pa.string()))

    return rows.map_batches(union, batch_format="pyarrow")


# ------------------------------------------------------------------------------------ evaluation

def eval_mode(cfg: CftConfig, kind: str) -> str:
    """eval.mode, with auto = direct for direct-prompt arms (exact and cheap), generate for CoT arms."""
    if cfg.eval.mode == "auto":
        return "direct" if kind == "direct" else "generate"
    return cfg.eval.mode


def evaluate(test_ds, model_dir: str, cfg: CftConfig, kind: str):
    """Test rows -> PRED_SCHEMA rows for the model in `model_dir`, prompted with `kind` (direct|cot).
    Direct mode always reads the direct prompt (a CoT arm has no single answer position)."""
    from cft_ray import score, teach

    ecfg = cfg.model_copy(update={"student": cfg.student.model_copy(update={"name": model_dir})})
    items = test_ds.select_columns(score.ITEM_SCHEMA.names)
    if eval_mode(cfg, kind) == "direct":
        ecfg = ecfg.model_copy(update={"score": cfg.score.model_copy(update={"pool": cfg.eval.pool})})

        def pick(t: pa.Table) -> pa.Table:  # a row the scorer could not score is wrong, with its reason
            pred = t["pred_options"]
            return pa.table({"item_id": t["item_id"], "pred": pred.cast(pa.int32()),
                             "correct": pa.compute.fill_null(pa.compute.equal(pred, t["answer"]), False),
                             "text": t["argmax_token"], "completion_tokens": pa.array([0] * len(t), pa.int32()),
                             "error": t["error"]}, schema=PRED_SCHEMA)
        return score.score(items, ecfg, prompt="direct").map_batches(pick, batch_format="pyarrow")
    backend = cfg.eval.backend
    if backend == "auto":
        import importlib.util

        backend = "vllm" if importlib.util.find_spec("vllm") is not None else "hf"
    tcfg = cfg.teach.model_copy(update={
        "backend": backend, "model": ecfg.student, "temperature": cfg.eval.temperature, "top_p": 1.0,
        "max_tokens": cfg.eval.max_new_tokens, "seed": cfg.eval.seed, "constrain_format": False,
        "pool": cfg.eval.pool, "samples": 1})
    return teach.teach(items, cfg.model_copy(update={"teach": tcfg}), prompt=kind).map_batches(
        lambda t: pa.table({"item_id": t["item_id"], "pred": t["parsed"], "correct": t["correct"], "text": t["text"],
                            "completion_tokens": t["completion_tokens"], "error": t["error"]}, schema=PRED_SCHEMA),
        batch_format="pyarrow")


def accuracy(df) -> dict:
    """Accuracy with its binomial standard error, parse failures, and per bucket/category/subject."""
    def one(part) -> dict:
        n = len(part)
        acc = float(part["correct"].mean()) if n else float("nan")
        return {"n": n, "accuracy": acc, "stderr": math.sqrt(acc * (1 - acc) / n) if n else float("nan"),
                "parse_failures": int(part["pred"].isna().sum())}
    out = one(df)
    out["parse_failure_rate"] = out["parse_failures"] / out["n"] if out["n"] else float("nan")
    for g in ("bucket", "category", "subject"):
        out[f"by_{g}"] = {str(k): one(p) for k, p in df.groupby(df[g].astype(object).fillna("<none>"))}
    return out


def _spent(cfg: CftConfig, train_dir: str | None, cot_ids: set[str]) -> dict:
    """Data spent, the paper's way (supervised target tokens x epochs), plus every teacher call made
    for the rows this arm routed to CoT (all rounds, kept or not: failed calls cost too)."""
    spent = {"target_tokens": 0, "train_tokens": 0, "teacher_calls": 0, "teacher_tokens_in": 0, "teacher_tokens_out": 0}
    if train_dir is None:
        return spent
    tm = store.read_json(store.join(train_dir, "train_manifest.json"))
    spent.update(target_tokens=tm["data_spent_target_tokens"],
                 train_tokens=sum(p["tokens_per_epoch"] * p["epochs"] for p in tm["phases"] if p["steps"]))
    if cot_ids:
        import pyarrow.compute as pc

        from cft_ray.teach import _columns

        s = _columns(store.join(stage_dir(cfg, "teach"), "parts"), ["item_id", "prompt_tokens", "completion_tokens"])
        s = s.filter(pc.is_in(s["item_id"], value_set=pa.array(sorted(cot_ids), pa.string())))
        spent.update(teacher_calls=s.num_rows, teacher_tokens_in=int(pc.sum(s["prompt_tokens"]).as_py() or 0),
                     teacher_tokens_out=int(pc.sum(s["completion_tokens"]).as_py() or 0))
    return spent


def train_arm(cfg: CftConfig, arm: str, rows, subsets: dict[str, set[str]], train_dir: str) -> tuple[str, set[str], set[str]]:
    """Train one arm (resuming or skipping as its dir says): (model dir, ids it routed to CoT, ids
    that trained on a kept teacher CoT; the rest of its CoT rows made no example)."""
    import pyarrow.compute as pc

    from cft_ray.train import fit

    cot = None
    if store.is_done(stage_dir(cfg, "teach")):
        from cft_ray.teach import load_cot

        cot = load_cot(stage_dir(cfg, "teach"))
    elif _arm_needs_teacher(cfg, arm):
        raise ConfigError(f"arm {arm}: the teach stage is not finished ({stage_dir(cfg, 'teach')}); run `cft-ray teach` first")
    t = split_routing(cfg)  # the arm's routing on the driver, by the same rule arm_rows applies
    ids = t["item_id"].to_pylist()
    treat = arm_treatment(arm, ids, t["treatment"].to_pylist(), subsets, cfg.select.response)
    routed = {k: treat.count(k) for k in set(treat)}
    fit(arm_rows(rows, arm, cfg, subsets), cot if routed.get("cot") else None,  # no CoT rows: no join
        arm_cfg(cfg, arm), train_dir, stage=f"train:{arm}", routed=routed)
    ex = store.columns(store.join(train_dir, "examples"), ["item_id", "kind", "error"])
    routed_cot = {i for i, x in zip(ids, treat) if x == "cot"}
    used = ex.filter(pc.and_(pc.equal(ex["kind"], "cot"), pc.is_null(ex["error"])))
    return store.join(train_dir, "model"), routed_cot, set(used["item_id"].to_pylist())


def train_arms(cfg: CftConfig) -> str:
    """`cft-ray train`: every arm but base, each into its own train dir; returns the run dir."""
    rows, subsets = routed_rows(cfg)
    for arm, (t, _) in arm_dirs(cfg).items():
        if t is not None:
            log.info("arm %s: train %s", arm, t)
            train_arm(cfg, arm, rows, subsets, t)
    return cfg.run_dir


def run_arm(cfg: CftConfig, arm: str, rows, subsets: dict[str, set[str]], dirs: tuple[str | None, str]) -> dict:
    """Train (unless base) and evaluate one arm; returns its metrics (also written to the eval dir)."""
    from cft_ray.split import load_split

    train_dir, eval_dir = dirs
    started = time.time()
    model_dir, routed_cot, used_cot = cfg.student.name, set(), set()
    if train_dir is not None:
        model_dir, routed_cot, used_cot = train_arm(cfg, arm, rows, subsets, train_dir)
    train_s = time.time() - started
    kind = prompt_kind(cfg, arm)
    sdir = stage_dir(cfg, "split")
    sets = {}
    e0 = time.time()
    # One pass over test/ (test_balanced/ is a subset of it): a generation engine starts once per arm.
    pdir = store.join(eval_dir, "predictions")
    store.reset(pdir)
    evaluate(load_split(sdir, "test"), model_dir, cfg, kind).write_parquet(pdir)
    preds = store.columns(pdir, [c for c in PRED_SCHEMA.names if c != "text"]).to_pandas()
    df = store.columns(store.join(sdir, "test"), META).to_pandas().merge(preds, on="item_id", how="left")
    if len(preds) != len(df) or df["correct"].isna().any():  # every test row gets exactly one prediction
        raise RuntimeError(f"eval {arm}: {len(preds)} predictions for {len(df)} test rows")
    balanced = set(store.columns(store.join(sdir, "test_balanced"), ["item_id"])["item_id"].to_pylist()) \
        if cfg.eval.balanced else None
    for name, part in (("test", df), ("test_balanced", None if balanced is None else df[df["item_id"].isin(balanced)])):
        if part is not None:
            sets[name] = accuracy(part)
            sets[name]["generated_tokens"] = int(part["completion_tokens"].fillna(0).sum())
    metrics = {"arm": arm, "model_dir": model_dir, "mode": eval_mode(cfg, kind), "prompt": kind,
               "sets": sets, "data_spent": _spent(cfg, train_dir, routed_cot),
               "cot_rows": len(used_cot), "train_s": round(train_s, 2), "eval_s": round(time.time() - e0, 2)}
    if train_dir:
        tm = store.read_json(store.join(train_dir, "train_manifest.json"))
        metrics["train"] = {k: tm.get(k) for k in ("steps", "tokens_per_s", "mfu", "wall_s", "schedule", "effective_batch")}
    store.write_json(store.join(eval_dir, "metrics.json"), metrics)
    store.finish(eval_dir, {"stage": f"eval:{arm}", "duration_s": round(time.time() - started, 2),
                            "counts": {k: v["n"] for k, v in sets.items()}})
    return metrics


def main(cfg: CftConfig, force: bool = False) -> str:
    """Stage entry: every arm of cfg.arms, skipping arms whose evaluation is finished."""
    dirs = arm_dirs(cfg)
    if needs_teacher(cfg) and not store.is_done(stage_dir(cfg, "teach")):
        raise ConfigError(f"arms: the teach stage is not finished ({stage_dir(cfg, 'teach')}); run `cft-ray teach` first")
    rows, subsets = routed_rows(cfg)
    summary = {}
    for arm in cfg.arms:
        t, e = dirs[arm]
        if force:
            for d in (t, e):
                if d:
                    store.reset(d)
        if store.is_done(e):
            summary[arm] = store.read_json(store.join(e, "metrics.json"))
            continue
        log.info("arm %s: train %s, eval %s", arm, t, e)
        summary[arm] = run_arm(cfg, arm, rows, subsets, dirs[arm])
    out = store.join(cfg.run_dir, "arms.json")
    store.write_json(out, {a: {"eval_dir": dirs[a][1], "train_dir": dirs[a][0],
                               **{k: summary[a][k] for k in ("sets", "data_spent", "prompt", "mode")}} for a in cfg.arms})
    return out
