"""Evaluate stage: direct (option-restricted argmax) vs generate (parse the last [[k]]) on a model
trained here to answer "[[k]]", accuracy bookkeeping, the eval engine's own resources. The arm recipes
and the random-routing subset are tests/test_arms.py."""
from __future__ import annotations

import math

import pandas as pd
import pyarrow as pa
import pytest
import torch

from cft_ray import arms, evaluate, prompts
from cft_ray.config import load_config
from cft_ray.data import ITEM_SCHEMA
from cft_ray.train import IGNORE, tokenize_examples
from conftest import build_tiny


def _items(n: int, options: int = 4) -> list[dict]:
    return [{"item_id": f"q{k}", "question": f"Which option is right for case {k * 7919 % 1000}?",
             "options": [f"choice {c}" for c in "abcdefghijklmnopqrst"[:options]], "answer": k % options,
             "subject": "logic", "category": "stem" if k % 2 else "other", "source": "test"} for k in range(n)]


@pytest.fixture(scope="module")
def marker_model(tmp_path_factory, smollm2_dir):
    """A tiny model fine-tuned here until it answers every item's gold "[[k]]" (direct prompt); 12
    options, so the golds include 10, 11 and 12 (whose first token is SmolLM2's "1")."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = build_tiny(tmp_path_factory.mktemp("marker"), smollm2_dir, layers=1)
    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    items = _items(12, options=12)
    enc = tokenize_examples(tok, [(prompts.direct_messages(it), prompts.marker(it["answer"])) for it in items], 1024)
    width = max(len(ids) for ids, _, _ in enc)
    ids = torch.tensor([[tok.pad_token_id] * (width - len(i)) + i for i, _, _ in enc])
    labels = torch.tensor([[IGNORE] * (width - len(lab)) + lab for _, lab, _ in enc])
    mask = (torch.arange(width)[None] >= torch.tensor([width - len(i) for i, _, _ in enc])[:, None]).long()
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    # Left padding puts every target at the end: the LM head runs on the last k positions only (10x faster).
    k = max(sum(1 for x in lab if x != IGNORE) for _, lab, _ in enc) + 1
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    torch.manual_seed(0)
    for _ in range(400):
        logits = model(input_ids=ids, attention_mask=mask, position_ids=pos, logits_to_keep=k).logits
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                 labels[:, 1 - k:].reshape(-1), ignore_index=IGNORE)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if loss.item() < 0.01:
            break
    model.save_pretrained(out, safe_serialization=True)
    return out, items, loss.item()


def _cfg(model_dir, mode):
    return load_config(None, [f"student.name={model_dir}", "student.dtype=float32", f"eval.mode={mode}", "arms=[base]",
                              "eval.backend=hf", "eval.max_new_tokens=12", "eval.pool.batch_size=8", "teach.hf_micro_batch=8"])


@pytest.mark.heavy
def test_direct_equals_generate_on_a_marker_trained_model(ray_local, marker_model):
    model_dir, items, final_loss = marker_model
    assert final_loss < 0.05, "the fixture must fit its answers, or the comparison says nothing"
    ds = ray_local.data.from_arrow(pa.Table.from_pylist(items, schema=ITEM_SCHEMA))
    got = {}
    for mode in ("direct", "generate"):
        df = evaluate.evaluate(ds, model_dir, _cfg(model_dir, mode), "direct", mode).to_pandas().set_index("item_id")
        got[mode] = df.sort_index()
        assert len(df) == len(items) and df["error"].isna().all()
    d, g = got["direct"], got["generate"]
    assert g["pred"].notna().all(), "generate mode parsed a [[k]] from every completion"
    assert (d["pred"] == g["pred"]).all() and (d["correct"] == g["correct"]).all()
    acc = d["correct"].mean()
    assert acc == g["correct"].mean() and acc > 0.9  # trained answers, not chance
    # gold 10..12: a first-token argmax reads "1" and can never pick them (issue 17, defect 4)
    assert d.loc[["q9", "q10", "q11"], "correct"].all(), d.loc[["q9", "q10", "q11"], ["pred", "text"]]
    assert (g["completion_tokens"] > 0).all() and g["text"].str.contains(r"\[\[").all()


@pytest.mark.heavy
def test_direct_mode_picks_the_label_with_the_likeliest_whole_answer(marker_model):
    """pred_options of the direct prompt = argmax over k of log P("k]]" | prompt + "[["), each computed here
    by a plain forward of the whole sequence (no cache): the scorer's cached, batched, row-copied version
    must agree, on the marker model's 12-option items (it answers 10..12 on some) and on items of 4 to 20
    options (labels 10..20 share their first token with 1 and 2)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cft_ray.config import ModelConfig
    from cft_ray.score import Scorer, prompt_args, prompt_text, prompt_tokens

    model_dir, trained, _ = marker_model
    cfg = load_config(None, ["score.token_budget=600"])  # several cache copies per micro-batch
    model = ModelConfig(name=model_dir, dtype="float32")
    scorer = Scorer(cfg, prompt="direct", model=model)
    more = [it | {"item_id": f"x{k}", "options": (it["options"] * 5)[:n], "answer": 0}
            for k, (it, n) in enumerate(zip(_items(7), (4, 9, 10, 15, 20, 19, 13)))]
    items = trained + more
    got = scorer(prompt_tokens(pa.Table.from_pylist(items, schema=ITEM_SCHEMA), **prompt_args(cfg, "direct", model))).to_pylist()
    tok = AutoTokenizer.from_pretrained(model_dir)
    ref_model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    picks = []
    for it, row in zip(items, got):
        head = tok(prompt_text(tok, it, "direct", "numbers", False), add_special_tokens=False).input_ids
        lps = []
        for lab in prompts.labels(len(it["options"])):
            ids = tok(prompt_text(tok, it, "direct", "numbers", False) + lab + "]]", add_special_tokens=False).input_ids
            with torch.no_grad():
                lp = torch.log_softmax(ref_model(torch.tensor([ids])).logits[0].float(), -1)
            lps.append(sum(lp[t - 1, ids[t]].item() for t in range(len(head), len(ids))))
        picks.append(max(range(len(lps)), key=lps.__getitem__))
        assert row["error"] is None
    assert [r["pred_options"] for r in got] == picks
    assert any(p >= 9 for p in picks), "some pick must be a label >= 10, or labels 10..20 go untested"


