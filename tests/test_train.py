"""Train stage: label masks per chat template, packing, Ray Data example building, and real Ray Train
+ DeepSpeed runs on a tiny model (ZeRO-2 LoRA; ZeRO-3 full runs in test_pipeline.py; a killed worker in
tests/reliability/test_killed_train_worker.py)."""
from __future__ import annotations

import glob
import json

import pyarrow as pa
import pytest
import torch

from cft_ray import prompts
from cft_ray.config import ConfigError, TrainConfig, load_config
from cft_ray.train import IGNORE, build_examples, pack, phase_datasets, resolve_phases, tokenize_examples
from conftest import LLAMA3_TEMPLATE, PAPER_STUDENTS, QWEN_TEMPLATE, TEMPLATES, build_tiny

BUCKETS = ["easy", "medium", "hard"]


def routed_rows(n: int = 48) -> list[dict]:
    """Hand-made output of the split stage: 3 buckets, 1 in 8 rows for validation, hard -> cot."""
    rows = []
    for k in range(n):
        b = BUCKETS[k % 3]
        rows.append({"item_id": f"i{k}", "question": f"What is {k} + {k}?", "options": [str(2 * k + d) for d in (-1, 0, 1, 2)],
                     "answer": 1, "subject": "elementary_mathematics", "category": "math", "bucket": b,
                     "bucket_idx": k % 3, "split": "valid" if k % 8 == 7 else "train",
                     "treatment": "cot" if b == "hard" else "direct"})
    return rows


def teacher_cot(rows: list[dict]) -> list[dict]:
    return [{"item_id": r["item_id"], "text": f"{r['question']} Doubling {r['question'].split()[2]} gives option 2. [[2]]"}
            for r in rows if r["treatment"] == "cot"]


@pytest.fixture(scope="module")
def template_dirs(tmp_path_factory, smollm2_dir, tiny_model_dir):
    root = tmp_path_factory.mktemp("templates")
    return {"smollm2": smollm2_dir, "tiny-chatml": tiny_model_dir,
            "qwen": build_tiny(root / "qwen", smollm2_dir, QWEN_TEMPLATE, layers=1),
            "llama3": build_tiny(root / "llama3", smollm2_dir, LLAMA3_TEMPLATE, layers=1),
            **{name: build_tiny(root / name, smollm2_dir, (TEMPLATES / f).read_text(), layers=1, special=sp)
               for name, (f, sp) in PAPER_STUDENTS.items()}}


@pytest.mark.parametrize("template", ["smollm2", "tiny-chatml", "qwen", "llama3", *PAPER_STUDENTS])
def test_label_mask_is_the_assistant_turn(template, template_dirs, items):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(template_dirs[template])
    pairs = [(prompts.direct_messages(it), prompts.marker(it["answer"])) for it in items]
    pairs += [(prompts.cot_messages(it), f"Step by step: option {it['answer'] + 1} is right. [[{it['answer'] + 1}]]") for it in items]
    for (msgs, target), (ids, labels, truncated) in zip(pairs, tokenize_examples(tok, pairs, max_length=4096)):
        trained = [i for i, x in enumerate(labels) if x != IGNORE]
        assert trained and not truncated
        first = trained[0]
        assert trained == list(range(first, len(ids))), "the trained span is the contiguous end of the example"
        assert [labels[i] for i in trained] == ids[first:]
        assert tok.decode(ids[:first]) == prompts.render(tok, msgs), "everything before the span is the prompt"
        assert tok.decode(ids[first:]).startswith(target), "the span starts with the assistant text"
    # all-token loss (the paper's setting) trains the prompt too
    ids, labels, _ = tokenize_examples(tok, pairs[:1], max_length=4096, loss_on="all")[0]
    assert labels == ids


