"""A known-answer task: variable chains with a difficulty knob and exact rationales (issue 20).

Every item lists CHAINS chains of assignments, shuffled together: each chain is a value (`k = 9`) and `level - 1`
variables each set to the previous one (`m = k`, `q = m`); the question asks for the value of the last variable of
one chain. Its level (the true difficulty) is the number of links to follow; the distractor chains are as long, so
nothing but following the links gives the answer (with shorter distractors "the value some variable refers to"
was a shortcut the probe's student found). The options are the numbers 1..9 in order, option k the value k (a
135M student cannot map arbitrary option values to their labels, FEASIBILITY.md). Example, level 2:

    Given n = s, t = j, o = 8, s = 2, j = 4, q = o. What is the value of t?
    rationale: t = j. j = 4. So t = 4, which is option 4. [[4]]

Each item carries its level and the rationale, which `teach.backend=rationale` reads in place of a teacher.
Items are unique by question across both files: `chains.jsonl` (the experiment's pool) and `chains_warmup.jsonl`
(the student's warm-up, disjoint from it). The shipped files are this module's output for its seed
(`python -m cft_ray.chains` rewrites them; a test checks). README "Known-answer experiment" has what
scripts/warmup_probe.py measured for this design and the ones before it.
"""
from __future__ import annotations

import json
import random
import string
from pathlib import Path

CHAINS = 3                  # chains per item, each ending in its own value: one queried, the others distractors
LEVELS = (1, 2, 4, 6)        # links from the queried variable to its value (and in every distractor chain)
POOL_PER_LEVEL = 200
WARMUP_PER_LEVEL = 100
SEED = 0
DATA = Path(__file__).parent / "data"


def item(rng: random.Random, level: int, chains_per_item: int = CHAINS) -> dict:
    """One item of `level`: `chains_per_item` chains of `level` links each (the queried one and its distractors),
    shuffled together; every chain ends in a value of its own. All chains alike, nothing but following the links
    tells the answer (with shorter distractors, "the value some variable refers to" was a shortcut)."""
    names = rng.sample(string.ascii_lowercase, chains_per_item * level)
    values = rng.sample(range(1, 10), chains_per_item)
    chains = [names[c * level:(c + 1) * level] for c in range(chains_per_item)]
    lines = [f"{chain[k]} = {chain[k - 1] if k else value}" for chain, value in zip(chains, values) for k in range(level)]
    rng.shuffle(lines)
    chain, value = chains[0], values[0]
    steps = [f"{chain[k]} = {chain[k - 1]}." for k in range(level - 1, 0, -1)] + [f"{chain[0]} = {value}."]
    return {"question": f"Given {', '.join(lines)}. What is the value of {chain[-1]}?",
            "options": [str(k) for k in range(1, 10)], "answer": value - 1, "subject": "variables",
            "category": f"level {level}", "level": level,
            "rationale": " ".join(steps) + f" So {chain[-1]} = {value}, which is option {value}. [[{value}]]"}


def generate(seed: int = SEED, levels: tuple[int, ...] = LEVELS, chains_per_item: int = CHAINS) -> tuple[list[dict], list[dict]]:
    """(experiment pool, warm-up pool): unique questions, every level in both, ids `chains-<level>-<n>`."""
    rng, seen, pool, warm = random.Random(seed), set(), [], []
    for level in levels:
        rows = []
        while len(rows) < POOL_PER_LEVEL + WARMUP_PER_LEVEL:
            r = item(rng, level, chains_per_item)
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
