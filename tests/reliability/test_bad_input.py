"""Malformed inputs through the real data and score stages: one corpus with every kind of bad row
(truncated Parquet, wrong types, missing columns, duplicate ids, a 1 MB question, empty options,
non-UTF-8 bytes, a broken JSONL line). Each bad row becomes an error row with its reason, the run
goes on, and counts reconcile at every stage: rows in = rows out + rows rejected."""
from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq

from cft_ray import data, score, store
from cft_ray.config import load_config

GOOD = [{"id": f"g{k}", "question": f"What is {k} + {k}?", "options": [str(2 * k + d) for d in (-1, 0, 1, 2)],
         "answer": 1} for k in range(30)]
BAD = {  # JSONL records -> the reason their error row must give
    "wrong type: options": ({"id": "b1", "question": "q?", "options": 7, "answer": 0}, "options is not a list"),
    "wrong type: answer": ({"id": "b2", "question": "q?", "options": ["a", "b"], "answer": "zz"}, "not an integer"),
    "wrong type: question": ({"id": "b3", "question": 12, "options": ["a", "b"], "answer": 0}, "question is not a string"),
    "missing column": ({"id": "b4", "question": "q?", "options": ["a", "b"]}, "missing field 'answer'"),
    "duplicate id": ({"id": "g3", "question": "Other?", "options": ["a", "b"], "answer": 0}, "duplicate item_id"),
    "empty options": ({"id": "b5", "question": "q?", "options": [], "answer": 0}, "fewer than 2 options"),
    "empty option": ({"id": "b6", "question": "q?", "options": ["a", " "], "answer": 0}, "empty option"),
}
BIG_ID = "big"


def write_corpus(src):
    src.mkdir()
    with open(src / "items.jsonl", "wb") as f:
        for rec in GOOD + [r for r, _ in BAD.values()]:
            f.write(json.dumps(rec).encode() + b"\n")
        f.write(json.dumps({"id": BIG_ID, "question": "Why? " + "x" * 1_000_000, "options": ["a", "b"],
                            "answer": 0}).encode() + b"\n")
        f.write(b'{"id": "broken", "question": "cut off", "options": [\n')
        f.write(b'{"id": "latin1", "question": "caf\xe9?", "options": ["a", "b"], "answer": 0}\n')
    (src / "truncated.parquet").write_bytes(pq_bytes()[:-40])  # footer gone: a writer killed mid-file
    pq.write_table(pa.table({"id": ["t1"], "question": ["q?"], "options": [["a", "b"]], "answer": [[1]]}),
                   src / "wrong_types.parquet")


def pq_bytes() -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(pa.table({"id": ["p1", "p2"], "question": ["a?", "b?"], "options": [["x", "y"]] * 2,
                             "answer": [0, 1]}), sink)
    return sink.getvalue().to_pybytes()


def test_every_bad_row_is_an_error_row_and_counts_reconcile(ray_local, tmp_path, tiny_model_dir):
    src = tmp_path / "src"
    write_corpus(src)
    # questions up to 2 MB pass the data stage here, so the 1 MB one reaches scoring and is rejected there
    cfg = load_config(None, [f"run_dir={tmp_path}/run", f"data.source={src}", "data.columns.item_id=id",
                             "data.max_question_chars=2000000", f"student.name={tiny_model_dir}",
                             "student.dtype=float32", "score.pool.batch_size=8"])
    d = data.main(cfg)
    dm = store.read_json(store.join(d, "manifest.json"))["counts"]
    errors = pq.read_table(store.join(d, "errors")).to_pylist()
    items = pq.read_table(store.join(d, "items")).to_pylist()
    # 30 good + 7 bad + big + broken + latin1 JSONL lines, 1 truncated file, 1 wrong-types row
    assert dm["rows_in"] == len(GOOD) + len(BAD) + 3 + 1 + 1 == dm["valid"] + dm["errors"]
    assert dm["rows_out"] == len(items) == len(GOOD) + 1 and dm["errors"] == len(errors)
    reasons = [e["reason"] for e in errors]
    for kind, (_, want) in BAD.items():
        assert any(want in r for r in reasons), (kind, reasons)
    for want in ("malformed JSON line", "non-UTF-8", "unreadable parquet file", "answer"):
        assert any(want in r for r in reasons), (want, reasons)
    assert all(e["source"] and e["raw"] is None or len(e["raw"]) <= 1000 for e in errors)  # raw text is bounded

    s = score.main(cfg)
    sm = store.read_json(store.join(s, "manifest.json"))["counts"]
    rows = pq.read_table(store.join(s, "parts"), columns=["item_id", "error"]).to_pylist()
    assert sm["rows_in"] == dm["rows_out"] == sm["rows_out"] + sm["errors"] == len(rows)
    bad = {r["item_id"]: r["error"] for r in rows if r["error"]}
    assert list(bad) == [BIG_ID] and "score.max_prompt_tokens" in bad[BIG_ID]
    assert len({r["item_id"] for r in rows}) == len(rows)
