"""Stage outputs on local disk or object storage: success markers, manifests, row-level resume.

A stage writes Parquet part files into `<stage dir>/parts/` as blocks finish. A part file is either
complete (its footer reads) or garbage from a killed writer (deleted on resume), so on re-run the
rows already in complete parts are skipped by an anti-join on `item_id`: every row exactly once.
A stage is finished when `_SUCCESS` exists next to its `manifest.json`.
"""
from __future__ import annotations

import io
import json
import logging
import os
import re
import time
import uuid
from typing import Iterable

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from cft_ray.config import ConfigError, error_line

log = logging.getLogger("cft_ray")
SUCCESS = "_SUCCESS"


def _fs(path: str) -> tuple[pafs.FileSystem, str]:
    if "://" in path:
        return pafs.FileSystem.from_uri(path)
    return pafs.LocalFileSystem(), str(path)


def check_writable(path: str) -> None:
    """Create `path` and write, then delete, a probe file in it: an unreachable object store, a wrong bucket,
    missing credentials or a read-only mount fail here, on the driver, in one line."""
    try:
        fs, p = _fs(path)
        fs.create_dir(p, recursive=True)
        probe = f"{p.rstrip('/')}/.cft-ray-probe-{uuid.uuid4().hex[:8]}"
        with fs.open_output_stream(probe) as f:
            f.write(b"ok")
        fs.delete_file(probe)
    except (OSError, ValueError) as e:
        raise ConfigError(f"run_dir: cannot write {path} ({error_line(e)}); check the path or bucket name, the credentials in the "
                          "environment (AWS_* for s3://, GOOGLE_APPLICATION_CREDENTIALS for gs://) and the network") from None


def shown(path: str) -> str:
    """A path as printed for the user: local ones absolute (a Ray job's working directory is not theirs)."""
    return path if "://" in path else os.path.abspath(path)


def join(path: str, *parts: str) -> str:
    return "/".join([str(path).rstrip("/"), *parts])


def exists(path: str) -> bool:
    fs, p = _fs(path)
    return fs.get_file_info(p).type != pafs.FileType.NotFound


def is_done(stage_dir: str) -> bool:
    return exists(join(stage_dir, SUCCESS))


def read_json(path: str) -> dict:
    fs, p = _fs(path)
    with fs.open_input_stream(p) as f:
        return json.loads(f.read())


