"""`cft-ray <stage> --config X.yaml [key.sub=value ...]`: every subcommand is a stage of the registry
(cft_ray.pipeline.STAGES), plus `run` (the chain), `data inspect` and `report <run dir>`.

This file only parses arguments, checks on the driver what can fail there, starts or joins Ray, and
prints where the output is. No module of the package imports torch, scipy, transformers or Ray at
import time (each imports them where it computes), so a config the first checks reject fails in about
a second. `jobs/*.py` call `job()`.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile

import pyarrow.parquet as pq

from cft_ray import data, models, pipeline, report, store, warmup
from cft_ray.config import EMBEDDED_CONFIG, ConfigError, load_config
from cft_ray.pipeline import STAGES
from cft_ray.runtime import init_ray

ALIASES = {"arms": ["evaluate"]}  # `cft-ray evaluate` (and jobs/evaluate.py) predate the arms module
COMMANDS = {**{n: s.doc for n, s in STAGES.items()}, "run": "the whole pipeline, skipping finished stages"}


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", default=str(EMBEDDED_CONFIG),
                   help="run config YAML (default: the embedded local default, jobs/configs/local.yaml)")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="cft-ray", description="Complexity-aware fine-tuning on Ray.")
    ap.add_argument("-v", "--verbose", action="store_true")
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name, doc in COMMANDS.items():
        if name == "report":  # takes a run dir, not a config
            continue
        if name == "data":
            dp = sub.add_parser("data", help=doc).add_subparsers(dest="data_cmd", required=True)
            _config_args(dp.add_parser("prepare", help=doc))
            ins = dp.add_parser("inspect", help="counts, error breakdown and a sample of a source, written nowhere")
            ins.add_argument("source", help="embedded:mmlu, a file/dir/glob, or hf:<id>")
            ins.add_argument("overrides", nargs="*", metavar="data.key=value")
            ins.add_argument("--sample", type=int, default=3, help="items to print")
            continue
        sp = sub.add_parser(name, help=doc, aliases=ALIASES.get(name, []))
        _config_args(sp)
        if name == "run":
            sp.add_argument("--only", help="run just this stage (upstream must be finished)")
            sp.add_argument("--from", dest="from_stage", help="re-run from this stage on")
            sp.add_argument("--dry-run", action="store_true", help="print the plan and what would be skipped")
    rep = sub.add_parser("report", help="(re)write the human report of a run directory")
    rep.add_argument("run_dir")
    return ap


def _inspect(args) -> int:
    cfg = load_config(None, [f"data.source={args.source}", *args.overrides])
    init_ray(cfg.ray.model_copy(update={"object_store_gb": 1}))
    with tempfile.TemporaryDirectory() as tmp:
        counts = data.ingest(cfg.data, tmp)
        sample = pq.read_table(store.join(tmp, "items")).slice(0, args.sample).to_pylist() if counts["rows_out"] else []
        errs = pq.read_table(store.join(tmp, "errors")).slice(0, args.sample).to_pylist() if counts["errors"] else []
    print(json.dumps(counts, indent=2))
    for title, rows in (("sample items", sample), ("sample errors", errs)):
        print(f"--- {title}")
        for r in rows:
            print(json.dumps(r, ensure_ascii=False)[:500])
    data.require_items(counts, cfg.data)  # after the breakdown: exit 2 with the one-line reason
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if args.cmd == "data" and args.data_cmd == "inspect":
            return _inspect(args)
        if args.cmd == "report":
            print(report.main_dir(args.run_dir))
            return 0
        cfg = load_config(args.config, args.overrides)
        stage = "arms" if args.cmd in ALIASES["arms"] else args.cmd
        if args.cmd == "run" or stage in models.STUDENT_STAGES:
            models.check_template_files(cfg.student)
        pipeline.preflight(cfg, pipeline.needed(cfg) if args.cmd == "run" else [stage])
        init_ray(cfg.ray)
        if args.cmd == "run":
            out = pipeline.main(cfg, only=args.only, from_stage=args.from_stage, dry_run=args.dry_run)
        else:
            out = STAGES[stage].run(warmup.stage_config(cfg, stage))
    except ConfigError as e:
        print(f"cft-ray: {e}", file=sys.stderr)
        return 2
    print(f"output: {out}")
    return 0


def job(stage: str) -> None:
    """Body of jobs/<stage>.py: the same CLI, so `ray job submit -- python jobs/score.py -c X` works."""
    argv = sys.argv[1:]
    sys.exit(main([stage, *argv] if stage != "data" else ["data", "prepare", *argv]))


if __name__ == "__main__":
    sys.exit(main())
