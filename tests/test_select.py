"""InstructDiff: the response scorer against a direct computation, the selection rule on constructed
data, the arm rule, and the whole selector (two rounds: the second trains on the first's selection)."""
from __future__ import annotations

import math

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from cft_ray import metrics, prompts, store
from cft_ray.config import ConfigError, load_config
from cft_ray.arms import arm_treatment
from cft_ray.select import choose, respond, select_instructdiff
from cft_ray.train import IGNORE, template_tail, tokenize_examples


def test_length_normalised_nll_and_entropy_on_hand_built_logits():
    # 3 response positions over a 4-token vocabulary: uniform, one-hot-ish, two-way split
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0], [20.0, 0.0, 0.0, 0.0], [5.0, 5.0, -1e9, -1e9]])
    target = torch.tensor([2, 0, 1])
    h, nll = metrics.entropy(logits), metrics.nll(logits, target)
    assert h.mean().item() == pytest.approx((math.log(4) + 0 + math.log(2)) / 3, abs=1e-5)
    assert nll.mean().item() == pytest.approx((math.log(4) + 0 + math.log(2)) / 3, abs=1e-5)


def _rows(items):
    out = []
    for k, it in enumerate(items):
        out.append({**it, "text": f"Step {k}: think{' more' * k}. So [[{it['answer'] + 1}]]"})
    out.append({"item_id": "inst", "instruction": "Name a colour.", "response": "Blue, the colour of the sky."})
    return out


def _direct(model, tok, row, kind):
    """Unbatched, unpadded, full logits: the definition of the two scores."""
    pair = prompts.example(row, "instruction" if "instruction" in row else kind)
    ids, labels, _ = tokenize_examples(tok, [pair], 2048)[0]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0, :-1].float()
    tgt = torch.tensor(labels[1:])
    keep = tgt != IGNORE
    tail = template_tail(tok, [pair])[0]  # the template's end-of-turn tokens are not the response
    if tail:
        keep[torch.nonzero(keep).flatten()[-tail:]] = False
    logp = torch.log_softmax(logits[keep], -1)
    nll = -logp.gather(1, tgt[keep][:, None]).squeeze(1)
    h = -(logp.exp() * logp).sum(-1)
    return nll.mean().item(), h.mean().item(), int(keep.sum())


@pytest.mark.parametrize("kind", ["direct", "cot"])
def test_response_scorer_equals_direct_computation(ray_local, tiny_model_dir, items, kind):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    rows = _rows(items)
    rows[0].pop("text") if kind == "cot" else None  # a CoT row without text: an error row, not a crash
    # tiny budgets: several micro-batches of mixed lengths, left padding in every one
    cfg = load_config(None, [f"student.name={tiny_model_dir}", "student.dtype=float32", "select.token_budget=400",
                             "select.logit_tokens=64", "select.pool.batch_size=5"])
    mixed = [{**r, **{k: r.get(k) for k in ("question", "options", "answer", "subject", "text", "instruction", "response")}}
             for r in rows]
    got = {r["item_id"]: r for r in respond(ray_local.data.from_items(mixed, override_num_blocks=1), cfg, tiny_model_dir, kind).take_all()}
    assert set(got) == {r["item_id"] for r in rows}
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    for r in rows:
        g = got[r["item_id"]]
        if kind == "cot" and r["item_id"] == rows[0]["item_id"]:
            assert "teacher text" in g["error"] and g["nll"] is None
            continue
        nll, h, n = _direct(model, tok, r, kind)
        assert g["error"] is None and g["resp_tokens"] == n
        assert g["nll"] == pytest.approx(nll, abs=1e-4) and g["entropy"] == pytest.approx(h, abs=1e-4)


def test_choose_drops_dnll_tails_and_keeps_lowest_dh():
    n = 100
    ids = [f"i{k:03d}" for k in range(n)]
    dnll = np.arange(n, dtype=float)           # 0..99: the 10% tails are i000-i009 and i090-i099
    dh = np.where(np.arange(n) % 2 == 0, -1.0, 1.0) * np.arange(n) / 100  # even ids: negative dH
    dnll[50] = np.nan                          # unscored row: never selected, never counted in cuts
    reason, cuts = choose(ids, [10] * n, dnll, dh, gamma=0.1, beta=0.1)
    assert reason[50] == "unscored"
    assert all(reason[k] == "dnll_low" for k in range(0, 10)) and all(reason[k] == "dnll_high" for k in range(91, 100))
    sel = [k for k, r in enumerate(reason) if r == "selected"]
    assert len(sel) == 10  # beta of the whole pool, in items
    inside = [k for k in range(n) if reason[k] in ("selected", "over_budget")]
    assert max(dh[sel]) <= min(dh[[k for k in inside if k not in sel]])  # the lowest dH inside the cuts
    assert set(sel) == set(sorted(inside, key=lambda k: dh[k])[:10]) and all(k % 2 == 0 for k in sel)
    assert cuts["dnll_low"] <= 10 and cuts["dnll_high"] >= 89


