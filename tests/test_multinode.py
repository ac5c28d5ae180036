"""Multi-node placement: a 3-node `ray.cluster_utils.Cluster` on this machine (head, an inference node
with `infer_node`, a training node with `train_node`, as in cluster.yaml) runs the pipeline on tiny data;
Ray's state API then says on which node every actor ran. In a subprocess: the test session's Ray stays up."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from test_pipeline import tiny_run_overrides

SCRIPT = textwrap.dedent("""
    import json, sys
    import ray
    from ray.cluster_utils import Cluster
    from ray.util.state import list_actors
    from cft_ray import pipeline
    from cft_ray.config import load_config

    cfg = load_config(None, json.loads(sys.argv[1]))
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2})
    cluster.add_node(num_cpus=2, resources={"infer_node": 2})
    cluster.add_node(num_cpus=3, resources={"train_node": 2})
    ray.init(address=cluster.address, log_to_driver=False)
    pipeline.main(cfg)
    kinds = {n["NodeID"]: ("infer" if "infer_node" in n["Resources"] else "train" if "train_node" in n["Resources"] else "head")
             for n in ray.nodes()}
    placed = [(a.repr_name or a.class_name, kinds.get(a.node_id)) for a in list_actors(detail=True, limit=10000)]
    print("PLACED " + json.dumps(placed))
    ray.shutdown()
    cluster.shutdown()
""")


@pytest.mark.heavy
def test_stages_run_on_the_nodes_their_config_asks_for(tmp_path, tiny_model_dir):
    infer, train = "{infer_node: 1}", "{train_node: 1}"
    overrides = tiny_run_overrides(tmp_path / "run", tiny_model_dir, arms=["base", "sft"]) + [
        f"score.pool.resources={infer}", f"eval.pool.resources={infer}", f"teach.pool.resources={infer}",
        f"train.resources_per_worker={train}", f"train.pool.resources={train}", "train.num_workers=2"]
    res = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(overrides)], capture_output=True, text=True, timeout=1200)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    placed = json.loads(next(line for line in res.stdout.splitlines() if line.startswith("PLACED "))[7:])
    where: dict[str, set] = {}
    for name, node in placed:
        key = "Scorer" if "Scorer" in name else "teacher" if "Teacher" in name else \
            "tokenize" if "Tokenize" in name else "train" if "TrainWorker" in name else None
        if key:
            where.setdefault(key, set()).add(node)
    # base and sft are evaluated with generate on HFTeacher actors (the eval pool)
    assert where["Scorer"] == {"infer"} and where["teacher"] == {"infer"}, where
    assert where["train"] == {"train"} and where["tokenize"] == {"train"}, where
