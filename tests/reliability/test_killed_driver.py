"""The driver SIGKILLed mid-stage, then the same command run again: it resumes (no row lost or
duplicated), finished stages are skipped.

- `ray job submit` for real, with the run dir on an S3-compatible server on loopback (moto's; the cluster
  gets the AWS_* variables as `ray start` does on a node): a `ray start --head` cluster in its own temp dir,
  the documented command submitted with --working-dir, its driver killed while the score stage is writing
  parts to the bucket, the same command submitted again; the outputs in the bucket are checked (and the path
  the job prints), a job with a relative run_dir is refused in one line, then the cluster is stopped.
  A half-written part file is left in the bucket after the kill: the re-run deletes it and redoes its rows."""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest
import yaml

from cft_ray import store
from cft_ray.config import load_config
from cft_ray.layout import stage_dir
from test_pipeline import tiny_run_overrides

ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _nested(overrides: list[str]) -> dict:
    """key.sub=value overrides as the YAML a user would write."""
    raw: dict = {}
    for o in overrides:
        key, val = o.split("=", 1)
        *head, last = key.split(".")
        d = raw
        for k in head:
            d = d.setdefault(k, {})
        d[last] = yaml.safe_load(val)
    return raw


def _procs(marker: str) -> list[psutil.Process]:
    out = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if marker in " ".join(p.info["cmdline"] or []):
                out.append(p)
        except psutil.Error:
            pass
    return out


def _stop(temp: Path) -> None:
    """`ray stop` would kill every Ray on the machine (the test session's too): kill only this
    cluster's processes, which all carry its temp dir on their command line."""
    procs = _procs(str(temp))
    for p in procs:
        p.terminate()
    _, alive = psutil.wait_procs(procs, timeout=20)
    for p in alive:
        p.kill()


@pytest.mark.heavy
def test_ray_job_submit_on_an_object_store_survives_a_killed_driver(tmp_path, base_model_dir, s3):
    """The student is a base model (no chat template) scored and evaluated in the plain format."""
    bin_dir = Path(sys.executable).parent
    # The job's `python` is whatever the cluster's PATH finds: this venv's, as on a cluster whose setup
    # commands installed the project.
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("RAY_ADDRESS", None)
    # Ray's token authentication, explicitly: the head makes (or reuses) ~/.ray/auth_token, the CLI sends it
    env["RAY_AUTH_MODE"] = "token"
    port, dash, agent, client = (_free_port() for _ in range(4))  # Ray's fixed defaults could clash with another Ray
    # its own session dir (never touches the test session's Ray), short: Unix socket paths stop at 107 bytes
    temp = Path(tempfile.mkdtemp(prefix="cftj", dir="/tmp"))
    started = subprocess.run([str(bin_dir / "ray"), "start", "--head", f"--port={port}", f"--dashboard-port={dash}",
                    "--num-cpus=2", f"--dashboard-agent-listen-port={agent}", f"--ray-client-server-port={client}", "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--temp-dir={temp}",
                    "--object-store-memory=500000000", "--disable-usage-stats"],
                   env=env, capture_output=True, text=True, timeout=180)
    assert started.returncode == 0, started.stdout[-2000:] + started.stderr[-2000:]
    try:
        run_dir = "s3://cft/runs/job"
        # base only (direct mode = one scoring pass); small score blocks and parts so the stage is
        # still writing when the driver is killed
        overrides = tiny_run_overrides(run_dir, base_model_dir, arms=["base"]) + [
            "student.chat_template=plain", "data.limit=120", "score.pool.batch_size=4", "score.rows_per_file=4", "eval.mode=direct"]
        cfg_path = tmp_path / "job.yaml"
        cfg_path.write_text(yaml.safe_dump(_nested(overrides)))
        cfg = load_config(cfg_path)
        # The README's command, unchanged: working dir = the repository, entrypoint = jobs/pipeline.py.
        submit = [str(bin_dir / "ray"), "job", "submit", f"--address=http://127.0.0.1:{dash}", "--working-dir", str(ROOT),
                  "--", "python", "jobs/pipeline.py", "--config", str(cfg_path)]

        log = tmp_path / "first.log"  # a file, not a pipe: a full pipe would block the CLI we wait for

        def launch():
            with open(log, "w") as out:
                return subprocess.Popen(submit, env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)

        first = launch()
        score_parts, deadline = store.join(stage_dir(cfg, "score"), "parts"), time.time() + 600
        while time.time() < deadline and not store.part_files(score_parts):
            if first.poll() is not None and "No available agent" in log.read_text():
                time.sleep(2)  # the head's job agent is still starting: Ray says "try again later"
                first = launch()
            assert first.poll() is None, log.read_text()[-3000:]
            time.sleep(0.2)
        drivers = [p for p in _procs(str(cfg_path)) if "jobs/pipeline.py" in " ".join(p.cmdline())
                   and "job" not in p.cmdline()[1:3]]
        assert drivers, "the job's driver process"
        for p in drivers:
            p.send_signal(signal.SIGKILL)
        first.wait(timeout=300)
        assert not store.is_done(stage_dir(cfg, "score")), "killed mid-stage"
        partial = store.columns(score_parts, ["item_id"]).num_rows
        assert 0 < partial < 120
        half = f"{score_parts[5:]}/zz-half-written.parquet"  # what a writer killed mid-file leaves behind
        with s3.open_output_stream(half) as f:
            f.write(b"PAR1 truncated")
        data_done = s3.get_file_info(store.join(stage_dir(cfg, "data"), "_SUCCESS")[5:]).mtime

        res = subprocess.run(submit, env=env, cwd=ROOT, capture_output=True, text=True, timeout=900)
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
        assert "succeeded" in res.stdout and "report:" in res.stdout
        assert s3.get_file_info(store.join(stage_dir(cfg, "data"), "_SUCCESS")[5:]).mtime == data_done  # not recomputed
        ids = store.columns(score_parts, ["item_id"])["item_id"].to_pylist()
        assert len(ids) == len(set(ids)) == 120, "every row exactly once"
        counts = store.read_json(store.join(stage_dir(cfg, "score"), "manifest.json"))["counts"]
        assert counts["resumed"] >= partial and counts["rows_in"] == 120
        assert not store.exists(f"s3://{half}"), "the half-written part was deleted, its rows redone"
        arms = store.read_json(store.join(run_dir, "arms.json"))
        assert arms["base"]["sets"]["test"]["n"] == store.columns(store.join(stage_dir(cfg, "split"), "test"), ["item_id"]).num_rows
        assert store.exists(f"{run_dir}/report/report.md")
        run = store.read_json(store.join(run_dir, "run_manifest.json"))
        assert run["machine"]["ray_address"].endswith(f":{port}"), "ran on the submitted cluster"
        assert f"report: {run_dir}/report/report.md" in res.stdout, "where the outputs really are"

        # A relative run_dir would land in the job's temporary copy of its working dir: refused in one line.
        t0 = time.time()
        rel = subprocess.run([*submit, "run_dir=runs/relative"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
        said = [ln for ln in rel.stdout.splitlines() if ln.startswith("cft-ray: ")]
        assert rel.returncode != 0 and said and "run_dir: 'runs/relative' is relative" in said[-1], rel.stdout[-3000:]
        assert "Traceback" not in rel.stdout and time.time() - t0 < 60
        assert not (ROOT / "runs" / "relative").exists()
    finally:
        _stop(temp)
        shutil.rmtree(temp, ignore_errors=True)
