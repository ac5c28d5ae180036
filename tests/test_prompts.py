import pytest

from cft_ray import prompts

ITEM = {"question": "2+2?", "options": ["3", "4", "5"], "answer": 1, "subject": "elementary_mathematics"}


def test_labels_both_schemes():
    assert prompts.labels(4) == ["1", "2", "3", "4"]
    assert prompts.labels(3, "letters") == ["A", "B", "C"]
    assert prompts.labels(20)[-1] == "20"
    with pytest.raises(ValueError):
        prompts.labels(21)


def test_score_prompt_follows_the_paper():
    sys, user = prompts.score_messages(ITEM)
    assert sys["content"].startswith("The following are multiple choice questions about elementary mathematics.")
    assert "ONLY the NUMBER" in sys["content"] and "ONLY the NUMBER" in user["content"]  # byte-exact: test_paper_prompts.py
    assert user["content"].startswith("Question: 2+2?\nOptions:\n1. 3\n2. 4\n3. 5\nChoose one of the answers.")
    no_subject = prompts.score_messages({**ITEM, "subject": None})[0]["content"]
    assert no_subject.startswith("The following are multiple choice questions. ")
    assert "otherwise return 0" in prompts.score_messages(ITEM, fallback=True)[0]["content"]
    assert "A. 3" in prompts.score_messages(ITEM, "letters")[1]["content"]
    assert "ONLY the LETTER" in prompts.score_messages(ITEM, "letters")[0]["content"]
    assert "answer 0" in prompts.score_messages(ITEM, fallback=True, preset="cftray")[0]["content"]


def test_gold_never_in_teacher_prompt():
    item = {**ITEM, "options": ["x", "y", "gold-text-only-here"], "answer": 2}
    text = " ".join(m["content"] for m in prompts.teacher_messages(item))
    assert "[[number_of_correct_answer]]" in text
    assert "[[3]]" not in text  # the options are listed, the gold id never is


@pytest.mark.parametrize("text, n, scheme, want", [
    ("so [[2]]", 4, "numbers", 1),
    ("[[1]] no wait, [[3]]", 4, "numbers", 2),       # last marker wins
    ("[[ 4 ]]", 4, "numbers", 3),
    ("[[5]]", 4, "numbers", None),                     # out of range
    ("[[0]]", 4, "numbers", None),                     # 0 is not an option id
    ("[2]", 4, "numbers", None),                       # malformed
    ("[[10]]", 10, "numbers", 9),
    ("[[b]]", 4, "letters", 1),
    ("[[E]]", 4, "letters", None),
    ("[[2]]", 4, "letters", None),                     # scheme mismatch is not silently accepted
    ("", 4, "numbers", None),
    (None, 4, "numbers", None),
])
def test_parse_marker(text, n, scheme, want):
    assert prompts.parse_marker(text, n, scheme) == want


def test_label_to_index_fallback():
    assert prompts.label_to_index("0", 4, fallback=True) == -1
    assert prompts.label_to_index("0", 4) is None
    assert prompts.label_to_index(" 2", 4) == 1
    assert prompts.label_to_index("x", 4) is None


def test_marker_roundtrip():
    for scheme in ("numbers", "letters"):
        for a in range(20):
            assert prompts.parse_marker(prompts.marker(a, scheme), 20, scheme) == a


def test_render_uses_chat_template(smollm2_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    prompt = prompts.render(tok, prompts.direct_messages(ITEM))
    full = prompts.render(tok, prompts.direct_messages(ITEM), assistant="[[2]]")
    assert prompt.endswith("<|im_start|>assistant\n")
    assert full.startswith(prompt) and "[[2]]" in full[len(prompt):]