def write_json(path: str, obj: dict) -> None:
    fs, p = _fs(path)
    fs.create_dir(p.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(p) as f:
        f.write(json.dumps(obj, indent=2, sort_keys=True, default=str).encode())


def write_table(table: pa.Table, path: str) -> None:
    """One small Parquet file written from the driver (selections, summaries)."""
    fs, p = _fs(path)
    fs.create_dir(p.rsplit("/", 1)[0], recursive=True)
    pq.write_table(table, p, filesystem=fs)


def write_png(fig, path: str) -> None:
    """A matplotlib figure as a PNG file at `path` (local or object store); the figure is closed."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    fs, p = _fs(path)
    fs.create_dir(p.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(p) as f:
        f.write(buf.getvalue())


def column_values(ds, name: str) -> pa.Array:
    """One small column (ids) of a Ray Dataset, gathered on the driver."""
    return pa.chunked_array([b[name] for b in ds.select_columns([name]).iter_batches(batch_format="pyarrow")],
                            pa.string()).combine_chunks()


def finish(stage_dir: str, manifest: dict) -> None:
    """Write the manifest, then the success marker (a crash between them leaves the stage unfinished)."""
    write_json(join(stage_dir, "manifest.json"), manifest)
    write_json(join(stage_dir, SUCCESS), {"finished_at": time.time()})


def reset(path: str) -> None:
    """Delete a directory (or a single file such as a `_SUCCESS` marker) if it exists."""
    fs, p = _fs(path)
    kind = fs.get_file_info(p).type
    if kind == pafs.FileType.Directory:
        fs.delete_dir(p)
    elif kind != pafs.FileType.NotFound:
        fs.delete_file(p)


def part_files(parts_dir: str, repair: bool = False) -> list[str]:
    """Complete Parquet files under parts_dir; with repair, files a killed writer left half-written
    are deleted (their rows were never counted as done, so they are simply redone)."""
    fs, p = _fs(parts_dir)
    if fs.get_file_info(p).type == pafs.FileType.NotFound:
        return []
    good = []
    for info in fs.get_file_info(pafs.FileSelector(p, recursive=True)):
        if info.type != pafs.FileType.File or not info.path.endswith(".parquet"):
            continue
        try:
            with fs.open_input_file(info.path) as f:
                pq.read_metadata(f)
            good.append(info.path)
        except Exception as e:  # noqa: BLE001 - any unreadable footer means an incomplete write
            if repair:
                log.warning("deleting incomplete part %s (%s)", info.path, e)
                fs.delete_file(info.path)
    prefix = "" if "://" not in str(parts_dir) else str(parts_dir).split("://")[0] + "://"
    return sorted(prefix + g for g in good)


def done_ids(parts_dir: str, key: str = "item_id") -> pa.Array:
    """The key column of every complete part: what a resumed run must not redo."""
    files = part_files(parts_dir, repair=True)
    if not files:
        return pa.array([], pa.string())
    fs, _ = _fs(parts_dir)
    cols = [pq.read_table(f if "://" not in f else f.split("://", 1)[1], columns=[key], filesystem=fs)[key]
            for f in files]
    return pa.chunked_array(cols).combine_chunks()


def pending(ds, parts_dir: str, key: str = "item_id"):
    """`ds` minus the rows whose key already sits in a complete part (the row-level resume)."""
    import ray

    done = done_ids(parts_dir, key)
    if len(done) == 0:
        return ds, 0
    ref = ray.put(done)

    def keep(t: pa.Table) -> pa.Table:
        return t.filter(pc.invert(pc.is_in(t[key], value_set=ray.get(ref))))

    return ds.map_batches(keep, batch_format="pyarrow"), len(pc.unique(done))


def read_parts(parts_dir: str):
    """A Ray Dataset over the complete parts (empty-safe)."""
    import ray

    files = part_files(parts_dir)
    if not files:
        raise FileNotFoundError(f"no output under {parts_dir}")
    return ray.data.read_parquet(files)


def columns(parts_dir: str, names: list[str], files: list[str] | None = None) -> pa.Table:
    """Small columns (ids, flags, counters) of the complete parts, read on the driver with pyarrow:
    no Ray Data job, whose start-up costs seconds, for what is a few bytes a row."""
    fs, _ = _fs(parts_dir)
    files = part_files(parts_dir) if files is None else files
    if not files:
        raise FileNotFoundError(f"no output under {parts_dir}")
    return pa.concat_tables(pq.read_table(f.split("://", 1)[-1], columns=names, filesystem=fs) for f in files)


def counts_by(parts_dir: str, column: str) -> dict:
    """Small driver-side tally of one column over the parts (e.g. error reasons)."""
    fs, _ = _fs(parts_dir)
    out: dict = {}
    for f in part_files(parts_dir):
        col = pq.read_table(f if "://" not in f else f.split("://", 1)[1], columns=[column], filesystem=fs)[column]
        for v, n in zip(*pc.value_counts(col).flatten()):
            out[v.as_py()] = out.get(v.as_py(), 0) + n.as_py()
    return out


def reason_counts(reasons: Iterable[str | None]) -> dict[str, int]:
    """Error rows tallied by kind: the reason up to its first ':' or '(', numbers written N (so
    "prompt has 2100 tokens > ..." and "... 2300 tokens ..." count as one kind)."""
    out: dict[str, int] = {}
    for r in reasons:
        if r is not None:
            k = re.sub(r"\d+", "N", re.split(r"[:(]", str(r), maxsplit=1)[0].strip())[:80]
            out[k] = out.get(k, 0) + 1
    return out


def stage_manifest(name: str, cfg_hash: str, started: float, counts: dict, extra: Iterable[tuple[str, object]] = ()) -> dict:
    took = time.time() - started
    return {"stage": name, "config_hash": cfg_hash, "duration_s": round(took, 3), "counts": counts,
            "rows_per_s": round(counts.get("rows_out", 0) / took, 3) if took > 0 else None, **dict(extra)}
