"""Nobody gets in through a checkpoint, a config or a log: model code runs only with
`trust_remote_code`, weights load from safetensors (a pickled checkpoint is refused and never
unpickled), DeepSpeed checkpoints are read with torch.load(weights_only=True), a key put in a config
is refused without being echoed, and no documented `ray job submit` carries a secret."""
from __future__ import annotations

import ast
import json
import pickle
import re
import shutil
from pathlib import Path

import pytest
import torch

from cft_ray import models
from cft_ray.config import ConfigError, ModelConfig, load_config

ROOT = Path(__file__).resolve().parents[2]


class Planted:
    """Unpickling this writes a marker file: proof that a loader executed what a file told it to."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('pwned')",))


def model_copy(tiny_model_dir, dst: Path) -> Path:
    shutil.copytree(tiny_model_dir, dst)
    return dst


def test_model_code_runs_only_with_trust_remote_code(tiny_model_dir, tmp_path):
    d = model_copy(tiny_model_dir, tmp_path / "custom")
    marker = tmp_path / "ran"
    (d / "evil_model.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\nraise SystemExit('custom code ran')\n")
    conf = json.loads((d / "config.json").read_text())
    conf.update(model_type="evil_arch", auto_map={"AutoConfig": "evil_model.EvilConfig",
                                                  "AutoModelForCausalLM": "evil_model.EvilModel"})
    (d / "config.json").write_text(json.dumps(conf))
    with pytest.raises(ConfigError, match="trust_remote_code"):
        models.load(ModelConfig(name=str(d), dtype="float32"))
    assert not marker.exists(), "the checkpoint's code ran without trust_remote_code"
    with pytest.raises(BaseException):  # noqa: B017 - it raises by design once it has run
        models.load(ModelConfig(name=str(d), dtype="float32", trust_remote_code=True))
    assert marker.exists(), "the flag is what gates it"


def test_pickled_model_weights_are_refused_unopened(tiny_model_dir, tmp_path):
    d = model_copy(tiny_model_dir, tmp_path / "pickled")
    for f in d.glob("*.safetensors"):
        f.unlink()
    marker = tmp_path / "unpickled"
    with open(d / "pytorch_model.bin", "wb") as f:
        pickle.dump({"model.embed_tokens.weight": Planted(marker)}, f)
    with pytest.raises(ConfigError, match="safetensors"):
        models.load(ModelConfig(name=str(d), dtype="float32"))
    assert not marker.exists()


def test_deepspeed_checkpoint_reader_is_weights_only(tmp_path):
    from cft_ray.train_loop import load_checkpoint_file

    marker = tmp_path / "unpickled"
    bad = tmp_path / "mp_rank_00_model_states.pt"
    torch.save({"module": Planted(marker)}, bad)
    with pytest.raises(pickle.UnpicklingError):
        load_checkpoint_file(str(bad))
    assert not marker.exists()
    # what DeepSpeed itself writes (tensors, its loss scaler and ZeRO enums) still loads
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    good = tmp_path / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    torch.save({"optimizer_state_dict": {"loss_scaler": LossScaler(1.0), "zero_stage": ZeroStageEnum.gradients,
                                         "state": torch.ones(3)}}, good)
    got = load_checkpoint_file(str(good))["optimizer_state_dict"]
    assert got["zero_stage"] == ZeroStageEnum.gradients and torch.equal(got["state"], torch.ones(3))


def test_package_never_unpickles():
    """Every torch.load in cft_ray says weights_only=True; no pickle/joblib/dill loads at all."""
    for f in sorted((ROOT / "cft_ray").glob("*.py")):
        tree = ast.parse(f.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Call):
                name = ast.unparse(node.func)
                if name.endswith(("pickle.load", "pickle.loads", "joblib.load", "dill.load", "cloudpickle.loads")):
                    pytest.fail(f"{f.name}:{node.lineno}: {name}")
                if name == "torch.load":
                    kw = {k.arg: k.value for k in node.keywords}
                    assert "weights_only" in kw and ast.literal_eval(kw["weights_only"]) is True, f"{f.name}:{node.lineno}"
                if any(k.arg == "trust_remote_code" and isinstance(k.value, ast.Constant) and k.value.value
                       for k in node.keywords):
                    pytest.fail(f"{f.name}:{node.lineno}: trust_remote_code=True hard-coded")


def test_a_key_in_a_config_is_refused_and_not_echoed(tmp_path):
    secret = "sk-live-DO-NOT-PRINT-123"
    for source in ("override", "file"):
        with pytest.raises(ConfigError) as e:
            if source == "override":
                load_config(None, [f"teach.api_key={secret}"])
            else:
                (tmp_path / "c.yaml").write_text(f"teach:\n  api_key: {secret}\n")
                load_config(tmp_path / "c.yaml")
        assert "teach.api_key" in str(e.value) and secret not in str(e.value)


def test_documented_job_submissions_carry_no_secrets():
    texts = [ROOT / "README.md", *(ROOT / "docs").glob("*.md"), *(ROOT / "jobs").glob("*.py"), ROOT / "cluster.yaml"]
    submits = [line for t in texts for line in t.read_text().splitlines() if "ray job submit" in line]
    assert submits, "the README documents `ray job submit`"
    for line in submits:
        assert not re.search(r"(?i)(api_key|token|secret|password)\s*[=:]|sk-[a-z0-9]|env_vars", line), line
