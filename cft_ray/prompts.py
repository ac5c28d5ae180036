"""Every prompt and every answer parser: the one place that knows how items become text.

Scoring, the teacher, SFT targets and evaluation all call these, so the label scheme (1..N or A..)
cannot drift between stages (mixing 0- and 1-based ids was a real bug in the reference code).
Internally answers are 0-based; prompts render labels 1..N (or A..).
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Literal, Mapping, Sequence

Scheme = Literal["numbers", "letters"]
Preset = Literal["paper", "cftray"]
LETTERS = "ABCDEFGHIJKLMNOPQRST"  # 20 labels: the max option count of the item contract

# Scoring instructions. "paper": the reference implementation's, byte for byte
# (../shared/reference/paper_prompts.json); "cftray": this project's earlier wording.
PAPER_ANSWER_ONLY = "Write down ONLY the {KIND} of the correct answer and nothing else."
PAPER_FALLBACK = ("If you are certain about the answer return the correct option {kind}, otherwise return 0. "
                  "Write down ONLY the {KIND} and nothing else.")
ANSWER_ONLY = "Answer with ONLY the {kind} of the correct option."
FALLBACK = " If you are not certain, answer 0."
COT_FORMAT = ("Explain your thinking process step-by-step. At the end, write down the {kind} of the correct "
              "answer by strictly following this format: [[{kind_var}]].")
DIRECT_SYS = "Analyze question and answer with only one {kind} in [[{kind_var}]] format."
COT_SYS = "Explain your thinking step-by-step. At the end, write the correct answer {kind} using [[{kind_var}]] format."
MARKER = re.compile(r"\[\[\s*([A-Za-z]|\d{1,2})\s*\]\]")


def labels(n: int, scheme: Scheme = "numbers") -> list[str]:
    if not 1 <= n <= len(LETTERS):
        raise ValueError(f"{n} options: the label schemes cover 1..{len(LETTERS)}")
    return [str(i + 1) for i in range(n)] if scheme == "numbers" else list(LETTERS[:n])


def _kind(scheme: Scheme) -> tuple[str, str]:
    return ("number", "number") if scheme == "numbers" else ("letter", "letter")


def _system_head(subject: str | None) -> str:
    about = f" about {subject.replace('_', ' ')}" if subject else ""
    return f"The following are multiple choice questions{about}."


def question_block(item: Mapping, scheme: Scheme = "numbers", preset: Preset = "paper") -> str:
    """The question and its labelled options. The paper preset strips the question (as the reference
    does; its options keep their whitespace), cftray keeps it as given."""
    opts = item["options"]
    lines = [f"{lab}. {opt}" for lab, opt in zip(labels(len(opts), scheme), opts)]
    question = item["question"].strip() if preset == "paper" else item["question"]
    return f"Question: {question}\nOptions:\n" + "\n".join(lines)


def score_messages(item: Mapping, scheme: Scheme = "numbers", fallback: bool = False,
                   preset: Preset = "paper") -> list[dict]:
    """Step 1 prompt: the answer is the first generated token."""
    kind, _ = _kind(scheme)
    if preset == "paper":
        instr = (PAPER_FALLBACK if fallback else PAPER_ANSWER_ONLY).format(kind=kind, KIND=kind.upper())
    else:
        instr = ANSWER_ONLY.format(kind=kind) + (FALLBACK if fallback else "")
    return [
        {"role": "system", "content": f"{_system_head(item.get('subject'))} {instr}"},
        {"role": "user", "content": f"{question_block(item, scheme, preset)}\nChoose one of the answers. {instr}"},
    ]


def teacher_messages(item: Mapping, scheme: Scheme = "numbers", preset: Preset = "paper") -> list[dict]:
    """Step 3 prompt. The gold answer never enters it. The paper's user message ends with a newline."""
    kind, var = _kind(scheme)
    return [
        {"role": "system", "content": f"{_system_head(item.get('subject'))} " + COT_FORMAT.format(kind=kind, kind_var=f"{var}_of_correct_answer")},
        {"role": "user", "content": question_block(item, scheme, preset) + ("\n" if preset == "paper" else "")},
    ]


def direct_messages(item: Mapping, scheme: Scheme = "numbers", preset: Preset = "paper") -> list[dict]:
    """Step 4/5 prompt of direct-answer arms (no assistant turn)."""
    kind, var = _kind(scheme)
    return [
        {"role": "system", "content": f"{_system_head(item.get('subject'))} " + DIRECT_SYS.format(kind=kind, kind_var=var)},
        {"role": "user", "content": question_block(item, scheme, preset)},
    ]


