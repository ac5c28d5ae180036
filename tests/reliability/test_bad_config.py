"""Bad configs fail before anything runs, with one message per bad field that names it; run
directories that would let a stage write or delete outside a directory of its own are refused."""
from __future__ import annotations

import types
import typing

import pytest
from pydantic import BaseModel

from cft_ray.config import CftConfig, ConfigError, load_config


def leaf_fields(model: type[BaseModel] = CftConfig, prefix: str = "") -> list[str]:
    out = []
    for name, f in model.model_fields.items():
        ann = f.annotation
        if typing.get_origin(ann) in (typing.Union, types.UnionType) and type(None) in typing.get_args(ann):
            ann = next(a for a in typing.get_args(ann) if a is not type(None))  # an optional section
        sub = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
        out += leaf_fields(sub, f"{prefix}{name}.") if sub else [f"{prefix}{name}"]
    return out


FIELDS = leaf_fields()


def test_the_walk_sees_every_section():
    assert len(FIELDS) > 100 and "teach.pool.size" in FIELDS and "data.columns.answer_format" in FIELDS


@pytest.mark.parametrize("field", FIELDS)
def test_every_field_rejects_a_wrong_type_with_one_message_naming_it(field):
    # a list holding a list is valid for no field (no field takes nested lists): the wrong-type case
    with pytest.raises(ConfigError) as e:
        load_config(None, [f"{field}=[[]]"])
    lines = str(e.value).splitlines()[1:]
    assert len(lines) == 1 and lines[0].strip().split(":")[0] in (field, f"{field}.0"), str(e.value)


@pytest.mark.parametrize("override,field", [
    ("score.pool.size=[3, 1]", "score.pool.size"), ("score.pool.size=abc", "score.pool.size"),
    ("split.quantiles=[0.9, 0.1]", "split.quantiles"), ("teach.max_retries=-1", "teach.max_retries"),
    ("train.zero_stage=4", "train.zero_stage"), ("data.columns.bogus=1", "data.columns.bogus"),
    ("train.resources_per_worker={CPU: lots}", "train.resources_per_worker.CPU"),
    ("train.offload_params=true", "train.offload_params"), ("arms=[instructdiff]", "selection"),
])
def test_bad_values_one_message_naming_the_field(override, field):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    lines = str(e.value).splitlines()[1:]
    assert len(lines) == 1 and lines[0].strip().startswith(f"{field}:"), str(e.value)


@pytest.mark.parametrize("run_dir", ["/", "/etc", "/tmp", "~", ".", "..", "runs/../..", "runs/../../x", " "])
def test_run_dirs_outside_a_directory_of_their_own_are_refused(run_dir):
    with pytest.raises(ConfigError, match="run_dir"):
        load_config(None, [f"run_dir='{run_dir}'"])


def test_ordinary_run_dirs_pass(tmp_path):
    for ok in ("runs/x", str(tmp_path / "run"), "s3://bucket/runs/x"):
        assert load_config(None, [f"run_dir={ok}"]).run_dir == ok
