"""The per-worker training loop (runs inside Ray Train workers); read it top to bottom.

    train_loop: the recipe, calling the steps below in order
    _setup: process group -> model (ZeRO-3: partitioned while loading) -> LoRA -> DeepSpeed engine
    _resume: DeepSpeed state + RNG + loop position from ray.train.get_checkpoint()
    _train_phase: epochs -> _optimizer_step (grad_accum micro-batches from this worker's shard)
    _save_checkpoint: every N steps / T minutes through ray.train.report(checkpoint=...)
    _valid_loss: after each phase with valid rows
    _report_final_model: HF model dir (LoRA merged) + adapter + tokenizer, reported as the last checkpoint

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
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np
import pyarrow as pa

from cft_ray import models
from cft_ray.config import ModelConfig, TrainConfig
from cft_ray.layout import IGNORE

log = logging.getLogger("cft_ray")
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


# Dense bf16/fp16 tensor-core peaks, TFLOP/s, keyed by a substring of the CUDA device name (first match).
GPU_PEAK_TFLOPS = {"h200": 989.0, "h100": 989.0, "a100": 312.0, "l40s": 362.0, "l4": 121.0, "a10g": 125.0}


def device_peak(tc: TrainConfig, device) -> tuple[float | None, str]:
    """(peak TFLOP/s of this worker, where it came from) for the MFU: the config's, else the GPU table
    (bf16/fp16 only), else on CPU the best rate of a 512^3 matmul in the training precision on this
    worker's threads, probed for ~0.3 s (what the cores reach, not a datasheet figure)."""
    import torch

    if tc.peak_tflops:
        return tc.peak_tflops, "config"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device).lower()
        hit = next((k for k in GPU_PEAK_TFLOPS if k in name), None)
        if hit is None or tc.precision == "fp32":
            return None, f"unknown for {name} in {tc.precision}: set train.peak_tflops"
        return GPU_PEAK_TFLOPS[hit], f"table: {hit}"
    a = torch.randn(512, 512, dtype=getattr(torch, DTYPES[tc.precision]))
    best, runs, end = float("inf"), 0, time.perf_counter() + 0.3
    while runs < 3 or time.perf_counter() < end:
        t = time.perf_counter()
        a @ a
        best, runs = min(best, time.perf_counter() - t), runs + 1
    return round(2 * 512**3 / best / 1e12, 4), f"probe: 512^3 {tc.precision} matmul, {torch.get_num_threads()} threads"


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


def summed_loss(model, batch: dict, device):
    """Cross-entropy summed over the batch's supervised tokens, the LM head applied only at positions
    whose next token is supervised in some row (logits_to_keep): a direct answer supervises ~5 of ~200
    positions, and the full [batch, seq, vocab] logits (600 MB in fp32 at 4 x 768 x 49k) cost memory
    and ~20% of a small model's step. Equal to transformers' summed loss (tests/test_train.py)."""
    import torch
    import torch.nn.functional as F

    labels = batch["labels"].to(device)[:, 1:]
    keep = (labels != IGNORE).any(0).nonzero().squeeze(1)
    inputs = {k: v.to(device) for k, v in batch.items() if torch.is_tensor(v) and k != "labels"}
    # no KV cache: training never reads it, and with one transformers ignores packed position_ids
    logits = model(**inputs, logits_to_keep=keep, use_cache=False).logits
    return F.cross_entropy(logits.float().flatten(0, 1), labels[:, keep].flatten(), ignore_index=IGNORE, reduction="sum")


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


@dataclass
class Run:
    """One worker's run: what setup builds and every later step reads. `state` is what
    trainer_state.json holds (step, history, checkpoints, resumes, valid, done, tag)."""
    tc: TrainConfig
    phases: list
    model_dir: str
    trust_remote_code: bool
    chat_template: str | None
    rank: int
    world: int
    device: Any
    engine: Any
    scheduler: Any
    collate_fn: Callable
    total_steps: int
    state: dict
    # HfDeepSpeedConfig (ZeRO-3 only): transformers holds it by weak reference, so it must stay
    # referenced for the whole run for its ZeRO-3 checks to see it
    hf_ds_config: Any = None
    last_ckpt: float = 0.0  # time of the last checkpoint (rank 0's clock decides when one is due)

    @property
    def lora(self) -> bool:
        return self.tc.method == "lora"


