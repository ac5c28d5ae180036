"""Experiment tracking (`tracking.backend: mlflow`): one MLflow parent run per pipeline run, one child run per arm.

Everything logged is read from what the stages wrote (their manifests, arms.json, comparisons.json, the train
manifests), after each stage finishes, so the tracker sees exactly the numbers of the report:
  parent  params: the run config, flattened (`score.metric`, `train.lr`, ...); tags: run dir, config hash
          metrics: every number of each stage's manifest (`score.auc.entropy`, `split.counts.train`, teacher yield,
          ...), the paired comparisons (`compare.caft_vs_sft.generate.test.p_value`); artefact: the report folder
  child   one per arm (tag `cft_ray.arm`): accuracy and its 95% interval per protocol and test set, data spent,
          training loss per step, tokens/s, MFU, steps, valid loss per phase
The parent run's id is kept in run_manifest.json per config hash: a resumed run logs into the same runs and
never makes a second child for an arm. A tracking failure during a run is logged as a warning and the run goes
on (its results are in the run dir; the report is the record); a misconfigured tracker fails on the driver
before Ray starts (preflight).
"""
from __future__ import annotations

import logging
import math
import os
import re
import tempfile
import time

import pyarrow.fs as pafs

from cft_ray import store
from cft_ray.config import CftConfig, ConfigError, config_hash, error_line

log = logging.getLogger("cft_ray")
ARM_TAG = "cft_ray.arm"


def uri(cfg: CftConfig) -> str:
    """The tracking URI: the config's, the environment's, else an embedded store next to the run's outputs."""
    found = cfg.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI")
    if found:
        return found
    if "://" in cfg.run_dir:
        raise ConfigError(f"tracking.uri: run_dir {cfg.run_dir} is on an object store, where MLflow keeps no embedded "
                          "store; give tracking.uri (a tracking server) or export MLFLOW_TRACKING_URI")
    return "file:" + os.path.join(store.shown(cfg.run_dir), "mlruns")


def client(cfg: CftConfig):
    """An MlflowClient for the run's URI; a missing package, an unreachable or refusing server fail in one line."""
    try:
        from mlflow.tracking import MlflowClient
    except ImportError:
        raise ConfigError("tracking.backend: mlflow needs the MLflow client: pip install 'cft-ray[tracking]' "
                          "(mlflow-skinny)") from None
    found = uri(cfg)
    if found.startswith("file:"):  # MLflow 3 keeps its file backend in maintenance mode, behind this opt-in; its
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # sqlite backend needs the full server package
    return MlflowClient(tracking_uri=found)


def check(cfg: CftConfig) -> None:
    """On the driver before Ray starts: the client imports and the server answers (no retries: a typo should
    not cost minutes of backoff)."""
    saved = {k: os.environ.get(k) for k in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT")}
    os.environ.update({"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"})
    try:
        client(cfg).search_experiments(max_results=1)
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001 - connection refused, auth, a non-MLflow server: all a config to fix
        raise ConfigError(f"tracking.uri: MLflow at {uri(cfg)} did not answer ({type(e).__name__}: {error_line(e)}); "
                          "check the URI, that the server runs, and MLFLOW_TRACKING_TOKEN / USERNAME / PASSWORD") from None
    finally:  # the run's own logging keeps MLflow's retries
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k)
            else:
                os.environ[k] = v


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, f"{key}."))
        else:
            out[key] = v
    return out


def _key(k: str) -> str:
    """MLflow keys take alphanumerics, _ - . / and spaces (subjects and arms have others)."""
    return re.sub(r"[^0-9A-Za-z_\-./ ]", "_", k)[:250]


def numbers(d: dict, prefix: str) -> dict[str, float]:
    """The finite numbers of a nested dict as metrics (booleans as 0/1; lists and text left out)."""
    return {_key(f"{prefix}.{k}"): float(v) for k, v in _flat(d).items()
            if isinstance(v, (int, float)) and not (isinstance(v, float) and not math.isfinite(v))}


def _log(mlflow, run_id: str, metrics: dict[str, float] | None = None, params: dict | None = None,
         steps: list[tuple[str, float, int]] = ()) -> None:
    from mlflow.entities import Metric, Param

    now = int(time.time() * 1000)
    ms = [Metric(k, v, now, 0) for k, v in (metrics or {}).items()] + [Metric(k, v, now, s) for k, v, s in steps]
    ps = [Param(_key(k), str(v)[:6000]) for k, v in (params or {}).items()]
    for i in range(0, len(ps), 100):  # the REST API's per-request limits
        mlflow.log_batch(run_id, params=ps[i:i + 100])
    for i in range(0, len(ms), 1000):
        mlflow.log_batch(run_id, metrics=ms[i:i + 1000])


