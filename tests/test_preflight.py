"""Driver checks (preflight.check_config): what would fail inside every actor fails before Ray starts, in a
ConfigError naming the field. No Ray here: that is the point."""
from __future__ import annotations

import string

import pytest

from cft_ray import pipeline, preflight, prompts, score
from cft_ray.config import EMBEDDED_CONFIG, ConfigError, PromptConfig, load_config


def _cfg(model_dir, tmp_path, *overrides):
    return load_config(EMBEDDED_CONFIG, [f"student.name={model_dir}", f"teach.model.name={model_dir}",
                              f"run_dir={tmp_path}/run", *overrides])


def test_the_embedded_configs_limits_pass(tiny_model_dir, tmp_path):
    cfg = _cfg(tiny_model_dir, tmp_path)
    preflight.check_config(cfg, pipeline.needed(cfg) + ["train"])


@pytest.mark.parametrize("override, field", [
    ("score.max_prompt_tokens=8", "score.max_prompt_tokens: 8 tokens <"),
    # teach.max_tokens is 160 in the embedded config: 200 leaves fewer than the teacher prompt's ~70
    ("teach.engine_kwargs.max_model_len=200", "teach.engine_kwargs.max_model_len: 200 tokens <"),
    ("train.max_length=200", "train.max_length: 200 tokens <"),
    ("eval.max_new_tokens=2000", "eval.engine_kwargs.max_model_len: 2048 tokens <"),
    # the tiny model's max_position_embeddings is 2048
    ("eval.engine_kwargs.max_model_len=4096", "max_position_embeddings: 2048 tokens < 4096"),
    ("train.max_length=3000", "max_position_embeddings: 2048 tokens < 3000"),
])
def test_a_limit_without_room_fails_on_the_driver_naming_it(tiny_model_dir, tmp_path, override, field):
    cfg = _cfg(tiny_model_dir, tmp_path, override)
    with pytest.raises(ConfigError, match=field.replace("(", r"\(")) as e:
        preflight.check_config(cfg, pipeline.needed(cfg) + ["train"])
    assert "\n" not in str(e.value)


def test_a_score_only_command_is_not_held_to_training_limits(tiny_model_dir, tmp_path):
    cfg = _cfg(tiny_model_dir, tmp_path, "train.max_length=3000")  # over the tiny model's 2048 positions
    preflight.check_config(cfg, ["score"])


def _digitless_tokenizer():
    """One token per character, digits unknown: "1".."9" all become <unk>."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = [c for c in string.printable if c not in string.digits]
    tk = Tokenizer(models.WordLevel({c: i for i, c in enumerate(["<unk>", *chars])}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", eos_token="\n")
    tok.chat_template = prompts.TEMPLATES["plain"]
    return tok


def test_labels_that_tokenise_alike_fail_and_the_other_scheme_passes():
    tok = _digitless_tokenizer()
    with pytest.raises(ConfigError, match=r"prompt.labels=numbers: labels '1' and '2' begin with the same token.*prompt.labels=letters"):
        score.check_labels(tok, PromptConfig(labels="numbers"))
    score.check_labels(tok, PromptConfig(labels="letters"))
