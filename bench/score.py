"""Score stage benchmark: the same N real MMLU items scored three ways with the student, side by side.

    .venv/bin/python bench/score.py [--n 300] [--threads 2] [--rss 1000,10000] [--rss-model tiny]

(a) reference: HF `generate(max_new_tokens=1, output_scores=True)`, one item at a time (the usual
    research-code way); (b) padded batches in random order computing the full [batch, seq, vocab]
    logits; (c) the cft-ray `Scorer` (length-sorted micro-batches under a token budget, last-position
    LM head), in-process with the same threads. Device and dtype come from the student config, so on a
    GPU box the same script shows the GPU gap. Then a matmul microbenchmark on the model's linear
    shapes gives this machine's attainable FLOP/s, and (c)'s model FLOP/s is reported as a fraction
    of it (FLOPs per item = 2 x linear params x T + 2 x layers x T^2 x hidden + 2 x hidden x vocab).
Finally the real stage (`cft-ray data prepare` + `cft-ray score`, fresh local Ray) runs on 1k and 10k
items while the summed PSS of its process tree is sampled: streaming means the peak must not grow
with the corpus (by default with a tiny random model, so the pipeline's own memory is what shows).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import threading
import time

import psutil
import pyarrow as pa
import torch

from cft_ray import metrics, models
from cft_ray.config import DataConfig, load_config
from cft_ray.data import ITEM_SCHEMA, normalize, resolve_source
from cft_ray.prompts import render, score_messages
from cft_ray.score import Scorer, prompt_args, prompt_tokens


def mmlu_items(n: int, seed: int = 0) -> list[dict]:
    files, cols = resolve_source(DataConfig())
    path = files[0][0]
    items = []
    with open(path) as f:
        for i, line in enumerate(f):
            try:
                it = normalize(json.loads(line), cols, DataConfig())
            except ValueError:
                continue  # the junk header rows
            items.append({**it, "source": f"mmlu:{i}"})
    random.Random(seed).shuffle(items)
    return items[:n]


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def reference(tok, model, items):
    """(a) one item at a time through generate; returns the step-1 entropy of each item."""
    out = []
    for it in items:
        ids = tok(render(tok, score_messages(it)), add_special_tokens=False, return_tensors="pt").to(model.device)
        with torch.inference_mode():
            g = model.generate(**ids, max_new_tokens=1, do_sample=False, output_scores=True,
                               return_dict_in_generate=True, pad_token_id=tok.pad_token_id)
        out.append(metrics.entropy(g.scores[0][0]).item())
    return out


def padded_full_logits(tok, model, items, batch=16, seed=0):
    """(b) random-order padded batches, full logits (what a plain `model(**batch)` loop does)."""
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    texts = [render(tok, score_messages(items[i])) for i in order]
    tok.padding_side = "left"
    padded = 0
    for s in range(0, len(texts), batch):
        enc = tok(texts[s:s + batch], add_special_tokens=False, padding=True, return_tensors="pt").to(model.device)
        padded += enc.input_ids.numel()
        pos = (enc.attention_mask.cumsum(-1) - 1).clamp(min=0)
        with torch.inference_mode():
            logits = model(**enc, position_ids=pos).logits  # [batch, seq, vocab]
            metrics.entropy(logits[:, -1])
    return padded


def flops_per_item(model, tokens: int) -> float:
    c = model.config
    lin = sum(m.weight.numel() for n, m in model.named_modules()
              if isinstance(m, torch.nn.Linear) and "lm_head" not in n)
    return 2 * lin * tokens + 2 * c.num_hidden_layers * tokens**2 * c.hidden_size + 2 * c.hidden_size * c.vocab_size


def matmul_peak(model, m_tokens: int, dtype, reps: int = 5) -> tuple[float, float]:
    """(FLOPs, seconds) of F.linear on the model's per-layer weight shapes at m_tokens rows."""
    layer = model.model.layers[0]
    shapes = [tuple(mod.weight.shape) for mod in layer.modules() if isinstance(mod, torch.nn.Linear)]
    flops = secs = 0.0
    for out_f, in_f in shapes:
        x = torch.randn(m_tokens, in_f, dtype=dtype, device=model.device)
        w = torch.randn(out_f, in_f, dtype=dtype, device=model.device)
        torch.nn.functional.linear(x, w)  # warm-up
        _, t = timed(lambda: [torch.nn.functional.linear(x, w) for _ in range(reps)])
        flops += 2 * m_tokens * in_f * out_f * reps
        secs += t
    return flops, secs


