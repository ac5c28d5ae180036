import os

import pytest
import torch

from cft_ray.config import ConfigError, ModelConfig
from cft_ray.models import load, resolve


def test_hf_directory(tiny_model_dir):
    tok, model = load(ModelConfig(name=tiny_model_dir, dtype="float32"))
    assert resolve(ModelConfig(name=tiny_model_dir)) == tiny_model_dir
    assert model.dtype == torch.float32 and not model.training
    assert tok.pad_token is not None and tok.chat_template


def test_auto_dtype_is_bf16_only_where_bf16_is_native(tiny_model_dir):
    from cft_ray.config import native_cpu_bf16

    _, model = load(ModelConfig(name=tiny_model_dir))
    assert model.dtype == (torch.bfloat16 if native_cpu_bf16() else torch.float32)
    _, model = load(ModelConfig(name=tiny_model_dir, dtype="bfloat16"))
    assert model.dtype == torch.bfloat16


def test_pickle_only_checkpoint_is_refused(tiny_model_dir, tmp_path):
    import shutil

    from safetensors.torch import load_file
    d = tmp_path / "pickled"
    shutil.copytree(tiny_model_dir, d)
    state = load_file(d / "model.safetensors")
    os.remove(d / "model.safetensors")
    torch.save(state, d / "pytorch_model.bin")
    with pytest.raises(ConfigError, match="safetensors"):
        load(ModelConfig(name=str(d)))


def test_bad_specs():
    with pytest.raises(ConfigError, match="does not exist"):
        resolve(ModelConfig(name="/nope/model.gguf"))
    with pytest.raises(ConfigError, match="does not exist"):
        resolve(ModelConfig(name="./not-here"))


def test_gguf_file_converts_once(smollm2_dir, tmp_path):
    """A GGUF given by path converts to a cached safetensors dir with the embedded model's logits."""
    from cft_ray.data import package_file
    from cft_ray.models import EMBEDDED_MODELS

    gguf = package_file(*EMBEDDED_MODELS["smollm2-135m-instruct"])
    cfg = ModelConfig(name=str(gguf.parent), gguf_file=gguf.name, cache_dir=str(tmp_path), dtype="float32")
    out = resolve(cfg)
    assert os.path.exists(os.path.join(out, "model.safetensors"))
    assert resolve(cfg) == out  # second call is a cache hit
    tok, model = load(cfg)
    _, ref = load(ModelConfig(name=smollm2_dir, dtype="float32"))
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.inference_mode():
        assert torch.allclose(model(ids).logits, ref(ids).logits, atol=1e-5)


@pytest.mark.heavy
def test_embedded_default_is_real_smollm2(smollm2_dir):
    tok, model = load(ModelConfig(name=smollm2_dir))
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(134.5e6, rel=0.01)
    assert model.config.num_hidden_layers == 30 and len(tok) == 49152
    msgs = [{"role": "user", "content": "Say hello."}]
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.inference_mode():
        out = model.generate(**ids, max_new_tokens=5, do_sample=False)
    assert out.shape[1] > ids["input_ids"].shape[1]
