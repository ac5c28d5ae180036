import pytest

from cft_ray import plan
from cft_ray.config import ModelConfig, load_config


def test_param_count_from_config_only(tiny_model_dir):
    from cft_ray.models import load

    _, model = load(ModelConfig(name=tiny_model_dir))
    assert plan.param_count(ModelConfig(name=tiny_model_dir)) == sum(p.numel() for p in model.parameters())
    assert plan.param_count(ModelConfig(name=tiny_model_dir), override_b=3.0) == 3e9


def test_token_stats_render_real_prompts(tiny_model_dir, items):
    cfg = load_config(None, [f"student.name={tiny_model_dir}"])
    s = plan.token_stats(cfg, items)
    assert 40 < s["score_prompt"] < 300 and s["direct_target"] >= 3  # "[[", "k", "]]" + end of turn
    letters = plan.token_stats(load_config(None, [f"student.name={tiny_model_dir}", "prompt.labels=letters"]), items)
    assert letters["score_prompt"] != s["score_prompt"]


def test_estimate_arithmetic():
    lengths = {"score_prompt": 100, "teacher_prompt": 120, "direct_prompt": 90, "cot_prompt": 95, "direct_target": 4}
    cfg = load_config(None, ["plan.gpu=a100", "train.method=full", "teach.policy=keep_all", "arms=[base, caft]"])
    p = plan.estimate(cfg, 1000, lengths, student_params=3e9, teacher_params=70e9)
    sc = p["stages"]["score"]
    assert sc["tokens"] == 100_000 and sc["flops"] == pytest.approx(2 * 3e9 * 100_000)
    assert sc["gpu_hours"] == pytest.approx(sc["flops"] / (312e12 * 0.35) / 3600)
    hard = 900 * 0.25  # 10% test held out, top quartile routed to cot
    assert p["stages"]["teach"]["calls"] == round(hard)
    assert p["stages"]["train"]["flops"] == pytest.approx(6 * 3e9 * p["stages"]["train"]["tokens"], rel=1e-6)
    lora = plan.estimate(load_config(None, ["train.method=lora"]), 1000, lengths, 3e9, 70e9)
    assert lora["stages"]["train"]["flops"] < p["stages"]["train"]["flops"]
    endpoint = plan.estimate(cfg, 1000, lengths, 3e9, None)
    assert endpoint["stages"]["teach"]["gpu_hours"] is None and endpoint["stages"]["teach"]["tokens_out"] > 0
    assert "teach" in plan.format_plan(p)