def score_manifest(stdout: str, n: int) -> dict:
    """The manifest of the score stage that `cft-ray score` printed as its output, checked to cover n rows."""
    with open(os.path.join(stdout.strip().rsplit("output: ", 1)[-1], "manifest.json")) as f:
        manifest = json.load(f)
    if manifest["counts"]["rows_in"] != n:
        raise RuntimeError(f"the stage scored {manifest['counts']['rows_in']} rows, not {n}")
    return manifest


ROLES = ("scoring actor", "task workers", "driver", "Ray system")


def role(p: psutil.Process, root: psutil.Process) -> str:
    """Which part of the stage a process of the `cft-ray score` tree is."""
    if p.pid == root.pid:
        return "driver"
    cmd = " ".join(p.cmdline())
    return "scoring actor" if "Scorer" in cmd else "task workers" if cmd.startswith("ray::") else "Ray system"


def cpu_by_role(proc: psutil.Popen, every: float = 0.5) -> dict[str, float]:
    """Waits for `proc` while summing the CPU seconds (user + system) of every process in its tree by `role`:
    where a stage's CPU goes, the profile behind its rate. A process is read until it exits, so up to
    `every` s of a short-lived process's CPU is missed."""
    seen: dict[int, tuple[str, float]] = {}
    while proc.poll() is None:
        for p in [proc, *proc.children(recursive=True)]:
            try:
                t = p.cpu_times()
                # a task worker that once hosted the actor keeps the actor's role
                kind = "scoring actor" if seen.get(p.pid, ("",))[0] == "scoring actor" else role(p, proc)
                seen[p.pid] = (kind, t.user + t.system)
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                pass
        time.sleep(every)
    return {r: round(sum(c for k, c in seen.values() if k == r), 1) for r in ROLES}


def stage_speed(items: list[dict], cfg, args) -> tuple[float, float, dict]:
    """(whole `cft-ray score` command s, the stage's own s from its manifest, CPU s by role) on `items`, same
    model and settings as the in-process methods, on a fresh local Ray."""
    cli = [sys.executable, "-m", "cft_ray.cli"]
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "items.jsonl")
        with open(src, "w") as f:
            for it in items:
                f.write(json.dumps({k: it[k] for k in ("question", "options", "answer", "subject")}) + "\n")
        common = [f"data.source={src}", f"run_dir={tmp}/run", "data.limit=null", f"ray.num_cpus={args.threads}",
                  # the actor reserves 1 CPU and runs `threads` torch threads: a CPU stays free for the prompt task
                  *args.overrides, "score.pool.num_cpus=1", f"score.pool.threads={args.threads}"]
        subprocess.run([*cli, "data", "prepare", *common], check=True, capture_output=True)
        t = time.time()
        with tempfile.TemporaryFile("w+") as log:
            proc = psutil.Popen([*cli, "score", *common], stdout=log, stderr=subprocess.DEVNULL, text=True)
            cpu = cpu_by_role(proc)
            whole = time.time() - t
            if proc.returncode:
                raise RuntimeError(f"cft-ray score failed on {len(items)} items")
            log.seek(0)
            manifest = score_manifest(log.read(), len(items))
    return whole, manifest["durations_s"]["score"], cpu


def tree_memory(root: psutil.Process) -> tuple[int, int]:
    """(summed PSS of the process tree, RSS of its scoring actor) in bytes."""
    total, actor = 0, 0
    for p in [root, *root.children(recursive=True)]:
        try:
            total += p.memory_full_info().pss
            if "Scorer" in " ".join(p.cmdline()):
                actor = max(actor, p.memory_info().rss)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return total, actor