def test_truncation_policies(tiny_model_dir, items):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    pair = [(prompts.cot_messages(items[0]), "Because 0 + 0 = 0. " * 10 + "[[2]]")]
    full, labels, _ = tokenize_examples(tok, pair, max_length=4096)[0]
    n = len(full) - 20
    ids, lab, trunc = tokenize_examples(tok, pair, max_length=n, truncation="keep_end")[0]
    assert trunc and ids == full[-n:] and lab == labels[-n:]
    ids, lab, trunc = tokenize_examples(tok, pair, max_length=n, truncation="keep_start")[0]
    assert trunc and ids == full[:n]
    assert "max_length" in str(tokenize_examples(tok, pair, max_length=n, truncation="drop")[0])
    # keeping the start of a long prompt leaves no answer token: an error, not a zero-loss row
    err = tokenize_examples(tok, pair, max_length=10, truncation="keep_start")[0]
    assert isinstance(err, ValueError) and "no trainable token" in str(err)


def test_packed_rows_train_like_separate_rows(tiny_model_dir, items):
    """Packing is lossless: the summed token loss of a packed sequence equals that of its rows run alone
    (position resets give a block-diagonal mask; each row's first label is masked)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    pairs = [(prompts.direct_messages(it), prompts.marker(it["answer"])) for it in items[:5]]
    res = tokenize_examples(tok, pairs, max_length=4096)
    t = pa.table({"input_ids": [r[0] for r in res], "labels": [r[1] for r in res],
                  "n_tokens": [len(r[0]) for r in res], "n_target": [sum(x != IGNORE for x in r[1][1:]) for r in res]})
    packed = pack(t, max_length=3 * max(len(r[0]) for r in res))
    assert sum(packed["n_rows"].to_pylist()) == 5 and packed.num_rows < 5
    assert sum(packed["n_target"].to_pylist()) == sum(t["n_target"].to_pylist())

    def summed_loss(ids, labels, pos=None):
        with torch.no_grad():
            kw = {"position_ids": torch.tensor([pos])} if pos is not None else {}
            return model(input_ids=torch.tensor([ids]), labels=torch.tensor([labels]), num_items_in_batch=1,
                         use_cache=False, **kw).loss.item()

    alone = sum(summed_loss(r[0], r[1]) for r in res)
    together = sum(summed_loss(*row) for row in zip(*(packed[c].to_pylist() for c in ("input_ids", "labels", "position_ids"))))
    assert together == pytest.approx(alone, rel=1e-6)


def test_loss_on_kept_logits_equals_transformers_summed_loss(tiny_model_dir, items):
    """train_loop.summed_loss applies the LM head at supervised positions only: same value as transformers'
    loss over every position, on a right-padded batch of short direct and long CoT rows and on packed rows."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cft_ray.train_loop import collate, summed_loss

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    pairs = [(prompts.direct_messages(it), prompts.marker(it["answer"])) for it in items[:3]]
    pairs += [(prompts.cot_messages(it), "Step by step, the answer follows. " * 4 + prompts.marker(it["answer"]))
              for it in items[3:5]]
    res = tokenize_examples(tok, pairs, max_length=4096)
    t = pa.table({"input_ids": [r[0] for r in res], "labels": [r[1] for r in res],
                  "n_tokens": [len(r[0]) for r in res], "n_target": [sum(x != IGNORE for x in r[1][1:]) for r in res]})
    packed = pack(t, max_length=2 * max(len(r[0]) for r in res))
    for table in (t, packed):
        batch = collate({c: table[c].to_pylist() for c in table.column_names}, tok.pad_token_id)
        inputs = {k: v for k, v in batch.items() if torch.is_tensor(v)}
        with torch.no_grad():
            want = model(**inputs, num_items_in_batch=1, use_cache=False).loss.item()
            got = summed_loss(model, batch, "cpu").item()
        assert got == pytest.approx(want, rel=1e-5)
        assert want > 0 and batch["n_target"] == int((batch["labels"][:, 1:] != IGNORE).sum())


def test_schedules():
    cfg = load_config(None, ["train.schedule=curriculum"])
    assert [p.buckets for p in resolve_phases(cfg.train, BUCKETS)] == [["easy"], ["medium"], ["hard"]]
    assert [p.treatments for p in resolve_phases(load_config().train, BUCKETS)] == [["direct"], ["cot"]]
    assert [p.treatments for p in resolve_phases(load_config(None, ["train.schedule=merged"]).train, BUCKETS)] == [["direct", "cot"]]
    custom = load_config(None, ['train.schedule=custom', 'train.phases=[{name: h, treatments: [cot], buckets: [hard], epochs: 2}]'])
    assert resolve_phases(custom.train, BUCKETS)[0].epochs == 2


