"""Step 4: supervised fine-tuning on the routed rows (direct answers + teacher CoT), on Ray Train + DeepSpeed.

    routed rows (+ teacher CoT)  --build_examples-->  token ids + label masks (Ray Data tasks)
        --phase_datasets-->  one shuffled (optionally packed) dataset per phase of the schedule
        --train-->  TorchTrainer; every worker streams its shard (train_loop.py)  -->  HF model dir

Examples come only from prompts.py and the model's chat template. Labels cover the assistant turn
(default) or every token; rows that cannot train (no teacher text, too long under truncation=drop, no
trainable token) stay in the output as error rows with their reason. Data spent follows the paper:
supervised target tokens x epochs, per phase.
"""
from __future__ import annotations

import json
import logging
import os
import time

import pyarrow as pa
import pyarrow.compute as pc

from cft_ray import layout, models, prompts, store
from cft_ray.config import CftConfig, ConfigError, Phase, TrainConfig
from cft_ray.layout import EXAMPLE_SCHEMA, IGNORE
from cft_ray.runtime import block_partials
from cft_ray.train_loop import train_loop

log = logging.getLogger("cft_ray")

ROUTED_COLUMNS = {"item_id", "question", "options", "answer", "bucket", "treatment"}
INSTRUCTION_COLUMNS = {"item_id", "instruction", "response", "treatment"}  # general instruction data


def tokenize_examples(tok, examples: list[tuple[list[dict], str]], max_length: int, loss_on: str = "assistant",
                      truncation: str = "keep_end") -> list[tuple[list[int], list[int], bool] | ValueError]:
    """(messages, assistant text) pairs -> (input_ids, labels, truncated), or the ValueError that makes
    the row unusable. The assistant span is what follows the rendered prompt-with-generation-header:
    checked as a token prefix, else located by character offsets (templates whose tokens merge
    across the boundary or that re-render earlier turns once an answer follows)."""
    prompt_txt = [prompts.render(tok, m) for m, _ in examples]
    full_txt = [prompts.render(tok, m, assistant=a) for m, a in examples]
    fast = getattr(tok, "is_fast", False)
    full = tok(full_txt, add_special_tokens=False, return_offsets_mapping=fast)
    prompt_ids = tok(prompt_txt, add_special_tokens=False)["input_ids"]
    out: list = []
    for i, (_, target) in enumerate(examples):
        ids, p = list(full["input_ids"][i]), prompt_ids[i]
        try:
            if ids[:len(p)] == p:
                start = len(p)
            else:
                pos = len(prompt_txt[i]) if full_txt[i].startswith(prompt_txt[i]) else full_txt[i].rfind(target)
                if pos < 0 or not fast:
                    raise ValueError("chat template: cannot locate the assistant turn in the rendered example")
                start = next((j for j, (_, end) in enumerate(full["offset_mapping"][i]) if end > pos), len(ids))
            labels = list(ids) if loss_on == "all" else [IGNORE] * start + ids[start:]
            truncated = len(ids) > max_length
            if truncated:
                if truncation == "drop":
                    raise ValueError(f"{len(ids)} tokens > max_length={max_length} (truncation=drop)")
                cut = slice(-max_length, None) if truncation == "keep_end" else slice(0, max_length)
                ids, labels = ids[cut], labels[cut]
            if all(x == IGNORE for x in labels[1:]):
                raise ValueError("no trainable token" + (" after truncation" if truncated else ""))
            out.append((ids, labels, truncated))
        except ValueError as e:
            out.append(e)
    return out


def template_tail(tok, examples: list[tuple[list[dict], str]]) -> list[int]:
    """Tokens the chat template appends after each assistant text (end-of-turn, newline): trained as part
    of the assistant turn, but not the answer. Needs a fast tokenizer's offsets (else 0)."""
    if not getattr(tok, "is_fast", False):
        return [0] * len(examples)
    full = [prompts.render(tok, m, assistant=a) for m, a in examples]
    enc = tok(full, add_special_tokens=False, return_offsets_mapping=True)
    ends = [text.rfind(a) + len(a) for text, (_, a) in zip(full, examples)]
    return [sum(1 for start, _ in offsets if start >= end) for offsets, end in zip(enc["offset_mapping"], ends)]


