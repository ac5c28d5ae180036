"""What can fail before a stage starts, found on the driver and said in one line naming what to change.

`check_config` runs before Ray starts: a relative run_dir inside a Ray job, run_dir reachable and writable,
every model the stages load resolvable (a local directory, a .gguf, an embedded alias, or a repo the Hub
serves) with a chat template, labels that tokenise apart, and the fixed part of every prompt within each
length limit. `check_resources` runs once Ray is up, before any stage starts an actor or a worker: every
actor pool and worker group of the stages fits the cluster. A local Ray that cft-ray started cannot grow,
nor can a cluster none of whose node types (`ray up`'s bootstrap config) offers the resource: both fail at
once; a joined cluster that may scale up gets `ray.resource_wait_minutes`.
"""
from __future__ import annotations

import difflib
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from cft_ray import arms, data, evaluate, generate, models, score, store, teach, tracking
from cft_ray.config import CftConfig, ConfigError, ModelConfig
from cft_ray.prompts import messages, prompt_ids

log = logging.getLogger("cft_ray")

BOOTSTRAP_CONFIG = "~/ray_bootstrap_config.yaml"  # the autoscaler's config, where `ray up` leaves it on the head node
TRAINING_STAGES = {"warmup", "train", "arms"}
_IMPLICIT = ("memory", "object_store_memory", "node:", "accelerator_type:")  # resources Ray adds to every node


# ------------------------------------------------------------------------------------ before Ray


def check_config(cfg: CftConfig, stages: list[str]) -> None:
    """Every driver check that needs no Ray; the first failure is a ConfigError naming the field."""
    if os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") and "://" not in cfg.run_dir and not os.path.isabs(cfg.run_dir):
        raise ConfigError(f"run_dir: {cfg.run_dir!r} is relative, and this driver runs inside a Ray job whose working "
                          f"directory ({os.getcwd()}) is a temporary copy deleted with the session; give a path every node "
                          "reaches: run_dir=s3://bucket/runs/x, a shared mount, or on a one-machine cluster run_dir=$PWD/runs/x")
    student, teacher = bool(models.STUDENT_STAGES & set(stages)), "teach" in stages and _engine_teacher(cfg)
    for section, m, used in (("student", cfg.student, student), ("teach.model", cfg.teach.model, teacher)):
        if used:
            _check_model(m, section)
    store.check_writable(cfg.run_dir)
    if cfg.tracking.backend != "none":
        tracking.check(cfg)
    _check_lengths(cfg, stages)


def _engine_teacher(cfg: CftConfig) -> bool:
    return arms.needs_teacher(cfg) and cfg.teach.backend in ("vllm", "hf")


def _check_model(m: ModelConfig, section: str) -> None:
    """The model resolves and has a chat template (from its files where it is local: no torch import)."""
    try:
        models.check_template_files(m)
        models.check_reachable(m)
    except ConfigError as e:
        msg = str(e)  # models' messages call the section `model.`: name the one this run configures
        raise ConfigError(f"{section}.{msg[len('model.'):]}" if msg.startswith("model.") else msg) from None


def _check_lengths(cfg: CftConfig, stages: list[str]) -> None:
    """The labels tokenise apart, the rationale column exists, and the fixed part of every prompt leaves room
    within each length limit (loading the tokenizers)."""
    room: list[tuple[str, int | None, int, str]] = []  # (field, its limit, tokens needed, what needs them)
    if models.STUDENT_STAGES & set(stages):
        tok = models.load_tokenizer(cfg.student)
        score.check_labels(tok, cfg.prompt)
        room += _student_room(cfg, stages, tok)
    if "teach" in stages and arms.needs_teacher(cfg) and cfg.teach.backend == "rationale":
        cols = cfg.data.columns or (data.EMBEDDED[cfg.data.source][2] if cfg.data.source in data.EMBEDDED else None)
        if cols is None or cols.rationale is None:
            raise ConfigError("teach.backend=rationale needs data.columns.rationale (the field holding each item's "
                              "worked solution); or pick a teacher backend (vllm, hf, openai)")
    elif "teach" in stages and _engine_teacher(cfg):
        need = _fixed_tokens(cfg, models.load_tokenizer(cfg.teach.model), "teacher") + cfg.teach.max_tokens
        ctx = models.context_length(cfg.teach.model)
        if cfg.teach.backend == "vllm":
            room.append(("teach.engine_kwargs.max_model_len", cfg.teach.engine_kwargs.get("max_model_len") or ctx, need,
                         "the teacher prompt's fixed part + teach.max_tokens"))
            need = cfg.teach.engine_kwargs.get("max_model_len") or need
        room.append((f"teach.model ({cfg.teach.model.name}) max_position_embeddings", ctx, need, "the teacher's engine"))
    for field, limit, need, what in room:
        if limit is not None and need > limit:
            raise ConfigError(f"{field}: {limit} tokens < {need} for {what}; raise it or lower the budget")


