"""Step 1 (score): the student reads every item once; we keep how unsure its one-token answer is.

`score(ds, cfg)` maps `Scorer` actors (one model copy each) over a Ray Dataset of items and returns
the items plus score columns (SCORE_FIELDS); `main(cfg)` runs the stage with row-level resume and
writes `parts/*.parquet`, `manifest.json`, `roc.json`, `roc.png` and `hist.png`.

Speed: the LM head runs on the last position only (`logits_to_keep=1`), so nothing [batch, seq,
vocab]-sized exists; inside an actor rows are sorted by length and packed into micro-batches of at
most `score.token_budget` padded tokens, left-padded with explicit position ids (= one-at-a-time
results). Only scalars leave the actor.

Option labels: a label's tokens are what the tokenizer makes of it right after the generation
prompt; the metrics use its FIRST token. With digit-splitting tokenizers (SmolLM2, Qwen2.5) the
labels 10..19 start with the token of "1" and 20 with that of "2": for items with 10+ options under
`prompt.labels=numbers` the row gets `label_collision=True`, `entropy_options` is then over the
distinct first tokens and `ce_gold` for gold 10..20 is -log p(first token) (mass shared with 1/2).
`pred` stays exact: when the argmax is such a shared first token, one more greedy step decides
between "1" and "1x", as `generate` would. Use `prompt.labels=letters` when >9 options matter.

Direct-mode evaluation (`prompt="direct"`) picks the option by its whole answer: `pred_options` is the
argmax over labels k of log P("k]]" | prompt + "[["), the first token from the prompt's logits and the
rest teacher-forced on copies of the prompt's KV cache. The closing "]]" is what tells "1" from "10".
"""
from __future__ import annotations

import copy
import functools
import inspect
import logging
import re
import time

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from cft_ray import layout, metrics, models, store
from cft_ray.batching import MicroBatcher, left_pad
from cft_ray.config import ActorPool, CftConfig, ConfigError, ModelConfig, PromptConfig
from cft_ray.layout import ITEM_SCHEMA, SCORE_FIELDS, SCORE_SCHEMA
from cft_ray.prompts import DIRECT_PREFIX, DIRECT_SUFFIX, label_to_index, labels, messages, render

log = logging.getLogger("cft_ray")

MAX_OPTIONS = 20


def prompt_text(tok, item, kind: str, scheme: str, fallback: bool, preset: str = "paper") -> str:
    """The scored text: the score prompt, or the direct prompt plus the "[[" its answers start with."""
    text = render(tok, messages(kind, item, scheme, fallback, preset))
    return text + DIRECT_PREFIX if kind == "direct" else text


PROMPT_COLUMNS = ("input_ids", "prompt_tokens", "error")  # what prompt_tokens adds for the Scorer


@functools.lru_cache(maxsize=4)
def _tokenizer(model_json: str):
    """One tokenizer per task worker process and model (Ray reuses task workers, so this loads once)."""
    return models.load_tokenizer(ModelConfig.model_validate_json(model_json))


def prompt_tokens(batch: pa.Table, model_json: str, kind: str, scheme: str, fallback: bool, preset: str,
                  max_tokens: int) -> pa.Table:
    """Ray Data task (CPU, fused with the read): items -> the same rows plus PROMPT_COLUMNS, the scored
    prompt's token ids, their count, and the error of a row that cannot be prompted or is over
    `max_tokens`. Rendering and tokenising here keeps the model actors (GPUs) on the forward pass."""
    tok = _tokenizer(model_json)
    rows = batch.select(ITEM_SCHEMA.names).to_pylist()
    ids, n, err = [None] * len(rows), [None] * len(rows), [None] * len(rows)
    texts, todo = [], []
    for i, r in enumerate(rows):
        try:
            texts.append(prompt_text(tok, r, kind, scheme, fallback, preset))
            todo.append(i)
        except Exception as e:  # noqa: BLE001 - a row that cannot be prompted is an error row
            err[i] = f"cannot build prompt: {type(e).__name__}: {e}"
    for i, t in zip(todo, tok(texts, add_special_tokens=False).input_ids if texts else []):  # one batched call
        n[i] = len(t)
        if len(t) > max_tokens:
            err[i] = f"prompt has {len(t)} tokens > score.max_prompt_tokens={max_tokens}"
        else:
            ids[i] = t
    base = batch.drop_columns([c for c in PROMPT_COLUMNS if c in batch.column_names])
    return base.append_column("input_ids", pa.array(ids, pa.list_(pa.int32()))) \
        .append_column("prompt_tokens", pa.array(n, pa.int32())).append_column("error", pa.array(err, pa.string()))