def tokenize_rows(t: pa.Table, model_json: str, scheme: str, max_length: int, loss_on: str, truncation: str,
                  preset: str = "paper", cot: pa.Table | None = None) -> pa.Table:
    """Ray Data UDF: routed rows (+ `text` on cot rows, or the `cot` table to take it from by item id)
    -> EXAMPLE_SCHEMA rows, errors included."""
    if cot is not None:
        t = t.append_column("text", cot["text"].take(pc.index_in(t["item_id"], value_set=cot["item_id"])))
    tok = models.cached_tokenizer(model_json)
    rows = t.to_pylist()
    built: list = [None] * len(rows)
    todo, pairs = [], []
    for i, r in enumerate(rows):
        try:
            pairs.append(prompts.example(r, r["treatment"], scheme, preset))
            todo.append(i)
        except ValueError as e:
            built[i] = e
    # the assistant span is located once; loss_on=all then trains every token of the same (truncated) ids
    for i, res in zip(todo, tokenize_examples(tok, pairs, max_length, "assistant", truncation)):
        built[i] = res
    out = []
    for r, res in zip(rows, built):
        ok = not isinstance(res, ValueError)
        ids, answer, trunc = res if ok else ([], [], False)
        labels = list(ids) if loss_on == "all" else answer
        # an instruction row's response is a direct target (its phase is the direct one)
        kind = "direct" if r["treatment"] == "instruction" else r["treatment"]
        out.append({"item_id": r["item_id"], "bucket": r.get("bucket"), "bucket_idx": r.get("bucket_idx"),
                    "split": r.get("split") or "train", "kind": kind, "input_ids": ids,
                    "labels": labels, "n_tokens": len(ids), "n_target": sum(x != IGNORE for x in labels[1:]),
                    "n_answer": sum(x != IGNORE for x in answer[1:]),
                    "truncated": trunc, "error": None if ok else str(res)})
    return pa.Table.from_pylist(out, schema=EXAMPLE_SCHEMA)


WANTED = ROUTED_COLUMNS | INSTRUCTION_COLUMNS | {"subject", "category", "bucket_idx", "split"}


def _wanted(names: list[str]) -> list[str]:
    """The columns examples are built from, of multiple-choice rows or instruction rows."""
    need = INSTRUCTION_COLUMNS if "instruction" in names else ROUTED_COLUMNS
    missing = need - set(names)
    if missing:
        raise ValueError(f"routed rows lack columns {sorted(missing)}")
    return [c for c in names if c in WANTED]


def _project(t: pa.Table) -> pa.Table:
    return t.select(_wanted(t.column_names))


def build_examples(rows, cot, cfg: CftConfig, model_dir: str | None = None):
    """Routed rows (+ teacher CoT rows `item_id, text`, or None) -> a lazy Dataset of EXAMPLE_SCHEMA.

    Rows routed to `drop` make no example. `treatment` decides the example kind, so an arm builds
    its data by rewriting that column (all direct = SFT, all cot = distillation)."""
    import ray
    from ray.data.expressions import col

    schema = rows.schema(fetch_if_missing=False)  # known for Parquet reads; a lazy chain would run to find out
    if schema is not None:
        rows = rows.select_columns(_wanted(schema.names))  # missing columns fail here, before any work
    else:  # project inside a map that fuses with the chain's last one (no extra Ray Data job)
        rows = rows.map_batches(_project, batch_format="pyarrow")
    routed = rows.filter(expr=col("treatment") != "drop")
    tc, pool = cfg.train, cfg.train.pool
    cot_table = None
    if cot is not None and cot.count() <= tc.cot_broadcast_rows:
        # Small: to the driver, shipped once with the map function, joined per block. The hash join's shuffle
        # actors cost ~18 s per arm here whatever the size.
        cot_table = pa.concat_tables(block_partials(cot.select_columns(["item_id", "text"]), lambda b: b)
                                     or [pa.table({"item_id": pa.array([], pa.string()), "text": pa.array([], pa.string())})])
        if pc.count_distinct(cot_table["item_id"]).as_py() != cot_table.num_rows:
            raise ValueError("teacher CoT has more than one row for an item id (the teach stage keeps one per item)")
    elif cot is not None:  # hash join: scales to corpora bigger than any one node (needs polars)
        routed = routed.join(cot.select_columns(["item_id", "text"]), join_type="left_outer", on=("item_id",),
                             num_partitions=max(2, int(ray.cluster_resources().get("CPU", 2))))
    model = cfg.student.model_copy(update={"name": model_dir}) if model_dir else cfg.student
    return routed.map_batches(
        tokenize_rows, batch_format="pyarrow", batch_size=pool.batch_size,
        concurrency=pool.size if isinstance(pool.size, int) else pool.size[1],
        num_cpus=pool.num_cpus, num_gpus=pool.num_gpus, resources=pool.resources or None,
        fn_kwargs={"model_json": model.model_dump_json(), "scheme": cfg.prompt.labels, "max_length": tc.max_length,
                   "loss_on": tc.loss_on, "truncation": tc.truncation, "preset": cfg.prompt.preset, "cot": cot_table})


