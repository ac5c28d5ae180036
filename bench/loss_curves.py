"""Loss curves of the same steps under three bf16 set-ups, one process each, no Ray: HF-style fp32 weights under
bf16 autocast, DeepSpeed ZeRO-2 bf16 and DeepSpeed ZeRO-0 bf16 (bf16 weights, fp32 master weights in the
optimizer). Same model, batches, AdamW, lr and clipping on every side; prints the loss at every step.

    .venv/bin/python bench/loss_curves.py [--steps 12] [--lr 1e-4] [--threads 2]

Why: the train benchmark compares tokens/s at "the same loss curve"; in bf16 a small step can fall below half a
bf16 ulp of a weight, so the bf16-weight paths see some updates late (README, Train).
"""
from __future__ import annotations

import argparse
import copy
import os
import subprocess
import sys

from cft_ray.config import load_config
from cft_ray.models import resolve
from cft_ray.train_loop import deepspeed_config

SIDES = ("autocast", "2", "0")  # fp32 weights + autocast; DeepSpeed ZeRO stage 2; stage 0


def side(name: str, args) -> list[float]:
    """The losses of `args.steps` steps under one set-up, in this process."""
    import torch
    from transformers import AutoModelForCausalLM


    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(resolve(load_config(None, []).student), dtype=torch.float32)
    g = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, base.config.vocab_size, (4, 64), generator=g) for _ in range(args.steps)]
    losses = []
    if name == "autocast":
        opt = torch.optim.AdamW(base.parameters(), lr=args.lr, weight_decay=0.0, fused=True)
        for b in batches:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = base(input_ids=b, labels=b).loss
            losses.append(loss.item())
            loss.backward()
            torch.nn.utils.clip_grad_norm_(base.parameters(), 1.0)
            opt.step()
            opt.zero_grad()
        return losses
    import deepspeed

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(29600 + int(name)), RANK="0", LOCAL_RANK="0",
                      WORLD_SIZE="1")
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # as the train stage: not JIT-built on CPU
    deepspeed.init_distributed(dist_backend="gloo")
    model = copy.deepcopy(base).to(torch.bfloat16)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0, fused=True)
    # the DeepSpeed config the train stage builds for one bf16 worker at this stage, batch 4, clip 1.0
    tc = load_config(None, [f"train.zero_stage={name}", "train.precision=bf16", "train.micro_batch=4",
                            "train.grad_accum=1", "train.num_workers=1", "train.grad_clip=1.0"]).train
    engine, *_ = deepspeed.initialize(model=model, model_parameters=list(model.parameters()), optimizer=opt,
                                      config=deepspeed_config(tc, 1))
    for b in batches:
        loss = engine(input_ids=b, labels=b).loss
        losses.append(loss.item())
        engine.backward(loss)
        engine.step()
    return losses


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--side", choices=SIDES, help=argparse.SUPPRESS)  # internal: run one side, print its losses
    args = ap.parse_args()
    if args.side:
        print(" ".join(f"{x:.4f}" for x in side(args.side, args)))
        return
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    rows = {}
    for name in SIDES:  # a process each: DeepSpeed's process group and the threads start fresh
        out = subprocess.run([sys.executable, __file__, "--side", name, "--steps", str(args.steps), "--lr", str(args.lr),
                              "--threads", str(args.threads)], check=True, capture_output=True, text=True).stdout
        rows[name] = [float(x) for x in out.strip().splitlines()[-1].split()]
    label = {"autocast": "fp32 weights, bf16 autocast (HF-style)", "2": "DeepSpeed ZeRO-2 bf16", "0": "DeepSpeed ZeRO-0 bf16"}
    print(f"SmolLM2-135M, lr {args.lr}, AdamW, clip 1.0, batches of 4 x 64 random tokens, {args.threads} threads\n")
    print("| set-up | " + " | ".join(f"step {i + 1}" for i in range(args.steps)) + " |")
    print("|---|" + "---|" * args.steps)
    for name, losses in rows.items():
        print(f"| {label[name]} | " + " | ".join(f"{x:.2f}" for x in losses) + " |")


if __name__ == "__main__":
    main()