def test_choose_token_budget_counts_response_tokens():
    ids = [f"i{k}" for k in range(10)]
    tokens = [100, 1, 1, 1, 1, 1, 1, 1, 1, 1]  # 109 tokens in the pool
    dh = np.arange(10, dtype=float)  # i0 has the lowest dH but is long
    reason, cuts = choose(ids, tokens, np.zeros(10), dh, gamma=0.0, beta=0.5, budget_by="tokens")
    assert cuts["budget"] == pytest.approx(54.5)
    assert reason[0] == "over_budget", "100 tokens do not fit a 54.5-token budget"
    items, _ = choose(ids, tokens, np.zeros(10), dh, gamma=0.0, beta=0.5, budget_by="items")
    assert items.count("selected") == 5 and items[0] == "selected"


def test_select_arms_train_only_their_rows():
    ids, split_tr = ["a", "b", "c", "v"], ["direct", "cot", "drop", "direct"]
    subsets = {"instructdiff": {"b", "v"}, "random_select": {"a", "v"}}
    assert arm_treatment("instructdiff", ids, split_tr, subsets) == ["drop", "direct", "drop", "direct"]
    assert arm_treatment("random_select", ids, split_tr, subsets, "cot") == ["cot", "drop", "drop", "cot"]
    with pytest.raises(ConfigError, match="selection"):
        load_config(None, ["arms=[base,instructdiff]"])
    assert load_config(None, ["selection=instructdiff", "arms=[base,instructdiff,random_select]"]).arms[-1] == "random_select"


@pytest.mark.heavy
def test_two_rounds_on_instruction_data(ray_local, tiny_model_dir, tmp_path):
    """General instruction data end to end: warm-up, two scoring passes per round, the selection; round 2
    trains on round 1's selection (its examples are exactly those ids) and re-scores under that model."""
    rows = [{"item_id": f"q{k:02d}", "instruction": f"Repeat the number {k} {'twice' if k % 3 else 'once'}.",
             "response": " ".join([str(k)] * (1 + k % 4))} for k in range(40)]
    rows.append({"item_id": "bad", "instruction": "No answer here.", "response": ""})  # no gold response
    cfg = load_config(None, [f"student.name={tiny_model_dir}", "student.dtype=float32", "train.num_workers=1",
                             "train.micro_batch=4", "train.precision=fp32", "train.lora_r=4", "train.lora_alpha=8",
                             "train.lr=5e-3", "train.checkpoint_every_steps=100", "train.pool.size=1",
                             "select.alpha=0.25", "select.beta=0.25", "select.iterations=2", "select.pool.batch_size=16"])
    out = str(tmp_path / "select")
    table, cuts, timings = select_instructdiff(ray_local.data.from_items(rows, override_num_blocks=1), cfg, out)
    reasons = table["reason"].to_pylist()
    assert table.num_rows == 41 and reasons.count("unscored") == 1  # rows in = scored + unscored, each once
    assert reasons.count("selected") == 10 and table["item_id"].to_pylist().count("q00") == 1
    assert [r["round"] for r in timings["rounds"]] == [1, 2] and timings["rounds"][0]["trained_on"] == 10
    first = pq.read_table(f"{out}/round-1/selection.parquet")
    picked1 = set(np.array(first["item_id"])[np.array(first["selected"])])
    trained2 = store.columns(f"{out}/round-2/train/examples", ["item_id", "error"])
    assert set(trained2["item_id"].to_pylist()) == picked1, "round 2 trains on round 1's selection"
    cal1, cal2 = (store.columns(f"{out}/round-{r}/scores", ["item_id", "nll"]).sort_by("item_id") for r in (1, 2))
    assert cal1["nll"].to_pylist() != cal2["nll"].to_pylist(), "round 2 scores under its own model"
    # a re-run finds every pass and every training run finished: same table
    again, _, _ = select_instructdiff(ray_local.data.from_items(rows, override_num_blocks=1), cfg, out)
    assert again.equals(table)


def test_response_tokens_are_the_answer_not_the_template(tiny_model_dir, items):
    """A direct answer "[[k]]" under ChatML is 3 tokens + "<|im_end|>" + newline: InstructDiff once scored
    all 5, so dNLL/dH mostly measured how well a model learned the template's closing tokens."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    pair = prompts.example(items[0], "direct")
    marker = tok(pair[1], add_special_tokens=False)["input_ids"]
    ids, labels, _ = tokenize_examples(tok, [pair], 2048)[0]
    turn = sum(x != IGNORE for x in labels[1:])
    assert template_tail(tok, [pair]) == [turn - len(marker)] and turn - len(marker) == 2
