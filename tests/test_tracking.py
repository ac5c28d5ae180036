"""Tracking without a server: a local run's embedded MLflow store (`<run_dir>/mlruns`, what a user gets with
`tracking.backend=mlflow` and nothing else), the run ids kept in the run manifest, and the fields that cannot work
failing on the driver. The server path (a real MLflow server, the whole pipeline): tests/test_pipeline.py."""
from __future__ import annotations

import socket

import pytest
from mlflow.tracking import MlflowClient

from cft_ray import store, tracking
from cft_ray.config import ConfigError, load_config


def _finished_stage(d: str, manifest: dict) -> None:
    store.write_json(store.join(d, "manifest.json"), manifest)
    store.write_json(store.join(d, store.SUCCESS), {})


def test_a_local_run_logs_to_its_embedded_store_once_per_stage(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    run_dir = str(tmp_path / "run")
    cfg = load_config(None, [f"run_dir={run_dir}", "tracking.backend=mlflow", "tracking.experiment=unit"])
    _finished_stage(f"{run_dir}/data-a", {"counts": {"rows_in": 5, "errors": 1}, "duration_s": 2.5, "source": "x"})
    run = {"stage_dirs": {"data": f"{run_dir}/data-a", "score": f"{run_dir}/score-b"}}  # score not finished yet
    tracking.log_run(cfg, run)
    mlflow = MlflowClient(f"file:{run_dir}/mlruns")
    runs = mlflow.search_runs([mlflow.get_experiment_by_name("unit").experiment_id])
    assert len(runs) == 1 and runs[0].data.params["run_dir"] == run_dir
    assert runs[0].data.metrics == {"data.counts.rows_in": 5.0, "data.counts.errors": 1.0, "data.duration_s": 2.5}
    _finished_stage(f"{run_dir}/score-b", {"roc_auc": {"entropy": 0.61, "margin": None}})
    tracking.log_run(cfg, run)  # the next stage: into the same run, the data stage not logged twice
    runs = mlflow.search_runs([mlflow.get_experiment_by_name("unit").experiment_id])
    assert len(runs) == 1 and runs[0].data.metrics["score.roc_auc.entropy"] == 0.61
    assert "score.roc_auc.margin" not in runs[0].data.metrics
    assert len(mlflow.get_metric_history(runs[0].info.run_id, "data.counts.rows_in")) == 1
    assert [*run["tracking"][f"file:{run_dir}/mlruns"].values()][0]["logged"] == ["data", "score"]
    # `run --from score`: the stage re-runs, its new numbers are logged into the same run, data's are not re-sent
    tracking.forget(run, "score")
    _finished_stage(f"{run_dir}/score-b", {"roc_auc": {"entropy": 0.64}})
    tracking.log_run(cfg, run)
    history = mlflow.get_metric_history(runs[0].info.run_id, "score.roc_auc.entropy")
    assert [m.value for m in sorted(history, key=lambda m: m.timestamp)] == [0.61, 0.64]
    assert len(mlflow.get_metric_history(runs[0].info.run_id, "data.counts.rows_in")) == 1
    assert len(mlflow.search_runs([mlflow.get_experiment_by_name("unit").experiment_id])) == 1


def test_what_cannot_track_fails_on_the_driver_in_one_line(tmp_path):
    cfg = load_config(None, ["run_dir=s3://bucket/runs/x", "tracking.backend=mlflow"])
    with pytest.raises(ConfigError, match=r"tracking.uri: run_dir s3://bucket/runs/x is on an object store"):
        tracking.check(cfg)
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = load_config(None, [f"run_dir={tmp_path}/run", "tracking.backend=mlflow", f"tracking.uri=http://127.0.0.1:{port}"])
    with pytest.raises(ConfigError, match=rf"tracking.uri: MLflow at http://127.0.0.1:{port} did not answer"):
        tracking.check(cfg)
