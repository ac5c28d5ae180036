"""The CLI's error contract (issue 22): each foreseeable failure exits non-zero within 30 s, its last stderr line
names the field or input to change, and no traceback is printed without --debug. Each case is a real `cft-ray`
(or `python jobs/<stage>.py`) process. A model without a chat template is tests/test_base_model.py; a relative
run_dir inside a real `ray job submit` is tests/reliability/test_killed_driver.py."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cft_ray import preflight
from cft_ray.config import EMBEDDED_CONFIG, ConfigError, load_config
from test_split import fake_score_stage, scored

ROOT = Path(__file__).resolve().parents[1]


def run_cli(args: list[str], env: dict | None = None, script: str | None = None) -> tuple[int, str, float]:
    """(exit code, stderr, seconds) of one CLI process; RAY_ADDRESS only when the case gives it."""
    full = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"PYTHONPATH": str(ROOT)} | (env or {})
    cmd = [sys.executable, script, *args] if script else [sys.executable, "-m", "cft_ray.cli", *args]
    t0 = time.time()
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT, env=full)
    return res.returncode, res.stderr, time.time() - t0


def assert_one_line(rc: int, err: str, secs: float, *expected: str, code: int = 2) -> str:
    last = (err.strip().splitlines() or [""])[-1]
    assert rc == code, err[-3000:]
    assert secs < 30, f"{secs:.1f} s"
    assert "Traceback" not in err, err[-3000:]
    assert last.startswith("cft-ray: ") and all(e in last for e in expected), last
    return last


@pytest.fixture(scope="module")
def session_address(ray_local):
    """The test session's Ray (2 CPUs, no custom resource), joined by a CLI process as a user joins a cluster."""
    return ray_local.get_runtime_context().gcs_address


