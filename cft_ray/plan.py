"""Cost plan: tokens, FLOPs and GPU-hours per stage, from corpus statistics, before anything runs.

Token counts come from rendering a sample of real items with the student's tokenizer and scaling by the
corpus size; FLOPs use the standard 2*N per forward token and 6*N per trained token (4*N with LoRA:
no weight gradients for the frozen base); GPU-hours divide by the GPU's bf16 peak times an assumed
utilisation (MFU). Inference decode is memory-bound, hence its much lower assumed MFU.
"""
from __future__ import annotations

import json
import logging
import time

from cft_ray import data, layout, prompts, store
from cft_ray.arms import select_cot, teacher_coverage
from cft_ray.config import CftConfig, ModelConfig
from cft_ray.models import load_tokenizer, resolve
from cft_ray.train_loop import GPU_PEAK_TFLOPS

log = logging.getLogger("cft_ray")

# Dense bf16 peak TFLOP/s per device: the GPUs' from the table MFU uses, and "cpu" for the project's
# 2-core AMX box, measured on the linear-layer shapes of SmolLM2 (bench/score.py).
PEAK_TFLOPS = {"cpu": 2.0, **GPU_PEAK_TFLOPS}


def param_count(cfg: ModelConfig, override_b: float | None = None) -> float:
    """Parameters of a model, from its config alone (built on the meta device: no weights read)."""
    if override_b:
        return override_b * 1e9
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    mcfg = AutoConfig.from_pretrained(resolve(cfg, weights=False), trust_remote_code=cfg.trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(mcfg, trust_remote_code=cfg.trust_remote_code)
    return float(sum(p.numel() for p in model.parameters()))


def token_stats(cfg: CftConfig, rows: list[dict]) -> dict:
    """Mean token lengths of every prompt/target kind the run will build, on a sample of items."""
    tok = load_tokenizer(cfg.student)
    scheme, preset = cfg.prompt.labels, cfg.prompt.preset

    def n(text: str) -> int:
        return len(tok(text, add_special_tokens=False).input_ids)

    def mean(xs):
        return sum(xs) / max(1, len(xs))

    return {
        "score_prompt": mean([n(prompts.render(tok, prompts.score_messages(r, scheme, cfg.prompt.fallback, preset))) for r in rows]),
        "teacher_prompt": mean([n(prompts.render(tok, prompts.teacher_messages(r, scheme, preset))) for r in rows]),
        "direct_prompt": mean([n(prompts.render(tok, prompts.direct_messages(r, scheme, preset))) for r in rows]),
        "cot_prompt": mean([n(prompts.render(tok, prompts.cot_messages(r, scheme, preset))) for r in rows]),
        "direct_target": mean([n(prompts.marker(r["answer"], scheme)) + 1 for r in rows]),  # + end-of-turn token
    }


def estimate(cfg: CftConfig, n_items: int, lengths: dict, student_params: float, teacher_params: float | None) -> dict:
    """Per-stage tokens/FLOPs/GPU-hours. Assumptions are returned alongside the numbers."""
    p = cfg.plan
    peak = PEAK_TFLOPS[p.gpu] * 1e12
    sp = cfg.split
    test = n_items * sp.test_fraction
    names, routes = sp.buckets(), sp.treatments()
    # share of the pool in each bucket: quantile gaps, or equal shares (chunks; thresholds unknown ahead)
    edges = [0.0, *sp.quantiles, 1.0] if sp.method == "quantiles" else [i / len(names) for i in range(len(names) + 1)]
    per_bucket = [(n_items - test) * (b - a) for a, b in zip(edges, edges[1:])]
    if sp.cap_per_bucket:
        per_bucket = [min(x, sp.cap_per_bucket) for x in per_bucket]
    pool = sum(x for x, b in zip(per_bucket, names) if routes[b] != "drop")
    cot_items = sum(x for x, b in zip(per_bucket, names) if routes[b] == "cot")
    hard_frac = cot_items / pool if pool else 0.0
    # the teacher covers every arm's CoT rows (arms.teacher_coverage): all rows for distill;
    # random routing's subset overlaps caft's by chance only, so it is counted in full
    cover = teacher_coverage(cfg.arms, select_cot(cfg))
    taught = pool if "all" in cover else cot_items * len(cover)
    out_tokens = cfg.teach.max_tokens * p.teacher_fill
    attempts = 1 + (cfg.teach.samples - 1) * p.resample_rate if cfg.teach.policy == "resample" else 1
    train_mult = 4 if cfg.train.method == "lora" else 6
    cot_target = out_tokens
    # caft: direct on easy+medium, CoT on hard; one epoch per phase times train.epochs
    direct_tokens = (pool - cot_items) * (lengths["direct_prompt"] + lengths["direct_target"])
    cot_tokens = cot_items * (lengths["cot_prompt"] + cot_target)
    train_tokens = (direct_tokens + cot_tokens) * cfg.train.epochs
    target_tokens = ((pool - cot_items) * lengths["direct_target"] + cot_items * cot_target) * cfg.train.epochs
    eval_tokens = test * (lengths["direct_prompt"] + cfg.eval.max_new_tokens * p.teacher_fill) * (len(cfg.arms))

    def stage(tokens: float, flops_per_token: float, mfu: float, **extra) -> dict:
        flops = tokens * flops_per_token
        return {"tokens": round(tokens), "flops": flops, "mfu_assumed": mfu,
                "gpu_hours": flops / (peak * mfu) / 3600, **extra}

    teacher_n = teacher_params or 0.0
    plan = {
        "score": stage(n_items * lengths["score_prompt"], 2 * student_params, p.mfu_prefill, items=n_items),
        "teach": stage(taught * attempts * (lengths["teacher_prompt"] + out_tokens), 2 * teacher_n,
                       p.mfu_decode, calls=round(taught * attempts),
                       tokens_in=round(taught * attempts * lengths["teacher_prompt"]),
                       tokens_out=round(taught * attempts * out_tokens)),
        "train": stage(train_tokens, train_mult * student_params, p.mfu_train, target_tokens=round(target_tokens)),
        "evaluate": stage(eval_tokens, 2 * student_params, p.mfu_decode, arms=len(cfg.arms)),
    }
    if cfg.selection == "instructdiff":  # per round: a warm-up training run + a scoring pass; one base pass
        sel, rounds = cfg.select, cfg.select.iterations
        resp = lengths["direct_target"] if sel.response == "direct" else cot_target
        per_item = lengths["direct_prompt"] + resp
        warm = (sel.alpha * pool + (rounds - 1) * sel.beta * pool) * per_item * cfg.train.epochs
        plan["select"] = stage(warm + (1 + rounds) * pool * per_item, 2 * student_params, p.mfu_prefill,
                               scored_items=round((1 + rounds) * pool), warmup_train_tokens=round(warm))
        plan["select"]["flops"] += warm * (train_mult - 2) * student_params  # training costs train_mult N
        plan["select"]["gpu_hours"] = plan["select"]["flops"] / (peak * p.mfu_prefill) / 3600
    if not teacher_params:
        plan["teach"].update(flops=None, gpu_hours=None, note="teacher size unknown (endpoint): tokens and calls only")
    return {"gpu": p.gpu, "peak_tflops": PEAK_TFLOPS[p.gpu], "items": n_items, "lengths": lengths,
            "student_params": student_params, "teacher_params": teacher_params,
            "assumptions": {"hard_fraction": hard_frac, "teacher_fill": p.teacher_fill,
                            "attempts_per_item": attempts, "train_flops_per_token": f"{train_mult}N"},
            "stages": plan,
            "total_gpu_hours": sum(s["gpu_hours"] or 0 for s in plan.values())}


def main(cfg: CftConfig) -> str:
    """`cft-ray plan`: needs the data stage (it reads the item count and a sample), nothing else."""
    ddir = data.main(cfg)  # cheap, idempotent: the plan is about *this* corpus
    n_items = store.read_json(store.join(ddir, "manifest.json"))["counts"]["rows_out"]
    sample = layout.load_items(ddir).limit(cfg.plan.sample_rows).take_all()
    lengths = token_stats(cfg, sample)
    teacher = None
    if cfg.teach.backend not in ("openai", "rationale"):
        teacher = param_count(cfg.teach.model, cfg.plan.teacher_params_b)
    elif cfg.plan.teacher_params_b:
        teacher = cfg.plan.teacher_params_b * 1e9
    result = estimate(cfg, n_items, lengths, param_count(cfg.student, cfg.plan.student_params_b), teacher)
    result["made_at"] = time.time()
    out = store.join(cfg.run_dir, "plan.json")
    store.write_json(out, result)
    print(format_plan(result))
    return out


def format_plan(plan: dict) -> str:
    rows = [f"cost plan on {plan['gpu']} ({plan['peak_tflops']:.0f} TFLOP/s bf16 peak), {plan['items']:,} items",
            f"{'stage':<10}{'tokens':>14}{'PFLOP':>12}{'GPU-hours':>12}  notes"]
    for name, s in plan["stages"].items():
        pf = "-" if s["flops"] is None else f"{s['flops'] / 1e15:.2f}"
        gh = "-" if s["gpu_hours"] is None else f"{s['gpu_hours']:.3f}"
        notes = ", ".join(f"{k}={v:,}" if isinstance(v, int) else f"{k}={v}" for k, v in s.items()
                          if k not in ("tokens", "flops", "gpu_hours", "mfu_assumed"))
        rows.append(f"{name:<10}{s['tokens']:>14,}{pf:>12}{gh:>12}  mfu={s['mfu_assumed']}; {notes}")
    rows.append(f"total GPU-hours: {plan['total_gpu_hours']:.3f}")
    return "\n".join(rows) + "\n" + json.dumps(plan["assumptions"])
