"""A known-answer task: variable chains with a difficulty knob and exact rationales (issue 20).

Every item lists STATEMENTS assignments in shuffled order, some a value (`k = 9`), some another variable
(`m = k`), and asks for one variable's value; its level is the number of links from that variable to its value
(level 1: a look-up; level 4: three hops first). The other statements are distractor chains ending in other
values, so every item has the same length and surface whatever its level: only following the chain tells
a hard item from an easy one. The options are the numbers 1..9 in order, option k the value k (a 135M student
cannot map arbitrary option values to their labels, FEASIBILITY.md). Example, level 3:

    Given t = 9, v = w, a = 4, u = v, p = t, w = 6. What is the value of u?
    rationale: u = v. v = w. w = 6. So u = 6, which is option 6. [[6]]

Each item carries its level (the true difficulty) and the rationale, which `teach.backend=rationale` reads in
place of a teacher. Measured with a plain loop (scripts/warmup_probe.py, SmolLM2-135M, full fine-tuning, lr
1e-4, batch 8, held-out items): 50 steps give 0.89 / 0.74 / 0.46 / 0.45 at levels 1-4 and an entropy ROC AUC of
0.68 against wrong answers; zero-shot it is at chance. Items are unique by question across both files:
`chains.jsonl` (the experiment's pool) and `chains_warmup.jsonl` (the student's warm-up, disjoint from it). The
shipped files are this module's output for its seed (`python -m cft_ray.chains` rewrites them; a test checks).
"""
from __future__ import annotations

import json
import random
import string
from pathlib import Path

STATEMENTS = 6
LEVELS = (1, 2, 3, 4)       # links from the queried variable to its value
POOL_PER_LEVEL = 200
WARMUP_PER_LEVEL = 100
SEED = 0
DATA = Path(__file__).parent / "data"


def item(rng: random.Random, level: int) -> dict:
    """One item of `level`: the queried chain plus distractor chains of 1-4 links, STATEMENTS in all, shuffled."""
    names = rng.sample(string.ascii_lowercase, STATEMENTS)
    values = rng.sample(range(1, 10), 9)          # every chain ends in a value of its own
    sizes, left = [level], STATEMENTS - level
    while left:
        sizes.append(rng.randint(1, min(left, 4)))
        left -= sizes[-1]
    chains, statements, used = [], [], 0
    for value, size in zip(values, sizes):
        chain = names[used:used + size]
        used += size
        chains.append(chain)
        statements += [f"{chain[0]} = {value}"] + [f"{chain[k]} = {chain[k - 1]}" for k in range(1, size)]
    rng.shuffle(statements)
    chain, value = chains[0], values[0]
    steps = [f"{chain[k]} = {chain[k - 1]}." for k in range(level - 1, 0, -1)] + [f"{chain[0]} = {value}."]
    return {"question": f"Given {', '.join(statements)}. What is the value of {chain[-1]}?",
            "options": [str(k) for k in range(1, 10)], "answer": value - 1, "subject": "variables",
            "category": f"level {level}", "level": level,
            "rationale": " ".join(steps) + f" So {chain[-1]} = {value}, which is option {value}. [[{value}]]"}


def generate(seed: int = SEED) -> tuple[list[dict], list[dict]]:
    """(experiment pool, warm-up pool): unique questions, every level in both, ids `chains-<level>-<n>`."""
    rng, seen, pool, warm = random.Random(seed), set(), [], []
    for level in LEVELS:
        rows = []
        while len(rows) < POOL_PER_LEVEL + WARMUP_PER_LEVEL:
            r = item(rng, level)
            if r["question"] not in seen:
                seen.add(r["question"])
                rows.append({"item_id": f"chains-{level}-{len(rows):04d}", **r})
        pool += rows[:POOL_PER_LEVEL]
        warm += rows[POOL_PER_LEVEL:]
    return pool, warm


def write(directory: Path = DATA) -> dict[str, int]:
    """Write chains.jsonl and chains_warmup.jsonl; returns rows per file."""
    directory.mkdir(parents=True, exist_ok=True)
    out = {}
    for name, rows in zip(("chains.jsonl", "chains_warmup.jsonl"), generate()):
        (directory / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
        out[name] = len(rows)
    return out


if __name__ == "__main__":
    print(write())