def prompt_args(cfg: CftConfig, prompt: str = "score", model: ModelConfig | None = None) -> dict:
    """The keyword arguments of `prompt_tokens` for a Scorer of the same (cfg, prompt, model)."""
    return {"model_json": (model or cfg.student).model_dump_json(), "kind": prompt, "scheme": cfg.prompt.labels,
            "fallback": cfg.prompt.fallback and prompt == "score", "preset": cfg.prompt.preset,
            "max_tokens": cfg.score.max_prompt_tokens}


def label_tokens(tok, scheme: str = "numbers", fallback: bool = False, kind: str = "score",
                 suffix: str = "", preset: str = "paper") -> dict[str, list[int]]:
    """Token ids of every label (1..20 or A..T, plus "0" under fallback), followed by `suffix`, as the
    model would emit them right after the prompt (so template-specific merges are respected)."""
    prompt = prompt_text(tok, {"question": "?", "options": ["x", "y"]}, kind, scheme, fallback, preset)
    head = tok(prompt, add_special_tokens=False).input_ids
    out = {}
    for lab in labels(MAX_OPTIONS, scheme) + (["0"] if fallback else []):
        ids = tok(prompt + lab + suffix, add_special_tokens=False).input_ids
        ids = ids[len(head):] if ids[:len(head)] == head else tok(lab + suffix, add_special_tokens=False).input_ids
        if not ids:
            raise ConfigError(f"tokenizer produces no token for label {lab!r}")
        out[lab] = ids
    return out


def check_labels(tok, prompt: PromptConfig) -> None:
    """Driver check: the labels one answer token can tell apart (1..9 or A..T, and "0" under the fallback)
    begin with different tokens; else two options share one probability and the entropy is not the student's."""
    first = label_tokens(tok, prompt.labels, prompt.fallback, "score", "", prompt.preset)
    seen: dict[int, str] = {}
    for lab, ids in first.items():
        if len(lab) == 1 and seen.setdefault(ids[0], lab) != lab:
            other = "letters" if prompt.labels == "numbers" else "numbers"
            raise ConfigError(f"prompt.labels={prompt.labels}: labels {seen[ids[0]]!r} and {lab!r} begin with the same "
                              f"token under this tokenizer, so scoring cannot tell them apart; try prompt.labels={other}")


