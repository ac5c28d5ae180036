"""The per-worker training loop (runs inside Ray Train workers); read it top to bottom.

    setup: process group -> model (ZeRO-3: partitioned while loading) -> LoRA -> DeepSpeed engine
    resume: DeepSpeed state + RNG + loop position from ray.train.get_checkpoint()
    loop: phases -> epochs -> optimizer steps of grad_accum micro-batches from this worker's shard
    checkpoint: every N steps / T minutes through ray.train.report(checkpoint=...)
    export: HF model dir (LoRA merged) + adapter + tokenizer, reported as the last checkpoint

The loss is the mean over every supervised token of the global batch (all workers, all
micro-batches), whatever the row lengths: each micro-batch's summed token loss is divided by the
global token count, which one all-reduce per step provides before the forward passes.
"""
from __future__ import annotations

import functools
import json
import logging
import math
import os
import shutil
import tempfile
import time

import numpy as np

log = logging.getLogger("cft_ray")
IGNORE = -100
DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def deepspeed_config(tc, world: int) -> dict:
    """DeepSpeed config from TrainConfig (a TrainConfig or its dict). A torch AdamW is passed as the
    client optimizer (no C++ op to compile) except under offload, which needs DeepSpeed's CPU Adam."""
    zero: dict = {"stage": tc.zero_stage}
    pin = tc.use_gpu
    if tc.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": pin}
    if tc.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": pin}
    if tc.zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    cfg = {
        "train_micro_batch_size_per_gpu": tc.micro_batch,
        "gradient_accumulation_steps": tc.grad_accum,
        "train_batch_size": tc.micro_batch * tc.grad_accum * world,
        "gradient_clipping": tc.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": tc.precision == "bf16"},
        "fp16": {"enabled": tc.precision == "fp16", "loss_scale": 0},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
    }
    if tc.offload_optimizer:
        cfg["optimizer"] = {"type": "AdamW", "params": {"lr": tc.lr, "betas": [0.9, 0.999], "eps": 1e-8,
                                                        "weight_decay": tc.weight_decay}}
    return cfg


def lr_factor(step: int, warmup: int, total: int, shape: str) -> float:
    if step < warmup:
        return step / max(1, warmup)
    if shape == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 1.0 - progress if shape == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))


def collate(batch: dict, pad_id: int) -> dict:
    """Right-pad a numpy batch of token lists. Packed rows carry position_ids and no attention mask
    (transformers derives the block-diagonal mask from the position resets); the padding tail of a
    packed row is a sequence of its own."""
    import torch

    seqs = batch["input_ids"]
    n, width = len(seqs), max(len(s) for s in seqs)
    ids = np.full((n, width), pad_id, np.int64)
    labels = np.full((n, width), IGNORE, np.int64)
    mask = np.zeros((n, width), np.int64)
    pos = np.zeros((n, width), np.int64)
    packed = "position_ids" in batch
    for i, s in enumerate(seqs):
        k = len(s)
        ids[i, :k], labels[i, :k], mask[i, :k] = s, batch["labels"][i], 1
        if packed:
            pos[i, :k], pos[i, k:] = batch["position_ids"][i], np.arange(width - k)
    out = {"input_ids": torch.from_numpy(ids), "labels": torch.from_numpy(labels),
           "n_tokens": int(np.sum(batch["n_tokens"])), "n_target": int(np.sum(batch["n_target"]))}
    out["position_ids" if packed else "attention_mask"] = torch.from_numpy(pos if packed else mask)
    return out


def state_fingerprint(engine) -> float:
    """Sum of |x| over the optimizer's master weights and moments, over all ranks: equal before a
    checkpoint and after restoring it, so a test (or a curious user) can see the restore was exact."""
    import torch
    import torch.distributed as dist

    opt = engine.optimizer
    while hasattr(opt, "optimizer"):  # ZeRO / BF16 wrappers around the torch (or CPU Adam) optimizer
        opt = opt.optimizer
    total = torch.zeros(1, dtype=torch.float64)
    for group in opt.param_groups:
        for p in group["params"]:
            total += p.detach().double().abs().sum().cpu()
            for v in opt.state.get(p, {}).values():
                if torch.is_tensor(v):
                    total += v.detach().double().abs().sum().cpu()
    dist.all_reduce(total)
    return float(total.item())