def parent_run(mlflow, cfg: CftConfig, run: dict) -> dict:
    """The pipeline run's MLflow run (created with the config as params on first use) and the stages already
    logged to it, kept in the run manifest per tracking URI and config hash."""
    key = config_hash(cfg.model_dump(mode="json", exclude={"tracking"}))
    runs = run.setdefault("tracking", {}).setdefault(uri(cfg), {})
    if key not in runs:
        exp = mlflow.get_experiment_by_name(cfg.tracking.experiment)
        exp_id = exp.experiment_id if exp else mlflow.create_experiment(cfg.tracking.experiment)
        created = mlflow.create_run(exp_id, run_name=f"{os.path.basename(cfg.run_dir.rstrip('/'))}-{key}",
                                    tags={"cft_ray.run_dir": store.shown(cfg.run_dir), "cft_ray.config_hash": key})
        _log(mlflow, created.info.run_id, params=_flat(cfg.model_dump(mode="json", exclude={"tracking"})))
        runs[key] = {"run_id": created.info.run_id, "logged": []}
    return runs[key]


def _child(mlflow, parent: str, arm: str) -> str:
    """The arm's child run: found by its tag on a re-run, else created."""
    exp_id = mlflow.get_run(parent).info.experiment_id
    found = mlflow.search_runs([exp_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent}' and "
                                                       f"tags.`{ARM_TAG}` = '{arm}'", max_results=1)
    if found:
        return found[0].info.run_id
    return mlflow.create_run(exp_id, run_name=arm, tags={"mlflow.parentRunId": parent, ARM_TAG: arm}).info.run_id


def log_arms(mlflow, parent: str, run_dir: str) -> None:
    """One child run per arm (accuracy, interval, data spent, training curve) and the paired comparisons."""
    arms = store.read_json(store.join(run_dir, "arms.json"))
    for arm, v in arms.items():
        metrics = {}
        for mode, sets in (v.get("by_mode") or {v["mode"]: v["sets"]}).items():
            for name, s in sets.items():
                metrics.update({f"{mode}.{name}.accuracy": s["accuracy"], f"{mode}.{name}.ci95_low": s["ci95"][0],
                                f"{mode}.{name}.ci95_high": s["ci95"][1], f"{mode}.{name}.n": s["n"]})
        metrics.update(numbers(v["data_spent"], "data_spent"))
        steps = []
        if v.get("train_dir"):
            tm = store.read_json(store.join(v["train_dir"], "train_manifest.json"))
            metrics.update(numbers({k: tm.get(k) for k in ("tokens_per_s", "mfu", "steps", "wall_s", "tokens")}, "train"))
            metrics.update({_key(f"train.valid_loss.{p['name']}"): p["valid_loss"] for p in tm["phases"]
                            if p.get("valid_loss") is not None})
            steps = [("train.loss", h["loss"], h["step"]) for h in tm.get("loss_curve", [])]
        child = _child(mlflow, parent, arm)
        _log(mlflow, child, metrics, params={"arm": arm, "prompt": v["prompt"], "protocol": v["mode"]}, steps=steps)
        mlflow.set_terminated(child)
    comp_path = store.join(run_dir, "comparisons.json")
    if store.exists(comp_path):
        comp = store.read_json(comp_path)
        _log(mlflow, parent, {_key(f"compare.{p['a']}_vs_{p['b']}.{mode}.{name}.{k}"): float(p[name][k])
                              for mode, pairs in comp["by_mode"].items() for p in pairs
                              for name in ("test", "test_balanced") if p.get(name)
                              for k in ("diff", "p_value", "significant")})


def log_report(mlflow, parent: str, report_dir: str) -> None:
    """The report folder as the parent run's artefact (copied out of an object store first)."""
    with tempfile.TemporaryDirectory() as tmp:
        fs, path = store._fs(report_dir)
        pafs.copy_files(path, tmp, source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
        mlflow.log_artifacts(parent, tmp, artifact_path="report")


def forget(run: dict, stage: str) -> None:
    """A stage run again (`cft-ray run --from/--only`) is logged again: its new numbers become the metrics' latest
    values in the same MLflow run (its old ones stay in their history)."""
    for runs in run.get("tracking", {}).values():
        for entry in runs.values():
            if stage in entry["logged"]:
                entry["logged"].remove(stage)


def log_run(cfg: CftConfig, run: dict) -> None:
    """Every finished stage not yet logged (its manifest's numbers; the arms as child runs; the report, which
    ends the parent run). Called after each stage; a failure is a warning, the run's results stay in run_dir."""
    if cfg.tracking.backend == "none":
        return
    try:
        mlflow = client(cfg)
        parent = parent_run(mlflow, cfg, run)
        for stage, d in run.get("stage_dirs", {}).items():
            if stage in parent["logged"]:
                continue
            if stage == "arms" and store.exists(store.join(cfg.run_dir, "arms.json")):
                log_arms(mlflow, parent["run_id"], cfg.run_dir)
            elif stage == "report" and store.exists(store.join(d, "report.md")):
                log_report(mlflow, parent["run_id"], d)
                mlflow.set_terminated(parent["run_id"])
            elif stage not in ("arms", "report") and store.is_done(d):
                _log(mlflow, parent["run_id"], numbers(store.read_json(store.join(d, "manifest.json")), stage))
            else:
                continue
            parent["logged"].append(stage)
    except Exception as e:  # noqa: BLE001 - tracking must not lose a run whose results are on disk
        log.warning("tracking: could not log to %s (%s: %s); the run goes on, its results are in %s",
                    cfg.tracking.uri or "MLflow", type(e).__name__, error_line(e), store.shown(cfg.run_dir))