@pytest.mark.parametrize("args, env, expected", [
    (["score", "student.name=/nonexistent/model"], {}, ["student.name: /nonexistent/model does not exist"]),
    # a hub id the Hub does not serve (here: no Hub at all), before any actor retries the download for a minute
    (["arms", "student.name=nope-org/nope-model"], {"HF_ENDPOINT": "http://127.0.0.1:9"},
     ["student.name: 'nope-org/nope-model' is not a local directory", "the Hub does not serve it"]),
    # the shipped paper config's placeholder bucket: an object store that does not answer
    (["plan", "run_dir=s3://YOUR-BUCKET/runs/x"],
     {"AWS_ENDPOINT_URL": "http://127.0.0.1:9", "AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "y"},
     ["run_dir: cannot write s3://YOUR-BUCKET/runs/x", "credentials"]),
], ids=["missing model", "hub id not served", "unreachable object store"])
def test_driver_checks_fail_before_ray_in_one_line(tmp_path, args, env, expected):
    overrides = [] if any(a.startswith("run_dir=") for a in args) else [f"run_dir={tmp_path}/run"]
    rc, err, secs = run_cli([*args, *overrides], env)
    assert_one_line(rc, err, secs, *expected)
    assert "Started a local Ray" not in err


def test_a_job_entrypoint_keeps_the_contract_and_debug_adds_the_traceback(tmp_path):
    rc, err, secs = run_cli(["student.name=/nonexistent/model", f"run_dir={tmp_path}/run"], script="jobs/score.py")
    assert_one_line(rc, err, secs, "student.name: /nonexistent/model does not exist")
    rc, err, _ = run_cli(["score", "--debug", "student.name=/nonexistent/model", f"run_dir={tmp_path}/run"])
    assert rc == 2 and "Traceback" in err and err.strip().splitlines()[-1].startswith("cft-ray: student.name:")


def test_a_mistyped_run_dir_and_an_unforeseen_failure_are_one_line_each(tmp_path):
    rc, err, secs = run_cli(["report", str(tmp_path / "no-such-run")])
    assert_one_line(rc, err, secs, f"report: no run directory at {tmp_path / 'no-such-run'}")
    assert not (tmp_path / "no-such-run").exists()
    (tmp_path / "a-file").write_text("not a run directory")  # exists, but nothing can be written under it
    rc, err, secs = run_cli(["report", str(tmp_path / "a-file")])
    last = (err.strip().splitlines() or [""])[-1]
    assert rc == 1 and secs < 30 and "Traceback" not in err, err[-3000:]
    assert last.startswith("cft-ray: report failed: ") and "--debug prints it" in last
    kept = Path(last.split("(traceback: ", 1)[1].split(";", 1)[0])
    assert "Traceback" in kept.read_text()


def test_a_gpu_pool_on_a_local_cpu_ray_fails_at_once(tiny_model_dir, tmp_path):
    """The issue's hang: `score.pool.num_gpus=1` on the local Ray cft-ray starts (it cannot grow)."""
    rc, err, secs = run_cli(["score", f"student.name={tiny_model_dir}", f"run_dir={tmp_path}/run",
                             "score.pool.num_gpus=1", "ray.num_cpus=2"])
    assert_one_line(rc, err, secs, "score.pool: each actor asks for {CPU: 1, GPU: 1}", "no node of the cluster has 'GPU'",
                    "score.pool.num_gpus=0")


@pytest.mark.parametrize("overrides, expected", [
    (["score.pool.resources={infer-node: 1}"], ["score.pool: each actor asks for {CPU: 1, infer-node: 1}",
                                                "no node of the cluster has 'infer-node'"]),
    (["score.pool.size=3"], ["score.pool: 3 x {CPU: 1} at once, and the cluster holds 2", "lower score.pool.size"]),
], ids=["misspelled custom resource", "more actors than the cluster holds"])
def test_a_joined_cluster_that_cannot_hold_the_asks_fails_after_the_bounded_wait(session_address, tiny_model_dir, tmp_path,
                                                                                  overrides, expected):
    rc, err, secs = run_cli(["score", f"student.name={tiny_model_dir}", f"run_dir={tmp_path}/run", "ray.resource_wait_minutes=0",
                             *overrides], {"RAY_ADDRESS": session_address})
    assert_one_line(rc, err, secs, *expected)


def test_no_valid_answer_fails_in_one_line_with_the_counts(session_address, tmp_path):
    import pyarrow as pa

    cfg = load_config(EMBEDDED_CONFIG, [f"run_dir={tmp_path}"])  # what the CLI loads without --config
    t = scored(80, seed=2)
    for name in ("valid", "unknown"):
        t = t.set_column(t.column_names.index(name), name, pa.array([False] * 80))
    fake_score_stage(cfg, t, parts=2)
    rc, err, secs = run_cli(["split", f"run_dir={tmp_path}"], {"RAY_ADDRESS": session_address})
    assert_one_line(rc, err, secs, "split: no row to bucket (80 scored, ", "invalid answer",
                    "the student never answered with an option label")


def test_an_empty_source_fails_in_one_line(tmp_path):
    src = tmp_path / "items.jsonl"
    src.write_text('{"question": "2+2?", "answer": 1}\n')
    rc, err, secs = run_cli(["data", "prepare", f"data.source={src}", f"run_dir={tmp_path}/run", "ray.num_cpus=2"])
    assert_one_line(rc, err, secs, f"data.source '{src}': 0 of 1 rows are valid items", "options")


def test_waiting_ends_when_a_node_with_the_resource_joins(ray_local, tmp_path):
    """A joined cluster may grow: the check waits (bounded) and passes once a node offering the resource has
    joined (`ray start --address`, as the autoscaler starts one); with no node coming it fails naming the field
    and the wait."""
    cfg = load_config(None, [f"run_dir={tmp_path}", "score.pool.resources={grown: 1}", "ray.resource_wait_minutes=0.05"])
    with pytest.raises(ConfigError, match=r"score.pool: .*no node of the cluster has 'grown'.*\(waited 0 of ray.resource_wait_minutes=0.05\)"):
        preflight.check_resources(cfg, ["score"], may_grow=True)
    ray_bin = Path(sys.executable).parent / "ray"
    node = subprocess.Popen([str(ray_bin), "start", "--address", ray_local.get_runtime_context().gcs_address, "--num-cpus", "1",
                             "--resources", '{"grown": 1}', "--block"], start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        found = preflight.check_resources(cfg.model_copy(update={"ray": cfg.ray.model_copy(update={"resource_wait_minutes": 2})}),
                                          ["score"], may_grow=True)
        assert found == ["score.pool: 1 x {CPU: 1, grown: 1} fits (1 at once)"]
    finally:
        os.killpg(node.pid, signal.SIGTERM)
        node.wait(timeout=60)


def test_cluster_yaml_node_types_make_the_paper_config_wait_and_a_typo_fail_at_once(ray_local, tmp_path, monkeypatch):
    """On a `ray up` cluster the head node keeps the autoscaler's config (cluster.yaml, as ~/ray_bootstrap_config.yaml):
    what some node type offers is waited for (the session's Ray has no GPU), what none offers fails at once."""
    monkeypatch.setattr(preflight, "BOOTSTRAP_CONFIG", str(ROOT / "cluster.yaml"))
    paper = ROOT / "jobs" / "configs" / "mmlu_pro_qwen3b.yaml"
    cfg = load_config(paper, [f"run_dir={tmp_path}", "ray.resource_wait_minutes=0.01"])
    for stage, field in (("score", "score.pool"), ("teach", "teach.pool"), ("train", "train.resources_per_worker")):
        with pytest.raises(ConfigError, match=rf"^{field}: .*GPU.*\(waited 0 of ray.resource_wait_minutes=0.01\)$"):
            preflight.check_resources(cfg, [stage], may_grow=True)
    typo = load_config(paper, [f"run_dir={tmp_path}", "score.pool.resources={infer-node: 1}"])  # waits 10 min if it waits
    t0 = time.time()
    with pytest.raises(ConfigError, match=r"no node of the cluster has 'infer-node'.*no node type of the autoscaler's config offers it"):
        preflight.check_resources(typo, ["score"], may_grow=True)
    assert time.time() - t0 < 10
