"""A known-answer task: chained +/- arithmetic with a difficulty knob and exact rationales (issue 20).

Every item asks for the value of an expression whose result is 1..9; its options are the numbers 1..9 in
order, so option k is the value k (a 135M student cannot map arbitrary option values to their labels,
FEASIBILITY.md). Levels, easiest first:

    1  one op on numbers < 20          e.g. 13 - 6
    2  two ops on numbers < 20         e.g. 4 + 15 - 12
    3  two ops on numbers < 60         e.g. 47 - 38 + 2
    4  four ops on numbers < 60        e.g. 31 + 22 - 48 + 9 - 7

Each item carries its level (the true difficulty) and a step-by-step rationale ending in `[[k]]`, which
`teach.backend=rationale` reads in place of a teacher. Items are unique by expression across both files:
`arith.jsonl` (the experiment's pool) and `arith_warmup.jsonl` (the student's warm-up, disjoint from it).
The shipped files are this module's output for its seed (`python -m cft_ray.arith` rewrites them; a test
checks they match).
"""
from __future__ import annotations

import json
import random
from pathlib import Path

LEVELS = {1: (1, 20), 2: (2, 20), 3: (2, 60), 4: (4, 60)}  # level -> (ops, numbers below)
PER_LEVEL = 800          # items per level before the warm-up cut (level 1 has fewer distinct expressions)
WARMUP_FRACTION = 0.4
SEED = 0
DATA = Path(__file__).parent / "data"


def expression(rng: random.Random, ops: int, below: int) -> list[int | str] | None:
    """Terms and signs of one expression whose running value stays in 0..99 and ends in 1..9, else None."""
    terms: list[int | str] = [rng.randrange(1, below)]
    value = terms[0]
    for _ in range(ops):
        sign, n = rng.choice("+-"), rng.randrange(1, below)
        value = value + n if sign == "+" else value - n
        if not 0 <= value <= 99:
            return None
        terms += [sign, n]
    return terms if 1 <= value <= 9 else None


def rationale(terms: list[int | str]) -> tuple[str, int]:
    """The worked steps of `terms` and the result: 'Start with 13. 13 - 6 = 7. The result is 7, option 7. [[7]]'."""
    value, steps = terms[0], [f"Start with {terms[0]}."]
    for sign, n in zip(terms[1::2], terms[2::2]):
        new = value + n if sign == "+" else value - n
        steps.append(f"{value} {sign} {n} = {new}.")
        value = new
    steps.append(f"The result is {value}, which is option {value}. [[{value}]]")
    return " ".join(steps), value


def generate(per_level: int = PER_LEVEL, seed: int = SEED) -> list[dict]:
    """Unique items, `per_level` of each level (fewer where the level has fewer distinct expressions)."""
    rng, items, seen = random.Random(seed), [], set()
    for level, (ops, below) in LEVELS.items():
        made, tries = 0, 0
        while made < per_level and tries < 200 * per_level:
            tries += 1
            terms = expression(rng, ops, below)
            text = " ".join(map(str, terms)) if terms else None
            if text is None or text in seen:
                continue
            seen.add(text)
            steps, value = rationale(terms)
            items.append({"item_id": f"arith-{level}-{made:04d}", "question": f"What is {text}?",
                          "options": [str(k) for k in range(1, 10)], "answer": value - 1,
                          "subject": "arithmetic", "category": f"level {level}", "level": level,
                          "rationale": steps})
            made += 1
    return items


def split_warmup(items: list[dict], fraction: float = WARMUP_FRACTION, seed: int = SEED) -> tuple[list[dict], list[dict]]:
    """(experiment pool, warm-up pool): a seeded cut of every level, so both pools hold every level."""
    rng, pool, warm = random.Random(seed + 1), [], []
    for level in LEVELS:
        rows = [r for r in items if r["level"] == level]
        rng.shuffle(rows)
        cut = round(fraction * len(rows))
        warm += rows[:cut]
        pool += rows[cut:]
    return pool, warm


def write(directory: Path = DATA) -> dict[str, int]:
    """Write arith.jsonl and arith_warmup.jsonl; returns rows per file."""
    directory.mkdir(parents=True, exist_ok=True)
    out = {}
    for name, rows in zip(("arith.jsonl", "arith_warmup.jsonl"), split_warmup(generate())):
        (directory / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
        out[name] = len(rows)
    return out


if __name__ == "__main__":
    print(write())