def train_loop(config: dict) -> None:
    import ray.train

    logging.basicConfig(level=logging.INFO)
    run = _setup(config)
    _resume(run)
    if run.state["done"]:
        return  # the export was reported before a late failure: nothing left to do
    run.last_ckpt = time.time()  # the checkpoint timer starts with the loop
    run.engine.train()
    offset = 0
    for phase_index, ph in enumerate(run.phases):
        end = offset + ph["steps"]
        if run.state["step"] < end:
            _train_phase(run, phase_index, ph, offset, end)
        if ph["steps"] and ph["valid"] and ph["name"] not in run.state["valid"]:
            batches = _micro_batches(config["valid"][ph["valid"]][run.rank], run.tc.micro_batch)
            run.state["valid"][ph["name"]] = _valid_loss(run.engine, batches, run.collate_fn, run.device)
            if run.rank == 0:
                log.info("train: phase %s valid loss %.4f", ph["name"], run.state["valid"][ph["name"]])
        offset = end
    _report_final_model(run)


def _setup(config: dict) -> Run:
    """Process group -> model -> LoRA -> DeepSpeed engine (weights, optimizer, LR schedule)."""
    import deepspeed
    import ray.train
    import ray.train.torch
    import torch

    tc = TrainConfig.model_validate(config["train"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    if not tc.use_gpu:  # Ray gives workers OMP_NUM_THREADS=1; use the CPUs this worker reserved
        torch.set_num_threads(max(1, int(tc.resources_per_worker.get("CPU", 1))))
        # DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce when it starts (60-250 s on a fresh
        # machine or venv: the build cache is keyed by paths) that only inference tensor parallelism calls;
        # training reduces through the gloo group. Marked unavailable, it is not built.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    torch.manual_seed(tc.seed)
    deepspeed.init_distributed(dist_backend="nccl" if tc.use_gpu else "gloo")  # reuses Ray Train's group
    ds_cfg = deepspeed_config(tc, world)
    model_dir = models.resolve(ModelConfig.model_validate_json(config["student"]))  # this node's copy
    hf_ds_config, model = _load_model(tc, ds_cfg, model_dir, config["trust_remote_code"])
    n_params = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
    trainable = [p for p in model.parameters() if p.requires_grad]
    n_trainable = sum(getattr(p, "ds_numel", p.numel()) for p in trainable)
    optimizer = None if "optimizer" in ds_cfg else torch.optim.AdamW(
        trainable, lr=tc.lr, weight_decay=tc.weight_decay, fused=True)  # one kernel per step, CUDA and CPU alike
    total_steps = sum(p["steps"] for p in config["phases"])
    schedule = functools.partial(lr_factor, warmup=tc.warmup_steps, total=total_steps, shape=tc.lr_schedule)
    engine, _, _, scheduler = deepspeed.initialize(
        model=model, model_parameters=trainable, optimizer=optimizer, config=ds_cfg,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule))
    peak, peak_source = device_peak(tc, device)
    state = {"step": 0, "history": [], "checkpoints": [], "resumes": [], "valid": {}, "done": False,
             "params": n_params, "trainable_params": n_trainable, "peak_tflops": peak, "peak_source": peak_source}
    return Run(tc=tc, phases=config["phases"], model_dir=model_dir,
               trust_remote_code=config["trust_remote_code"], chat_template=config.get("chat_template"), rank=rank, world=world, device=device,
               engine=engine, scheduler=scheduler, collate_fn=functools.partial(collate, pad_id=config["pad_id"]),
               total_steps=total_steps, state=state, hf_ds_config=hf_ds_config)


def _load_model(tc: TrainConfig, ds_cfg: dict, model_dir: str, trust_remote_code: bool):
    """The HF model (with its LoRA adapter for method=lora), and the HfDeepSpeedConfig to keep alive.
    Under ZeRO-3, HfDeepSpeedConfig makes from_pretrained partition the weights while loading."""
    import torch
    from transformers import AutoModelForCausalLM

    hf_ds_config = None
    if tc.zero_stage == 3:
        from transformers.integrations import HfDeepSpeedConfig
        hf_ds_config = HfDeepSpeedConfig(ds_cfg)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, DTYPES[tc.precision]),
                                                 attn_implementation=tc.attn_implementation,
                                                 trust_remote_code=trust_remote_code, use_safetensors=True)
    if tc.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if tc.method == "lora":
        from peft import LoraConfig, get_peft_model
        model = get_peft_model(model, LoraConfig(r=tc.lora_r, lora_alpha=tc.lora_alpha, lora_dropout=tc.lora_dropout,
                                                 target_modules=tc.lora_target_modules, task_type="CAUSAL_LM"))
    return hf_ds_config, model


