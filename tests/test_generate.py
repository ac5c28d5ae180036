"""Generation backends (cft_ray/generate.py): greedy decoding is pinned whatever the checkpoint's
generation_config.json says (it once leaked repetition_penalty, n-gram bans and sampling flags into
"greedy" evaluation and teaching)."""
from __future__ import annotations

import dataclasses
import json
import shutil

import pyarrow as pa
import torch

from cft_ray.config import ActorPool, ModelConfig
from cft_ray.generate import GenerationSpec, HFGenerator
from cft_ray.prompts import messages, render


def _greedy_by_hand(model, tok, prompt_ids: list[int], steps: int, eos: set[int]) -> str:
    """Argmax of the next-token logits, one token at a time: greedy with nothing else applied."""
    ids = list(prompt_ids)
    out = []
    with torch.no_grad():
        for _ in range(steps):
            nxt = int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
            out.append(nxt)
            ids.append(nxt)
            if nxt in eos:
                break
    return tok.decode(out, skip_special_tokens=True)


def test_hf_greedy_ignores_the_checkpoints_generation_config(tiny_model_dir, items, tmp_path):
    d = tmp_path / "model"
    shutil.copytree(tiny_model_dir, d)
    path = d / "generation_config.json"
    gc = json.loads(path.read_text()) if path.exists() else {}
    gc.update(repetition_penalty=5.0, no_repeat_ngram_size=1, do_sample=True, top_k=3, temperature=3.0)
    path.write_text(json.dumps(gc))
    spec = GenerationSpec(section="eval", backend="hf", model=ModelConfig(name=str(d), dtype="float32"), prompt="direct",
                          labels="numbers", pool=ActorPool(), max_tokens=10, hf_micro_batch=1)
    gen = HFGenerator(spec)
    rows = [{**it, "sample_idx": 0} for it in items[:4]]
    got = gen(pa.Table.from_pylist(rows))["text"].to_pylist()
    tok, model = gen.tok, gen.model
    want, leaked = [], []
    for r in rows:
        p = tok(render(tok, messages("direct", r, "numbers")), add_special_tokens=False)["input_ids"]
        want.append(_greedy_by_hand(model, tok, p, 10, gen.eos))
        with torch.no_grad():  # what the checkpoint's own config makes of "do_sample=False"
            g = model.generate(input_ids=torch.tensor([p]), max_new_tokens=10, do_sample=False)[0, len(p):].tolist()
        leaked.append(tok.decode(g[:next((k + 1 for k, x in enumerate(g) if x in gen.eos), len(g))], skip_special_tokens=True))
    assert got == want
    assert leaked != want  # the test can tell: the checkpoint's penalties change greedy output
    assert gen.generation_config.repetition_penalty == 1.0 and gen.generation_config.do_sample is False


def test_vllm_gets_the_hf_backends_token_ids_one_bos(smollm2_dir, items, tmp_path):
    """A Llama-3-style template writes its own BOS and the tokenizer adds one too: the text prompt that
    went to vLLM was re-tokenized there with the tokenizer's BOS, so vLLM saw two where hf saw one.
    The vLLM request now carries the ids the hf backend feeds (one BOS); a test run on the real engine
    (test_teach.py) checks the engine counts the same prompt tokens."""
    from transformers import AutoTokenizer

    from cft_ray.generate import vllm_request
    from conftest import LLAMA3_TEMPLATE, build_tiny

    d = build_tiny(tmp_path / "bos", smollm2_dir, LLAMA3_TEMPLATE, layers=1)
    AutoTokenizer.from_pretrained(d, add_bos_token=True).save_pretrained(d)  # a BOS-adding tokenizer
    spec = GenerationSpec(section="eval", backend="vllm", model=ModelConfig(name=d, dtype="float32"), prompt="cot",
                          labels="numbers", pool=ActorPool(), max_tokens=10)
    gen = HFGenerator(dataclasses.replace(spec, backend="hf"))
    tok = gen.tok
    bos = tok.bos_token_id
    for it in items[:3]:
        row = {**it, "sample_idx": 0}
        req = vllm_request(spec, d, row)
        text = render(tok, messages("cot", row, "numbers"))
        assert req["tokenized_prompt"] == tok(text, add_special_tokens=False)["input_ids"]
        assert req["tokenized_prompt"].count(bos) == 1 and req["tokenized_prompt"][0] == bos
        assert tok(text)["input_ids"][:2] == [bos, bos], "the text path doubles the BOS: the test can tell"
        hf = gen(pa.Table.from_pylist([row]))["prompt_tokens"].to_pylist()
        assert hf == [len(req["tokenized_prompt"])]
        assert req["sampling_params"]["temperature"] == 0.0 and req["sampling_params"]["max_tokens"] == 10