def pack(t: pa.Table, max_length: int) -> pa.Table:
    """Ray Data UDF: first-fit-decreasing packing of rows into sequences of <= max_length tokens.
    position_ids restart at every row, which makes transformers build a block-diagonal causal mask
    (no attention across rows); the first label of each row is masked so no row learns from its
    neighbour's last token."""
    ids, labels = t["input_ids"].to_pylist(), t["labels"].to_pylist()
    bins: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(ids)), key=lambda i: -len(ids[i])):
        j = next((b for b, r in enumerate(room) if r >= len(ids[i])), None)
        if j is None:
            bins.append([]), room.append(max_length)
            j = len(bins) - 1
        bins[j].append(i)
        room[j] -= len(ids[i])
    counted = {c: t[c].to_pylist() for c in ("n_target", "n_answer") if c in t.column_names}
    out = {"input_ids": [], "labels": [], "position_ids": [], "n_tokens": [], **{c: [] for c in counted}, "n_rows": []}
    for b in bins:
        out["input_ids"].append([x for i in b for x in ids[i]])
        out["labels"].append([x for i in b for x in [IGNORE] + labels[i][1:]])
        out["position_ids"].append([p for i in b for p in range(len(ids[i]))])
        out["n_tokens"].append(sum(len(ids[i]) for i in b))
        for c, per_row in counted.items():
            out[c].append(sum(per_row[i] for i in b))
        out["n_rows"].append(len(b))
    return pa.table(out, schema=pa.schema([("input_ids", pa.list_(pa.int32())), ("labels", pa.list_(pa.int32())),
                                           ("position_ids", pa.list_(pa.int32())), ("n_tokens", pa.int32()),
                                           *((c, pa.int32()) for c in counted), ("n_rows", pa.int32())]))


def resolve_phases(tc: TrainConfig, buckets: list[str]) -> list[Phase]:
    """The schedule as phases; `buckets` in increasing difficulty (for the curriculum)."""
    if tc.schedule == "custom":
        if not tc.phases:
            raise ConfigError("train.phases: schedule=custom needs at least one phase")
        return list(tc.phases)
    if tc.schedule == "two_phase":  # paper: direct (easy+medium by routing), then CoT (hard) continuing
        return [Phase(name="direct", treatments=["direct"], epochs=tc.epochs),
                Phase(name="cot", treatments=["cot"], epochs=tc.epochs)]
    if tc.schedule == "merged":
        return [Phase(name="merged", treatments=["direct", "cot"], epochs=tc.epochs)]
    return [Phase(name=f"curriculum-{b}", treatments=["direct"], buckets=[b], epochs=tc.epochs) for b in buckets]


def _token_sums(ds) -> dict[str, int]:
    """Sums of the token counters in one pass over per-block partial sums."""
    cols = ["n_tokens", "n_target", "n_answer"]

    def part(t: pa.Table) -> pa.Table:
        return pa.table({c: [int(pc.sum(t[c]).as_py() or 0)] for c in cols})

    blocks = block_partials(ds, part)
    return {c: sum(sum(b[c].to_pylist()) for b in blocks) for c in cols}