# What DeepSpeed's checkpoints hold besides tensors and builtins (found by loading ZeRO 0-3 checkpoints,
# bf16/fp16/fp32, LoRA and full, with weights_only=True); anything else in a checkpoint is refused.
DS_CHECKPOINT_CLASSES = ("deepspeed.runtime.fp16.loss_scaler.LossScaler",
                         "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
                         "deepspeed.runtime.zero.config.ZeroStageEnum", "deepspeed.utils.tensor_fragment.fragment_address")


def load_checkpoint_file(path: str, map_location=None):
    """torch.load(weights_only=True) for DeepSpeed checkpoint files: DeepSpeed's own reader unpickles
    anything (weights_only=False), and a checkpoint directory is not always ours alone (shared storage)."""
    import importlib

    import torch

    allowed = [getattr(importlib.import_module(n.rsplit(".", 1)[0]), n.rsplit(".", 1)[1]) for n in DS_CHECKPOINT_CLASSES]
    with torch.serialization.safe_globals(allowed):
        return torch.load(path, map_location=map_location, weights_only=True)


def train_loop(config: dict) -> None:
    import deepspeed
    import ray.train
    import ray.train.torch
    import torch
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM

    from cft_ray.config import TrainConfig

    logging.basicConfig(level=logging.INFO)
    tc = TrainConfig.model_validate(config["train"])
    plan, model_dir = config["plan"], config["model_dir"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    if not tc.use_gpu:  # Ray gives workers OMP_NUM_THREADS=1; use the CPUs this worker reserved
        torch.set_num_threads(max(1, int(tc.resources_per_worker.get("CPU", 1))))
    torch.manual_seed(tc.seed)
    deepspeed.init_distributed(dist_backend="nccl" if tc.use_gpu else "gloo")  # reuses Ray Train's group
    ds_cfg = deepspeed_config(tc, world)
    lora = tc.method == "lora"
    total_steps = sum(p["steps"] for p in plan)
    ga = tc.grad_accum

    # --- model: under ZeRO-3 HfDeepSpeedConfig makes from_pretrained partition weights while loading
    hf_ds = None
    if tc.zero_stage == 3:
        from transformers.integrations import HfDeepSpeedConfig
        hf_ds = HfDeepSpeedConfig(ds_cfg)  # noqa: F841 - must stay referenced until the model exists
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, DTYPES[tc.precision]),
                                                 trust_remote_code=config["trust_remote_code"], use_safetensors=True)
    if tc.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if lora:
        from peft import LoraConfig, get_peft_model
        model = get_peft_model(model, LoraConfig(r=tc.lora_r, lora_alpha=tc.lora_alpha, lora_dropout=tc.lora_dropout,
                                                 target_modules=tc.lora_target_modules, task_type="CAUSAL_LM"))
    n_params = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
    trainable = [p for p in model.parameters() if p.requires_grad]
    n_trainable = sum(getattr(p, "ds_numel", p.numel()) for p in trainable)
    optimizer = None if "optimizer" in ds_cfg else torch.optim.AdamW(
        trainable, lr=tc.lr, weight_decay=tc.weight_decay, fused=tc.use_gpu)
    schedule = functools.partial(lr_factor, warmup=tc.warmup_steps, total=total_steps, shape=tc.lr_schedule)
    engine, _, _, scheduler = deepspeed.initialize(
        model=model, model_parameters=trainable, optimizer=optimizer, config=ds_cfg,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule))

    # --- resume: DeepSpeed restores weights, optimizer and scheduler; we restore RNG and position
    state = {"step": 0, "history": [], "checkpoints": [], "resumes": [], "valid": {}, "done": False,
             "params": n_params, "trainable_params": n_trainable}
    ckpt = ray.train.get_checkpoint()
    if ckpt:
        with ckpt.as_directory() as d:
            with open(os.path.join(d, "trainer_state.json")) as f:
                state = json.load(f)
            if state["done"]:
                return  # the export was reported before a late failure: nothing left to do
            engine.checkpoint_engine.load = load_checkpoint_file
            engine.load_checkpoint(d, tag=state["tag"], load_module_strict=not lora)
            rng = np.fromfile(os.path.join(d, f"rng_rank{rank}.bin"), dtype=np.uint8)
            torch.set_rng_state(torch.from_numpy(rng))
        fp = state_fingerprint(engine)
        state["resumes"].append({"step": state["step"], "fingerprint": fp,
                                 "saved_fingerprint": state["checkpoints"][-1]["fingerprint"]})
        log.info("train: rank %d resumed at step %d (state fingerprint %.6g)", rank, state["step"], fp)

    tracker = _tracker(tc, config) if rank == 0 and tc.tracking != "none" else None

    def save(step: int) -> None:
        tmp = tempfile.mkdtemp(prefix="cft-ckpt-")
        engine.save_checkpoint(tmp, tag=f"step{step}", exclude_frozen_parameters=lora)
        torch.get_rng_state().numpy().tofile(os.path.join(tmp, f"rng_rank{rank}.bin"))
        state["tag"] = f"step{step}"
        state["checkpoints"].append({"step": step, "fingerprint": state_fingerprint(engine), "time": time.time()})
        if rank == 0:
            with open(os.path.join(tmp, "trainer_state.json"), "w") as f:
                json.dump(state, f)
        ray.train.report({"step": step, "loss": state["history"][-1]["loss"]},
                         checkpoint=ray.train.Checkpoint.from_directory(tmp),
                         checkpoint_dir_name=f"step-{step:08d}-r{len(state['resumes'])}")
        shutil.rmtree(tmp, ignore_errors=True)

    # --- the loop: phase -> epoch -> step; a resumed run skips what the checkpoint had consumed
    step, offset, last_ckpt = state["step"], 0, time.time()
    loader = functools.partial(collate, pad_id=config["pad_id"])
    engine.train()
    for pi, ph in enumerate(plan):
        end = offset + ph["steps"]
        if step < end:
            shard = ray.train.get_dataset_shard(ph["dataset"])
            spe = ph["steps_per_epoch"]
            for epoch in range(math.ceil(ph["steps"] / spe)):
                first, last = offset + epoch * spe, min(offset + (epoch + 1) * spe, end)
                if step >= last:
                    continue
                batches = iter(shard.iter_torch_batches(
                    batch_size=tc.micro_batch, collate_fn=loader, prefetch_batches=2,
                    local_shuffle_buffer_size=tc.shuffle_buffer_rows or None,
                    local_shuffle_seed=tc.seed * 100_003 + pi * 1009 + epoch))
                for _ in range((step - first) * ga):
                    next(batches)
                while step < last:
                    t0 = time.time()
                    micro = [next(batches) for _ in range(ga)]
                    due = rank == 0 and time.time() - last_ckpt >= tc.checkpoint_every_minutes * 60
                    counts = torch.tensor([sum(b["n_target"] for b in micro), sum(b["n_tokens"] for b in micro), due],
                                          dtype=torch.float64)
                    dist.all_reduce(counts)
                    norm = counts[0].item() / (world * ga)  # see the module docstring
                    loss_sum = 0.0
                    for b in micro:
                        inputs = {k: v.to(device) for k, v in b.items() if torch.is_tensor(v)}
                        # no KV cache: training never reads it, and with one transformers ignores packed position_ids
                        loss = engine(**inputs, num_items_in_batch=norm, use_cache=False).loss
                        engine.backward(loss)
                        engine.step()
                        loss_sum += loss.item()
                    mean = torch.tensor([loss_sum], dtype=torch.float64)
                    dist.all_reduce(mean)
                    step += 1
                    gn = engine.get_global_grad_norm()
                    state["history"].append({
                        "step": step, "phase": ph["name"], "epoch": epoch, "loss": mean.item() / (world * ga),
                        "lr": scheduler.get_last_lr()[0], "grad_norm": None if gn is None else float(gn),
                        "tokens": int(counts[1].item()), "target_tokens": int(counts[0].item()),
                        "time_s": time.time() - t0})
                    state["step"] = step
                    if rank == 0 and (step % tc.log_every_steps == 0 or step == total_steps):
                        h = state["history"][-1]
                        log.info("train: step %d/%d phase %s epoch %d loss %.4f lr %.3g %.0f tok/s", step, total_steps,
                                 ph["name"], epoch, h["loss"], h["lr"], h["tokens"] / h["time_s"])
                        if tracker:
                            tracker({"loss": h["loss"], "lr": h["lr"], "tokens_per_s": h["tokens"] / h["time_s"]}, step)
                    if step < total_steps and (step % tc.checkpoint_every_steps == 0 or counts[2].item() > 0):
                        save(step)
                        last_ckpt = time.time()
        if ph["steps"] and ph["valid"] and ph["name"] not in state["valid"]:
            state["valid"][ph["name"]] = _valid_loss(engine, ray.train.get_dataset_shard(ph["valid"]), tc, loader, device)
            if rank == 0:
                log.info("train: phase %s valid loss %.4f", ph["name"], state["valid"][ph["name"]])
        offset = end

    # --- export: the final model as the last checkpoint; the driver copies it into the stage dir
    tmp = tempfile.mkdtemp(prefix="cft-export-")
    _export(engine, tc, model_dir, tmp, rank, config["trust_remote_code"])
    state["done"] = True
    if rank == 0:
        with open(os.path.join(tmp, "trainer_state.json"), "w") as f:
            json.dump(state, f)
    ray.train.report({"step": step, "done": True},
                     checkpoint=ray.train.Checkpoint.from_directory(tmp) if rank == 0 else None,
                     checkpoint_dir_name=f"export-{step:08d}")
    shutil.rmtree(tmp, ignore_errors=True)


