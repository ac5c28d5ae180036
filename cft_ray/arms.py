"""The experiment's arms: each trained on the same train ids and evaluated on the same test sets.

An arm is a rewrite of the split's `treatment` column plus a schedule (RECIPES):
  base            no training
  sft             every row direct                         (one shuffled phase)
  distill         every row CoT                            (one shuffled phase)
  caft            the split's routing (hard -> CoT)         (train.schedule: paper's two phases)
  curriculum      every row direct, easy -> medium -> hard  (one phase per bucket)
  random_routing  CoT on a seeded random subset of the size of caft's CoT set, direct elsewhere
  instructdiff    only the InstructDiff selection (select.response: direct or CoT) (cft_ray/select.py)
  random_select   a seeded random subset of the selection's size, same response  (its control)
Arms share the scored data, the split and the teacher's outputs: the teach stage generates once for
the union of the rows any requested arm routes to CoT (teach_for_arms). A CoT-routed row whose teacher
output was not kept (teach.policy) makes no example in any arm: it is an error row of the arm's
training manifest ("cot row without teacher text"), so CoT arms train on verified reasoning only and
say how much was lost. Each arm is evaluated with the prompt it was trained on (prompt_kind).
"""
from __future__ import annotations

import logging
import time
from typing import Callable

import pyarrow as pa
import pyarrow.compute as pc

from cft_ray import layout, store, teach
from cft_ray.config import COT_ARMS, SELECT_ARMS, CftConfig, ConfigError, Phase, config_hash
from cft_ray.evaluate import eval_modes, evaluate_on_split, predictions_dir
from cft_ray.split import seeded_subset
from cft_ray.stats import compare
from cft_ray.train import train_from_rows

log = logging.getLogger("cft_ray")

DESCRIPTIONS = {  # what each arm trains on, for people (model cards)
    "sft": "direct answers on every training item",
    "distill": "the teacher's verified chain-of-thought on every training item",
    "caft": "direct answers on the items the student found easy or medium, the teacher's verified chain-of-thought "
            "on the items it found hard (by its own uncertainty score)",
    "curriculum": "direct answers on every training item, easy before medium before hard",
    "random_routing": "chain-of-thought on a random subset of the size of caft's hard set, direct answers elsewhere",
    "instructdiff": "the InstructDiff differential-entropy selection of the training items",
    "random_select": "a random subset of the size of the InstructDiff selection",
}
RECIPES = {  # arm -> train.schedule
    "sft": "merged", "distill": "merged", "caft": None, "curriculum": "curriculum",
    "random_routing": None, "instructdiff": "merged", "random_select": "merged",
}
COVERAGE_ARMS = {"all": "distill", "routed": "caft", "random": "random_routing"}  # teacher coverage -> its arm


# ------------------------------------------------------------------------------------ recipes

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


def arm_budget(cfg: CftConfig) -> float:
    """Epochs every arm trains in all (train.arm_epochs, default twice train.epochs)."""
    return cfg.train.arm_epochs or 2 * cfg.train.epochs


def arm_cfg(cfg: CftConfig, arm: str) -> CftConfig:
    """The run config with the arm's training schedule, its phases sharing the same budget of epochs
    (the paper's: merged arms train it all; two_phase half + half; the curriculum half on the hardest
    bucket and the other half shared by the easier ones). A custom schedule keeps its own epochs."""
    total, tc = arm_budget(cfg), cfg.train
    schedule = RECIPES.get(arm) or tc.schedule
    update: dict = {"schedule": schedule}
    if schedule == "merged":
        update["epochs"] = total
    elif schedule == "two_phase":
        update["epochs"] = total / 2
    elif schedule == "curriculum":
        buckets = cfg.split.buckets()
        update.update(schedule="custom", phases=[
            Phase(name=f"curriculum-{b}", treatments=["direct"], buckets=[b],
                  epochs=total / 2 if i == len(buckets) - 1 else total / 2 / (len(buckets) - 1))
            for i, b in enumerate(buckets)])
    return cfg.model_copy(update={"train": tc.model_copy(update=update)})


def arm_dirs(cfg: CftConfig) -> dict[str, tuple[str | None, str]]:
    """arm -> (train dir or None for base, eval dir); keyed by everything upstream + train + eval."""
    out = {}
    for arm in cfg.arms:
        upstream = layout.stage_dir(cfg, "select" if arm in SELECT_ARMS else "teach").rsplit("/", 1)[-1]
        train_cfg = arm_cfg(cfg, arm).train
        train_dir = None if arm == "base" else \
            store.join(cfg.run_dir, f"train-{arm}-{config_hash(upstream, train_cfg, arm)}")
        out[arm] = (train_dir, store.join(cfg.run_dir, f"eval-{arm}-{config_hash(upstream, train_cfg, cfg.eval, arm)}"))
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


