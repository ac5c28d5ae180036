"""A base model (no chat template): with `student.chat_template=plain` the whole chain scores, trains
and evaluates it; without the option the CLI fails on the driver, before Ray starts, in one line."""
from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import build_tiny


@pytest.fixture(scope="module")
def base_model_dir(tmp_path_factory, smollm2_dir):
    from transformers import AutoTokenizer

    d = build_tiny(tmp_path_factory.mktemp("base"), smollm2_dir, layers=1)
    tok = AutoTokenizer.from_pretrained(d)
    tok.chat_template = None
    for f in tmp_path_factory.getbasetemp().glob("base*/chat_template.jinja"):
        f.unlink()
    tok.save_pretrained(d)
    assert not getattr(AutoTokenizer.from_pretrained(d), "chat_template", None), "the fixture must have no template"
    return d


def test_without_a_template_the_cli_fails_in_one_line_before_ray(base_model_dir, tmp_path):
    """Decided from the model directory's files before the CLI imports torch, transformers or Ray: that is
    what makes it fast (~1 s idle here, README), and it is checked here by the import log, not a timer."""
    res = subprocess.run([sys.executable, "-X", "importtime", "-m", "cft_ray.cli", "score",
                          f"student.name={base_model_dir}", f"run_dir={tmp_path}/run"],
                         capture_output=True, text=True, timeout=120)
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and lines, res.stderr[-2000:]
    assert lines[-1].startswith("cft-ray: ") and "has no chat template" in lines[-1] and "student.chat_template" in lines[-1]
    imported = {ln.rsplit("|", 1)[-1].strip() for ln in lines if ln.startswith("import time:")}
    assert "cft_ray.config" in imported, "the import log must be read"
    assert not imported & {"torch", "transformers", "ray", "scipy"}, sorted(imported & {"torch", "transformers", "ray", "scipy"})
    assert "Traceback" not in res.stderr and "Started a local Ray" not in res.stderr + res.stdout


def test_the_option_passes_the_fast_check_and_a_bad_spec_fails_it(base_model_dir, tiny_model_dir):
    from cft_ray import models
    from cft_ray.config import ConfigError, ModelConfig

    models.check_template_files(ModelConfig(name=str(tiny_model_dir)))  # ships its template

    models.check_template_files(ModelConfig(name=str(base_model_dir), chat_template="plain"))
    with pytest.raises(ConfigError, match="chat_template 'nosuch'"):
        models.check_template_files(ModelConfig(name=str(base_model_dir), chat_template="nosuch"))
    with pytest.raises(ConfigError, match="has no chat template"):
        models.check_template_files(ModelConfig(name=str(base_model_dir)))


@pytest.mark.heavy
def test_plain_format_warms_up_scores_and_evaluates_a_base_model(ray_local, base_model_dir, tmp_path):
    """The whole chain on a model without a chat template: a warm-up (Ray Train, the arms' training path) trains it
    in the plain "Answer: [[k]]" format, the warmed model carries that format as its template, and it is scored and
    evaluated in it. One training run: the arms train through the same code (tests/test_train.py, test_pipeline.py).
    (The chain with the run dir and the models on an object store: tests/test_pipeline.py.)"""
    import pyarrow.parquet as pq
    from transformers import AutoTokenizer

    from cft_ray import pipeline, store, warmup
    from cft_ray.config import load_config

    run_dir = str(tmp_path / "run")
    cfg = load_config(None, [f"run_dir={run_dir}", "data.limit=40", f"student.name={base_model_dir}", "student.dtype=float32",
                             "student.chat_template=plain", "split.exclude=[]", "split.test_fraction=0.25", "arms=[base]",
                             "warmup.source=embedded:arith-warmup", "warmup.limit=16", "warmup.method=lora", "score.prompt=direct",
                             "eval.mode=direct", "train.num_workers=1", "train.micro_batch=4", "train.lora_r=4",
                             "train.lora_alpha=8", "train.precision=fp32", "train.max_length=512", "train.pool.size=1"])
    assert pipeline.main(cfg) == f"{run_dir}/report/report.md" and store.exists(f"{run_dir}/report/report.md")
    arms = store.read_json(f"{run_dir}/arms.json")
    assert list(arms) == ["base"] and arms["base"]["sets"]["test"]["n"] > 0
    warm = pipeline.stage_dirs(cfg)["warmup"]
    ex = pq.read_table(f"{warm}/examples", columns=["input_ids"]).slice(0, 1).to_pylist()[0]
    text = AutoTokenizer.from_pretrained(base_model_dir).decode(ex["input_ids"])
    assert "Answer: [[" in text and "<|im_start|>" not in text, text[-200:]  # the plain format, not a chat
    trained = AutoTokenizer.from_pretrained(f"{warm}/model")
    assert trained.chat_template and "Answer: " in trained.chat_template  # the template travels with the model
    assert warmup.stage_config(cfg, "arms").student.name == f"{warm}/model"  # scored and evaluated: the warmed model