def test_build_examples_keeps_errors(ray_local, tiny_model_dir):
    rows = routed_rows(12)
    rows[0]["treatment"] = "drop"
    cot = teacher_cot(rows)[1:]  # the first hard row gets no teacher text
    cfg = load_config(None, [f"student.name={tiny_model_dir}", "train.pool.size=1"])
    ex = build_examples(ray_local.data.from_items(rows, override_num_blocks=1), ray_local.data.from_items(cot, override_num_blocks=1), cfg).to_pandas()
    assert len(ex) == 11  # the dropped row makes no example, every other row is there
    bad = ex[ex.error.notna()]
    assert list(bad.item_id) == ["i2"] and "teacher text" in bad.error.iloc[0]
    good = ex[ex.error.isna()]
    assert set(good.kind) == {"direct", "cot"} and (good.n_target > 0).all()
    assert (good.n_tokens == good.input_ids.map(len)).all()
    assert set(good[good.kind == "cot"].bucket) == {"hard"}


def test_small_cot_joined_per_block_equals_the_hash_join(ray_local, tiny_model_dir):
    """Teacher CoT up to train.cot_broadcast_rows is joined per block on the driver's copy; above it, Ray Data's
    hash join. Both give the same examples (items without teacher text included); a CoT table with two rows
    for one item is refused rather than silently taking one."""
    rows = routed_rows(24)
    cot = teacher_cot(rows)[1:]
    built = {}
    for limit in (100_000, 0):
        cfg = load_config(None, [f"student.name={tiny_model_dir}", "train.pool.size=1", f"train.cot_broadcast_rows={limit}"])
        ex = build_examples(ray_local.data.from_items(rows, override_num_blocks=3), ray_local.data.from_items(cot, override_num_blocks=2), cfg)
        built[limit] = ex.to_pandas().sort_values("item_id").reset_index(drop=True)
    small, hashed = built[100_000], built[0]
    assert len(small) == 24 and small.error.notna().sum() == 1
    assert small.drop(columns=["input_ids", "labels"]).equals(hashed.drop(columns=["input_ids", "labels"]))
    assert all(list(a) == list(b) for a, b in zip(small.input_ids, hashed.input_ids))
    assert all(list(a) == list(b) for a, b in zip(small.labels, hashed.labels))
    cfg = load_config(None, [f"student.name={tiny_model_dir}", "train.pool.size=1"])
    with pytest.raises(ValueError, match="more than one row for an item id"):
        build_examples(ray_local.data.from_items(rows), ray_local.data.from_items(cot + cot[:1]), cfg)


def test_data_spent_counts_answer_tokens_whatever_loss_on(ray_local, tiny_model_dir):
    """loss_on=all (the paper's) trains prompt tokens too; data spent, the paper's measure, counts the
    answer tokens only, so it is the same under both settings (it once counted every trained token)."""
    rows = routed_rows(24)
    spent = {}
    for loss_on in ("assistant", "all"):
        cfg = load_config(None, [f"student.name={tiny_model_dir}", "train.pool.size=1", f"train.loss_on={loss_on}",
                                 "train.micro_batch=2", "train.num_workers=1"])
        ex = build_examples(ray_local.data.from_items(rows, override_num_blocks=1), ray_local.data.from_items(teacher_cot(rows), override_num_blocks=1), cfg)
        phases, _, _ = phase_datasets(ex, cfg)
        spent[loss_on] = [(p["target_tokens_per_epoch"], p["trained_tokens_per_epoch"], p["data_spent_target_tokens"])
                          for p in phases]
    assert [s[0] for s in spent["all"]] == [s[0] for s in spent["assistant"]] and all(s[0] > 0 for s in spent["all"])
    assert [s[2] for s in spent["all"]] == [s[2] for s in spent["assistant"]]
    assert all(s[1] > 3 * s[0] for s in spent["all"]) and all(s[1] == s[0] for s in spent["assistant"])


