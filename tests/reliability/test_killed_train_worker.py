"""A Ray Train worker SIGKILLed after the first committed checkpoint: Ray Train restarts the worker
group, which resumes from that checkpoint with the saved optimizer state (DeepSpeed's checkpoint read
with torch.load(weights_only=True)) and ends at the same step, with the same losses, as the
uninterrupted run (the session's `lora_run`)."""
from __future__ import annotations

import json
import threading
import time

import psutil
import pytest

from test_train import _train


def _train_workers() -> list:
    return [p for p in psutil.Process().children(recursive=True) if "RayTrainWorker" in " ".join(p.cmdline())]


@pytest.mark.heavy
def test_killed_worker_resumes_exactly(ray_local, tiny_model_dir, tmp_path, lora_run):
    """Kill a worker process after the first checkpoint: Ray Train restarts the group, which resumes at
    the saved step with the saved optimizer state and ends like the uninterrupted run."""
    _, _, ref = lora_run
    killed = []

    def killer():
        # wait until Ray Train has committed a checkpoint (all ranks reported), not just uploaded one
        snapshot, deadline = tmp_path / "ray_train" / "checkpoint_manager_snapshot.json", time.time() + 600
        while time.time() < deadline:
            try:
                if json.loads(snapshot.read_text())["latest_checkpoint_result"]["checkpoint_dir_name"].startswith("step-"):
                    break
            except (OSError, ValueError, KeyError, TypeError):
                pass
            time.sleep(0.05)
        workers = _train_workers()
        if workers:
            workers[-1].kill()
            killed.append(workers[-1].pid)

    th = threading.Thread(target=killer, daemon=True)
    th.start()
    _, m = _train(ray_local, tiny_model_dir, tmp_path)
    th.join()
    assert killed and m["resumes"], "a worker was killed and the run resumed"
    r = m["resumes"][0]
    saved = {c["step"]: c["fingerprint"] for c in ref["checkpoints"]}
    assert r["step"] in saved and r["fingerprint"] == r["saved_fingerprint"] == pytest.approx(saved[r["step"]], rel=1e-9)
    assert m["steps"] == ref["steps"]
    got, want = [h["loss"] for h in m["loss_curve"]], [h["loss"] for h in ref["loss_curve"]]
    assert got == pytest.approx(want, rel=1e-5), "same data order and state after the resume"