def rewrite_treatment(rows, rule: Callable[[list, list, list, object], list[str]], data=None):
    """`rows` with `treatment` = rule(item_ids, treatments, splits, data) per batch (absent columns
    read as None); `data` (id sets) travels once through the object store. Every arm's data, the
    teacher's rows and InstructDiff's warm-up are built by this one rewrite."""
    import ray

    ref = ray.put(data)

    def apply(t: pa.Table) -> pa.Table:
        def column(name):
            return t[name].to_pylist() if name in t.column_names else [None] * t.num_rows
        new = pa.array(rule(t["item_id"].to_pylist(), column("treatment"), column("split"), ray.get(ref)), pa.string())
        if "treatment" in t.column_names:
            return t.set_column(t.schema.get_field_index("treatment"), "treatment", new)
        return t.append_column("treatment", new)

    return rows.map_batches(apply, batch_format="pyarrow")


def arm_rows(rows, arm: str, cfg: CftConfig, subsets: dict[str, set[str]] | None = None):
    """The split's train+valid rows with `treatment` rewritten for `arm`."""
    if arm == "caft":
        return rows
    kind = cfg.select.response
    return rewrite_treatment(rows, lambda ids, tr, _, subs: arm_treatment(arm, ids, tr, subs, kind),
                             {arm: (subsets or {}).get(arm, set())})


def routed_rows(cfg: CftConfig):
    """(train+valid rows of the split, {arm: its id subset}) shared by every arm: random_routing's CoT
    rows; the InstructDiff selection and a random subset of its size, each with the validation rows."""
    sdir = layout.upstream(cfg, "split", by="arms")
    rows = layout.load_split(sdir, "train").union(layout.load_split(sdir, "valid"))
    subsets: dict[str, set[str]] = {}
    if "random_routing" in cfg.arms:
        t = layout.split_routing(sdir)
        n_cot = int(pc.sum(pc.equal(t["treatment"], "cot")).as_py() or 0)
        subsets["random_routing"] = seeded_subset(sorted(t["item_id"].to_pylist()), n_cot, cfg.split.seed + 1)
    if SELECT_ARMS & set(cfg.arms):
        chosen = layout.selected_ids(layout.upstream(cfg, "select", by="arms"))
        valid = set(layout.split_ids(sdir, "valid"))
        subsets["instructdiff"] = chosen | valid
        subsets["random_select"] = seeded_subset(sorted(layout.split_ids(sdir, "train")), len(chosen), cfg.select.seed + 1) | valid
    return rows, subsets


# ------------------------------------------------------------------------------------ the teacher's rows

def teacher_coverage(arms, select_cot: bool = False) -> set[str]:
    """Which train rows the teach stage must cover for these arms: all (distill, or InstructDiff scoring
    CoT responses), the split's CoT rows (caft), the random-routing subset. The teach manifest records
    it: a finished teach stage whose coverage lacks a newly added arm's rows re-opens and generates
    only the missing ones."""
    need = {c for c, a in COVERAGE_ARMS.items() if a in arms}
    return {"all"} if "all" in need or select_cot else need


def teacher_rows(cfg: CftConfig):
    """Rows the teach stage must cover (teacher_coverage): the union over the requested arms of the
    rows they route to CoT, as train+valid rows whose `treatment` says so."""
    rows, subsets = routed_rows(cfg.model_copy(update={"arms": [a for a in cfg.arms if a not in SELECT_ARMS]}))
    if "distill" in cfg.arms or select_cot(cfg):
        return arm_rows(rows, "distill", cfg)
    use_caft = "caft" in cfg.arms
    return rewrite_treatment(
        rows, lambda ids, tr, _, chosen: ["cot" if (use_caft and x == "cot") or i in chosen else "direct"
                                          for i, x in zip(ids, tr)],
        subsets.get("random_routing", set()))


def teach_finished(cfg: CftConfig) -> bool:
    """The teach stage is done for this config: finished, and taught every row its arms need."""
    have = layout.taught_coverage(layout.stage_dir(cfg, "teach"))
    return bool(have) and ("all" in have or teacher_coverage(cfg.arms, select_cot(cfg)) <= have)


def teach_for_arms(cfg: CftConfig) -> str:
    """`cft-ray teach`: the teacher's CoT for every row the requested arms route to CoT, taught once."""
    out = layout.stage_dir(cfg, "teach")
    layout.upstream(cfg, "split", by="teach")
    if teach_finished(cfg):
        log.info("teach: %s is finished (covers %s), skipping", out, sorted(layout.taught_coverage(out)))
        return out
    need = teacher_coverage(cfg.arms, select_cot(cfg)) | layout.taught_coverage(out)
    rows = teacher_rows(cfg.model_copy(update={"arms": [COVERAGE_ARMS[c] for c in sorted(need)]}))
    return teach.main(cfg, rows, sorted(need))


