import pytest

from cft_ray.config import CftConfig, ConfigError, config_hash, load_config
from cft_ray.layout import stage_dir


def test_defaults_validate_and_every_field_is_documented():
    cfg = load_config()
    assert cfg.student.name == "smollm2-135m-instruct" and cfg.student.trust_remote_code is False

    def walk(model_cls, path=""):
        for name, field in model_cls.model_fields.items():
            ann = field.annotation
            if isinstance(ann, type) and hasattr(ann, "model_fields"):
                walk(ann, f"{path}{name}.")
            elif path:  # top-level sections are containers; their fields carry the docs
                assert field.description, f"{path}{name} has no description"
    walk(CftConfig)


def test_yaml_and_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("run_dir: /tmp/x\nscore:\n  token_budget: 1024\n")
    cfg = load_config(p, ["score.pool.size=[1, 3]", "split.quantiles=[0.2, 0.8]", "student.dtype=float32"])
    assert cfg.run_dir == "/tmp/x" and cfg.score.token_budget == 1024
    assert cfg.score.pool.size == (1, 3) and cfg.split.quantiles == [0.2, 0.8]
    assert cfg.student.dtype == "float32"


def test_auto_precision_is_decided_on_the_driver_by_device():
    from cft_ray.config import native_cpu_bf16

    cpu = load_config(None, [])
    want = ("bfloat16", "bf16") if native_cpu_bf16() else ("float32", "fp32")
    assert (cpu.student.dtype, cpu.train.precision) == want and cpu.teach.model.dtype == want[0]
    gpu = load_config(None, ["eval.pool.num_gpus=1", "train.use_gpu=true", "teach.pool.num_gpus=1"])
    assert (gpu.student.dtype, gpu.train.precision, gpu.teach.model.dtype) == ("bfloat16", "bf16", "bfloat16")
    fixed = load_config(None, ["student.dtype=float16", "train.precision=fp32"])
    assert (fixed.student.dtype, fixed.train.precision) == ("float16", "fp32")


@pytest.mark.parametrize("override, field", [
    ("score.token_budget=0", "score.token_budget"),
    ("score.pool.size=[3, 1]", "score.pool.size"),
    ("student.dtype=float8", "student.dtype"),
    ("teach.backend=magic", "teach.backend"),
    ("split.bogus=1", "split.bogus"),
    ("arms=[base, nonsense]", "arms.1"),
    ("split.bucket_names=[a, b]", "split.bucket_names"),
])
def test_bad_values_name_the_field(override, field):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert field in str(e.value)


def test_malformed_override_and_file(tmp_path):
    with pytest.raises(ConfigError, match="key.sub=value"):
        load_config(None, ["no_equals_sign"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a list\n- not a mapping\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(bad)
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.yaml")


def test_hash_is_stable_and_keys_stage_dirs():
    a, b = load_config(), load_config()
    assert config_hash(a) == config_hash(b)
    c = load_config(None, ["split.seed=7"])
    assert config_hash(a) != config_hash(c)
    # split changes the split dir but not the score dir; pool size changes neither
    assert stage_dir(a, "score") == stage_dir(c, "score")
    assert stage_dir(a, "split") != stage_dir(c, "split")
    d = load_config(None, ["score.pool.size=2"])
    assert stage_dir(a, "score") == stage_dir(d, "score")
    assert stage_dir(a, "data") != stage_dir(load_config(None, ["data.limit=10"]), "data")


def test_batching_is_part_of_the_score_and_select_dirs():
    """bf16 scores depend on the micro-batch a row ran in: other batching = another stage dir, never a
    resume that mixes rows scored both ways (the budget once sat outside the hash)."""
    a = load_config()
    for stage, ov in (("score", "score.token_budget=8192"), ("score", "score.pool.batch_size=128"),
                      ("score", "score.max_padding=0.5"), ("select", "select.token_budget=8192"),
                      ("select", "select.logit_tokens=512")):
        assert stage_dir(a, stage) != stage_dir(load_config(None, [ov]), stage), ov
    for ov in ("score.pool.size=[1,4]", "score.pool.num_cpus=2", "score.pool.threads=1", "score.pool.max_restarts=0"):
        assert stage_dir(a, "score") == stage_dir(load_config(None, [ov]), "score"), ov
    # how fast an endpoint is asked is not what it answers: the teach stage stays where it is
    for ov in ("teach.concurrency=32", "teach.timeout_s=5", "teach.rpm=500", "teach.tpm=90000"):
        assert stage_dir(a, "teach") == stage_dir(load_config(None, [ov]), "teach"), ov
    assert stage_dir(a, "teach") != stage_dir(load_config(None, ["teach.max_tokens=64"]), "teach")


def test_overriding_one_pool_field_keeps_the_sections_defaults():
    """`score.pool.size=2` once rebuilt the pool from ActorPool's defaults: batch 64 instead of the score
    pool's 256, silently changing the batching (and the stage dir)."""
    cfg = load_config(None, ["score.pool.size=2", "teach.pool.num_cpus=2"])
    assert (cfg.score.pool.size, cfg.score.pool.batch_size) == (2, 256)
    assert (cfg.teach.pool.num_cpus, cfg.teach.pool.batch_size) == (2, 16)
    assert load_config(None, ["data.columns.answer=gold"]).data.columns.answer == "gold"


def test_length_budgets_that_contradict_each_other_fail_naming_the_field():
    """Defaults once had teacher 1024 tokens, train cap 1024 (a CoT example lost its question) and eval
    512 tokens (CoT answers cut and counted wrong)."""
    ok = load_config(None, ["arms=[base, caft]"])
    assert ok.train.max_length > ok.teach.max_tokens and ok.eval.max_new_tokens >= ok.teach.max_tokens
    with pytest.raises(ConfigError, match="train.max_length"):
        load_config(None, ["arms=[base, caft]", "train.max_length=1024"])
    with pytest.raises(ConfigError, match="eval.max_new_tokens"):
        load_config(None, ["arms=[base, distill]", "eval.max_new_tokens=512"])
    load_config(None, ["arms=[base, sft]", "eval.max_new_tokens=512", "train.max_length=512"])  # no CoT arm
    load_config(None, ["arms=[base, caft]", "eval.mode=direct", "eval.max_new_tokens=8"])  # nothing decoded


def test_the_packaged_default_is_the_jobs_local_config():
    """`cft-ray run` without --config reads the copy shipped in the package: it must be jobs/configs/local.yaml
    (the copy once kept a bf16 teacher the jobs config had dropped)."""
    from pathlib import Path

    from cft_ray.config import EMBEDDED_CONFIG

    jobs = Path(__file__).resolve().parents[1] / "jobs" / "configs" / "local.yaml"
    assert EMBEDDED_CONFIG.read_text() == jobs.read_text()
