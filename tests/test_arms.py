"""The arm recipes (cft_ray/arms.py): every arm's treatment of the same split rows, its phases and its
epochs (equal budgets, the paper's 20 / 20 / 10 + 10 / 5 + 5 + 10), random routing's CoT count equal to
caft's, the teacher's row union, and the paired comparisons the report prints."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from cft_ray import arms, report, store
from cft_ray.config import load_config
from cft_ray.layout import stage_dir
from cft_ray.train import resolve_phases

ROOT = Path(__file__).resolve().parents[1]
ENTROPY_ARMS = ["base", "sft", "distill", "caft", "curriculum", "random_routing"]


@pytest.mark.parametrize("config, per_phase", [
    (ROOT / "jobs/configs/mmlu_pro_qwen3b.yaml",
     {"sft": [20], "distill": [20], "caft": [10, 10], "curriculum": [5, 5, 10], "random_routing": [10, 10],
      "instructdiff": [20], "random_select": [20]}),
    (None, {"sft": [2], "distill": [2], "caft": [1, 1], "curriculum": [0.5, 0.5, 1], "random_routing": [1, 1]}),
])
def test_every_arm_trains_the_same_budget(config, per_phase):
    cfg = load_config(config, ["run_dir=/tmp/cft-arms-budget"] if config else [])
    buckets = cfg.split.buckets()
    for arm, want in per_phase.items():
        phases = resolve_phases(arms.arm_cfg(cfg, arm).train, buckets)
        assert [p.epochs for p in phases] == want, arm
        assert sum(want) == arms.arm_budget(cfg)
    curriculum = resolve_phases(arms.arm_cfg(cfg, "curriculum").train, buckets)
    assert [p.buckets for p in curriculum] == [[b] for b in buckets] and all(p.treatments == ["direct"] for p in curriculum)
    assert [p.treatments for p in resolve_phases(arms.arm_cfg(cfg, "caft").train, buckets)] == [["direct"], ["cot"]]
    assert [p.treatments for p in resolve_phases(arms.arm_cfg(cfg, "sft").train, buckets)] == [["direct", "cot"]]
    explicit = load_config(config, ["run_dir=/tmp/cft-arms-budget", "train.arm_epochs=6"] if config else ["train.arm_epochs=6"])
    assert sum(p.epochs for p in resolve_phases(arms.arm_cfg(explicit, "curriculum").train, buckets)) == 6


def _split_dir(cfg, n: int = 60) -> list[dict]:
    """A finished split stage written by hand: 3 buckets, every 6th row valid, hard -> cot."""
    rows = [{"item_id": f"i{k:03d}", "question": f"q{k}", "options": ["a", "b"], "answer": 0,
             "bucket": ["easy", "medium", "hard"][k % 3], "bucket_idx": k % 3,
             "split": "valid" if k % 6 == 5 else "train", "treatment": "cot" if k % 3 == 2 else "direct"} for k in range(n)]
    out = stage_dir(cfg, "split")
    for name in ("train", "valid"):
        store.write_table(pa.Table.from_pylist([r for r in rows if r["split"] == name]), store.join(out, name, "part-0.parquet"))
    store.finish(out, {"stage": "split"})
    return rows


def test_arm_recipes_route_the_same_rows(ray_local, tmp_path):
    cfg = load_config(None, [f"run_dir={tmp_path}", f"arms={ENTROPY_ARMS}"])
    rows = _split_dir(cfg)
    split_tr = [r["treatment"] for r in rows]
    ids = [r["item_id"] for r in rows]
    data, subsets = arms.routed_rows(cfg)
    assert data.count() == len(rows)
    routed = {a: arms.arm_treatment(a, ids, split_tr, subsets) for a in ENTROPY_ARMS}
    assert routed["caft"] == split_tr and routed["distill"] == ["cot"] * len(rows)
    assert routed["sft"] == routed["curriculum"] == routed["base"] == ["direct"] * len(rows)
    assert routed["random_routing"].count("cot") == split_tr.count("cot") == 20  # the same CoT budget as caft
    assert set(arms.routed_rows(cfg)[1]["random_routing"]) == subsets["random_routing"]  # seeded
    for arm in ("sft", "distill", "random_routing"):  # the Ray Data rewrite applies the driver's rule
        got = {r["item_id"]: r["treatment"] for r in arms.arm_rows(data, arm, cfg, subsets).take_all()}
        assert [got[i] for i in ids] == routed[arm], arm
    union = {r["item_id"]: r["treatment"] for r in arms.teacher_rows(cfg.model_copy(update={"arms": ["caft", "random_routing"]})).take_all()}
    want = {i for i, a, b in zip(ids, routed["caft"], routed["random_routing"]) if "cot" in (a, b)}
    assert {i for i, t in union.items() if t == "cot"} == want
    assert arms.teacher_coverage(["caft", "random_routing"]) == {"routed", "random"}


def _predictions(eval_dir: str, correct: list[bool], name: str = "predictions") -> None:
    store.write_table(pa.table({"item_id": [f"i{k:03d}" for k in range(len(correct))], "correct": correct}),
                      store.join(eval_dir, name, "part-0.parquet"))


def test_paired_comparisons_and_their_report_table(tmp_path):
    """Every protocol gets its own comparisons, each pairing predictions made under that protocol only
    (eval.mode: auto once put base's argmax beside caft's generation in one table)."""
    cfg = load_config(None, [f"run_dir={tmp_path}", "arms=[base, sft, caft]", "eval.balanced=false",
                             "eval.extra_modes=[direct]"])
    n = 200
    base = np.zeros(n, bool)
    base[:60] = True                      # 0.30
    caft = base.copy()
    caft[60:100] = True                   # +40 items right only under caft
    caft[:5] = False                      # 5 right only under base
    sft = base.copy()
    sft[100:103] = True                   # 3 discordant items: no real difference
    dirs = {a: (None, str(tmp_path / f"eval-{a}")) for a in ("base", "sft", "caft")}
    for a, c in (("base", base), ("sft", sft), ("caft", caft)):
        _predictions(dirs[a][1], list(c))
        _predictions(dirs[a][1], list(base), "predictions_direct")  # under direct, all three answer alike
    summary = {a: {"mode": "generate", "prompt": "cot" if a == "caft" else "direct"} for a in dirs}
    comp = arms.compare_arms(cfg, dirs, summary)
    assert comp["protocol"] == "generate" and comp["pairs"] == comp["by_mode"]["generate"]
    assert all(r["test"]["diff"] == 0 and r["test"]["n10"] == r["test"]["n01"] == 0 for r in comp["by_mode"]["direct"])
    pairs = {(r["a"], r["b"]): r for r in comp["pairs"]}
    assert list(pairs) == [("sft", "base"), ("caft", "base"), ("caft", "sft")]
    cb = pairs[("caft", "base")]["test"]
    assert (cb["n10"], cb["n01"], cb["n"]) == (40, 5, n) and cb["diff"] == pytest.approx(0.175)
    assert cb["significant"] and cb["p_value"] < 1e-6 and cb["diff_ci95"][0] > 0
    sb = pairs[("sft", "base")]["test"]
    assert not sb["significant"] and sb["p_value"] == pytest.approx(0.25)  # 3 of 3 discordant: 2 / 2^3
    assert (pairs[("caft", "base")]["prompt_a"], pairs[("caft", "base")]["prompt_b"]) == ("cot", "direct")
    store.write_json(store.join(cfg.run_dir, "comparisons.json"), comp)
    text = "\n".join(report._section_comparisons(cfg.run_dir))
    assert "| caft vs base | generate | test | 200 | +0.175 |" in text and "| caft vs base | direct | test | 200 | +0.000 |" in text


def test_report_shows_each_arms_epochs_in_training_order(tmp_path):
    """Curriculum trains easy, medium, hard: written through the store (sorted JSON keys) and read back,
    the report must still say so (a dict once came back as easy, hard, medium)."""
    store.write_json(str(tmp_path / "m.json"), {"epochs": [["easy", 0.5], ["medium", 0.5], ["hard", 1.0]]})
    back = store.read_json(str(tmp_path / "m.json"))["epochs"]
    assert report.phase_epochs(back) == "0.5 easy + 0.5 medium + 1 hard"
    assert report.phase_epochs([["merged", 2.0]]) == "2" and report.phase_epochs([]) == "-"
    # a phase with fewer rows than one global batch did not train: the table must not hide it
    skipped = [["direct", 1.0], ["cot", 1.0, "7 rows < one global batch of 8"]]
    assert report.phase_epochs(skipped) == "1 direct + 0 cot (skipped: 7 rows < one global batch of 8)"


def test_report_names_the_rationale_teacher_not_an_unused_models_settings(tmp_path):
    """teach.backend=rationale calls no model: the setup line once printed the default teacher model's sampling."""
    cfg = load_config(None, [f"run_dir={tmp_path}", "data.source=embedded:chains", "teach.backend=rationale"])
    line = next(x for x in report._section_setup({"config": cfg.model_dump(mode="json")}, str(tmp_path)) if "teacher" in x)
    assert "own rationales" in line and "temperature" not in line, line
    vllm = cfg.model_copy(update={"teach": cfg.teach.model_copy(update={"backend": "vllm"})})
    line = next(x for x in report._section_setup({"config": vllm.model_dump(mode="json")}, str(tmp_path)) if "teacher" in x)
    assert "via vllm (temperature" in line, line