def _fixed_tokens(cfg: CftConfig, tok, kind: str) -> int:
    """Tokens of a `kind` prompt before any question or option text: template, system message, instructions."""
    blank = {"question": "", "options": [""] * 4}
    return len(prompt_ids(tok, messages(kind, blank, cfg.prompt.labels, cfg.prompt.fallback, cfg.prompt.preset)))


def _student_room(cfg: CftConfig, stages: list[str], tok) -> list[tuple[str, int | None, int, str]]:
    ctx = models.context_length(cfg.student)
    trains = bool({"arms", "train"} & set(stages))  # a score-only command is not held to training's limits
    out = [(f"student ({cfg.student.name}) max_position_embeddings", ctx, cfg.train.max_length, "train.max_length")] \
        if trains else []
    if "score" in stages:
        out.append(("score.max_prompt_tokens", cfg.score.max_prompt_tokens, _fixed_tokens(cfg, tok, "score") + 1,
                    "the score prompt's fixed part"))
    if trains and arms.needs_teacher(cfg):
        out.append(("train.max_length", cfg.train.max_length, _fixed_tokens(cfg, tok, "cot") + cfg.teach.max_tokens,
                    "a CoT example: its prompt's fixed part + teach.max_tokens"))
    if "arms" in stages and cfg.eval.backend != "hf" and "generate" in [cfg.eval.mode, *cfg.eval.extra_modes]:
        need = _fixed_tokens(cfg, tok, "cot") + cfg.eval.max_new_tokens
        out.append(("eval.engine_kwargs.max_model_len", cfg.eval.engine_kwargs.get("max_model_len") or ctx, need,
                    "the eval prompt's fixed part + eval.max_new_tokens"))
        out.append((f"student ({cfg.student.name}) max_position_embeddings", ctx,
                    cfg.eval.engine_kwargs.get("max_model_len") or need, "eval.engine_kwargs.max_model_len"))
    return out


# ------------------------------------------------------------------------------------ Ray's resources


@dataclass(frozen=True)
class Ask:
    """What one config field makes a stage ask Ray for: `count` units at once, each of these bundles
    (several for a tensor-parallel engine; all alike)."""
    field: str
    size_field: str
    bundles: tuple[dict, ...]
    count: int


def asks(cfg: CftConfig, stages: list[str]) -> list[Ask]:
    """Every actor pool and worker group the stages start, as Ray will be asked for it."""
    out = []
    pools = [("score.pool", cfg.score.pool, "score" in stages),
             ("select.pool", cfg.select.pool, "select" in stages and cfg.selection == "instructdiff"),
             ("eval.pool (direct)", cfg.eval.pool, "arms" in stages and "direct" in [cfg.eval.mode, *cfg.eval.extra_modes]),
             ("train.pool", cfg.train.pool.model_copy(update={"size": 1}), bool(TRAINING_STAGES & set(stages)))]
    out += [Ask(f, f"{f.split()[0]}.size", (p.bundle(),), p.min_size()) for f, p, used in pools if used]
    engines = [("teach.pool", teach.teacher_spec(cfg) if "teach" in stages and arms.needs_teacher(cfg) else None),
               ("eval.pool (generate)", evaluate.eval_spec(cfg, cfg.student.name, "cot")
                if "arms" in stages and "generate" in [cfg.eval.mode, *cfg.eval.extra_modes] else None)]
    out += [Ask(f, f"{f.split()[0]}.size", tuple(b), s.pool.min_size()) for f, s in engines if s and (b := generate.placement(s))]
    if TRAINING_STAGES & set(stages):
        t = cfg.train  # Ray Train's own defaults (ScalingConfig._resources_per_worker_not_none)
        worker = {k: v for k, v in t.resources_per_worker.items() if v} if t.resources_per_worker else \
            ({} if t.use_gpu else {"CPU": 1})
        if t.use_gpu:
            worker.setdefault("GPU", 1)
        out.append(Ask("train.resources_per_worker", "train.num_workers", (worker,), t.num_workers))
    return out


