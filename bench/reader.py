"""Parquet reader benchmark (`ray.parquet_reader`): Ray Data's v1 and v2 readers on the same files.

    .venv/bin/python bench/reader.py [small_reads] [big_rows]

- small: what a stage does between its passes (read a split output, a few KB, and take its ids),
  repeated; this fixed per-read cost is what a run of many short stages and CI pay.
- big: one read of `big_rows` rows x 10 columns in 32 files, for throughput.
Each reader runs in the same Ray session, interleaved (v1, v2, v1, v2, ...). Prints seconds and ratios.
"""
from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq


def main(small_reads: int = 6, big_rows: int = 2_000_000) -> None:
    import ray

    ray.init(num_cpus=2, object_store_memory=1 << 30, include_dashboard=False, log_to_driver=False)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    root = tempfile.mkdtemp(prefix="bench-reader-")
    pq.write_table(pa.table({"item_id": [f"i{k}" for k in range(40)], "treatment": ["cot", "direct"] * 20}),
                   f"{root}/small.parquet")
    rng = np.random.default_rng(0)
    per = big_rows // 32
    os.makedirs(f"{root}/big")
    for f in range(32):
        pq.write_table(pa.table({f"c{j}": rng.random(per) for j in range(10)}), f"{root}/big/{f:02d}.parquet")

    def small() -> None:
        ray.data.read_parquet(f"{root}/small.parquet").select_columns(["item_id"]).take_all()

    def big() -> None:
        assert ray.data.read_parquet(f"{root}/big").filter(
            expr=ray.data.expressions.col("c0") > 0.5).count() > 0

    times: dict[str, dict[str, list[float]]] = {"v1": {"small": [], "big": []}, "v2": {"small": [], "big": []}}
    for _ in range(2):  # warm-up: worker processes, imports
        for v in times:
            ctx.use_datasource_v2 = v == "v2"
            small()
    for k in range(small_reads):
        for v in times:
            ctx.use_datasource_v2 = v == "v2"
            t = time.perf_counter()
            small()
            times[v]["small"].append(time.perf_counter() - t)
            if k < 2:
                t = time.perf_counter()
                big()
                times[v]["big"].append(time.perf_counter() - t)
    med = {v: {k: statistics.median(x) for k, x in d.items()} for v, d in times.items()}
    print(f"small read (40 rows), median of {small_reads}: v1 {med['v1']['small']:.2f} s, v2 {med['v2']['small']:.2f} s "
          f"(v2/v1 = {med['v2']['small'] / med['v1']['small']:.1f}x); range v2 "
          f"{min(times['v2']['small']):.2f}-{max(times['v2']['small']):.2f} s")
    print(f"big read ({big_rows:,} rows, 32 files), median of 2: v1 {med['v1']['big']:.2f} s "
          f"({big_rows / med['v1']['big'] / 1e6:.1f} M rows/s), v2 {med['v2']['big']:.2f} s "
          f"({big_rows / med['v2']['big'] / 1e6:.1f} M rows/s)")


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:]))