def test_accuracy_stderr_parse_failures_and_groups():
    df = pd.DataFrame({"correct": [True, False, True, True, False], "pred": [1, None, 2, 0, 3],
                       "bucket": ["easy", "easy", "hard", "hard", "hard"], "category": ["a"] * 5,
                       "subject": ["s", "s", "s", None, None]})
    m = evaluate.accuracy(df)
    assert m["n"] == 5 and m["accuracy"] == pytest.approx(0.6)
    assert m["stderr"] == pytest.approx(math.sqrt(0.6 * 0.4 / 5))
    assert m["parse_failures"] == 1 and m["parse_failure_rate"] == pytest.approx(0.2)
    assert m["by_bucket"]["easy"]["accuracy"] == 0.5 and m["by_bucket"]["hard"]["n"] == 3
    assert m["by_subject"]["<none>"]["n"] == 2


def test_arm_prompt_and_teacher_coverage():
    from cft_ray.arms import teacher_coverage

    cfg = load_config(None, ["arms=[base,caft,sft]"])
    assert arms.prompt_kind(cfg, "caft") == "cot" and arms.prompt_kind(cfg, "sft") == "direct"
    assert teacher_coverage(cfg.arms) == {"routed"} and arms.needs_teacher(cfg)
    no_cot = load_config(None, ["arms=[base,caft]", "split.routing={easy: direct, medium: direct, hard: direct}"])
    assert not arms.needs_teacher(no_cot) and arms.prompt_kind(no_cot, "caft") == "direct"
    assert teacher_coverage(["caft", "distill", "random_routing"]) == {"all"}
    assert teacher_coverage(["caft", "random_routing"]) == {"routed", "random"}
    assert teacher_coverage(["base", "sft", "curriculum"]) == set()


def test_eval_engine_of_the_paper_config_asks_for_the_students_resources():
    """The paper config's teacher is a 72B model on 4 L40S GPUs per engine; evaluating a 3B student must
    not inherit that (the eval engines once were built from the teacher's section): one GPU per engine,
    the eval pool's size and batch, the eval section's engine arguments. No GPU needed: the processor
    config is inspected, not run."""
    from pathlib import Path

    from cft_ray.generate import vllm_processor_config
    from cft_ray.teach import teacher_spec

    cfg = load_config(Path(__file__).resolve().parents[1] / "jobs/configs/mmlu_pro_qwen3b.yaml")
    spec = evaluate.eval_spec(cfg, "/models/trained-caft", "cot")
    assert spec.model.name == "/models/trained-caft" and spec.model.dtype == cfg.student.dtype and spec.prompt == "cot"
    got = vllm_processor_config(spec, path="/models/trained-caft").model_dump()
    assert got["engine_kwargs"]["tensor_parallel_size"] == cfg.eval.tensor_parallel_size == 1
    assert got["accelerator_type"] is None and got["concurrency"] == (1, 4) and got["batch_size"] == 256
    assert got["placement_group_config"]["bundles"] == [{"CPU": 1.0, "GPU": 1.0, "infer_node": 1.0}]
    assert {k: got["engine_kwargs"][k] for k in cfg.eval.engine_kwargs} == cfg.eval.engine_kwargs
    assert got["engine_kwargs"]["seed"] == cfg.eval.seed
    teacher = vllm_processor_config(teacher_spec(cfg), path="/models/teacher").model_dump()
    assert teacher["engine_kwargs"]["tensor_parallel_size"] == 4 and teacher["accelerator_type"] == "L40S"
    assert len(teacher["placement_group_config"]["bundles"]) == 4  # the teacher keeps its own