def cot_messages(item: Mapping, scheme: Scheme = "numbers", preset: Preset = "paper") -> list[dict]:
    """Step 4/5 prompt of CoT-trained arms (no assistant turn)."""
    kind, var = _kind(scheme)
    return [
        {"role": "system", "content": f"{_system_head(item.get('subject'))} " + COT_SYS.format(kind=kind, kind_var=var)},
        {"role": "user", "content": question_block(item, scheme, preset)},
    ]


def messages(kind: str, item: Mapping, scheme: Scheme = "numbers", fallback: bool = False,
             preset: Preset = "paper") -> list[dict]:
    """The prompt of `kind`: score (step 1), teacher (step 3), direct / cot (steps 4-5)."""
    if kind == "score":
        return score_messages(item, scheme, fallback, preset)
    return {"teacher": teacher_messages, "direct": direct_messages, "cot": cot_messages}[kind](item, scheme, preset)


def example(row: Mapping, kind: str, scheme: Scheme = "numbers", preset: Preset = "paper") -> tuple[list[dict], str]:
    """(prompt messages, assistant target) of a supervised or teacher-forced example: the direct answer,
    the row's teacher CoT (`text`), or an instruction-data row's `instruction` -> `response`.
    Raises ValueError for a row that cannot make one (it becomes an error row, never a silent drop)."""
    if kind == "direct":
        return direct_messages(row, scheme, preset), marker(row["answer"], scheme)
    if kind == "cot":
        if not row.get("text"):
            raise ValueError("cot row without teacher text")
        return cot_messages(row, scheme, preset), row["text"]
    if kind == "instruction":
        if not row.get("instruction") or not row.get("response"):
            raise ValueError("instruction row without instruction or response text")
        return [{"role": "user", "content": row["instruction"]}], row["response"]
    raise ValueError(f"unknown treatment {kind!r}")


# Direct-prompt scoring reads the answer right after this assistant prefix (= the SFT target's head).
DIRECT_PREFIX = "[["
DIRECT_SUFFIX = "]]"


def marker(answer: int, scheme: Scheme = "numbers") -> str:
    """The SFT target of a direct example, and the required ending of a CoT text: '[[k]]'."""
    return f"[[{labels(answer + 1, scheme)[answer]}]]"


def label_to_index(label: str, n: int, scheme: Scheme = "numbers", fallback: bool = False) -> int | None:
    """'3' -> 2 (0-based); 0 under fallback -> -1 (= unknown); anything else -> None (invalid)."""
    label = label.strip()
    if scheme == "numbers":
        if not label.isdigit():
            return None
        k = int(label)
        if k == 0 and fallback:
            return -1
        return k - 1 if 1 <= k <= n else None
    label = label.upper()
    if fallback and label == "0":
        return -1
    return LETTERS.index(label) if len(label) == 1 and label in LETTERS[:n] else None


def parse_marker(text: str | None, n: int, scheme: Scheme = "numbers") -> int | None:
    """0-based answer from the LAST [[k]] in a generation; None if absent or not an option id."""
    if not text:
        return None
    found = MARKER.findall(text)
    return label_to_index(found[-1], n, scheme) if found else None


# Named chat templates (ModelConfig.chat_template). "plain" is for base models: the system and user text,
# then "Answer:"; an example's assistant text follows it and ends with the tokenizer's EOS.
TEMPLATES = {
    "plain": ("{% for m in messages %}{% if m['role'] == 'assistant' %}{{ 'Answer: ' + m['content'] + eos_token }}"
              "{% else %}{{ m['content'] + '\n\n' }}{% endif %}{% endfor %}"
              "{% if add_generation_prompt %}{{ 'Answer: ' }}{% endif %}"),
    "chatml": ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
               "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"),
}


def chat_template(spec: str) -> str:
    """The Jinja source of a chat_template setting: a named template, a .jinja file, or Jinja itself."""
    if spec in TEMPLATES:
        return TEMPLATES[spec]
    if "{{" in spec or "{%" in spec:
        return spec
    path = Path(spec).expanduser()
    if path.suffix == ".jinja" and path.is_file():
        return path.read_text()
    raise ValueError(f"chat_template {spec!r}: not one of {sorted(TEMPLATES)}, a .jinja file or a Jinja string")


def render(tokenizer, messages: Sequence[dict], assistant: str | None = None) -> str:
    """Chat-template text; with `assistant` the full example, else the prompt + generation header."""
    msgs = list(messages) + ([{"role": "assistant", "content": assistant}] if assistant is not None else [])
    return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=assistant is None)


def prompt_ids(tokenizer, messages: Sequence[dict]) -> list[int]:
    """The prompt's token ids as every backend feeds them (transformers and vLLM alike): the rendered
    chat text tokenized without the tokenizer's own special tokens, since the template already holds
    them (a BOS-adding tokenizer would put a second <|begin_of_text|> before Llama-3's)."""
    return tokenizer(render(tokenizer, messages), add_special_tokens=False)["input_ids"]
