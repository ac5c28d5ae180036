"""Plain-loop warm-up probe (issue 20): does a task give SmolLM2-135M graded competence in N steps of direct
answers? Trains on `embedded:chains-warmup` (cft_ray/chains.py), measures on the experiment pool `embedded:chains`
(never trained on). No Ray, no DeepSpeed: full fine-tuning, fp32 master weights + bf16 autocast, AdamW, batch 8
padded, constant lr, direct targets '[[k]]<|im_end|>' after the pipeline's own direct prompt. Every 25 steps:
accuracy by level of the argmax over the digits 1-9 after the prompt + '[[', and the ROC AUC of that
distribution's entropy against wrong answers (the experiment's own score stage reads the full vocabulary).

    .venv/bin/python scripts/warmup_probe.py 100 1e-4 [test items per level] [levels, e.g. 1,2,4,6] [chains per item]

After the warm-up pool's items, it goes on with the pool's items that are not test items (a direct-answer SFT arm's
training), so one run shows the warmed student and what direct SFT then makes of the hard levels.
"""
import random
import sys
import time

import torch
from sklearn.metrics import roc_auc_score
from transformers import AutoModelForCausalLM, AutoTokenizer

from cft_ray import chains, prompts
from cft_ray.config import load_config
from cft_ray.models import resolve

steps, lr = int(sys.argv[1]), float(sys.argv[2])
per_level = int(sys.argv[3]) if len(sys.argv) > 3 else 100
level_ids = tuple(int(x) for x in sys.argv[4].split(",")) if len(sys.argv) > 4 else chains.LEVELS
per_item = int(sys.argv[5]) if len(sys.argv) > 5 else chains.CHAINS
torch.manual_seed(0); torch.set_num_threads(2)
rng = random.Random(0)
pool, warm = chains.generate(levels=level_ids, chains_per_item=per_item)
levels = [str(lv) for lv in level_ids]
test = [r for lv in level_ids for r in [x for x in pool if x["level"] == lv][:per_level]]
tested = {r["item_id"] for r in test}
rng.shuffle(warm)
rest = [r for r in pool if r["item_id"] not in tested]
rng.shuffle(rest)
train = warm + rest  # read in order: the warm-up's items first
print("warm-up", len(warm), "then", len(rest), "test", len(test), flush=True)
md = resolve(load_config(None, []).student)
tok = AutoTokenizer.from_pretrained(md)
model = AutoModelForCausalLM.from_pretrained(md, dtype=torch.float32)
opt = torch.optim.AdamW(model.parameters(), lr=lr)
def enc(r):
    p = tok(prompts.render(tok, prompts.direct_messages(r)), add_special_tokens=False)["input_ids"]
    full = tok(prompts.render(tok, prompts.direct_messages(r), prompts.marker(r["answer"])), add_special_tokens=False)["input_ids"]
    return full, len(p)
digits = [tok.convert_tokens_to_ids(str(k)) for k in range(1, 10)]
def evaluate():
    model.eval(); out = []
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        for i in range(0, len(test), 16):
            b = test[i:i + 16]
            ids = [tok(prompts.render(tok, prompts.direct_messages(r)) + prompts.DIRECT_PREFIX, add_special_tokens=False)["input_ids"] for r in b]
            w = max(map(len, ids)); x = torch.full((len(b), w), tok.pad_token_id); m = torch.zeros_like(x)
            for j, s in enumerate(ids): x[j, w - len(s):] = torch.tensor(s); m[j, w - len(s):] = 1  # left pad
            lg = model(input_ids=x, attention_mask=m).logits[:, -1, digits].float()
            p = lg.softmax(-1)
            for j, r in enumerate(b):
                ent = -(p[j] * p[j].clamp_min(1e-12).log()).sum().item()
                out.append((r["level"], int(p[j].argmax()) == r["answer"], ent))
    model.train()
    acc = {lv: round(sum(c for l, c, _ in out if l == int(lv)) / max(1, sum(l == int(lv) for l, _, _ in out)), 3) for lv in levels}
    y = [not c for _, c, _ in out]; e = [x for _, _, x in out]
    auc = roc_auc_score(y, e) if 0 < sum(y) < len(y) else float("nan")
    return acc, round(auc, 3)
print("step 0", evaluate(), flush=True)
t0 = time.time(); model.train()
for step in range(1, steps + 1):
    b = [enc(train[(8 * (step - 1) + j) % len(train)]) for j in range(8)]
    w = max(len(f) for f, _ in b)
    x = torch.full((8, w), tok.pad_token_id); y = torch.full((8, w), -100); m = torch.zeros_like(x)
    for j, (f, n) in enumerate(b):
        x[j, :len(f)] = torch.tensor(f); y[j, n:len(f)] = torch.tensor(f[n:]); m[j, :len(f)] = 1
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(input_ids=x, attention_mask=m, labels=y).loss
    loss.backward(); torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0); opt.step(); opt.zero_grad()
    if step % 25 == 0:
        print(f"step {step} loss {loss.item():.3f} {time.time() - t0:.0f}s", evaluate(), flush=True)
