"""`cft-ray <stage> --config X.yaml [key.sub=value ...]`: every subcommand is a stage of the registry
(cft_ray.pipeline.STAGES), plus `run` (the chain), `data inspect`, `report <run dir>` and
`export <run dir> --arm A <out>`.

This file only parses arguments, checks on the driver what can fail there, starts or joins Ray, and
prints where the output is. No module of the package imports torch, scipy, transformers or Ray at
import time (each imports them where it computes), so a config the first checks reject fails in about
a second. `jobs/*.py` call `job()`.

Errors: exit 2 and one stderr line (`cft-ray: <field or input>: ...`) for a config or input to change, exit 1 and
one line naming the exception and the file its traceback was kept in for anything else; `--debug` prints it.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
import traceback
from pathlib import Path

import pyarrow.parquet as pq

from cft_ray import data, export, pipeline, preflight, report, store, warmup
from cft_ray.config import EMBEDDED_CONFIG, ConfigError, error_line, load_config
from cft_ray.pipeline import STAGES
from cft_ray.runtime import init_ray, joins_cluster

ALIASES = {"arms": ["evaluate"]}  # `cft-ray evaluate` (and jobs/evaluate.py) predate the arms module
COMMANDS = {**{n: s.doc for n, s in STAGES.items()}, "run": "the whole pipeline, skipping finished stages"}


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", default=str(EMBEDDED_CONFIG),
                   help="run config YAML (default: the embedded local default, jobs/configs/local.yaml)")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")


def parser() -> argparse.ArgumentParser:
    # -v/--debug before or after the subcommand: the subparsers' copies must not reset the main parser's
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="print the traceback of a failure (else one line, the traceback kept in a log file)")
    ap = argparse.ArgumentParser(prog="cft-ray", description="Complexity-aware fine-tuning on Ray.", parents=[common])
    ap.set_defaults(verbose=False, debug=False)
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name, doc in COMMANDS.items():
        if name == "report":  # takes a run dir, not a config
            continue
        if name == "data":
            dp = sub.add_parser("data", help=doc, parents=[common]).add_subparsers(dest="data_cmd", required=True)
            _config_args(dp.add_parser("prepare", help=doc, parents=[common]))
            ins = dp.add_parser("inspect", help="counts, error breakdown and a sample of a source, written nowhere",
                                parents=[common])
            ins.add_argument("source", help="embedded:mmlu, a file/dir/glob, or hf:<id>")
            ins.add_argument("overrides", nargs="*", metavar="data.key=value")
            ins.add_argument("--sample", type=int, default=3, help="items to print")
            continue
        sp = sub.add_parser(name, help=doc, aliases=ALIASES.get(name, []), parents=[common])
        _config_args(sp)
        if name == "run":
            sp.add_argument("--only", help="run just this stage (upstream must be finished)")
            sp.add_argument("--from", dest="from_stage", help="re-run from this stage on")
            sp.add_argument("--dry-run", action="store_true", help="run the driver checks, print what they found, "
                            "the plan and what would be skipped")
    rep = sub.add_parser("report", help="(re)write the human report of a run directory", parents=[common])
    rep.add_argument("run_dir")
    exp = sub.add_parser("export", help="a trained arm as a publishable folder: model, adapter, model card, CoT data set",
                         parents=[common])
    exp.add_argument("run_dir")
    exp.add_argument("out", help="the folder to write (local, or s3:// / gs:// without --push-to-hub)")
    exp.add_argument("--arm", required=True, help="the arm to export (a trained one: sft, caft, distill, ...)")
    exp.add_argument("--push-to-hub", metavar="REPO", help="upload the model folder to this Hub model repo (token: HF_TOKEN)")
    exp.add_argument("--dataset-repo", metavar="REPO", help="upload the CoT data set to this Hub dataset repo")
    exp.add_argument("--private", action="store_true", help="create the Hub repos private")
    return ap


def _inspect(args) -> str:
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
    return ""


def _command(args) -> str:
    """Run one parsed command; where its output is."""
    if args.cmd == "data" and args.data_cmd == "inspect":
        return _inspect(args)
    if args.cmd == "report":
        return report.main_dir(args.run_dir)
    if args.cmd == "export":
        return export.main(args.run_dir, args.arm, args.out, args.push_to_hub, args.dataset_repo, args.private)
    cfg = load_config(args.config, args.overrides)
    stage = "arms" if args.cmd in ALIASES["arms"] else args.cmd
    only, from_stage = (args.only, args.from_stage) if args.cmd == "run" else (None, None)
    preflight.check_config(cfg, pipeline.needed(cfg) if args.cmd == "run" else [stage])
    may_grow = joins_cluster(cfg.ray)
    init_ray(cfg.ray)
    starting = [s for s, act in pipeline.actions(cfg, pipeline.stage_dirs(cfg), only, from_stage)
                if not act.startswith("skip")] if args.cmd == "run" else [stage]
    found = preflight.check_resources(cfg, starting, may_grow)
    if args.cmd != "run":
        return STAGES[stage].run(warmup.stage_config(cfg, stage))
    if args.dry_run:
        print("driver checks passed: run_dir writable, models and chat templates, labels, length limits")
        print("\n".join(f"  {line}" for line in found))
    return pipeline.main(cfg, only=only, from_stage=from_stage, dry_run=args.dry_run)


def _innermost(e: BaseException) -> BaseException:
    """The exception to report: Ray wraps a task's error (`.cause`), Ray Data chains it (`__cause__`); a
    ConfigError is the message itself, whatever it was raised from."""
    seen = {id(e)}
    while isinstance(nxt := getattr(e, "cause", None) or (None if isinstance(e, ConfigError) else e.__cause__),
                     BaseException) and id(nxt) not in seen:
        e = nxt
        seen.add(id(e))
    return e


def main(argv: list[str] | None = None) -> int:
    """One error contract for every command: exit 2 and one line for a config or input error, exit 1 and one
    line naming the exception for anything else; the traceback only with --debug, else in a log file."""
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        out = _command(args)
    except Exception as e:  # noqa: BLE001 - the contract: one line on stderr whatever failed
        root = _innermost(e)
        if args.debug:
            traceback.print_exc()
        if isinstance(root, ConfigError):
            print(f"cft-ray: {root}", file=sys.stderr)  # one line, or one per field for several invalid fields
            return 2
        kept = Path(tempfile.gettempdir()) / "cft-ray" / f"{time.strftime('%Y%m%d-%H%M%S')}-{args.cmd}.log"
        kept.parent.mkdir(parents=True, exist_ok=True)
        kept.write_text(traceback.format_exc())
        print(f"cft-ray: {args.cmd} failed: {type(root).__name__}: {error_line(root, 300)} (traceback: {kept}; --debug prints it)",
              file=sys.stderr)
        return 1
    if args.cmd == "data" and args.data_cmd == "inspect":
        return 0
    print(f"output: {store.shown(out)}")
    return 0


def job(stage: str) -> None:
    """Body of jobs/<stage>.py: the same CLI, so `ray job submit -- python jobs/score.py -c X` works."""
    argv = sys.argv[1:]
    sys.exit(main([stage, *argv] if stage != "data" else ["data", "prepare", *argv]))


if __name__ == "__main__":
    sys.exit(main())