def _resume(run: Run) -> None:
    """Restore from ray.train.get_checkpoint(), if any: DeepSpeed restores weights, optimizer and
    scheduler; we restore the RNG and the loop position (run.state). A final export (state "done")
    is left unloaded: there is nothing to resume."""
    import ray.train
    import torch

    ckpt = ray.train.get_checkpoint()
    if not ckpt:
        return
    with ckpt.as_directory() as d:
        with open(os.path.join(d, "trainer_state.json")) as f:
            run.state = json.load(f)
        if run.state["done"]:
            return
        run.engine.checkpoint_engine.load = load_checkpoint_file
        run.engine.load_checkpoint(d, tag=run.state["tag"], load_module_strict=not run.lora)
        rng = np.fromfile(os.path.join(d, f"rng_rank{run.rank}.bin"), dtype=np.uint8)
        torch.set_rng_state(torch.from_numpy(rng))
    fp = state_fingerprint(run.engine)
    run.state["resumes"].append({"step": run.state["step"], "fingerprint": fp,
                                 "saved_fingerprint": run.state["checkpoints"][-1]["fingerprint"]})
    log.info("train: rank %d resumed at step %d (state fingerprint %.6g)", run.rank, run.state["step"], fp)


def _train_phase(run: Run, phase_index: int, ph: dict, offset: int, end: int) -> None:
    """The phase's epochs, as optimizer steps offset+1..end; a resumed run skips the epochs and the
    micro-batches the checkpoint had consumed (the shards are deterministic: preserve_order)."""
    import ray.train

    tc, ga = run.tc, run.tc.grad_accum
    shard = ray.train.get_dataset_shard(ph["dataset"])
    spe = ph["steps_per_epoch"]
    for epoch in range(math.ceil(ph["steps"] / spe)):
        first, last = offset + epoch * spe, min(offset + (epoch + 1) * spe, end)
        if run.state["step"] >= last:
            continue
        batches = iter(shard.iter_torch_batches(
            batch_size=tc.micro_batch, collate_fn=run.collate_fn, prefetch_batches=2,
            local_shuffle_buffer_size=tc.shuffle_buffer_rows or None,
            local_shuffle_seed=tc.seed * 100_003 + phase_index * 1009 + epoch))
        for _ in range((run.state["step"] - first) * ga):
            next(batches)
        while run.state["step"] < last:
            checkpoint_due = _optimizer_step(run, batches, ph["name"], epoch)
            step = run.state["step"]
            if run.rank == 0 and (step % tc.log_every_steps == 0 or step == run.total_steps):
                _log_step(run, ph["name"], epoch)
            if step < run.total_steps and (step % tc.checkpoint_every_steps == 0 or checkpoint_due):
                _save_checkpoint(run, step)
                run.last_ckpt = time.time()


def _optimizer_step(run: Run, batches, phase: str, epoch: int) -> bool:
    """One optimizer step over grad_accum micro-batches; appends its record to run.state["history"].
    Returns whether the checkpoint timer ran out: rank 0's clock decides, and the all-reduce that
    counts the tokens carries its verdict so that every rank checkpoints at the same step."""
    import torch
    import torch.distributed as dist

    engine, ga, world = run.engine, run.tc.grad_accum, run.world
    t0 = time.time()
    micro = [next(batches) for _ in range(ga)]
    # Rank 0's host time per part of the step. On CUDA, kernels run asynchronously, so time moves to the
    # next part that waits on the device (loss.item() below); on CPU every part is synchronous.
    parts = {"data": time.time() - t0, "forward": 0.0, "backward": 0.0, "optimizer": 0.0}
    due = run.rank == 0 and time.time() - run.last_ckpt >= run.tc.checkpoint_every_minutes * 60
    counts = torch.tensor([sum(b["n_target"] for b in micro), sum(b["n_tokens"] for b in micro), due],
                          dtype=torch.float64)
    dist.all_reduce(counts)
    norm = counts[0].item() / (world * ga)  # see the module docstring
    loss_sum = 0.0
    for b in micro:
        t = time.perf_counter()
        loss = summed_loss(engine, b, run.device) / norm
        t1 = time.perf_counter()
        engine.backward(loss)  # ZeRO's gradient reduction runs in here and in step()
        t2 = time.perf_counter()
        engine.step()
        loss_sum += loss.item()
        t3 = time.perf_counter()
        parts["forward"] += t1 - t
        parts["backward"] += t2 - t1
        parts["optimizer"] += t3 - t2
    mean = torch.tensor([loss_sum], dtype=torch.float64)
    dist.all_reduce(mean)
    step = run.state["step"] + 1
    gn = engine.get_global_grad_norm()
    run.state["history"].append({
        "step": step, "phase": phase, "epoch": epoch, "loss": mean.item() / (world * ga),
        "lr": run.scheduler.get_last_lr()[0], "grad_norm": None if gn is None else float(gn),
        "tokens": int(counts[1].item()), "target_tokens": int(counts[0].item()),
        "time_s": time.time() - t0, "parts_s": parts})
    run.state["step"] = step
    return counts[2].item() > 0