def phase_datasets(examples, cfg: CftConfig) -> tuple[list[dict], dict, dict]:
    """Usable train/valid examples -> (phases, datasets, valid): per phase the selected rows, shuffled with the
    run seed, packed if configured, materialised (epochs re-read them, resumes replay them), and the
    step count every worker will run; the valid rows as one list of Arrow block refs per rank, equal-sized
    (each Ray Train dataset costs a SplitCoordinator actor, ~6 s to start here, for rows read once).
    Phases without rows are kept in the list with 0 steps."""
    from ray.data.expressions import col

    tc = cfg.train
    ok = examples.filter(expr=col("error").is_null()).materialize()
    buckets = cfg.split.buckets()  # easiest first, as the split named them (no shuffle job to find out)
    global_batch = tc.num_workers * tc.micro_batch * tc.grad_accum
    phases, datasets, valid_refs = [], {}, {}
    keep = ["input_ids", "labels", "n_tokens", "n_target", "n_answer"]
    for i, ph in enumerate(resolve_phases(tc, buckets)):
        sel = col("kind").is_in(list(ph.treatments))
        if ph.buckets is not None:
            sel = sel & col("bucket").is_in(list(ph.buckets))
        train = ok.filter(expr=sel & (col("split") == "train")).select_columns(keep).random_shuffle(seed=tc.seed + i)
        if tc.packing:
            train = train.map_batches(pack, batch_format="pyarrow", batch_size=4096, fn_kwargs={"max_length": tc.max_length})
        train = train.materialize()
        valid = ok.filter(expr=sel & (col("split") == "valid")).select_columns(keep).materialize()
        rows, n_valid = train.count(), valid.count()
        sums = _token_sums(train)
        # drop_last per epoch: every worker runs the same number of full steps (collectives never
        # wait on a worker that ran out of rows); the tail rows move with the per-epoch shuffle.
        spe = (rows // tc.num_workers) // (tc.micro_batch * tc.grad_accum)
        if rows and spe == 0:  # e.g. few kept teacher outputs: the other phases still train; the manifest says so
            log.warning("train: phase %s has %d rows, fewer than one global batch (%d workers x micro_batch %d x "
                        "grad_accum %d): skipped", ph.name, rows, tc.num_workers, tc.micro_batch, tc.grad_accum)
        entry = {"name": ph.name, "treatments": list(ph.treatments), "buckets": ph.buckets, "epochs": ph.epochs,
                 "rows": rows, "valid_rows": n_valid, "steps_per_epoch": spe,
                 "steps": max(1, round(ph.epochs * spe)) if spe else 0,
                 "tokens_per_epoch": sums["n_tokens"], "target_tokens_per_epoch": sums["n_answer"],
                 "trained_tokens_per_epoch": sums["n_target"],
                 "rows_unused_per_epoch": rows - spe * global_batch, "dataset": f"train_{i}",
                 "valid": f"valid_{i}" if n_valid >= tc.num_workers else None}
        entry["data_spent_target_tokens"] = round(entry["target_tokens_per_epoch"] * ph.epochs) if spe else 0
        if not rows:
            log.warning("train: phase %s has no rows; skipped", ph.name)
        elif not spe:
            entry["skipped"] = f"{rows} rows < one global batch of {global_batch}"
        else:
            datasets[entry["dataset"]] = train
            if entry["valid"]:
                valid_refs[entry["valid"]] = [part.to_arrow_refs() for part in valid.split(tc.num_workers, equal=True)]
        phases.append(entry)
    if not any(p["steps"] for p in phases):
        per = ", ".join(f"{p['name']}: {p['rows']} rows" for p in phases)
        bad = store.reason_counts(store.column_values(examples.filter(expr=col("error").is_not_null()), "error").to_pylist())
        raise ConfigError(f"train: no phase has one global batch of {global_batch} rows ({per}; unusable examples: "
                          f"{bad or 'none'}); check the routing and the teacher's kept output, "
                          "or lower train.micro_batch, grad_accum or num_workers")
    return phases, datasets, valid_refs


def train(examples, cfg: CftConfig, out_dir: str, init_from: str | None = None) -> str:
    """Examples (EXAMPLE_SCHEMA, error rows allowed) -> `<out_dir>/model` (HF, LoRA merged),
    `<out_dir>/adapter` (LoRA), `<out_dir>/train_manifest.json`. Resumes from the checkpoints in
    `<out_dir>/ray_train` when run again with the same out_dir. Returns the model dir."""
    import pyarrow.fs as pafs
    import ray.train
    from ray.data import ExecutionOptions
    from ray.train.torch import TorchTrainer

    tc = cfg.train
    started = time.time()
    # each worker resolves the model on its own node (an object store's model is fetched there once);
    # the driver only reads its tokenizer
    student = cfg.student.model_copy(update={"name": init_from}) if init_from else cfg.student
    phases, datasets, valid_refs = phase_datasets(examples, cfg)
    tok = models.load_tokenizer(cfg.student, models.resolve(student, weights=False))
    env = {"TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", os.path.expanduser("~/.cache/torch_extensions"))}
    if not tc.use_gpu:
        env["DS_ACCELERATOR"] = "cpu"
    storage = out_dir if "://" in out_dir else os.path.abspath(out_dir)
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"train": tc.model_dump(mode="json"), "phases": phases, "valid": valid_refs,
                           "student": student.model_dump_json(),
                           "pad_id": tok.pad_token_id, "trust_remote_code": cfg.student.trust_remote_code,
                           "chat_template": tok.chat_template if cfg.student.chat_template else None},
        scaling_config=ray.train.ScalingConfig(num_workers=tc.num_workers, use_gpu=tc.use_gpu,
                                               resources_per_worker=tc.resources_per_worker or None),
        run_config=ray.train.RunConfig(
            name="ray_train", storage_path=storage, worker_runtime_env={"env_vars": env},
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=tc.checkpoints_to_keep),
            failure_config=ray.train.FailureConfig(max_failures=tc.max_failures)),
        datasets=datasets,
        # preserve_order makes the split of each phase across workers deterministic, so a resumed
        # run skips exactly the micro-batches the lost run had consumed.
        dataset_config=ray.train.DataConfig(execution_options=ExecutionOptions(preserve_order=True),
                                            enable_shard_locality=False))
    result = trainer.fit()
    ckpt = result.checkpoint
    fs, out = store._fs(out_dir)
    fs.create_dir(out, recursive=True)
    for sub in ("model", "adapter"):
        src = f"{ckpt.path}/{sub}"
        if ckpt.filesystem.get_file_info(src).type == pafs.FileType.Directory:
            fs.create_dir(f"{out}/{sub}", recursive=True)
            pafs.copy_files(src, f"{out}/{sub}", source_filesystem=ckpt.filesystem, destination_filesystem=fs)
    with ckpt.filesystem.open_input_stream(f"{ckpt.path}/trainer_state.json") as f:
        state = json.loads(f.read())
    manifest = _manifest(cfg, phases, state, time.time() - started, student.name)
    manifest["config_hash"] = layout.dir_hash(out_dir)
    store.write_json(store.join(out_dir, "train_manifest.json"), manifest)
    log.info("train: %d steps, %.0f tokens/s, MFU %s -> %s", manifest["steps"], manifest["tokens_per_s"],
             manifest["mfu"], store.join(out_dir, "model"))
    return store.join(out_dir, "model")