# ------------------------------------------------------------------------------------ running an arm

def data_spent(cfg: CftConfig, train_dir: str | None, cot_ids: set[str]) -> dict:
    """Data spent, the paper's way (supervised target tokens x epochs), plus every teacher call made
    for the rows this arm routed to CoT (all rounds, kept or not: failed calls cost too)."""
    spent = {"target_tokens": 0, "train_tokens": 0, "teacher_calls": 0, "teacher_tokens_in": 0, "teacher_tokens_out": 0}
    if train_dir is None:
        return spent
    tm = store.read_json(store.join(train_dir, "train_manifest.json"))
    spent.update(target_tokens=tm["data_spent_target_tokens"],
                 train_tokens=sum(p["tokens_per_epoch"] * p["epochs"] for p in tm["phases"] if p["steps"]))
    if cot_ids:
        s = layout.teach_columns(store.join(layout.stage_dir(cfg, "teach"), "parts"),
                                 ["item_id", "prompt_tokens", "completion_tokens", "finish_reason"])
        s = s.filter(pc.is_in(s["item_id"], value_set=pa.array(sorted(cot_ids), pa.string())))
        calls = s.num_rows - int(pc.sum(pc.equal(s["finish_reason"], "rationale")).as_py() or 0)  # read, not asked
        spent.update(teacher_calls=calls, teacher_tokens_in=int(pc.sum(s["prompt_tokens"]).as_py() or 0),
                     teacher_tokens_out=int(pc.sum(s["completion_tokens"]).as_py() or 0))
    return spent


def train_arm(cfg: CftConfig, arm: str, rows, subsets: dict[str, set[str]], train_dir: str) -> tuple[str, set[str], set[str]]:
    """Train one arm (resuming or skipping as its dir says): (model dir, ids it routed to CoT, ids
    that trained on a kept teacher CoT; the rest of its CoT rows made no example)."""
    teach_dir = layout.stage_dir(cfg, "teach")
    cot = layout.load_cot(teach_dir) if store.is_done(teach_dir) else None
    if cot is None and _arm_needs_teacher(cfg, arm):
        raise ConfigError(f"arm {arm}: the teach stage is not finished ({teach_dir}); run `cft-ray teach` first")
    t = layout.split_routing(layout.stage_dir(cfg, "split"))  # the arm's routing on the driver, by arm_rows' rule
    ids = t["item_id"].to_pylist()
    treat = arm_treatment(arm, ids, t["treatment"].to_pylist(), subsets, cfg.select.response)
    routed = {k: treat.count(k) for k in set(treat)}
    train_from_rows(arm_rows(rows, arm, cfg, subsets), cot if routed.get("cot") else None,  # no CoT rows: no join
                    arm_cfg(cfg, arm), train_dir, stage=f"train:{arm}", routed=routed)
    ex = store.columns(store.join(train_dir, "examples"), ["item_id", "kind", "error"])
    routed_cot = {i for i, x in zip(ids, treat) if x == "cot"}
    used = ex.filter(pc.and_(pc.equal(ex["kind"], "cot"), pc.is_null(ex["error"])))
    return store.join(train_dir, "model"), routed_cot, set(used["item_id"].to_pylist())


def train_arms(cfg: CftConfig) -> str:
    """`cft-ray train`: every arm but base, each into its own train dir; returns the run dir."""
    rows, subsets = routed_rows(cfg)
    for arm, (train_dir, _) in arm_dirs(cfg).items():
        if train_dir is not None:
            log.info("arm %s: train %s", arm, train_dir)
            train_arm(cfg, arm, rows, subsets, train_dir)
    return cfg.run_dir


