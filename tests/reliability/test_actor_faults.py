"""A Ray Data actor (one scorer, one teacher) SIGKILLed mid-stage: Ray restarts it and retries its
batch, the stage completes with every row exactly once and reconciled counts. An actor that keeps
dying exhausts `pool.max_restarts` and fails the stage with a clear error instead of looping."""
from __future__ import annotations

import os
import signal
import threading
import time

import psutil
import pyarrow.parquet as pq
import pytest

from cft_ray import arms, score, store
from cft_ray.config import load_config
from cft_ray.layout import stage_dir
from test_score import _items, _prepare
from test_teach import cfg_for, make_split, samples_of


def actor_pids(name: str) -> list[int]:
    """Processes of this machine's Ray actors whose class is `name` (Ray titles them ray::<class>...)."""
    out = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if f"({name})" in " ".join(p.info["cmdline"] or []):
                out.append(p.pid)
        except psutil.Error:
            pass
    return out


def killer(name: str, parts_dir: str, times: int, killed: list, min_parts: int = 1) -> threading.Thread:
    """SIGKILL the `name` actor `times` times: first once `min_parts` parts are on disk (mid-stage),
    then each restarted incarnation as soon as it appears."""
    def run():
        deadline = time.time() + 300
        while time.time() < deadline and len(store.part_files(parts_dir)) < min_parts:
            time.sleep(0.05)
        while time.time() < deadline and len(killed) < times:
            for pid in actor_pids(name):
                if pid not in killed:
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
            time.sleep(0.05)

    th = threading.Thread(target=run, daemon=True)
    th.start()
    return th


@pytest.mark.heavy
def test_scoring_actor_killed_mid_stage_is_restarted(ray_local, tmp_path, tiny_model_dir):
    items = _items(240)
    cfg = load_config(None, _prepare(tmp_path, items, 2, f"student.name={tiny_model_dir}", "student.dtype=float32",
                                     "score.pool.batch_size=4", "score.token_budget=64", "score.rows_per_file=8"))
    out = stage_dir(cfg, "score")
    killed: list[int] = []
    th = killer("Scorer", store.join(out, "parts"), 1, killed, min_parts=2)
    assert score.main(cfg) == out
    th.join()
    assert len(killed) == 1, "the scorer was killed mid-stage"
    assert actor_pids("Scorer") == [] or killed[0] not in actor_pids("Scorer")
    ids = pq.read_table(store.join(out, "parts"), columns=["item_id"])["item_id"].to_pylist()
    assert len(ids) == len(set(ids)) == len(items), "every row exactly once"
    c = store.read_json(store.join(out, "manifest.json"))["counts"]
    assert c["rows_in"] == len(items) == c["rows_out"] + c.get("errors", 0)


@pytest.mark.heavy
def test_scoring_actor_that_keeps_dying_fails_the_stage(ray_local, tmp_path, tiny_model_dir):
    items = _items(240)
    cfg = load_config(None, _prepare(tmp_path, items, 2, f"student.name={tiny_model_dir}", "student.dtype=float32",
                                     "score.pool.batch_size=4", "score.token_budget=64", "score.rows_per_file=8",
                                     "score.pool.max_restarts=1"))
    out = stage_dir(cfg, "score")
    killed: list[int] = []
    th = killer("Scorer", store.join(out, "parts"), 2, killed)
    t0 = time.time()
    with pytest.raises(Exception, match="(?i)actor.*(died|dead|unavailable)|ActorDiedError|ActorUnavailable"):
        score.main(cfg)
    th.join()
    assert len(killed) == 2 and time.time() - t0 < 300
    assert not store.is_done(out), "a failed stage is never marked finished"
    ids = pq.read_table(store.join(out, "parts"), columns=["item_id"])["item_id"].to_pylist() \
        if store.part_files(store.join(out, "parts")) else []
    assert len(ids) == len(set(ids)) < len(items), "what was written stays, once: a re-run resumes from it"


@pytest.mark.heavy
def test_teacher_actor_killed_mid_stage_is_restarted(ray_local, tmp_path, smollm2_dir, items):
    # the real SmolLM2 teacher: slow enough per batch (1 row, 24 tokens) that the kill lands mid-stage
    cfg = cfg_for(tmp_path, smollm2_dir, "teach.policy=keep_all", "teach.max_tokens=24", "teach.pool.batch_size=1",
                  "teach.hf_micro_batch=1")
    cot_ids = {it["item_id"] for it in items}
    make_split(cfg, items, cot_ids)
    out = stage_dir(cfg, "teach")
    killed: list[int] = []
    th = killer("HFGenerator", store.join(out, "parts", "r0"), 1, killed)
    assert arms.teach_for_arms(cfg) == out
    th.join()
    assert len(killed) == 1, "the teacher was killed mid-stage"
    s = samples_of(out)
    assert sorted(r["item_id"] for r in s) == sorted(cot_ids), "every CoT row exactly once"
    m = store.read_json(store.join(out, "manifest.json"))["counts"]
    assert m["requested"] == len(cot_ids) == m["kept"] + sum(m["failed"].values())