def _log_step(run: Run, phase: str, epoch: int) -> None:
    h = run.state["history"][-1]
    log.info("train: step %d/%d phase %s epoch %d loss %.4f lr %.3g %.0f tok/s", h["step"], run.total_steps,
             phase, epoch, h["loss"], h["lr"], h["tokens"] / h["time_s"])


def _save_checkpoint(run: Run, step: int) -> None:
    """DeepSpeed state (every rank its shard) + this rank's RNG + trainer_state.json (rank 0),
    reported to Ray Train, which moves it to storage."""
    import ray.train
    import torch

    tmp = tempfile.mkdtemp(prefix="cft-ckpt-")
    run.engine.save_checkpoint(tmp, tag=f"step{step}", exclude_frozen_parameters=run.lora)
    torch.get_rng_state().numpy().tofile(os.path.join(tmp, f"rng_rank{run.rank}.bin"))
    run.state["tag"] = f"step{step}"
    run.state["checkpoints"].append({"step": step, "fingerprint": state_fingerprint(run.engine), "time": time.time()})
    if run.rank == 0:
        with open(os.path.join(tmp, "trainer_state.json"), "w") as f:
            json.dump(run.state, f)
    ray.train.report({"step": step, "loss": run.state["history"][-1]["loss"]},
                     checkpoint=ray.train.Checkpoint.from_directory(tmp),
                     checkpoint_dir_name=f"step-{step:08d}-r{len(run.state['resumes'])}")
    shutil.rmtree(tmp, ignore_errors=True)


def _micro_batches(refs: list, size: int) -> Iterator[pa.Table]:
    """This rank's valid rows in micro-batches of `size`, one Arrow block fetched at a time (a large valid split
    never sits whole in a worker); ranks hold equal row counts, so every rank yields as many batches."""
    import ray

    carry = None
    for ref in refs:
        rows = ray.get(ref) if carry is None else pa.concat_tables([carry, ray.get(ref)])
        full = rows.num_rows - rows.num_rows % size
        for start in range(0, full, size):
            yield rows.slice(start, size)
        carry = rows.slice(full)
    if carry is not None and carry.num_rows:
        yield carry


def _valid_loss(engine, batches: Iterator[pa.Table], collate_fn, device) -> float | None:
    """Token-mean loss over this rank's valid micro-batches (equal shards: every rank runs the same batches,
    which ZeRO-3's parameter gathers require)."""
    import torch
    import torch.distributed as dist

    engine.eval()
    total = torch.zeros(2, dtype=torch.float64)
    with torch.no_grad():
        for part in batches:
            b = collate_fn({c: part[c].to_numpy(zero_copy_only=False) for c in part.column_names})
            total[0] += summed_loss(engine, b, device).item()
            total[1] += b["n_target"]
    dist.all_reduce(total)
    engine.train()
    return total[0].item() / total[1].item() if total[1] > 0 else None


def _report_final_model(run: Run) -> None:
    """The final model as the last checkpoint (state "done"); the driver copies it into the stage dir."""
    import ray.train

    step = run.state["step"]
    tmp = tempfile.mkdtemp(prefix="cft-export-")
    _export(run.engine, run.tc, run.model_dir, tmp, run.rank, run.trust_remote_code, run.chat_template)
    run.state["done"] = True
    if run.rank == 0:
        with open(os.path.join(tmp, "trainer_state.json"), "w") as f:
            json.dump(run.state, f)
    ray.train.report({"step": step, "done": True},
                     checkpoint=ray.train.Checkpoint.from_directory(tmp) if run.rank == 0 else None,
                     checkpoint_dir_name=f"export-{step:08d}")
    shutil.rmtree(tmp, ignore_errors=True)


def _export(engine, tc, model_dir: str, out: str, rank: int, trust_remote_code: bool,
            chat_template: str | None = None) -> None:
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
    tok = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    if chat_template:  # the configured template travels with the trained model
        tok.chat_template = chat_template
    tok.save_pretrained(os.path.join(out, "model"))