def run_arm(cfg: CftConfig, arm: str, rows, subsets: dict[str, set[str]], dirs: tuple[str | None, str]) -> dict:
    """Train (unless base) and evaluate one arm; returns its metrics (also written to the eval dir)."""
    train_dir, eval_dir = dirs
    started = time.time()
    model_dir, routed_cot, used_cot = cfg.student.name, set(), set()
    if train_dir is not None:
        model_dir, routed_cot, used_cot = train_arm(cfg, arm, rows, subsets, train_dir)
    train_s = time.time() - started
    kind = prompt_kind(cfg, arm)
    e0 = time.time()
    by_mode = {m: evaluate_on_split(cfg, model_dir, kind, layout.stage_dir(cfg, "split"), eval_dir, m)
               for m in eval_modes(cfg)}
    sets = by_mode[cfg.eval.mode]
    metrics = {"arm": arm, "model_dir": model_dir, "mode": cfg.eval.mode, "prompt": kind,
               "sets": sets, "by_mode": by_mode, "data_spent": data_spent(cfg, train_dir, routed_cot),
               "cot_rows": len(used_cot), "train_s": round(train_s, 2), "eval_s": round(time.time() - e0, 2)}
    if train_dir:
        tm = store.read_json(store.join(train_dir, "train_manifest.json"))
        metrics["train"] = {k: tm.get(k) for k in ("steps", "tokens_per_s", "mfu", "wall_s", "schedule", "effective_batch")}
        # a list: JSON dicts are written with sorted keys, which would show curriculum's phases out of order
        metrics["epochs"] = [[p["name"], p["epochs"]] for p in tm["phases"] if p["steps"]]
    store.write_json(store.join(eval_dir, "metrics.json"), metrics)
    store.finish(eval_dir, {"stage": f"eval:{arm}", "config_hash": layout.dir_hash(eval_dir),
                            "duration_s": round(time.time() - started, 2),
                            "counts": {k: v["n"] for k, v in sets.items()}})
    return metrics


def run_arms(cfg: CftConfig) -> str:
    """Stage entry: every arm of cfg.arms, skipping arms whose evaluation is finished; `arms.json`."""
    dirs = arm_dirs(cfg)
    if needs_teacher(cfg) and not store.is_done(layout.stage_dir(cfg, "teach")):
        raise ConfigError(f"arms: the teach stage is not finished ({layout.stage_dir(cfg, 'teach')}); run `cft-ray teach` first")
    rows, subsets = routed_rows(cfg)
    summary = {}
    for arm in cfg.arms:
        train_dir, eval_dir = dirs[arm]
        if store.is_done(eval_dir):
            summary[arm] = store.read_json(store.join(eval_dir, "metrics.json"))
            continue
        log.info("arm %s: train %s, eval %s", arm, train_dir, eval_dir)
        summary[arm] = run_arm(cfg, arm, rows, subsets, dirs[arm])
    store.write_json(store.join(cfg.run_dir, "comparisons.json"), compare_arms(cfg, dirs, summary))
    out = store.join(cfg.run_dir, "arms.json")
    store.write_json(out, {a: {"eval_dir": dirs[a][1], "train_dir": dirs[a][0],
                               "epochs": summary[a].get("epochs", []),
                               **{k: summary[a].get(k) for k in ("sets", "by_mode", "data_spent", "prompt", "mode")}}
                           for a in cfg.arms})
    return out


def compared_pairs(arms: list[str]) -> list[tuple[str, str]]:
    """The pairs the report compares: each arm vs base and vs sft, and each method vs its control."""
    pairs = [(a, ref) for ref in ("base", "sft") for a in arms if ref in arms and a not in ("base", ref)]
    pairs += [(a, b) for a, b in (("caft", "distill"), ("caft", "random_routing"), ("instructdiff", "random_select"))
              if a in arms and b in arms]
    return list(dict.fromkeys(pairs))


def compare_arms(cfg: CftConfig, dirs: dict, summary: dict) -> dict:
    """Paired comparisons on the shared test items (test and test_balanced), under each protocol, every
    arm evaluated alike: exact McNemar p-value, bootstrap interval of the difference, the smallest
    difference the set could detect. `pairs` are the headline protocol's; each pair names the prompt
    each arm answered (direct or cot: part of the arm's treatment)."""
    split_dir = layout.stage_dir(cfg, "split")
    sets = {"test": None} | ({"test_balanced": set(layout.split_ids(split_dir, "test_balanced"))} if cfg.eval.balanced else {})
    out: dict = {"alpha": 0.05, "test": "exact McNemar (two-sided) on the discordant items; 95% paired bootstrap "
                 "interval of the accuracy difference (10,000 resamples of items)", "protocol": cfg.eval.mode, "by_mode": {}}
    for mode in eval_modes(cfg):
        correct = {a: store.columns(predictions_dir(dirs[a][1], mode, cfg), ["item_id", "correct"]).to_pandas()
                   .set_index("item_id")["correct"] for a in cfg.arms}
        pairs = []
        for a, b in compared_pairs(list(cfg.arms)):
            row = {"a": a, "b": b, "prompt_a": summary[a]["prompt"], "prompt_b": summary[b]["prompt"]}
            for name, ids in sets.items():
                both = correct[a].to_frame("a").join(correct[b].to_frame("b"), how="inner")
                if ids is not None:
                    both = both[both.index.isin(ids)]
                row[name] = compare(both["a"].to_numpy(bool), both["b"].to_numpy(bool), seed=cfg.split.seed)
            pairs.append(row)
        out["by_mode"][mode] = pairs
    out["pairs"] = out["by_mode"][cfg.eval.mode]
    return out
