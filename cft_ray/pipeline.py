"""`cft-ray run`: data -> score -> split -> teach -> select -> arms (train + evaluate each) -> report, in one job.

STAGES is the one registry of stage entry points: the CLI's subcommands and the pipeline's chain both
read it. Each stage writes under `<run_dir>/<stage>-<hash of the config sections that decide it>`
(cft_ray.layout); a finished stage (`_SUCCESS` + manifest) is skipped, an unfinished one resumes at
row level (or from its training checkpoint). `run_manifest.json` records the lineage, versions,
machine and every stage's counts, durations and throughput.
"""
from __future__ import annotations

import logging
import os
import platform
import time
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from typing import Callable

from cft_ray import arms, data, layout, plan, report, score, select, split, store, tracking, warmup
from cft_ray.config import CftConfig, ConfigError, config_hash

log = logging.getLogger("cft_ray")


@dataclass(frozen=True)
class Stage:
    name: str
    run: Callable[[CftConfig], str]  # config -> where its output is
    doc: str
    chained: bool = True             # a step of `cft-ray run` (train and plan are commands only)


STAGES = {s.name: s for s in [
    Stage("data", data.main, "validate and prepare the corpus (items + errors Parquet)"),
    Stage("warmup", warmup.main, "direct-answer SFT of the student on warmup.source before scoring (optional)"),
    Stage("score", score.main, "score every item with the student (entropy and friends)"),
    Stage("split", split.main, "cut scored items into easy/medium/hard, hold out test sets, route"),
    Stage("teach", arms.teach_for_arms, "teacher chain-of-thought for the rows the arms route to cot"),
    Stage("select", select.main, "InstructDiff differential-entropy data selection"),
    Stage("train", arms.train_arms, "Ray Train + DeepSpeed SFT of each arm", chained=False),
    Stage("arms", arms.run_arms, "train (unless finished) and evaluate each arm: held-out accuracy"),
    Stage("report", report.main, "the human report of the run (report.md + plots)"),
    Stage("plan", plan.main, "estimate tokens, FLOPs and GPU-hours per stage before running", chained=False),
]}
CHAIN = [name for name, s in STAGES.items() if s.chained]


def stage_dirs(cfg: CftConfig) -> dict:
    """Where each chained stage of this config writes (arms: arm -> (train dir, eval dir))."""
    dirs: dict = {s: layout.stage_dir(warmup.stage_config(cfg, s), s) for s in ("data", "warmup", "score", "split", "teach", "select")}
    dirs["arms"] = arms.arm_dirs(warmup.stage_config(cfg, "arms"))
    dirs["report"] = store.join(cfg.run_dir, "report")
    return dirs


def _done(stage: str, where, cfg: CftConfig) -> bool:
    if stage == "teach":
        return arms.teach_finished(cfg)
    if stage == "arms":
        return all(store.is_done(d) for pair in where.values() for d in pair if d)
    return store.is_done(where)


def needed(cfg: CftConfig) -> list[str]:
    """The score stage only without split.scores; the teacher only when some arm trains on
    chain-of-thought; select only for InstructDiff."""
    skip = {s for s, need in (("warmup", bool(cfg.warmup.source)), ("score", not cfg.split.scores), ("teach", arms.needs_teacher(cfg)),
                              ("select", cfg.selection == "instructdiff")) if not need}
    return [s for s in CHAIN if s not in skip]


def _reset(where) -> None:
    """Delete a stage's output (arms: every arm's train and eval dir) before a forced re-run."""
    for d in [where] if isinstance(where, str) else [d for pair in where.values() for d in pair if d]:
        store.reset(d)


def versions() -> dict:
    out = {}
    for pkg in ("cft_ray", "torch", "transformers", "ray", "deepspeed", "peft", "vllm", "pyarrow"):
        try:
            out[pkg] = version("cft-ray" if pkg == "cft_ray" else pkg)
        except PackageNotFoundError:  # not installed (vllm on a machine without it)
            out[pkg] = None
    return out


def machine() -> dict:
    import ray
    import torch

    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    up = ray.is_initialized()
    return {"host": platform.node(), "platform": platform.platform(), "python": platform.python_version(),
            "cpus": os.cpu_count(), "driver_gpus": gpus, "ray_address": ray.get_runtime_context().gcs_address if up else None,
            "ray_resources": ray.cluster_resources() if up else None}


def actions(cfg: CftConfig, dirs: dict, only: str | None, from_stage: str | None) -> list[tuple[str, str]]:
    """(stage, what to do with it) for every needed stage: run, re-run, or skip and why."""
    for name, val in (("--only", only), ("--from", from_stage)):
        if val is not None and val not in CHAIN:
            raise ConfigError(f"{name} {val!r}: stages are {', '.join(CHAIN)}")
    wanted = needed(cfg)
    chosen = [only] if only else wanted[wanted.index(from_stage):] if from_stage in wanted else wanted
    out = []
    for s in wanted:
        if s not in chosen:
            out.append((s, "skip (not selected)"))
        elif from_stage:
            out.append((s, "re-run"))
        elif s != "report" and _done(s, dirs[s], warmup.stage_config(cfg, s)):  # the report is cheap and reads everything: always fresh
            out.append((s, "skip (finished)"))
        else:
            out.append((s, "run"))
    return out


def main(cfg: CftConfig, only: str | None = None, from_stage: str | None = None, dry_run: bool = False) -> str:
    dirs = stage_dirs(cfg)
    todo = actions(cfg, dirs, only, from_stage)
    print(f"run {store.shown(cfg.run_dir)} (config {config_hash(cfg)})")
    for s, action in todo:
        shown = dirs[s] if isinstance(dirs[s], str) else f"{len(dirs[s])} arms"
        print(f"  {s:<8} {action:<20} {shown}")
    if dry_run:
        return cfg.run_dir

    manifest_path = store.join(cfg.run_dir, "run_manifest.json")
    run = store.read_json(manifest_path) if store.exists(manifest_path) else {}
    run.update(config=cfg.model_dump(mode="json"), config_hash=config_hash(cfg), versions=versions(),
               machine=machine(), stage_dirs=dirs)
    run.setdefault("stages", {})
    started = time.time()
    for s, action in todo:
        if s == "score" and not store.exists(store.join(cfg.run_dir, "plan.json")) and store.is_done(dirs["data"]):
            plan.main(cfg)  # the cost plan, before the expensive stages; the report compares
        if action.startswith("skip"):
            run["stages"].setdefault(s, {})["skipped"] = action
            tracking.log_run(cfg, run)
            store.write_json(manifest_path, run)
            continue
        if action == "re-run":
            _reset(dirs[s])
            tracking.forget(run, s)
        t0 = time.time()
        log.info("stage %s: %s", s, action)
        out = STAGES[s].run(warmup.stage_config(cfg, s))
        run["stages"][s] = {"output": out, "wall_s": round(time.time() - t0, 2), "skipped": None}
        tracking.log_run(cfg, run)
        store.write_json(manifest_path, run)  # after every stage: a killed run still shows its lineage
    run["wall_s"] = round(time.time() - started, 2)
    store.write_json(manifest_path, run)
    report_md = store.join(dirs["report"], "report.md")
    print(f"report: {store.shown(report_md)}")
    return report_md
