"""Run dirs and models on an object store (issue 21), against a real S3-compatible server on loopback (moto's,
in a thread of this process); pyarrow reaches it through AWS_ENDPOINT_URL as it would reach S3 or MinIO."""
from __future__ import annotations

from pathlib import Path

import pyarrow.fs as pafs
import pytest

from cft_ray import models, store
from cft_ray.config import ConfigError, ModelConfig
from conftest import upload


def test_a_model_on_the_object_store_is_fetched_once_per_content_and_loads(s3, tiny_model_dir, tmp_path):
    upload(s3, tiny_model_dir, "cft/run/train-x/model")
    cfg = ModelConfig(name="s3://cft/run/train-x/model", cache_dir=str(tmp_path / "cache"), dtype="float32")
    models.check_reachable(cfg)
    local = Path(models.resolve(cfg))
    for f in Path(tiny_model_dir).iterdir():
        assert (local / f.name).read_bytes() == f.read_bytes(), f.name
    assert models.resolve(cfg) == str(local) and len(list((tmp_path / "cache").iterdir())) == 1, "fetched once"
    tok, model = models.load(cfg, "cpu")  # transformers reads the node-local copy
    assert model.config.num_hidden_layers == 2 and tok.chat_template
    # the same address re-trained (a forced re-run): new content, fetched again
    with s3.open_output_stream("cft/run/train-x/model/generation_config.json") as out:
        out.write(b'{"max_new_tokens": 7}')
    again = Path(models.resolve(cfg))
    assert again != local and (again / "generation_config.json").read_bytes() == b'{"max_new_tokens": 7}'


def test_a_directory_without_a_model_fails_on_the_driver(s3, tmp_path):
    with s3.open_output_stream("cft/not-a-model/readme.txt") as out:
        out.write(b"no config.json here")
    for name in ("s3://cft/not-a-model", "s3://cft/nothing-at-all"):
        with pytest.raises(ConfigError, match=f"model.name: {name} has no config.json"):
            models.check_reachable(ModelConfig(name=name))
        with pytest.raises(ConfigError, match="has no config.json"):
            models.resolve(ModelConfig(name=name, cache_dir=str(tmp_path)))


def test_run_dir_write_probe_passes_on_a_bucket_and_names_a_missing_one(s3):
    store.check_writable("s3://cft/runs/a")
    assert [f.base_name for f in s3.get_file_info(pafs.FileSelector("cft/runs/a", allow_not_found=True))] == [], \
        "the probe file is removed"
    with pytest.raises(ConfigError, match=r"^run_dir: cannot write s3://no-such-bucket/runs/a \(.*\); check"):
        store.check_writable("s3://no-such-bucket/runs/a")


def test_the_driver_reads_tokenizer_and_config_without_fetching_the_weights(s3, tiny_model_dir, tmp_path):
    """What the driver needs of a model on an object store (tokenizer, chat template, context length) comes without
    the weight files: a 70B checkpoint (140 GB) has no business on a head node's disk."""
    import json

    upload(s3, tiny_model_dir, "cft/run/train-y/model")
    cfg = ModelConfig(name="s3://cft/run/train-y/model", cache_dir=str(tmp_path / "cache"))
    assert models.load_tokenizer(cfg).chat_template
    want = json.loads((Path(tiny_model_dir) / "config.json").read_text())["max_position_embeddings"]
    assert models.context_length(cfg) == want
    (meta,) = (tmp_path / "cache").iterdir()
    assert meta.name.endswith("-meta") and (meta / "tokenizer.json").exists() and (meta / "config.json").exists()
    assert not list(meta.glob("*.safetensors")), "no weights fetched"
