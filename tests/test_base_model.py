"""A base model (no chat template, the `base_model_dir` fixture): without `student.chat_template` the CLI fails on
the driver, before Ray starts, in one line; the option passes the check. The whole chain on it in the plain format:
scored and evaluated in tests/reliability/test_killed_driver.py (the `ray job submit` run), trained (the warm-up, the
arms' training path) in tests/test_warmup.py."""
from __future__ import annotations

import subprocess
import sys

import pytest


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
