"""Split stage benchmark: how the quantile cut points are found, side by side, on the same Dataset.

    .venv/bin/python bench/split.py [rows] [blocks]

- naive: collect the metric column to the driver (`to_pandas`) and `np.quantile`: fastest on one
  node, but the driver holds the whole column (fails beyond driver memory).
- ray Quantile: Ray Data's exact `Quantile` aggregate: one accumulator holds the whole column.
- cft-ray: `split.prepare` (hash draws, exclusions) + global Ray Data sort + a block-at-a-time stream
  to the driver (`split.order_stats`): exact, the driver holds one block.
Then the whole stage (`split.main`, on synthetic scored Parquet) for rows/s. Prints ratios.
"""
from __future__ import annotations

import os
import sys
import tempfile
import threading
import time

import numpy as np
import psutil

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))


def peak_rss(fn):
    """(result, seconds, driver peak RSS growth in MB) of fn()."""
    proc, peak, stop = psutil.Process(), [0], threading.Event()
    base = proc.memory_info().rss

    def watch():
        while not stop.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss - base)
            time.sleep(0.01)

    th = threading.Thread(target=watch)
    th.start()
    t = time.time()
    out = fn()
    took = time.time() - t
    stop.set()
    th.join()
    return out, took, peak[0] / 2**20


def main(rows: int = 200_000, blocks: int = 8) -> None:
    import ray
    from ray.data.aggregate import Quantile
    from ray.data.expressions import col

    from cft_ray import split as sp
    from cft_ray.config import SplitConfig, load_config
    from test_split import fake_score_stage, scored

    ray.init(num_cpus=2, object_store_memory=1 << 30, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    cfg = SplitConfig(test_fraction=0.0, exclude=[])
    qs = np.array([0.25, 0.75])
    data = scored(rows).select(["item_id", "entropy", "valid", "unknown", "error"])
    ds = ray.data.from_arrow(data).repartition(blocks).materialize()

    def naive():
        col = ds.select_columns(["entropy"]).to_pandas()["entropy"].dropna().to_numpy()
        s = np.sort(col)
        return s[np.floor(qs * len(s)).astype(int)]

    def ray_quantile():
        return [ds.aggregate(Quantile("entropy", q=q))["quantile(entropy)"] for q in qs]

    def ours():
        pool = ds.map_batches(sp.prepare, batch_format="pyarrow", fn_kwargs={"cfg": cfg}) \
            .filter(expr=col("_role") == "pool").select_columns(["_d"]).sort("_d").materialize()
        n, held = pool.count(), []

        def stream():
            for b in pool.iter_batches(batch_format="numpy", batch_size=None):
                held.append(len(b["_d"]))
                yield b["_d"]

        out = sp.order_stats(stream(), np.floor(qs * n).astype(int))
        driver_rows["cft-ray sort + stream"] = max(held)
        return out

    res = {}
    driver_rows = {"naive to_pandas + np.sort": rows, "ray Quantile aggregate (x2)": 0}
    for name, fn in (("naive to_pandas + np.sort", naive), ("ray Quantile aggregate (x2)", ray_quantile), ("cft-ray sort + stream", ours)):
        fn()  # warm the workers
        out, took, mb = peak_rss(fn)
        res[name] = (took, mb, np.round(np.asarray(out, dtype=float), 6).tolist())
    print(f"\ncut points of {rows:,} rows in {blocks} blocks (2 CPUs)")
    print("| method | seconds | metric values held at once by the driver | driver peak RSS growth (MB) | cuts |\n|---|---|---|---|---|")
    base = res["naive to_pandas + np.sort"][0]
    for name, (took, mb, cuts) in res.items():
        held = driver_rows[name] or "0 (one aggregator task holds all)"
        print(f"| {name} | {took:.2f} ({took / base:.2f}x naive) | {held} | {mb:.0f} | {cuts} |")
    assert res["cft-ray sort + stream"][2] == res["naive to_pandas + np.sort"][2], "cft-ray cuts must be exact"

    with tempfile.TemporaryDirectory() as tmp:
        n_stage = min(rows, 50_000)
        rcfg = load_config(None, [f"run_dir={tmp}", "split.cap_per_bucket=1000"])
        fake_score_stage(rcfg, scored(n_stage), parts=blocks)
        t = time.time()
        sp.main(rcfg)
        took = time.time() - t
    print(f"\nwhole stage (split.main, {n_stage:,} scored rows, cap 1000): {took:.1f} s, {n_stage / took:,.0f} rows/s")


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:3]))