class Scorer:
    """Ray Data actor: a pyarrow batch of items -> the same rows with SCORE_FIELDS appended.
    `prompt="direct"` scores the direct-answer prompt after "[[" (direct-mode evaluation, which
    passes its own `model` and `pool`); the defaults are the student and the score pool."""

    def __init__(self, cfg: CftConfig, prompt: str = "score", model: ModelConfig | None = None,
                 pool: ActorPool | None = None):
        import torch

        model, pool = model or cfg.student, pool or cfg.score.pool
        self.device = models.device_of(model)
        if self.device == "cpu":  # one intra-op thread per reserved CPU; more would fight Ray's tasks
            torch.set_num_threads(pool.cpu_threads())
        self.tok, self.model = models.load(model, self.device)
        self.kind = prompt
        self.scheme, self.fallback = cfg.prompt.labels, cfg.prompt.fallback and prompt == "score"
        self.preset = cfg.prompt.preset
        self.batcher = MicroBatcher(cfg.score.token_budget, cfg.score.max_padding, self.device)
        self.pad_id = self.tok.pad_token_id
        first = {lab: ids[0] for lab, ids in label_tokens(self.tok, self.scheme, self.fallback, prompt, "", self.preset).items()}
        # Per option count n: each label's first token, and the first tokens shared by >1 label.
        self.first = {n: [first[lab] for lab in labels(n, self.scheme)] for n in range(1, MAX_OPTIONS + 1)}
        self.shared = {n: {t for t in ids if ids.count(t) > 1} for n, ids in self.first.items()}
        # Direct evaluation: each label's whole answer "k]]", in label order.
        self.answers = list(label_tokens(self.tok, self.scheme, False, prompt, DIRECT_SUFFIX, self.preset).values()) \
            if prompt == "direct" else None
        self.keep_arg = "logits_to_keep" in inspect.signature(self.model.forward).parameters
        if not self.keep_arg:
            log.warning("%s.forward has no logits_to_keep: full logits are computed (more memory)",
                        type(self.model).__name__)

    def __call__(self, batch: pa.Table) -> pa.Table:
        """Rows carrying PROMPT_COLUMNS (from `prompt_tokens`) -> rows with SCORE_FIELDS; this actor only pads,
        runs the model and does the maths."""
        rows = batch.select(ITEM_SCHEMA.names).to_pylist()
        errors = batch["error"].to_pylist()
        res = [{"prompt_tokens": n, "error": e} for n, e in zip(batch["prompt_tokens"].to_pylist(), errors)]
        enc = [(i, ids) for i, (ids, e) in enumerate(zip(batch["input_ids"].to_pylist(), errors)) if e is None]
        for (i, _), reason in self.batcher.run(enc, lambda chunk: self._score(chunk, rows, res)):
            res[i]["error"] = reason
        return self._table(batch, rows, res)

    @property
    def max_rows(self) -> int | None:
        """Rows per micro-batch after an out-of-memory error (None: the token budget alone)."""
        return self.batcher.max_rows

    def _forward(self, ids, mask, position_ids, use_cache=False, past=None):
        kw = {"logits_to_keep": 1} if self.keep_arg else {}
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=position_ids,
                         past_key_values=past, use_cache=use_cache, **kw)
        return out.logits[:, -1].float(), out.past_key_values

    def _score(self, chunk: list[tuple[int, list[int]]], rows: list[dict], res: list[dict]) -> None:
        import torch

        width = len(chunk[0][1])
        ids, mask, position_ids = left_pad([t for _, t in chunk], self.pad_id)
        ns = [len(rows[i]["options"]) for i, _ in chunk]
        opt = torch.zeros((len(chunk), MAX_OPTIONS), dtype=torch.long)
        opt_mask = torch.zeros((len(chunk), MAX_OPTIONS), dtype=torch.bool)
        for j, n in enumerate(ns):
            uniq = list(dict.fromkeys(self.first[n]))  # shared first tokens count once
            opt[j, :len(uniq)] = torch.tensor(uniq)
            opt_mask[j, :len(uniq)] = True
        gold = torch.tensor([self.first[n][rows[i]["answer"]] for n, (i, _) in zip(ns, chunk)])
        two_step = any(self.shared[n] for n in ns)
        dev = self.model.device
        with torch.inference_mode():
            logits, past = self._forward(ids.to(dev), mask.to(dev), position_ids.to(dev),
                                         use_cache=two_step or self.answers is not None)
            h = metrics.entropy(logits)
            h_opt = metrics.subset_entropy(logits, opt.to(dev), opt_mask.to(dev))
            ce = metrics.nll(logits, gold.to(dev))
            pmax, margin, arg = metrics.top2(logits)
            if self.answers is not None:
                answer_lp = self._answer_logprobs(logits, past, mask.to(dev), position_ids.to(dev), ns)
                pred_opt = [max(range(n), key=lp.__getitem__) for n, lp in zip(ns, answer_lp)]
            else:  # restricted argmax: masked-out slots get -inf; ties go to the lowest label like argmax does
                opt_logits = logits.gather(1, opt.to(dev)).masked_fill(~opt_mask.to(dev), float("-inf"))
                best = opt[torch.arange(len(chunk)), opt_logits.argmax(-1).cpu()].tolist()
                pred_opt = [self.first[n].index(t) for n, t in zip(ns, best)]
            arg_l = arg.tolist()
            second = [None] * len(chunk)
            if two_step and any(a in self.shared[n] for a, n in zip(arg_l, ns)):
                # A shared first token ("1" of 1 and 10..19): one greedy step more, as generate would.
                nxt, _ = self._forward(arg[:, None], torch.cat([mask, torch.ones_like(mask[:, :1])], 1).to(dev),
                                       position_ids[:, -1:].to(dev) + 1, use_cache=True, past=past)
                second = [b if a in self.shared[n] else None
                          for a, b, n in zip(arg_l, nxt.argmax(-1).tolist(), ns)]
        cols = zip(h.tolist(), h_opt.tolist(), ce.tolist(), pmax.tolist(), margin.tolist())  # one sync each
        for j, ((i, _), (h_j, ho_j, ce_j, p_j, m_j)) in enumerate(zip(chunk, cols)):
            first_text = self.tok.decode([arg_l[j]])
            text = first_text if second[j] is None else self.tok.decode([arg_l[j], second[j]])
            res[i].update(entropy=h_j, entropy_options=ho_j, ce_gold=ce_j, max_prob=p_j, margin=m_j,
                          argmax_id=arg_l[j], argmax_token=first_text, pred=self._parse(text, ns[j]),
                          pred_options=pred_opt[j],
                          padded_tokens=width)

    def _answer_logprobs(self, logits, past, mask, position_ids, ns: list[int]) -> list[list[float]]:
        """log P("k]]" | prompt) of every option label k of every row: the first token from `logits`, the
        rest teacher-forced on row copies of the prompt's KV cache, at most score.token_budget cached
        tokens at a time (the copies are what costs memory)."""
        import torch

        first_lp = torch.log_softmax(logits, -1)
        cands = [(j, k, self.answers[k]) for j, n in enumerate(ns) for k in range(n)]
        out = [[0.0] * n for n in ns]
        step = max(1, self.batcher.budget // mask.shape[1])
        for s in range(0, len(cands), step):
            part = cands[s: s + step]
            rows = torch.tensor([j for j, _, _ in part], device=mask.device)
            lp = first_lp[rows, torch.tensor([c[0] for *_, c in part], device=mask.device)].tolist()
            width = max(len(c) for *_, c in part) - 1
            if width:
                ids = torch.full((len(part), width), self.pad_id, dtype=torch.long)
                for r, (*_, c) in enumerate(part):  # right-padded: a pad only follows the tokens that count
                    ids[r, :len(c) - 1] = torch.tensor(c[:-1])
                m = torch.cat([mask[rows], torch.ones((len(part), width), dtype=mask.dtype, device=mask.device)], 1)
                pos = position_ids[rows, -1:] + 1 + torch.arange(width, device=mask.device)
                nxt = self.model(input_ids=ids.to(mask.device), attention_mask=m, position_ids=pos,
                                 past_key_values=_cache_rows(past, rows), use_cache=True).logits.float()
                # each label's later tokens, gathered at once (one device sync, not one per token)
                target = torch.zeros((len(part), width), dtype=torch.long)
                counted = torch.zeros((len(part), width), dtype=torch.bool)
                for r, (*_, c) in enumerate(part):
                    target[r, :len(c) - 1], counted[r, :len(c) - 1] = torch.tensor(c[1:]), True
                got = torch.log_softmax(nxt, -1).gather(2, target.to(mask.device)[..., None])[..., 0]
                lp = [a + b for a, b in zip(lp, got.masked_fill(~counted.to(mask.device), 0).sum(-1).tolist())]
            for (j, k, _), v in zip(part, lp):
                out[j][k] = v
        return out

    def _parse(self, text: str, n: int) -> int | None:
        if self.scheme == "numbers":  # "1" + "." -> "1"; "1" + "0" -> "10"
            m = re.match(r"\s*(\d+)", text)
            text = m.group(1) if m else text
        return label_to_index(text, n, self.scheme, self.fallback)

    def _table(self, batch: pa.Table, rows: list[dict], res: list[dict]) -> pa.Table:
        for r, row in zip(res, rows):
            pred = r.get("pred")
            r["valid"] = pred is not None
            r["unknown"] = pred == -1
            r["correct"] = pred is not None and pred == row["answer"]
            r["label_collision"] = bool(self.shared.get(len(row["options"])))
        cols = [batch.column(f.name).cast(f.type) for f in ITEM_SCHEMA]
        cols += [pa.array([r.get(f.name) for r in res], f.type) for f in SCORE_FIELDS]
        extra = [f for f in batch.schema  # e.g. bucket, in evaluation
                 if f.name not in SCORE_SCHEMA.names and f.name not in PROMPT_COLUMNS]
        return pa.Table.from_arrays(cols + [batch.column(f.name) for f in extra],
                                    schema=pa.schema([*SCORE_SCHEMA, *extra]))


def _cache_rows(past, rows):
    """A KV cache holding `rows` of `past` (repeats allowed), leaving `past` as it is."""
    sub = copy.copy(past)
    sub.layers = [copy.copy(layer) for layer in past.layers]
    sub.batch_select_indices(rows)
    return sub


def score(ds, cfg: CftConfig, prompt: str = "score", model: ModelConfig | None = None, pool: ActorPool | None = None):
    """Items Dataset -> scored Dataset (ITEM_SCHEMA + SCORE_FIELDS), on an actor pool (score.pool unless
    given). Extra input columns pass through; `prompt` is "score" (step 1) or "direct" (evaluation)."""
    pool = pool or cfg.score.pool
    ds = ds.map_batches(prompt_tokens, batch_format="pyarrow", fn_kwargs=prompt_args(cfg, prompt, model))
    # Blocks of one batch: upstream files may be one big block, which would feed a single actor.
    ds = ds.repartition(target_num_rows_per_block=pool.batch_size)
    return ds.map_batches(Scorer, fn_constructor_kwargs={"cfg": cfg, "prompt": prompt, "model": model, "pool": pool},
                          batch_size=pool.batch_size,
                          batch_format="pyarrow", **pool.map_args())


DIAG_COLUMNS = ["item_id", "subject", "category", "level", "valid", "unknown", "correct", "label_collision",
                "prompt_tokens", "padded_tokens", "error", *metrics.SCORE_METRICS]


def _diagnostics(out: str, df) -> dict:
    """roc.json, roc.png, hist.png over the valid rows; returns the overall summary."""
    ok = df[df["valid"] & ~df["unknown"]]
    report = metrics.roc_report(ok)
    report["rows"] = {"scored": int(df["error"].isna().sum()), "used": int(len(ok))}
    store.write_json(store.join(out, "roc.json"), report)
    metrics.plot_roc(ok, store.join(out, "roc.png"))
    metrics.plot_hist(ok, store.join(out, "hist.png"))
    return report["overall"]


def main(cfg: CftConfig) -> str:
    """Stage entry: score the data stage's items into `stage_dir(cfg, "score")`, resuming by row."""
    upstream = layout.upstream(cfg, "data", by="score")
    out = layout.stage_dir(cfg, "score")
    if layout.finished(out, "score"):
        return out
    started = time.time()
    parts = store.join(out, "parts")
    items = layout.load_items(upstream)
    rows_in = items.count()
    todo, n_done = store.pending(items, parts)
    earlier = {f.rsplit("/", 1)[-1] for f in store.part_files(parts)}
    if n_done:
        log.info("score: resuming, %d of %d rows already scored", n_done, rows_in)
    if n_done < rows_in:
        score(todo, cfg, cfg.score.prompt).write_parquet(parts, min_rows_per_file=cfg.score.rows_per_file)
    score_s = time.time() - started

    # Small columns to the driver (~40 bytes a row as Arrow + categoricals): counts and diagnostics.
    tables = []
    for f in store.part_files(parts):
        fs, path = pafs.FileSystem.from_uri(f) if "://" in f else (pafs.LocalFileSystem(), f)
        t = pq.read_table(path, columns=DIAG_COLUMNS, filesystem=fs)
        tables.append(t.append_column("new", pa.repeat(f.rsplit("/", 1)[-1] not in earlier, t.num_rows)))
    t = pa.concat_tables(tables)
    n_ids = pc.count_distinct(t["item_id"]).as_py()
    if t.num_rows != n_ids or n_ids != rows_in:
        raise RuntimeError(f"score: {t.num_rows} rows / {n_ids} ids written for {rows_in} items (resume mismatch)")
    df = t.drop(["item_id"]).to_pandas(strings_to_categorical=True)
    del t, tables
    new = df[df["new"]]
    tokens, padded = int(new["prompt_tokens"].where(new["error"].isna()).sum()), int(new["padded_tokens"].sum())
    errors = int(df["error"].notna().sum())
    counts = {"rows_in": rows_in, "rows_out": rows_in - errors, "errors": errors, "resumed": n_done,
              "valid": int(df["valid"].sum()), "invalid": int((~df["valid"] & df["error"].isna()).sum()),
              "unknown": int(df["unknown"].sum()), "correct": int(df["correct"].sum()),
              "label_collision": int(df["label_collision"].sum())}
    overall = _diagnostics(out, df)
    throughput = {"rows_scored": int(len(new)), "tokens": tokens, "rows_per_s": round(len(new) / score_s, 3),
                  "tokens_per_s": round(tokens / score_s, 1),
                  "padding_waste": round(1 - tokens / padded, 4) if padded else None}
    manifest = store.stage_manifest("score", layout.dir_hash(out), started, counts, [
        ("model", cfg.student.model_dump(mode="json")), ("prompt", cfg.prompt.model_dump(mode="json")),
        ("score", cfg.score.model_dump(mode="json")), ("upstream", upstream),
        ("durations_s", {"score": round(score_s, 3), "total": round(time.time() - started, 3)}),
        ("throughput", throughput), ("accuracy", overall["accuracy"]), ("roc_auc", overall["auc"]),
        ("error_reasons", store.reason_counts(df["error"].dropna().astype(str)))])
    store.finish(out, manifest)
    log.info("score: %d rows (%d errors), %.1f rows/s, %.0f tokens/s, AUC %s", rows_in, errors,
             throughput["rows_per_s"], throughput["tokens_per_s"], overall["auc"])
    return out