def distinct_items(n: int, path: str) -> str:
    """n distinct items (MMLU's, cycled, each copy's question numbered): a corpus larger than MMLU's 13,937."""
    base = mmlu_items(10**6)
    with open(path, "w") as f:
        for k in range(n):
            it = base[k % len(base)]
            f.write(json.dumps({"question": f"[{k}] {it['question']}", "options": it["options"],
                                "answer": it["answer"], "subject": it["subject"]}) + "\n")
    return path


def stage_peak_memory(n: int, model_dir: str, run_dir: str) -> tuple[float, float, float, dict]:
    """(peak summed PSS of the process tree in MB, peak RSS of the scoring actor in MB, seconds, manifest
    throughput) of `cft-ray score` on n distinct items."""
    cli = [sys.executable, "-m", "cft_ray.cli"]
    os.makedirs(run_dir, exist_ok=True)
    src = distinct_items(n, os.path.join(run_dir, "items.jsonl"))
    # data.limit=null: the packaged default samples 500 items, which would measure 500 at every size
    common = [f"data.source={src}", f"run_dir={run_dir}/run", f"student.name={model_dir}", "ray.num_cpus=2",
              "data.limit=null"]
    subprocess.run([*cli, "data", "prepare", *common], check=True, capture_output=True)
    proc = psutil.Popen([*cli, "score", *common], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    peak, stop = [0, 0], threading.Event()

    def watch():
        while not stop.is_set():
            peak[:] = [max(a, b) for a, b in zip(peak, tree_memory(proc))]
            time.sleep(2.0)  # reading smaps of a dozen Ray processes costs CPU: sample sparingly

    th = threading.Thread(target=watch, daemon=True)
    t = time.time()
    th.start()
    out, _ = proc.communicate()
    took = time.time() - t
    stop.set()
    th.join()
    if proc.returncode:
        raise RuntimeError(f"cft-ray score failed on {n} items")
    return peak[0] / 2**20, peak[1] / 2**20, took, score_manifest(out, n)["throughput"]


def tiny_model(out_dir: str, tokenizer_dir: str) -> str:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    LlamaForCausalLM(cfg).save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return out_dir


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=768, help="items for (b) and (c)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds interleaving (a), (b), (c); 0 = memory run only")
    ap.add_argument("--n-ref", type=int, default=None, help="items for (a), the slow reference (default: all --n, "
                    "so every method reads the same items)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=16, help="batch size of (b)")
    ap.add_argument("--rss", default="1000,10000,50000", help="corpus sizes for the memory run ('' to skip)")
    ap.add_argument("--rss-model", default="tiny", help="'tiny' (random 2-layer Llama) or 'student'")
    ap.add_argument("overrides", nargs="*", help="config overrides, e.g. student.dtype=float32 score.token_budget=8192")
    args = ap.parse_args()
    cfg = load_config(None, [f"score.pool.num_cpus={args.threads}", *args.overrides])
    torch.set_num_threads(args.threads)
    items = mmlu_items(args.n)
    dtype = getattr(torch, cfg.student.dtype)
    print(f"model {cfg.student.name} {cfg.student.dtype} on {models.device_of(cfg.student)}, "
          f"{args.threads} threads, {len(items)} MMLU items, token_budget {cfg.score.token_budget}")

    if args.rounds:
        compare(args, cfg, items, dtype)
    memory(args, cfg)


def compare(args, cfg, items, dtype) -> None:
    """(a), (b), (c) interleaved in rounds, then the matmul figure."""
    scorer = Scorer(cfg)  # also what (a) and (b) use: the same weights, dtype and device
    tok, model = scorer.tok, scorer.model
    pargs = prompt_args(cfg)

    split = {"prompt task": 0.0, "forward": 0.0}  # (c)'s time by part, summed over the timed rounds
    forward = scorer._forward

    def timed_forward(*a, **kw):
        t0 = time.perf_counter()
        out = forward(*a, **kw)
        split["forward"] += time.perf_counter() - t0
        return out

    scorer._forward = timed_forward

    def c(t):  # the stage's two steps in one process: the prompt task, then the model actor
        t0 = time.perf_counter()
        batch = prompt_tokens(t, **pargs)
        split["prompt task"] += time.perf_counter() - t0
        return scorer(batch)

    table = pa.Table.from_pylist(items[:8], schema=ITEM_SCHEMA)
    # warm-up: kernel selection and first-touch allocations happen outside the timings
    c(table), reference(tok, model, items[:2]), padded_full_logits(tok, model, items[:args.batch])
    split.update({"prompt task": 0.0, "forward": 0.0})
    # Rounds interleave the three methods, so a load change on a shared box hits all of them alike.
    bs, n_ref = cfg.score.pool.batch_size, min(args.n_ref or len(items), len(items))
    wall, cpu, scored, ref, padded_b, ref_items, mm = [0.0] * 3, [0.0] * 3, [], [], 0, [], [0.0, 0.0]
    for r in range(args.rounds):
        part = items[r::args.rounds]
        sub = part[:n_ref // args.rounds + (r < n_ref % args.rounds)]
        ref_items += sub
        tpart = pa.Table.from_pylist(part, schema=ITEM_SCHEMA)
        for k, fn in enumerate((lambda: ref.extend(reference(tok, model, sub)),
                                lambda: padded_full_logits(tok, model, part, args.batch),
                                lambda: scored.extend(row for s in range(0, len(part), bs)
                                                      for row in c(tpart.slice(s, bs)).to_pylist()))):
            c0 = time.process_time()
            out, t = timed(fn)
            wall[k] += t
            cpu[k] += time.process_time() - c0
            padded_b += out if k == 1 else 0
        mm = [a + b for a, b in zip(mm, matmul_peak(model, cfg.score.token_budget, dtype))]
    tok_of = {r["item_id"]: r["prompt_tokens"] for r in scored}
    tokens = sum(tok_of.values())
    rows = []
    for k, (name, n, tk, padded) in enumerate((
            ("(a) generate, 1 at a time", len(ref_items), sum(tok_of[i["item_id"]] for i in ref_items), None),
            (f"(b) padded batches of {args.batch}, random order, full logits", len(items), tokens, padded_b),
            ("(c) cft-ray Scorer", len(items), tokens, sum(r["padded_tokens"] for r in scored)))):
        rows.append((name, n / wall[k], tk / wall[k], n / cpu[k], None if padded is None else 1 - tk / padded))
    print(f"\n| method | items/s | tokens/s | items per CPU-s | padding waste | vs (a) |\n|---|---|---|---|---|---|")
    for name, ips, tps, ipc, waste in rows:
        print(f"| {name} | {ips:.2f} | {tps:.0f} | {ipc:.2f} | {'-' if waste is None else f'{waste:.1%}'} "
              f"| {ips / rows[0][1]:.2f}x |")
    print(f"(c)/(b) = {rows[2][1] / rows[1][1]:.2f}x wall, {rows[2][3] / rows[1][3]:.2f}x CPU; "
          f"(c)/(a) = {rows[2][3] / rows[0][3]:.2f}x CPU; load average {os.getloadavg()[0]:.1f}")
    actor = wall[2] - split["prompt task"]
    print(f"(c) by part: prompt task {split['prompt task']:.1f} s; model actor {actor:.1f} s, of which forward passes "
          f"{split['forward']:.1f} s and the rest (padding, maths, parsing, Arrow) {actor - split['forward']:.1f} s = "
          f"{(actor - split['forward']) / actor:.1%} of the actor (target <= 10%)")
    whole, stage, cpu_all = stage_speed(items, cfg, args)
    print(f"(d) the real stage, `cft-ray data prepare` + `cft-ray score` on the same {len(items)} items, after the rounds: "
          f"{len(items) / stage:.2f} items/s in the stage ({stage:.1f} s), {len(items) / whole:.2f} items/s for the whole "
          f"score command ({whole:.1f} s, Ray start-up included); stage / (c) = {len(items) / stage / rows[2][1]:.2f}x "
          f"(target >= 0.9x)")
    # The stage's time includes a fixed cost (the actor's process start, imports and model load) that (c) pays before
    # its timer; the stage on half the items separates it from the per-item rate (the steady state).
    half = len(items) // 2
    _, stage_half, cpu_half = stage_speed(items[:half], cfg, args)
    marginal = (len(items) - half) / (stage - stage_half)
    print(f"(d) on the first {half} items: {stage_half:.1f} s in the stage; marginal rate {marginal:.2f} items/s = "
          f"{marginal / rows[2][1]:.2f}x (c) (target >= 0.9x), fixed cost {stage - len(items) / marginal:.1f} s")
    # Where the CPU goes: the marginal CPU seconds per item of each part of the stage against (c)'s, whose process
    # does the same work (prompt task + model actor) alone on the box.
    n_more = len(items) - half
    per_item = {r: (cpu_all[r] - cpu_half[r]) / n_more for r in ROLES}
    print(f"(d) CPU s by part, {len(items)} / {half} items: " + "; ".join(f"{r} {cpu_all[r]} / {cpu_half[r]}" for r in ROLES))
    print(f"(d) marginal CPU ms per item: " + "; ".join(f"{r} {1e3 * v:.1f}" for r, v in per_item.items())
          + f"; all {1e3 * sum(per_item.values()):.1f}, of {1e3 * args.threads / marginal:.1f} the box had per item "
          f"({args.threads} cores / marginal rate); (c) used {1e3 * cpu[2] / len(items):.1f} (prompt task "
          f"{1e3 * split['prompt task'] / len(items):.1f} of it)")
    by_id = {r["item_id"]: r for r in scored}
    dh = max(abs(a - by_id[i["item_id"]]["entropy"]) for a, i in zip(ref, ref_items))
    print(f"(c) vs (a) entropy max |diff| {dh:.3g} nats over {n_ref} items ({cfg.student.dtype}; padding changes matmul shapes)")

    flops = {r["item_id"]: flops_per_item(model, r["prompt_tokens"]) for r in scored}
    peak = mm[0] / mm[1]
    mean_len = tokens // len(items)
    f1, s1 = matmul_peak(model, mean_len, dtype)
    print(f"\nmatmul on the model's linear shapes ({cfg.student.dtype}, {args.threads} threads, measured in each round): "
          f"{peak / 1e12:.2f} TFLOP/s at {cfg.score.token_budget} rows; {f1 / s1 / 1e12:.2f} at {mean_len} rows (batch 1)")
    for k, its in ((0, ref_items), (1, items), (2, items)):
        achieved = sum(flops[i["item_id"]] for i in its) / wall[k]
        print(f"{rows[k][0]}: {achieved / 1e12:.3f} model TFLOP/s = {achieved / peak:.0%} of the matmul figure")



def memory(args, cfg) -> None:
    """Peak PSS of the real stage at each corpus size."""
    sizes = [int(s) for s in args.rss.split(",") if s]
    if sizes:
        with tempfile.TemporaryDirectory() as tmp:
            model_dir = tiny_model(os.path.join(tmp, "tiny"), models.resolve(cfg.student)) \
                if args.rss_model == "tiny" else cfg.student.name
            print(f"\n| items | peak PSS, process tree (MB) | peak RSS, scoring actor (MB) | wall s | rows/s | tokens/s |"
                  f" padding waste |\n|---|---|---|---|---|---|---|")
            peaks = []
            for n in sizes:
                tree, actor, took, thr = stage_peak_memory(n, model_dir, os.path.join(tmp, f"run{n}"))
                peaks.append((tree, actor))
                print(f"| {n} | {tree:.0f} | {actor:.0f} | {took:.0f} | {thr['rows_per_s']} | {thr['tokens_per_s']} | "
                      f"{thr['padding_waste']} |")
            print(f"peak memory ratio {sizes[-1]} / {sizes[0]} items: tree {peaks[-1][0] / peaks[0][0]:.2f}x, "
                  f"scoring actor {peaks[-1][1] / peaks[0][1]:.2f}x (model: {args.rss_model}; target <= 1.1x)")


if __name__ == "__main__":
    main()
