"""The whole pipeline (`cft-ray run`) on tiny data with a tiny random model, on a 3-node cluster
(`ray.cluster_utils.Cluster`: head, an inference node with `infer_node`, a training node with
`train_node`, as in cluster.yaml): the arms train and are evaluated, every stage's actors and tasks ran on the
node type its config asked for (Ray's state API), the report renders, a re-run skips every finished
stage, `--dry-run` says so."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap

import pyarrow.parquet as pq
import pytest

from cft_ray import pipeline, store
from cft_ray.config import load_config
from cft_ray.layout import stage_dir

# The embedded default's arms. All six arms trained on this tiny run once (issue 7's note); each arm costs
# ~2 min here, so CI runs these two (every arm's recipe, budget and routing: tests/test_arms.py; data spent: tests/test_train.py).
ARMS = ["base", "caft"]


def tiny_run_overrides(run_dir, model_dir, arms=ARMS) -> list[str]:
    """Everything small: 60 MMLU items, the tiny model as student and teacher (transformers backends)."""
    return [f"run_dir={run_dir}", "data.limit=60", f"student.name={model_dir}", "student.dtype=float32",
            "score.pool.batch_size=16", "split.test_fraction=0.25", "split.exclude=[]",  # a random model answers no label
            "teach.backend=hf", f"teach.model.name={model_dir}", "teach.model.dtype=float32",
            "teach.constrain_format=true", "teach.max_tokens=12", "teach.samples=1", "teach.pool.batch_size=8",
            "teach.policy=keep_all",  # a random teacher is rarely right: keep its outputs so CoT phases have rows
            "train.num_workers=1", "train.micro_batch=4", "train.lora_r=4", "train.lora_alpha=8",
            "train.precision=fp32", "train.max_length=512", "train.checkpoint_every_steps=100", "train.pool.size=1",
            "eval.mode=generate", "eval.backend=hf", "eval.max_new_tokens=12", "eval.pool.batch_size=8",
            "teach.hf_micro_batch=8", f"arms=[{','.join(arms)}]"]


INFER, TRAIN = "{infer_node: 1}", "{train_node: 1}"
PLACEMENT = [f"score.pool.resources={INFER}", f"teach.pool.resources={INFER}", f"eval.pool.resources={INFER}",
             f"train.pool.resources={TRAIN}", f"train.resources_per_worker={TRAIN}"]

# In a subprocess: the cluster gets its own driver, the test session's local Ray stays up.
CLUSTER_RUN = textwrap.dedent("""
    import json, sys
    import ray
    from ray.cluster_utils import Cluster
    from ray.util.state import list_actors, list_tasks
    from cft_ray import pipeline
    from cft_ray.config import load_config
    from cft_ray.runtime import init_ray

    cfg = load_config(None, json.loads(sys.argv[1]))
    store = {"object_store_memory": 300 * 2**20}
    # the head's dashboard agent gets a free port: Ray's fixed default clashes with any other Ray head here
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "dashboard_agent_listen_port": int(sys.argv[2]), **store})
    cluster.add_node(num_cpus=2, resources={"infer_node": 2}, **store)
    cluster.add_node(num_cpus=2, resources={"train_node": 2}, **store)
    ray.init(address=cluster.address, log_to_driver=False)
    init_ray(cfg.ray)  # as the CLI and jobs do
    report = pipeline.main(cfg)
    kind = {n["NodeID"]: "infer" if "infer_node" in n["Resources"] else "train" if "train_node" in n["Resources"]
            else "head" for n in ray.nodes()}
    actors = [(a.class_name, a.repr_name, kind.get(a.node_id)) for a in list_actors(detail=True, limit=10000)]
    actors += [("task", t.name, kind.get(t.node_id)) for t in list_tasks(detail=True, limit=10000) if t.node_id]
    print("RESULT " + json.dumps({"report": report, "actors": actors}))
    ray.shutdown()
    cluster.shutdown()