def _valid_loss(engine, shard, tc, loader, device) -> float | None:
    """Token-mean loss over this phase's valid rows (equal shards: every rank runs the same batches,
    which ZeRO-3's parameter gathers require)."""
    import torch
    import torch.distributed as dist

    engine.eval()
    total = torch.zeros(2, dtype=torch.float64)
    with torch.no_grad():
        for b in shard.iter_torch_batches(batch_size=tc.micro_batch, collate_fn=loader):
            inputs = {k: v.to(device) for k, v in b.items() if torch.is_tensor(v)}
            total[0] += engine(**inputs, num_items_in_batch=1, use_cache=False).loss.item()
            total[1] += b["n_target"]
    dist.all_reduce(total)
    engine.train()
    return total[0].item() / total[1].item() if total[1] > 0 else None


def _export(engine, tc, model_dir: str, out: str, rank: int, trust_remote_code: bool) -> None:
    """Rank 0 writes out/model (safetensors, + tokenizer) and, for LoRA, out/adapter. ZeRO-3 weights
    are gathered first (a collective: every rank calls this)."""
    import deepspeed
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    dtype = getattr(torch, DTYPES[tc.precision])
    module = engine.module
    zero3 = tc.zero_stage == 3
    if tc.method == "lora":  # gather only the adapter, never the frozen base
        named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        with deepspeed.zero.GatheredParameters([p for _, p in named], enabled=zero3):
            sd = {n: p.detach().to("cpu", dtype).clone() for n, p in named} if rank == 0 else None
    else:
        sd = engine._zero3_consolidated_16bit_state_dict() if zero3 else (module.state_dict() if rank == 0 else None)
    if rank != 0:
        return
    unset_hf_deepspeed_config()  # the fresh base below must load whole, not partitioned
    if tc.method == "lora":
        from peft import PeftModel
        module.save_pretrained(os.path.join(out, "adapter"), state_dict=sd, safe_serialization=True)
        base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, trust_remote_code=trust_remote_code,
                                                    use_safetensors=True)
        merged = PeftModel.from_pretrained(base, os.path.join(out, "adapter")).merge_and_unload()
        merged.save_pretrained(os.path.join(out, "model"), safe_serialization=True)
    else:
        module.save_pretrained(os.path.join(out, "model"), state_dict={k: v.to(dtype) for k, v in sd.items()},
                               safe_serialization=True)
    AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code).save_pretrained(os.path.join(out, "model"))


def _tracker(tc, config: dict):
    """rank-0 metric logger through Ray Train's MLflow / W&B integrations (endpoints and keys from env)."""
    run_cfg = {k: v for k, v in config["train"].items() if not isinstance(v, (dict, list))}
    if tc.tracking == "mlflow":
        from ray.air.integrations.mlflow import setup_mlflow
        mlflow = setup_mlflow(run_cfg, experiment_name=tc.tracking_project, rank_zero_only=True)
        return lambda metrics, step: mlflow.log_metrics(metrics, step=step)
    from ray.air.integrations.wandb import setup_wandb
    run = setup_wandb(run_cfg, project=tc.tracking_project, rank_zero_only=True)
    return lambda metrics, step: run.log(metrics, step=step)
