"""`cft-ray run`: data -> score -> split -> teach -> select -> arms (train + evaluate each) -> report, in one job.

Each stage writes under `<run_dir>/<stage>-<hash of the config sections that decide it>`; a finished
stage (`_SUCCESS` + manifest) is skipped, an unfinished one resumes at row level (or from its
training checkpoint). `run_manifest.json` records the lineage, versions, machine and every stage's
counts, durations and throughput.
"""
from __future__ import annotations

import importlib
import logging
import os
import platform
import time

from cft_ray import store
from cft_ray.config import CftConfig, ConfigError, config_hash, stage_dir

log = logging.getLogger("cft_ray")

STAGES = ["data", "score", "split", "teach", "select", "arms", "report"]


def stage_dirs(cfg: CftConfig) -> dict[str, str]:
    """Where each stage of this config writes (arms and report live in the run dir itself)."""
    dirs = {s: stage_dir(cfg, s) for s in ("data", "score", "split", "teach", "select")}
    from cft_ray.evaluate import arm_dirs

    dirs["arms"] = arm_dirs(cfg)
    dirs["report"] = store.join(cfg.run_dir, "report")
    return dirs


def _done(stage: str, where, cfg: CftConfig) -> bool:
    if stage == "teach":
        from cft_ray.teach import finished

        return finished(cfg)
    if stage == "arms":
        return all(store.is_done(d) for pair in where.values() for d in pair if d)
    return store.is_done(where)


def _needed(cfg: CftConfig) -> list[str]:
    """The teacher only runs when some arm trains on chain-of-thought; select only for InstructDiff."""
    from cft_ray.evaluate import needs_teacher

    skip = {s for s, need in (("teach", needs_teacher(cfg)), ("select", cfg.selection == "instructdiff")) if not need}
    return [s for s in STAGES if s not in skip]


def versions() -> dict:
    out = {}
    for pkg in ("cft_ray", "torch", "transformers", "ray", "deepspeed", "peft", "vllm", "pyarrow"):
        try:
            from importlib.metadata import version

            out[pkg] = version("cft-ray" if pkg == "cft_ray" else pkg)
        except Exception:  # noqa: BLE001 - not installed (vllm on a machine without it)
            out[pkg] = None
    return out


def machine() -> dict:
    import torch

    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    try:
        import ray

        resources = ray.cluster_resources() if ray.is_initialized() else None
        address = ray.get_runtime_context().gcs_address if ray.is_initialized() else None
    except Exception:  # noqa: BLE001
        resources = address = None
    return {"host": platform.node(), "platform": platform.platform(), "python": platform.python_version(),
            "cpus": os.cpu_count(), "driver_gpus": gpus, "ray_address": address, "ray_resources": resources}


def main(cfg: CftConfig, only: str | None = None, from_stage: str | None = None, dry_run: bool = False) -> str:
    for name, val in (("--only", only), ("--from", from_stage)):
        if val is not None and val not in STAGES:
            raise ConfigError(f"{name} {val!r}: stages are {', '.join(STAGES)}")
    dirs = stage_dirs(cfg)
    needed = _needed(cfg)
    chosen = [only] if only else needed[needed.index(from_stage):] if from_stage in needed else needed
    plan = []
    for s in needed:
        if s not in chosen:
            action = "skip (not selected)"
        elif from_stage:
            action = "re-run"
        elif s != "report" and _done(s, dirs[s], cfg):  # the report is cheap and reads everything: always fresh
            action = "skip (finished)"
        else:
            action = "run"
        plan.append((s, action, dirs[s]))
    print(f"run {cfg.run_dir} (config {config_hash(cfg)})")
    for s, action, where in plan:
        shown = where if isinstance(where, str) else f"{len(where)} arms"
        print(f"  {s:<8} {action:<20} {shown}")
    if dry_run:
        return cfg.run_dir

    manifest_path = store.join(cfg.run_dir, "run_manifest.json")
    run = store.read_json(manifest_path) if store.exists(manifest_path) else {}
    run.update(config=cfg.model_dump(mode="json"), config_hash=config_hash(cfg), versions=versions(),
               machine=machine(), stage_dirs={k: v for k, v in dirs.items()})
    run.setdefault("stages", {})
    started = time.time()
    for s, action, where in plan:
        if s == "score" and not store.exists(store.join(cfg.run_dir, "plan.json")) and store.is_done(dirs["data"]):
            from cft_ray import plan as cost  # the cost plan, before the expensive stages; the report compares

            cost.main(cfg)
        if action.startswith("skip"):
            run["stages"].setdefault(s, {})["skipped"] = action
            store.write_json(manifest_path, run)
            continue
        if action == "re-run" and isinstance(where, str):
            store.reset(where)
        t0 = time.time()
        log.info("stage %s: %s", s, action)
        module = importlib.import_module("cft_ray.evaluate" if s == "arms" else f"cft_ray.{s}")
        out = module.main(cfg, force=action == "re-run") if s == "arms" else module.main(cfg)
        run["stages"][s] = {"output": out, "wall_s": round(time.time() - t0, 2), "skipped": None}

        store.write_json(manifest_path, run)  # after every stage: a killed run still shows its lineage
    run["wall_s"] = round(time.time() - started, 2)
    store.write_json(manifest_path, run)
    report = store.join(dirs["report"], "report.md")
    print(f"report: {report}")
    return report