""")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_model_dir):
    run_dir = tmp_path_factory.mktemp("pipeline") / "run"
    # caft trains in full under ZeRO-3 (bf16, 2 workers): the partitioned save path, on the training node
    overrides = tiny_run_overrides(run_dir, tiny_model_dir) + PLACEMENT + [
        "train.method=full", "train.zero_stage=3", "train.precision=bf16", "train.num_workers=2", "train.micro_batch=2"]
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        agent_port = sock.getsockname()[1]
    res = subprocess.run([sys.executable, "-c", CLUSTER_RUN, json.dumps(overrides), str(agent_port)], capture_output=True,
                         text=True, timeout=1500)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    out = json.loads(next(line for line in res.stdout.splitlines() if line.startswith("RESULT "))[7:])
    return load_config(None, overrides), out["report"], out["actors"]


@pytest.mark.heavy
def test_stages_ran_on_the_nodes_their_config_asks_for(tiny_run):
    where: dict[str, set] = {}
    for cls, name, node in tiny_run[2]:
        label = f"{cls} {name}"
        for key in ("Scorer", "HFGenerator", "tokenize_rows", "TrainWorker"):
            if key in label:
                where.setdefault(key, set()).add(node)
    # Scorer: score stage; HFGenerator: teach and generate-mode eval; tokenize_rows tasks + TrainWorker: train
    assert where == {"Scorer": {"infer"}, "HFGenerator": {"infer"}, "tokenize_rows": {"train"}, "TrainWorker": {"train"}}, where


@pytest.mark.heavy
def test_arms_train_evaluate_and_report(tiny_run):
    cfg, report, _ = tiny_run
    arms = store.read_json(store.join(cfg.run_dir, "arms.json"))
    assert list(arms) == ARMS
    test_n = pq.read_table(store.join(stage_dir(cfg, "split"), "test")).num_rows
    for a, v in arms.items():
        t = v["sets"]["test"]
        correct = pq.read_table(store.join(v["eval_dir"], "predictions"), columns=["correct"])["correct"].to_pylist()
        assert t["n"] == test_n == len(correct) and t["accuracy"] == pytest.approx(sum(correct) / len(correct)), a
        assert t["ci95"][0] <= t["accuracy"] <= t["ci95"][1], a
        assert set(t["by_bucket"]) <= {"easy", "medium", "hard"}
        assert "test_balanced" in v["sets"]
    spent = {a: v["data_spent"] for a, v in arms.items()}
    assert spent["base"]["target_tokens"] == 0 and spent["base"]["teacher_calls"] == 0
    hard = pq.read_table(store.join(stage_dir(cfg, "split"), "train"), columns=["treatment"])["treatment"].to_pylist()
    hard += pq.read_table(store.join(stage_dir(cfg, "split"), "valid"), columns=["treatment"])["treatment"].to_pylist()
    assert spent["caft"]["teacher_calls"] == hard.count("cot") > 0  # one call per CoT row (samples=1)
    assert spent["caft"]["target_tokens"] > 0 and spent["caft"]["train_tokens"] > spent["caft"]["target_tokens"]
    assert arms["caft"]["prompt"] == "cot" and arms["base"]["prompt"] == "direct"
    tdir = arms["caft"]["train_dir"]
    c = store.read_json(store.join(tdir, "manifest.json"))["counts"]
    assert c["rows_in"] == c["routed_drop"] + c["examples"] and c["examples"] == c["rows_out"] + c["errors"]
    tm = store.read_json(store.join(tdir, "train_manifest.json"))
    assert (tm["zero_stage"], tm["method"], tm["num_workers"]) == (3, "full", 2) and tm["trainable_params"] == tm["params"]
    assert tm["steps"] == sum(p["steps"] for p in tm["phases"]) > 0
    text = open(report).read()
    for section in ("## Score", "## Split", "## Teach", "## Arms", "## Time per stage", "## Plan vs actual"):
        assert section in text, section
    comp = store.read_json(store.join(cfg.run_dir, "comparisons.json"))["pairs"]
    assert [(r["a"], r["b"]) for r in comp] == [("caft", "base")] and comp[0]["test"]["n"] == test_n
    assert "## Paired comparisons (same test items, same protocol)" in text and "| caft vs base | generate | test |" in text
    for png in ("arms_accuracy.png", "arms_spent.png", "score_roc.png", "split_distribution.png"):
        assert os.path.getsize(os.path.join(os.path.dirname(report), png)) > 1000, png
    # the cost plan made before the run against what the stages counted: the stated factors (README)
    from cft_ray.report import plan_vs_actual

    plan = store.read_json(store.join(cfg.run_dir, "plan.json"))
    got = {f"{q} ({s})": a / p for q, s, p, a in plan_vs_actual(plan, pipeline.stage_dirs(cfg), cfg.run_dir) if a and p}
    assert 0.8 <= got["prompt tokens (score)"] <= 1.25, got
    assert 0.5 <= got["calls (teach)"] <= 2 and 0.5 <= got["tokens x epochs (train caft)"] <= 2, got
    run = store.read_json(store.join(cfg.run_dir, "run_manifest.json"))
    assert run["versions"]["torch"] and run["versions"]["ray"] and run["config_hash"]
    assert all(run["stages"][s]["wall_s"] is not None for s in pipeline.needed(cfg))


@pytest.mark.heavy
def test_rerun_skips_finished_stages(ray_local, tiny_run, capsys):
    cfg = tiny_run[0]
    score_parts = store.part_files(store.join(stage_dir(cfg, "score"), "parts"))
    mtimes = [os.path.getmtime(f) for f in score_parts]
    pipeline.main(cfg, dry_run=True)
    plan = capsys.readouterr().out
    for s in ("data", "score", "split", "teach", "arms"):
        assert any(line.split()[:2] == [s, "skip"] for line in plan.splitlines()), plan
    pipeline.main(cfg)
    run = store.read_json(store.join(cfg.run_dir, "run_manifest.json"))
    assert run["stages"]["score"]["skipped"] and run["stages"]["arms"]["skipped"]
    assert [os.path.getmtime(f) for f in score_parts] == mtimes
    # arms that need no teacher plan no teach stage; the stages they share are skipped
    fewer = cfg.model_copy(update={"arms": ["base"]})
    capsys.readouterr()
    pipeline.main(fewer, dry_run=True)
    plan = {line.split()[0]: line.split()[1] for line in capsys.readouterr().out.splitlines()[1:]}
    assert "teach" not in plan and plan["score"] == "skip" and plan["arms"] == "skip"


def test_dry_run_of_the_embedded_default(tmp_path, capsys):
    from cft_ray.config import EMBEDDED_CONFIG

    cfg = load_config(EMBEDDED_CONFIG, [f"run_dir={tmp_path}"])
    assert pipeline.main(cfg, dry_run=True) == str(tmp_path)
    out = capsys.readouterr().out
    assert [line.split()[0] for line in out.splitlines()[1:]] == [s for s in pipeline.CHAIN if s not in ("select", "warmup")]
    assert not os.listdir(tmp_path)  # a dry run writes nothing
    assert json.loads(json.dumps(cfg.model_dump(mode="json")))["arms"] == ["base", "caft"]
