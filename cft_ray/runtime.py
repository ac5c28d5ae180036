"""Joining or starting Ray, the same way for a laptop run, `ray job submit` and tests."""
from __future__ import annotations

import logging
import os

from cft_ray.config import RayConfig

log = logging.getLogger("cft_ray")


def joins_cluster(cfg: RayConfig) -> bool:
    """Whether `init_ray` joins a running cluster (which may grow) rather than starting a local Ray."""
    return bool(cfg.address or os.environ.get("RAY_ADDRESS"))


def init_ray(cfg: RayConfig):
    """Connect to cfg.address / RAY_ADDRESS when set (a `ray job submit` sets it), else start a
    local Ray sized to the machine. Re-entrant: an already-initialised Ray is reused."""
    import ray

    if not ray.is_initialized():
        if joins_cluster(cfg):
            ray.init(address=cfg.address or os.environ["RAY_ADDRESS"], log_to_driver=True)
        else:
            # address="local": a new local Ray, as documented, even when another Ray runs on this machine
            # (Ray would otherwise join it and refuse num_cpus). No dashboard (~1 GB of processes here), hence no
            # State API, so Ray Train's placement-group cleaner is silenced: it would warn once a second per run.
            ray.init(address="local", num_cpus=cfg.num_cpus or os.cpu_count(),
                     object_store_memory=int(cfg.object_store_gb * 2**30), include_dashboard=False, log_to_driver=True,
                     runtime_env={"worker_process_setup_hook": "cft_ray.runtime.quiet_placement_group_cleaner"})
        log.info("ray: %s", ray.cluster_resources())
    # the driver plans every read, so its DataContext decides the reader for the whole cluster
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = True
    ctx.use_datasource_v2 = cfg.parquet_reader == "v2"
    return ray


def quiet_placement_group_cleaner() -> None:
    """Worker setup hook of a local Ray: the cleaner can only query its controller through the dashboard's State
    API; without a dashboard it cannot work, and says so every second."""
    logging.getLogger("ray.train.v2._internal.execution.controller.placement_group_cleaner").setLevel(logging.ERROR)


def block_partials(ds, part) -> list:
    """`part(block) -> small pyarrow table` on every block of `ds`, the results on the driver: one pass, and
    only partials travel (Dataset.sum / aggregate / groupby run a hash aggregation whose actor costs ~5 s here,
    whatever the size). Ray Data hands back an empty block as a table with no columns: those are dropped."""
    import ray

    return [t for t in ray.get(ds.map_batches(part, batch_format="pyarrow", batch_size=None).to_arrow_refs())
            if t.num_rows]