def _step_profile(hist: list[dict]) -> dict[str, float]:
    """Share of the optimizer steps' time per part, over the steps of the history that carry parts."""
    timed = [h for h in hist if "parts_s" in h]  # a step restored from an older checkpoint has none
    total = sum(h["time_s"] for h in timed)
    if not total:
        return {}
    shares = {k: sum(h["parts_s"][k] for h in timed) / total for k in timed[0]["parts_s"]}
    return {**{k: round(v, 4) for k, v in shares.items()}, "other": round(1 - sum(shares.values()), 4)}


def _manifest(cfg: CftConfig, phases: list[dict], state: dict, wall_s: float, init_dir: str) -> dict:
    """Throughput from the surviving history (step compute time only), MFU = model FLOPs / time / peak.
    FLOPs per token: 6N for full fine-tuning; 4N + 6 x trainable for LoRA (no weight gradients of
    the frozen base)."""
    tc, hist = cfg.train, state["history"]
    tokens = sum(h["tokens"] for h in hist)
    step_s = sum(h["time_s"] for h in hist)
    n, trainable = state["params"], state["trainable_params"]
    flops_per_token = 6 * n if tc.method == "full" else 4 * n + 6 * trainable
    tps = tokens / step_s if step_s else 0.0
    peak = state.get("peak_tflops")  # the config's, else the GPU table's or the CPU probe's (train_loop.device_peak)
    mfu = tps * flops_per_token / (peak * 1e12 * tc.num_workers) if peak else None
    reported = []
    for p in phases:
        seen = [h for h in hist if h["phase"] == p["name"]]
        reported.append({**{k: v for k, v in p.items() if k not in ("dataset", "valid")},
                         "seen_target_tokens": sum(h["target_tokens"] for h in seen),
                         "valid_loss": state["valid"].get(p["name"])})
    return {"stage": "train", "init_from": init_dir,
            "method": tc.method, "schedule": tc.schedule, "loss_on": tc.loss_on, "packing": tc.packing,
            "zero_stage": tc.zero_stage, "precision": tc.precision, "num_workers": tc.num_workers,
            "effective_batch": tc.num_workers * tc.micro_batch * tc.grad_accum,
            "steps": state["step"], "params": n, "trainable_params": trainable,
            "tokens": tokens, "tokens_per_s": round(tps, 2), "step_time_s": round(step_s, 3), "wall_s": round(wall_s, 3),
            "mfu": round(mfu, 5) if mfu is not None else None, "peak_tflops_per_worker": peak,
            # where the step time went on rank 0 (train_loop._optimizer_step); "other": the all-reduces of counts and loss
            "step_profile": _step_profile(hist),
            "peak_source": state.get("peak_source"),
            "data_spent_target_tokens": sum(p["data_spent_target_tokens"] for p in phases),
            "phases": reported, "resumes": state["resumes"], "checkpoints": state["checkpoints"],
            "loss_curve": [{k: h[k] for k in ("step", "phase", "epoch", "loss", "target_tokens", "lr", "grad_norm")}
                           for h in hist]}


