"""cluster.yaml passes Ray's own autoscaler validation, and the stages' resource requests can land."""
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def _cluster():
    return yaml.safe_load((ROOT / "cluster.yaml").read_text())


def test_cluster_yaml_validates_with_ray():
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = prepare_config(_cluster())
    validate_config(cfg)
    types = cfg["available_node_types"]
    assert cfg["head_node_type"] == "head" and "GPU" not in types["head"]["resources"]
    assert all(types[t]["min_workers"] == 0 for t in types if t != "head")
    assert types["infer_gpu"]["node_config"].get("InstanceMarketOptions", {}).get("MarketType") == "spot"
    assert "InstanceMarketOptions" not in types["train_gpu"]["node_config"]  # training is on-demand


def test_a_typo_is_rejected_by_the_same_validation():
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    bad = _cluster()
    bad["available_node_types"]["train_gpu"]["min_worker"] = 0  # typo of min_workers
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(bad))


def test_nodes_install_only_pinned_versions_the_suite_ran_with():
    """cluster.yaml installs with constraints/cluster-gpu.txt (scripts/lock.sh): every requirement pinned, the
    framework versions equal to the ones this test suite imports, and vLLM at the version ray[llm] pins."""
    from importlib.metadata import distribution, version

    setup = " ".join(_cluster()["setup_commands"])
    assert "-c constraints/cluster-gpu.txt" in setup and "pip install" in setup
    lines = [ln.strip() for ln in (ROOT / "constraints" / "cluster-gpu.txt").read_text().splitlines()]
    pins = dict(ln.split("==", 1) for ln in lines if ln and not ln.startswith("#"))
    assert len(pins) == len([ln for ln in lines if ln and not ln.startswith("#")]) > 100, "every line a name==version pin"
    for pkg in ("ray", "transformers", "deepspeed", "peft", "accelerate", "pyarrow", "pydantic", "datasets", "s3fs", "mlflow-skinny"):
        assert pins[pkg] == version(pkg) if pkg != "s3fs" else pkg in pins, pkg
    ray_llm = [r for r in distribution("ray").requires if r.startswith("vllm") and 'extra == "llm"' in r]
    assert ray_llm and f"=={pins['vllm']};" in ray_llm[0].replace(" ", ""), (ray_llm, pins["vllm"])
