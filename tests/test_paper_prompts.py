"""The paper prompt preset renders the reference implementation's messages byte for byte
(../shared/reference/paper_prompts.json: three MMLU-Pro items, the scoring prompt plain and with
fallback, the teacher's CoT prompt); the subject is the item's base_cluster, as in the reference."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from cft_ray import prompts

REFERENCE = Path(__file__).parent / "fixtures" / "reference" / "paper_prompts.json"  # copied from ../shared/reference
KINDS = {"score numbers (ref plain)": ("score", False), "score numbers+fallback": ("score", True),
         "teacher numbers": ("teacher", False)}


def _cases():
    ref = json.loads(REFERENCE.read_text())
    for name, want in ref["prompts"].items():
        qid = name.split()[0]
        kind, fallback = next(v for k, v in KINDS.items() if name[len(qid) + 1:].startswith(k))
        it = ref["items"][qid]
        item = {"question": it["question"], "options": it["options"], "answer": it["answer_index"],
                "subject": it["base_cluster"]}
        yield pytest.param(item, kind, fallback, want, id=name)


@pytest.mark.parametrize("item, kind, fallback, want", list(_cases()))
def test_paper_preset_is_the_reference_byte_for_byte(item, kind, fallback, want):
    got = prompts.messages(kind, item, "numbers", fallback, preset="paper")
    assert [m["role"] for m in got] == ["system", "user"]
    assert got[0]["content"] == want["system_ref"]
    assert got[1]["content"] == want["user_ref"]
    # the project's earlier wording stays available, and differs
    assert prompts.messages(kind, item, "numbers", fallback, preset="cftray") != got
