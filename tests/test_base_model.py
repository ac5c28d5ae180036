"""A base model (no chat template): with `student.chat_template=plain` the whole chain scores, trains
and evaluates it; without the option the CLI fails on the driver, before Ray starts, in one line."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import build_tiny, upload

ROOT = Path(__file__).resolve().parents[1]


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
def test_plain_format_scores_trains_and_evaluates_a_base_model_from_an_object_store(base_model_dir, tmp_path, s3):
    """The whole chain as a user runs it (`cft-ray run`, its own local Ray) with the student and the run dir on an
    S3-compatible server on loopback: every actor and train worker fetches the model to its node's cache, the arms'
    models and the report land in the bucket, and the evaluated sft model is read back from it."""
    import pyarrow.parquet as pq
    from transformers import AutoTokenizer

    from cft_ray import store

    upload(s3, base_model_dir, "cft/models/base")
    run_dir = "s3://cft/runs/base"
    (tmp_path / "defaults.yaml").write_text("{}\n")  # the field defaults, not the embedded run's config
    res = subprocess.run([sys.executable, "-m", "cft_ray.cli", "run", "-c", str(tmp_path / "defaults.yaml"),
                          f"run_dir={run_dir}", "data.limit=40",
                          "student.name=s3://cft/models/base", f"student.cache_dir={tmp_path}/cache", "student.dtype=float32",
                          "student.chat_template=plain", "split.exclude=[]", "split.test_fraction=0.25", "arms=[base, sft]",
                          "eval.mode=direct", "train.num_workers=1", "train.micro_batch=4", "train.lora_r=4", "train.lora_alpha=8",
                          "train.precision=fp32", "train.max_length=512", "train.pool.size=1", "ray.num_cpus=2"],
                         capture_output=True, text=True, timeout=900, env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"report: {run_dir}/report/report.md" in res.stdout and store.exists(f"{run_dir}/report/report.md")
    arms = store.read_json(f"{run_dir}/arms.json")
    assert set(arms) == {"base", "sft"} and all(a["sets"]["test"]["n"] == arms["base"]["sets"]["test"]["n"] > 0
                                                for a in arms.values())
    assert arms["sft"]["train_dir"].startswith(f"{run_dir}/") and store.exists(f"{arms['sft']['train_dir']}/model/model.safetensors")
    fs, path = store._fs(f"{arms['sft']['train_dir']}/examples")
    ex = pq.read_table(path, filesystem=fs, columns=["input_ids"]).slice(0, 1).to_pylist()[0]
    text = AutoTokenizer.from_pretrained(base_model_dir).decode(ex["input_ids"])
    assert "Answer: [[" in text and "<|im_start|>" not in text, text[-200:]  # the plain format, not a chat
    fetched = [d for d in (tmp_path / "cache").iterdir() if not d.name.startswith(".")]
    assert {d.name.split("-")[0] for d in fetched} >= {"base", "model"}, "the student and the trained sft model, fetched"
    trained = AutoTokenizer.from_pretrained(next(d for d in fetched if d.name.startswith("model")))
    assert trained.chat_template and "Answer: " in trained.chat_template  # the template travels with the model
