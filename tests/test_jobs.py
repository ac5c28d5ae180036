"""`ray job submit` for real: a `ray start --head` cluster in its own temp dir, the pipeline job
submitted with --working-dir, waited for, its outputs checked, the cluster stopped."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from cft_ray import store
from cft_ray.config import load_config, stage_dir
from test_pipeline import tiny_run_overrides

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _overrides_to_yaml(overrides: list[str]) -> dict:
    raw: dict = {}
    for o in overrides:
        key, val = o.split("=", 1)
        d = raw
        *head, last = key.split(".")
        for k in head:
            d = d.setdefault(k, {})
        d[last] = yaml.safe_load(val)
    return raw


@pytest.mark.heavy
def test_ray_job_submit_runs_the_pipeline(tmp_path, tiny_model_dir):
    bin_dir = Path(sys.executable).parent
    ray_cli = str(bin_dir / "ray")
    env = {**os.environ, "RAY_ADDRESS": ""}
    env.pop("RAY_ADDRESS")
    port, dash = _free_port(), _free_port()
    temp = tmp_path / "ray"  # its own session dir: never touches the test session's Ray
    subprocess.run([ray_cli, "start", "--head", f"--port={port}", f"--dashboard-port={dash}", "--num-cpus=2",
                    "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--temp-dir={temp}",
                    "--object-store-memory=500000000", "--disable-usage-stats"],
                   check=True, env=env, capture_output=True, timeout=180)
    try:
        run_dir = tmp_path / "run"
        overrides = tiny_run_overrides(run_dir, tiny_model_dir, arms=["base"])
        cfg_path = tmp_path / "job.yaml"
        cfg_path.write_text(yaml.safe_dump(_overrides_to_yaml(overrides)))
        # The documented command, unchanged: working dir = the repository, entrypoint = jobs/pipeline.py.
        res = subprocess.run([ray_cli, "job", "submit", f"--address=http://127.0.0.1:{dash}", "--working-dir", str(ROOT),
                              "--", "python", "jobs/pipeline.py", "--config", str(cfg_path)],
                             env=env, capture_output=True, text=True, timeout=900, cwd=ROOT)
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
        assert "succeeded" in res.stdout and "report:" in res.stdout
        cfg = load_config(cfg_path)
        assert store.is_done(stage_dir(cfg, "score"))
        arms = store.read_json(store.join(str(run_dir), "arms.json"))
        assert arms["base"]["sets"]["test"]["n"] == pq.read_table(store.join(stage_dir(cfg, "split"), "test")).num_rows
        assert (run_dir / "report" / "report.md").exists()
        # the job ran on the submitted cluster, not on a private local Ray
        run = store.read_json(store.join(str(run_dir), "run_manifest.json"))
        assert run["machine"]["ray_address"].endswith(f":{port}")
    finally:
        _stop(temp)


def _stop(temp: Path) -> None:
    """`ray stop` would kill every Ray on the machine (the test session's too): kill only the
    processes of this cluster, which all carry its temp dir on their command line."""
    import psutil

    procs = [p for p in psutil.process_iter(["cmdline"]) if str(temp) in " ".join(p.info["cmdline"] or [])]
    for p in procs:
        p.terminate()
    _, alive = psutil.wait_procs(procs, timeout=20)
    for p in alive:
        p.kill()