def test_no_phase_with_a_full_batch_fails_in_one_line_with_the_counts(ray_local, tiny_model_dir):
    """CoT rows without teacher text are unusable examples; the direct rows left are fewer than one global batch."""
    rows = routed_rows(12)
    cfg = load_config(None, [f"student.name={tiny_model_dir}", "train.pool.size=1", "train.micro_batch=8", "train.num_workers=2"])
    cot = [{**c, "text": None} for c in teacher_cot(rows)]
    ex = build_examples(ray_local.data.from_items(rows, override_num_blocks=1), ray_local.data.from_items(cot, override_num_blocks=1), cfg)
    with pytest.raises(ConfigError) as e:
        phase_datasets(ex, cfg)
    msg = str(e.value)
    n_direct = sum(r["treatment"] == "direct" and r["split"] == "train" for r in rows)
    assert "\n" not in msg and msg.startswith("train: no phase has one global batch of 16 rows (direct: ")
    assert f"direct: {n_direct} rows, cot: 0 rows" in msg and "cot row without teacher text" in msg, msg


# --- real training runs ------------------------------------------------------------------------

RUN = ["train.micro_batch=2", "train.epochs=3", "train.lr=2e-3", "train.checkpoint_every_steps=5",
       "train.lora_r=8", "train.lora_alpha=16", "train.precision=fp32", "train.zero_stage=2", "train.max_failures=2"]


def _train(ray, model_dir, out, extra=(), rows=None):
    from cft_ray.train import train

    rows = rows or routed_rows()
    cfg = load_config(None, [f"student.name={model_dir}", "train.pool.size=1", *RUN, *extra])
    ex = build_examples(ray.data.from_items(rows, override_num_blocks=1), ray.data.from_items(teacher_cot(rows), override_num_blocks=1), cfg)
    model = train(ex, cfg, str(out))
    return model, json.loads((out / "train_manifest.json").read_text())


@pytest.mark.heavy
def test_loss_is_the_token_mean_whatever_the_worker_x_accumulation_layout(ray_local, tiny_model_dir, tmp_path, monkeypatch):
    """One epoch over 32 examples at a negligible learning rate on 2 workers x 2 accumulation steps of
    2 rows: the steps' losses, weighted by their target tokens, must equal the initial model's mean loss
    per supervised token over all 32 examples, computed here in one process, which no layout changes
    (a per-micro-batch or per-worker mean, or a row lost or repeated by the sharding, would not).
    One layout only: each Ray Train run costs ~80 s here."""
    from transformers import AutoModelForCausalLM

    rows = routed_rows(36)  # 32 train rows: an effective batch of 8 divides them under both layouts
    cfg = load_config(None, [f"student.name={tiny_model_dir}"])
    ex = [e for e in build_examples(ray_local.data.from_items(rows, override_num_blocks=1), ray_local.data.from_items(teacher_cot(rows), override_num_blocks=1), cfg)
          .take_all() if e["split"] == "train"]
    assert len(ex) == 32
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    total = n = 0
    with torch.no_grad():
        for e in ex:
            logits = model(input_ids=torch.tensor([e["input_ids"]])).logits[0, :-1]
            lab = torch.tensor(e["labels"][1:])
            total += torch.nn.functional.cross_entropy(logits, lab, ignore_index=IGNORE, reduction="sum").item()
            n += int((lab != IGNORE).sum())
    want = total / n
    # the workers get the driver's TORCH_EXTENSIONS_DIR: CPU training must not JIT-build DeepSpeed's shm all-reduce
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "torch_extensions"))
    for workers, accum in ((2, 2),):
        _, m = _train(ray_local, tiny_model_dir, tmp_path / f"w{workers}", [
            "train.schedule=merged", "train.epochs=1", "train.lr=1e-12",
            f"train.num_workers={workers}", f"train.grad_accum={accum}", "train.micro_batch=2"], rows=rows)
        curve = m["loss_curve"]
        assert len(curve) == 4 and sum(h["target_tokens"] for h in curve) == n, (workers, accum)
        got = sum(h["loss"] * h["target_tokens"] for h in curve) / n
        assert got == pytest.approx(want, rel=1e-4), (workers, accum)
    assert not (tmp_path / "torch_extensions" / "deepspeed_shm_comm").exists()


