"""The warm-up stage (warmup.source): direct-answer SFT of the student on items of its own before scoring,
leaving out any item that shares content with the run's items, and every later stage's student is its model."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from cft_ray import data, pipeline, preflight, store, warmup
from cft_ray.config import ConfigError, load_config
from cft_ray.layout import stage_dir


def _items(prefix: str, n: int, offset: int = 0) -> list[dict]:
    return [{"item_id": f"{prefix}{k}", "question": f"What is {k + offset} + 1?", "options": [str(k + offset + d) for d in range(4)],
             "answer": 1, "subject": "arithmetic"} for k in range(n)]


@pytest.mark.heavy
def test_warmup_trains_on_its_own_items_and_later_stages_use_its_model(ray_local, base_model_dir, tmp_path):
    """On a base model (no chat template) in the plain format: the training path's examples, and the template
    travelling with the trained model, are checked here too."""
    from transformers import AutoTokenizer

    run_items = _items("r", 12)
    # 16 warm-up items: 3 are run items under other ids (same question and options), 13 are new
    warm_items = _items("w", 3) + _items("w-new", 13, offset=100)
    for name, rows in (("run.jsonl", run_items), ("warm.jsonl", warm_items)):
        (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = load_config(None, [f"run_dir={tmp_path}/run", f"data.source={tmp_path}/run.jsonl", f"student.name={base_model_dir}",
                             "student.chat_template=plain", f"warmup.source={tmp_path}/warm.jsonl", "warmup.method=lora", "warmup.lr=1e-2", "warmup.epochs=2", "score.prompt=direct",
                             "train.num_workers=1", "train.micro_batch=4", "train.lora_r=4", "train.lora_alpha=8",
                             "train.precision=fp32", "train.max_length=256", "teach.max_tokens=64", "train.pool.size=1", "train.checkpoint_every_steps=100"])
    assert pipeline.needed(cfg)[:3] == ["data", "warmup", "score"]
    preflight.check_config(cfg, pipeline.needed(cfg))
    data.main(cfg)
    out = warmup.main(cfg)
    assert out == stage_dir(cfg, "warmup")
    m = store.read_json(store.join(out, "manifest.json"))
    c = m["counts"]
    assert (c["warmup_items"], c["shared_with_run"], c["rows_in"], c["examples"], c["errors"]) == (16, 3, 13, 13, 0)
    trained = set(store.columns(store.join(out, "examples"), ["item_id"])["item_id"].to_pylist())
    assert trained == {data.content_id(r["question"], r["options"]) for r in warm_items[3:]}  # the run's content never trains here
    tm = store.read_json(store.join(out, "train_manifest.json"))
    assert tm["method"] == "lora" and tm["steps"] == 6 and [p["name"] for p in tm["phases"]] == ["merged"]  # 13 rows // 4 x 2 epochs
    ex = store.columns(store.join(out, "examples"), ["input_ids"])["input_ids"][0].as_py()
    text = AutoTokenizer.from_pretrained(base_model_dir).decode(ex)
    assert "Answer: [[" in text and "<|im_start|>" not in text, text[-200:]  # the plain format, not a chat
    trained = AutoTokenizer.from_pretrained(store.join(out, "model"))
    assert trained.chat_template and "Answer: " in trained.chat_template  # the template travels with the model
    before = load_file(f"{base_model_dir}/model.safetensors")
    after = load_file(store.join(out, "model", "model.safetensors"))
    assert any(not torch.equal(before[k], after[k]) for k in before)  # LoRA merged into the weights
    # every stage after it runs with the warmed model; the data stage and the warm-up itself with the configured one
    assert warmup.stage_config(cfg, "score").student.name == store.join(out, "model")
    assert warmup.stage_config(cfg, "data").student.name == base_model_dir
    no_warm = cfg.model_copy(update={"warmup": cfg.warmup.model_copy(update={"source": None})})
    dirs, plain = pipeline.stage_dirs(cfg), pipeline.stage_dirs(no_warm)
    assert dirs["data"] == plain["data"] and dirs["score"] != plain["score"] and dirs["split"] != plain["split"]
    assert warmup.main(cfg) == out  # finished: skipped


def test_warm_up_items_that_are_all_run_items_fail_in_one_line(ray_local, base_model_dir, tmp_path):
    """The run's own source as warm-up source (same seed, same sample): nothing left, said before any training."""
    (tmp_path / "run.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _items("r", 6)))
    cfg = load_config(None, [f"run_dir={tmp_path}/run", f"data.source={tmp_path}/run.jsonl", f"student.name={base_model_dir}",
                             f"warmup.source={tmp_path}/run.jsonl", "score.prompt=direct"])
    data.main(cfg)
    with pytest.raises(ConfigError, match=r"warmup.source: all 6 warm-up items from .* are also items of the run"):
        warmup.main(cfg)


def test_a_warmed_student_read_under_the_score_prompt_is_refused_naming_the_field(tmp_path):
    """The warm-up teaches '[[k]]'; the score prompt reads the first answer token, '[[' for every item (measured on
    a chained-arithmetic pool: 1,537 of 1,537 invalid, and the split then had nothing to bucket)."""
    with pytest.raises(ConfigError, match=r"score.prompt: .*set score.prompt=direct"):
        load_config(None, [f"run_dir={tmp_path}/run", "warmup.source=embedded:chains-warmup"])
    assert load_config(None, [f"run_dir={tmp_path}/run", "warmup.source=embedded:chains-warmup", "score.prompt=direct"])