def train_from_rows(rows, cot, cfg: CftConfig, out: str, stage: str = "train", routed: dict | None = None,
                    upstream_counts: dict | None = None, extra: list[tuple[str, object]] = ()) -> str:
    """Routed rows (+ CoT) -> examples/ (tokenised once, so a re-run after a crash goes straight to
    training) -> Ray Train -> `out` finished with its manifest; a finished `out` is returned as is.
    `routed` = rows per treatment when the caller knows them (else one pass over `rows` counts them);
    `upstream_counts` and `extra` go into the manifest written with `_SUCCESS` (the caller's own counts)."""
    if store.is_done(out):
        return out
    started = time.time()
    ex_dir = store.join(out, "examples")
    if not store.is_done(ex_dir):
        store.reset(ex_dir)
        build_examples(rows, cot, cfg).write_parquet(ex_dir)
        store.write_json(store.join(ex_dir, store.SUCCESS), {"finished_at": time.time()})
    import ray

    # counts on the driver from small columns: one Ray Data pass over the routed rows, none over examples
    treat = dict(routed or {})
    for b in [] if routed is not None else rows.select_columns(["treatment"]).iter_batches(batch_format="pyarrow"):
        for v, n in zip(*pc.value_counts(b["treatment"]).flatten()):
            treat[v.as_py()] = treat.get(v.as_py(), 0) + n.as_py()
    n_in, n_drop = sum(treat.values()), treat.get("drop", 0)
    small = store.columns(ex_dir, ["error", "truncated"])
    n_rows, n_err = small.num_rows, small.num_rows - small["error"].null_count
    reasons = store.reason_counts(small["error"].to_pylist())
    n_trunc = int(pc.sum(small["truncated"]).as_py() or 0)
    model_dir = train(ray.data.read_parquet(ex_dir), cfg, out)
    tm = store.read_json(store.join(out, "train_manifest.json"))
    counts = {**(upstream_counts or {}), "rows_in": n_in, "routed_drop": n_drop, "examples": n_rows,
              "rows_out": n_rows - n_err, "errors": n_err, "error_reasons": reasons, "truncated": n_trunc}
    if n_in != n_drop + n_rows:
        raise RuntimeError(f"train example counts do not reconcile: {counts}")
    store.finish(out, store.stage_manifest(stage, layout.dir_hash(out), started, counts, [
        ("model_dir", model_dir), ("tokens_per_s", tm["tokens_per_s"]), ("mfu", tm["mfu"]), ("steps", tm["steps"]),
        ("data_spent_target_tokens", tm["data_spent_target_tokens"]), ("train_manifest", "train_manifest.json"), *extra]))
    return out
