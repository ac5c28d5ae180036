"""The whole pipeline (`cft-ray run`) on tiny data with a tiny random model, on a 3-node cluster
(`ray.cluster_utils.Cluster`: head, an inference node with `infer_node`, a training node with
`train_node`, as in cluster.yaml), with the run dir, the student and the teacher on an S3-compatible server on
loopback (moto's, as a user's bucket): the arms train and are evaluated, every stage's actors and tasks ran on the
node type its config asked for (Ray's state API), outputs, checkpoints, trained models and the report are in the
bucket, the report renders, a re-run skips every finished stage, `--dry-run` says so."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap

import pyarrow.parquet as pq
import pytest

from cft_ray import export, pipeline, store
from cft_ray.config import ConfigError, load_config
from cft_ray.layout import stage_dir
from conftest import upload

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


def _read(path: str) -> bytes:
    fs, p = store._fs(path)
    with fs.open_input_stream(p) as f:
        return f.read()


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_model_dir, s3, mlflow_server):
    upload(s3, tiny_model_dir, "cft/models/tiny")
    # every node's processes inherit the AWS_* variables the s3 fixture exported (a user exports theirs)
    run_dir, model = "s3://cft/runs/pipeline", "s3://cft/models/tiny"
    cache = tmp_path_factory.mktemp("cache")
    # caft trains in full under ZeRO-3 (bf16, 2 workers): the partitioned save path, on the training node
    overrides = tiny_run_overrides(run_dir, model) + PLACEMENT + [
        f"student.cache_dir={cache}", f"teach.model.cache_dir={cache}", "tracking.backend=mlflow",
        f"tracking.uri={mlflow_server}",
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
    test_n = store.columns(store.join(stage_dir(cfg, "split"), "test"), ["item_id"]).num_rows
    for a, v in arms.items():
        t = v["sets"]["test"]
        correct = store.columns(store.join(v["eval_dir"], "predictions"), ["correct"])["correct"].to_pylist()
        assert t["n"] == test_n == len(correct) and t["accuracy"] == pytest.approx(sum(correct) / len(correct)), a
        assert t["ci95"][0] <= t["accuracy"] <= t["ci95"][1], a
        assert set(t["by_bucket"]) <= {"easy", "medium", "hard"}
        assert "test_balanced" in v["sets"]
    spent = {a: v["data_spent"] for a, v in arms.items()}
    assert spent["base"]["target_tokens"] == 0 and spent["base"]["teacher_calls"] == 0
    hard = store.columns(store.join(stage_dir(cfg, "split"), "train"), ["treatment"])["treatment"].to_pylist()
    hard += store.columns(store.join(stage_dir(cfg, "split"), "valid"), ["treatment"])["treatment"].to_pylist()
    assert spent["caft"]["teacher_calls"] == hard.count("cot") > 0  # one call per CoT row (samples=1)
    assert spent["caft"]["target_tokens"] > 0 and spent["caft"]["train_tokens"] > spent["caft"]["target_tokens"]
    assert arms["caft"]["prompt"] == "cot" and arms["base"]["prompt"] == "direct"
    tdir = arms["caft"]["train_dir"]
    c = store.read_json(store.join(tdir, "manifest.json"))["counts"]
    assert c["rows_in"] == c["routed_drop"] + c["examples"] and c["examples"] == c["rows_out"] + c["errors"]
    tm = store.read_json(store.join(tdir, "train_manifest.json"))
    assert (tm["zero_stage"], tm["method"], tm["num_workers"]) == (3, "full", 2) and tm["trainable_params"] == tm["params"]
    assert tm["steps"] == sum(p["steps"] for p in tm["phases"]) > 0
    assert report == f"{cfg.run_dir}/report/report.md" and tdir.startswith("s3://cft/runs/pipeline/")
    assert store.exists(f"{tdir}/model/model.safetensors") and store.exists(f"{tdir}/ray_train")
    text = _read(report).decode()
    for section in ("## Score", "## Split", "## Teach", "## Arms", "## Time per stage", "## Plan vs actual"):
        assert section in text, section
    comp = store.read_json(store.join(cfg.run_dir, "comparisons.json"))["pairs"]
    assert [(r["a"], r["b"]) for r in comp] == [("caft", "base")] and comp[0]["test"]["n"] == test_n
    assert "## Paired comparisons (same test items, same protocol)" in text and "| caft vs base | generate | test |" in text
    for png in ("arms_accuracy.png", "arms_spent.png", "score_roc.png", "split_distribution.png"):
        assert len(_read(f"{cfg.run_dir}/report/{png}")) > 1000, png
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
def test_mlflow_holds_one_parent_run_and_a_child_per_arm_with_the_reports_numbers(tiny_run, mlflow_server):
    from mlflow.tracking import MlflowClient

    cfg = tiny_run[0]
    mlflow = MlflowClient(mlflow_server)
    runs = mlflow.search_runs([mlflow.get_experiment_by_name("cft-ray").experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED", [r.data.tags for r in runs]
    p = parents[0].data
    assert p.params["train.lr"] == str(cfg.train.lr) and p.params["student.name"] == cfg.student.name
    assert p.tags["cft_ray.run_dir"] == cfg.run_dir
    scored = store.read_json(store.join(stage_dir(cfg, "score"), "manifest.json"))
    assert p.metrics["score.counts.rows_in"] == scored["counts"]["rows_in"] > 0
    assert p.metrics["score.duration_s"] == pytest.approx(scored["duration_s"])
    # an AUC is logged when there is one (a random model answers no label: then None, and left out)
    assert p.metrics.get("score.roc_auc.entropy") == (scored["roc_auc"] or {}).get("entropy"), scored["roc_auc"]
    split = store.read_json(store.join(stage_dir(cfg, "split"), "manifest.json"))["counts"]
    assert p.metrics["split.counts.test"] == split["test"] and p.metrics["teach.counts.kept"] >= 0
    comp = store.read_json(store.join(cfg.run_dir, "comparisons.json"))["by_mode"]["generate"][0]["test"]
    assert p.metrics["compare.caft_vs_base.generate.test.p_value"] == pytest.approx(comp["p_value"])
    assert "report/report.md" in [a.path for a in mlflow.list_artifacts(parents[0].info.run_id, "report")]
    children = {r.data.tags["cft_ray.arm"]: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id}
    assert sorted(children) == sorted(ARMS)
    arms = store.read_json(store.join(cfg.run_dir, "arms.json"))
    for arm, r in children.items():
        t = arms[arm]["sets"]["test"]
        m = r.data.metrics
        assert (m["generate.test.accuracy"], m["generate.test.ci95_low"], m["generate.test.n"]) == \
            pytest.approx((t["accuracy"], t["ci95"][0], t["n"])), arm
        assert m["data_spent.target_tokens"] == arms[arm]["data_spent"]["target_tokens"]
    curve = store.read_json(store.join(arms["caft"]["train_dir"], "train_manifest.json"))["loss_curve"]
    history = mlflow.get_metric_history(children["caft"].info.run_id, "train.loss")
    assert [(h.step, h.value) for h in history] == [(c["step"], pytest.approx(c["loss"])) for c in curve]


@pytest.mark.heavy
def test_rerun_skips_finished_stages(ray_local, tiny_run, capsys, mlflow_server):
    cfg = tiny_run[0]
    fs, _ = store._fs(cfg.run_dir)
    score_parts = [p.split("://")[1] for p in store.part_files(store.join(stage_dir(cfg, "score"), "parts"))]
    mtimes = [i.mtime for i in fs.get_file_info(score_parts)]
    pipeline.main(cfg, dry_run=True)
    plan = capsys.readouterr().out
    for s in ("data", "score", "split", "teach", "arms"):
        assert any(line.split()[:2] == [s, "skip"] for line in plan.splitlines()), plan
    pipeline.main(cfg)
    run = store.read_json(store.join(cfg.run_dir, "run_manifest.json"))
    assert run["stages"]["score"]["skipped"] and run["stages"]["arms"]["skipped"]
    from mlflow.tracking import MlflowClient  # the re-run logged into the same runs: no second parent, no second child

    mlflow = MlflowClient(mlflow_server)
    assert len(mlflow.search_runs([mlflow.get_experiment_by_name("cft-ray").experiment_id])) == 1 + len(ARMS)
    assert [i.mtime for i in fs.get_file_info(score_parts)] == mtimes
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


@pytest.mark.heavy
def test_export_writes_a_loadable_model_its_card_and_the_cot_rows_it_trained_on(tiny_run, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = tiny_run[0]
    arms = store.read_json(store.join(cfg.run_dir, "arms.json"))
    out = export.main(cfg.run_dir, "caft", str(tmp_path / "caft"))  # from the bucket to a local folder
    names = {p.name for p in (tmp_path / "caft").iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json", "README.md", "cft_ray_config.yaml", "cot"} <= names, names
    assert not any(n.endswith((".bin", ".pt", ".pth", ".pkl")) for n in names), "safetensors only"
    model = AutoModelForCausalLM.from_pretrained(out)
    assert AutoTokenizer.from_pretrained(out).chat_template and model.num_parameters() > 0
    # the card states the arm's numbers as arms.json has them, and the paired comparison with its p-value
    card = (tmp_path / "caft" / "README.md").read_text()
    t, spent = arms["caft"]["sets"]["test"], arms["caft"]["data_spent"]
    assert f"| test | {t['accuracy']:.3f} [{t['ci95'][0]:.3f}, {t['ci95'][1]:.3f}] | {t['n']} |" in card
    assert f"| {spent['target_tokens']} | " in card and "| caft vs base |" in card
    assert load_config(tmp_path / "caft" / "cft_ray_config.yaml").model_dump() == cfg.model_dump()
    # the CoT set: exactly the cot examples caft trained on, each with the teacher text it trained on
    ex = store.columns(store.join(arms["caft"]["train_dir"], "examples"), ["item_id", "kind", "error"]).to_pylist()
    trained = sorted(r["item_id"] for r in ex if r["kind"] == "cot" and r["error"] is None)
    cot = pq.read_table(tmp_path / "caft" / "cot" / "data.parquet").to_pylist()
    assert trained and [r["item_id"] for r in cot] == trained
    teacher = {r["item_id"]: r["text"] for r in store.columns(store.join(stage_dir(cfg, "teach"), "cot"), ["item_id", "text"]).to_pylist()}
    assert all(r["rationale"] == teacher[r["item_id"]] and r["question"] and len(r["options"]) > 1 for r in cot)
    assert f"# Chain-of-thought rows the `caft` arm trained on\n\n{len(cot)} multiple-choice items" in \
        (tmp_path / "caft" / "cot" / "README.md").read_text()
    # what cannot be exported or pushed says so before anything is written
    with pytest.raises(ConfigError, match="'base' trained nothing"):
        export.main(cfg.run_dir, "base", str(tmp_path / "base"))
    with pytest.raises(ConfigError, match="'nosuch' is not an arm"):
        export.main(cfg.run_dir, "nosuch", str(tmp_path / "x"))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    with pytest.raises(ConfigError, match="export HF_TOKEN"):
        export.main(cfg.run_dir, "caft", str(tmp_path / "pushed"), repo="me/caft")
    assert not (tmp_path / "pushed").exists()
    # a Hub that cannot be reached: one line that says where the export is (HF_ENDPOINT: a closed port)
    monkeypatch.setenv("HF_TOKEN", "hf_test")
    monkeypatch.setattr("huggingface_hub.constants.ENDPOINT", f"http://127.0.0.1:{_closed_port()}")
    with pytest.raises(ConfigError, match=r"could not be reached .*the export itself is in .*pushed"):
        export.main(cfg.run_dir, "caft", str(tmp_path / "pushed"), repo="me/caft")
    assert (tmp_path / "pushed" / "model.safetensors").exists()


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