def check_resources(cfg: CftConfig, stages: list[str], may_grow: bool) -> list[str]:
    """Each ask against the live nodes; what fits, one line each. Fails at once with the field to change when
    the cluster cannot grow (`may_grow` False, or no node type of the autoscaler's config offers it), else
    waits up to `ray.resource_wait_minutes` for nodes to join, saying so every 15 s."""
    import ray

    types = _node_types() if may_grow else []
    wait_s = cfg.ray.resource_wait_minutes * 60 if may_grow else 0
    wanted = asks(cfg, stages)
    started = time.time()
    while True:
        nodes = [n["Resources"] for n in ray.nodes() if n["Alive"]]
        short = [(a, why) for a in wanted if (why := _shortfall(a, nodes))]
        if not short:
            return [f"{a.field}: {a.count} x {_fmt(a.bundles)} fits ({_holds(nodes, a.bundles[0])} at once)" for a in wanted]
        a, why = short[0]
        waited = time.time() - started
        if may_grow and types is not None and not any(_may_hold(t, a.bundles[0]) for t in types):
            raise ConfigError(f"{why}; no node type of the autoscaler's config offers it either")
        if waited >= wait_s:
            raise ConfigError(why + (f" (waited {waited / 60:.0f} of ray.resource_wait_minutes="
                                     f"{cfg.ray.resource_wait_minutes:g})" if wait_s else ""))
        log.info("waiting for %d x %s for %s: %.0f of %g min", a.count, _fmt(a.bundles), a.field, waited / 60,
                 cfg.ray.resource_wait_minutes)
        time.sleep(min(15, max(0.5, wait_s - waited)))


def _holds(nodes: list[dict], bundle: dict) -> int:
    """How many copies of `bundle` the nodes hold between them (each copy on one node)."""
    return sum(min((int(n.get(k, 0) / v + 1e-9) for k, v in bundle.items()), default=1 << 30) for n in nodes)


def _shortfall(a: Ask, nodes: list[dict]) -> str | None:
    """None when the nodes hold the ask, else the one-line reason naming the field."""
    b = a.bundles[0]
    need, have = a.count * len(a.bundles), _holds(nodes, b)
    if have >= need:
        return None
    offered = sorted({k for n in nodes for k in n if not k.startswith(_IMPLICIT)})
    # a custom resource first: a typo there is likelier than GPUs not scaled up yet
    missing = sorted((k for k in b if all(k not in n for n in nodes)), key=lambda k: k in ("CPU", "GPU"))
    if missing:
        k = missing[0]
        close = difflib.get_close_matches(k, [r for r in offered if r not in ("CPU", "GPU")], n=1, cutoff=0.6)
        hint = f"did you mean {close[0]!r}?" if close else \
            f"set {a.size_field[:-len('.size')]}.num_gpus=0 on a CPU cluster" if k == "GPU" and a.size_field.endswith(".size") else \
            "train.use_gpu=false on a CPU cluster" if k == "GPU" else f"nodes offer {offered}"
        return f"{a.field}: each {_unit(a)} asks for {_fmt(a.bundles)}, and no node of the cluster has {k!r}; {hint}"
    return (f"{a.field}: {a.count} x {_fmt(a.bundles)} at once, and the cluster holds {have} "
            f"({len(nodes)} node(s): {', '.join(_fmt([{k: v for k, v in n.items() if k in offered}]) for n in nodes)}); "
            f"lower {a.size_field} or what each asks for")


def _unit(a: Ask) -> str:
    return "worker" if a.size_field == "train.num_workers" else "engine" if len(a.bundles) > 1 else "actor"


def _fmt(bundles) -> str:
    one = "{" + ", ".join(f"{k}: {v:g}" for k, v in bundles[0].items()) + "}"
    return one if len(bundles) == 1 else f"{len(bundles)} x {one}"


def _node_types() -> list[dict] | None:
    """Resources of each node type the autoscaler may start (from `ray up`'s bootstrap config on the head
    node); None when unknown (no such file: any node might join)."""
    path = Path(BOOTSTRAP_CONFIG).expanduser()
    if not path.is_file():
        return None
    types = (yaml.safe_load(path.read_text()) or {}).get("available_node_types") or {}
    return [t.get("resources") or {} for t in types.values()]


def _may_hold(resources: dict, bundle: dict) -> bool:
    """Whether a node of this type can hold `bundle`. CPU, GPU and memory a node type does not list are
    detected at its start (unknown here, so possible); a custom resource must be listed."""
    return all(resources.get(k, v if k in ("CPU", "GPU", "memory") else 0) >= v for k, v in bundle.items())