@pytest.mark.heavy
def test_lora_zero2_two_workers(lora_run):
    out, model_dir, m = lora_run
    assert m["num_workers"] == 2 and m["zero_stage"] == 2
    assert m["steps"] == sum(p["steps"] for p in m["phases"]) == len(m["loss_curve"]) == 30
    direct = [h["loss"] for h in m["loss_curve"] if h["phase"] == "direct"]
    assert sum(direct[-3:]) / 3 < sum(direct[:3]) / 3 - 0.2, "loss goes down"
    p = m["phases"][0]
    assert p["data_spent_target_tokens"] == 3 * p["target_tokens_per_epoch"] > 0
    assert m["data_spent_target_tokens"] == sum(q["data_spent_target_tokens"] for q in m["phases"])
    assert m["tokens_per_s"] > 0 and p["valid_loss"] is not None
    assert [c["step"] for c in m["checkpoints"]] == [5, 10, 15, 20, 25]
    # no train.peak_tflops: the CPU workers probe their matmul rate, so the MFU is there and below 1
    assert m["peak_source"].startswith("probe: 512^3 fp32 matmul") and m["peak_tflops_per_worker"] > 0
    assert 0 < m["mfu"] < 1
    prof = m["step_profile"]  # shares of rank 0's step time: every part measured, together the whole
    assert set(prof) == {"data", "forward", "backward", "optimizer", "other"} and sum(prof.values()) == pytest.approx(1, abs=1e-3)
    assert all(prof[k] > 0 for k in ("forward", "backward", "optimizer")) and prof["other"] > -1e-3


def test_device_peak_from_config_probe_and_gpu_table():
    from cft_ray.train_loop import GPU_PEAK_TFLOPS, device_peak

    cpu = torch.device("cpu")
    assert device_peak(TrainConfig(peak_tflops=3.5), cpu) == (3.5, "config")
    peak, source = device_peak(TrainConfig(precision="fp32"), cpu)
    assert 0 < peak < 50 and source.startswith("probe")  # a CPU core does < 50 TFLOP/s
    # the table matches the longest names first: an L40S is not an L4
    assert next(k for k in GPU_PEAK_TFLOPS if k in "nvidia l40s") == "l40s"


@pytest.mark.heavy
def test_export_loads_generates_and_merge_equals_adapter(lora_run, tiny_model_dir):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, model_dir, _ = lora_run
    assert glob.glob(f"{model_dir}/*.safetensors") and not glob.glob(f"{model_dir}/*.bin")
    tok = AutoTokenizer.from_pretrained(model_dir)
    merged = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    x = tok(prompts.render(tok, prompts.direct_messages(routed_rows(1)[0])), return_tensors="pt")
    gen = merged.generate(**x, max_new_tokens=4, do_sample=False)
    assert gen.shape[1] == x["input_ids"].shape[1] + 4
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    adapted = PeftModel.from_pretrained(base, str(out / "adapter")).eval()
    with torch.no_grad():
        a, b = adapted(**x).logits, merged(**x).logits
        untrained = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)(**x).logits
    assert torch.allclose(a, b, atol=1e-4)
    assert not torch.allclose(a, untrained, atol=1e-3), "training changed the model"


def test_valid_micro_batches_cross_block_boundaries_in_order(ray_local):
    """A rank's valid rows arrive as Arrow blocks of any size; the micro-batches are full-size across block
    boundaries (every rank runs as many batches as its peers) and keep every row once, in order."""
    import ray

    from cft_ray.train_loop import _micro_batches

    refs = [ray.put(pa.table({"i": list(range(a, b))})) for a, b in ((0, 3), (3, 8), (8, 9))]
    batches = list(_micro_batches(refs, 4))
    assert [b.num_rows for b in batches] == [4, 4, 1]
    assert [i for b in batches for i in b["i"].to_pylist()] == list(range(9))
