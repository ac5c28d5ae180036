"""The human report of a run: `<run_dir>/report/report.md` + PNG plots, from the stages' own files.

It reads only what the stages wrote (manifests, roc.json, split.json, arms.json, plan.json), so it can
be re-rendered at any time with `cft-ray report <run_dir>`.
"""
from __future__ import annotations

import logging

import pyarrow.fs as pafs

from cft_ray import store
from cft_ray.config import ConfigError

log = logging.getLogger("cft_ray")


def _copy(src: str, dst: str) -> bool:
    """One file, through pyarrow's filesystems like every other output (fsspec would need s3fs for s3://)."""
    if not store.exists(src):
        return False
    (sfs, sp), (dfs, dp) = store._fs(src), store._fs(dst)
    dfs.create_dir(dp.rsplit("/", 1)[0], recursive=True)
    pafs.copy_files(sp, dp, source_filesystem=sfs, destination_filesystem=dfs)
    return True


def _manifest(d: str | None) -> dict | None:
    if d and store.exists(store.join(d, "manifest.json")):
        return store.read_json(store.join(d, "manifest.json"))
    return None


def _fmt(x, nd=3):
    return "-" if x is None else f"{x:,.{nd}f}" if isinstance(x, float) else f"{x:,}" if isinstance(x, int) else str(x)


def _table(header: list[str], rows: list[list]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(_fmt(c) for c in r) + " |" for r in rows]


def plot_arms(arms: dict, out: str) -> None:
    """Accuracy per arm with binomial error bars, overall and per test bucket."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names = list(arms)
    sets = [s for s in ("test", "test_balanced") if all(s in arms[a]["sets"] for a in names)]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    w = 0.8 / max(1, len(sets))
    for k, s in enumerate(sets):
        parts = [arms[a]["sets"][s] for a in names]
        acc = [p["accuracy"] for p in parts]
        ci = [p.get("ci95") or [p["accuracy"] - p["stderr"], p["accuracy"] + p["stderr"]] for p in parts]
        err = [[max(0.0, x - lo) for x, (lo, _) in zip(acc, ci)], [max(0.0, hi - x) for x, (_, hi) in zip(acc, ci)]]
        axes[0].bar(np.arange(len(names)) + k * w, acc, w, yerr=err, capsize=3, label=s)
    axes[0].set_xticks(np.arange(len(names)) + w * (len(sets) - 1) / 2, names)
    axes[0].set(ylabel="accuracy (95% Wilson interval)", title="held-out accuracy per arm")
    axes[0].legend(fontsize=8)
    buckets = sorted({b for a in names for b in arms[a]["sets"]["test"]["by_bucket"]})
    w = 0.8 / max(1, len(names))
    for k, a in enumerate(names):
        by = arms[a]["sets"]["test"]["by_bucket"]
        axes[1].bar(np.arange(len(buckets)) + k * w, [by.get(b, {}).get("accuracy", np.nan) for b in buckets], w,
                    yerr=[by.get(b, {}).get("stderr", 0) for b in buckets], capsize=2, label=a)
    axes[1].set_xticks(np.arange(len(buckets)) + w * (len(names) - 1) / 2, buckets)
    axes[1].set(ylabel="accuracy", title="test accuracy per difficulty bucket")
    axes[1].legend(fontsize=8)
    store.write_png(fig, out)


def plot_spent(arms: dict, out: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(arms)
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.bar(names, [arms[a]["data_spent"]["target_tokens"] for a in names], color="tab:orange")
    ax.set(ylabel="supervised target tokens x epochs", title="data spent per arm")
    store.write_png(fig, out)


def plan_vs_actual(p: dict, dirs: dict, run_dir: str) -> list[tuple[str, str, float, float | None]]:
    """(quantity, stage, planned, actual) for what both the plan and the manifests count; the train
    figures are the caft arm's (the plan prices that arm)."""
    st = p["stages"]
    out = []
    m = _manifest(dirs.get("score"))
    out.append(("prompt tokens", "score", st["score"]["tokens"], m and m["throughput"].get("tokens")))
    m = _manifest(dirs.get("teach"))
    out.append(("calls", "teach", st["teach"]["calls"], m and m["counts"]["generated"]))
    out.append(("tokens in+out", "teach", st["teach"]["tokens"], m and m["tokens"]["in"] + m["tokens"]["out"]))
    train_dir = (dirs.get("arms") or {}).get("caft", [None])[0]
    tm = store.join(train_dir, "train_manifest.json") if train_dir else None
    tm = store.read_json(tm) if tm and store.exists(tm) else None
    out.append(("tokens x epochs", "train caft", st["train"]["tokens"],
                tm and sum(ph["tokens_per_epoch"] * ph["epochs"] for ph in tm["phases"] if ph["steps"])))
    out.append(("target tokens x epochs", "train caft", st["train"]["target_tokens"], tm and tm["data_spent_target_tokens"]))
    return out


def _section_setup(run: dict, run_dir: str) -> list[str]:
    """Title and the run's configuration: models, data, split, training, evaluation, versions."""
    lines = [f"# cft-ray report: `{run_dir}`", ""]
    cfg = run.get("config", {})
    if not cfg:
        return lines
    st, te = cfg["student"], cfg["teach"]
    teacher = ("the items' own rationales (teach.backend rationale: no model, checked against gold)"
               if te["backend"] == "rationale" else
               f"`{te['model']['name'] if te['backend'] != 'openai' else te.get('api_model')}` "
               f"via {te['backend']} (temperature {te['temperature']}, top_p {te['top_p']}, max_tokens {te['max_tokens']}, "
               f"seed {te['seed']}, policy {te['policy']} x{te['samples']}, format constraint {te['constrain_format']})")
    return lines + [
        f"- student: `{st['name']}` ({st['dtype']}); teacher: {teacher}",
        f"- data: `{cfg['data']['source']}` (limit {cfg['data']['limit']}); labels: {cfg['prompt']['labels']} "
        f"(fallback {cfg['prompt']['fallback']})",
        f"- split: metric `{cfg['split']['metric']}`, {cfg['split']['method']} {cfg['split']['quantiles'] if cfg['split']['method'] == 'quantiles' else ''}, "
        f"routing {cfg['split']['routing']}",
        f"- train: {cfg['train']['method']}, lr {cfg['train']['lr']}, epochs/phase {cfg['train']['epochs']}, "
        f"effective batch {cfg['train']['micro_batch'] * cfg['train']['grad_accum'] * cfg['train']['num_workers']}, "
        f"ZeRO-{cfg['train']['zero_stage']}, {cfg['train']['precision']}, loss on {cfg['train']['loss_on']}",
        f"- evaluation: {cfg['eval']['mode']} protocol (also {cfg['eval'].get('extra_modes') or 'none'}), max_new_tokens {cfg['eval']['max_new_tokens']}, temperature {cfg['eval']['temperature']}",
        f"- config hash `{run.get('config_hash')}`; versions: " + ", ".join(f"{k} {v}" for k, v in run.get("versions", {}).items() if v), ""]


def _section_data(data_dir: str | None) -> list[str]:
    """Rows read, validated, rejected (by reason) and used."""
    m = _manifest(data_dir)
    if not m:
        return []
    c = m["counts"]
    return ["## Data", f"{c['rows_in']:,} rows in, {c['valid']:,} valid, {c['errors']:,} rejected "
            f"({', '.join(f'{k}: {v}' for k, v in c.get('error_reasons', {}).items())}); {c['rows_out']:,} items used.", ""]


def _section_warmup(wdir: str | None) -> list[str]:
    """The student's warm-up: on what, how much, and what it left out."""
    m = _manifest(wdir)
    if not m:
        return []
    c = m["counts"]
    tm = store.read_json(store.join(wdir, "train_manifest.json"))
    return ["## Warm-up", f"The student scored and fine-tuned below is the configured one after direct-answer SFT on "
            f"{c['rows_out']:,} items of `{m.get('source')}` ({c.get('shared_with_run', 0):,} left out: they are "
            f"also the run's items); {tm['steps']} steps, {tm['method']}, {_fmt(tm.get('tokens_per_s'), 1)} tokens/s, "
            f"final loss {_fmt(tm['loss_curve'][-1]['loss'] if tm.get('loss_curve') else None)}.", ""]


def _section_score(sdir: str | None, rdir: str) -> list[str]:
    """Student accuracy, throughput and each uncertainty metric's ROC AUC; copies the score plots."""
    m = _manifest(sdir)
    if not m:
        return []
    roc = store.read_json(store.join(sdir, "roc.json"))
    ov = roc["overall"]
    lines = ["## Score: how unsure is the student?",
             f"Student accuracy on its own answer token: {_fmt(ov['accuracy'])} over {ov['n']:,} valid rows; "
             f"{m['throughput']['rows_per_s']:.1f} rows/s, {m['throughput']['tokens_per_s']:.0f} tokens/s, "
             f"padding waste {m['throughput'].get('padding_waste')}.", "",
             "ROC AUC of each metric as a predictor of a correct answer (confidence = 1 - metric/max):", ""]
    lines += _table(["metric", "AUC"], [[k, v] for k, v in ov["auc"].items()]) + [""]
    if "vs_level" in roc:  # a task with known levels: the metric against the truth, not only the student's answer
        vl = roc["vs_level"]
        lines += [f"Known difficulty: ROC AUC of each metric as a predictor of an easier item ({vl['easy']}, "
                  f"{vl['n_correct']:,} of {vl['n']:,} rows), and the student by level:", ""]
        lines += _table(["metric", "AUC vs level"], [[k, v] for k, v in vl["auc"].items()]) + [""]
        lines += _table(["level", "rows", "student accuracy", "entropy AUC vs correct"],
                        [[k, v["n"], _fmt(v["accuracy"]), v["auc"].get("entropy")] for k, v in roc["by_level"].items()]) + [""]
    for name in ("roc.png", "hist.png"):
        if _copy(store.join(sdir, name), store.join(rdir, f"score_{name}")):
            lines.append(f"![{name}](score_{name})")
    return lines + [""]


def _section_split(spdir: str | None, rdir: str) -> list[str]:
    """Difficulty thresholds, bucket sizes per split and exclusions; copies the distribution plot."""
    if not (spdir and store.exists(store.join(spdir, "split.json"))):
        return []
    sj = store.read_json(store.join(spdir, "split.json"))
    lines = ["## Split", f"Difficulty `{sj['difficulty']}`, normalised by {sj['normalize']}; thresholds "
             f"{[round(x, 4) for x in sj['thresholds']]} (fitted on {sj['fitted_on']}). Routing: {sj['routing']}.", ""]
    lines += _table(["split"] + sj["buckets"], [[s] + [v.get(b, 0) for b in sj["buckets"]] for s, v in sj["sizes"].items()])
    lines += ["", f"Excluded (kept, flagged): {sj['excluded'] or 'none'}."]
    rq = sj.get("routing_quality")
    if rq and rq["routed_cot"]:
        lines += ["", f"Routing against the student's own answers (train + valid, {rq['rows']:,} rows): of the "
                  f"{rq['routed_cot']:,} rows routed to CoT, {_fmt(rq['precision'])} were answered wrong (precision; "
                  f"{_fmt(rq['base_rate_wrong'])} of all rows were); of the {rq['student_wrong']:,} answered wrong, "
                  f"{_fmt(rq['recall'])} were routed (recall)."]
    if _copy(store.join(spdir, sj.get("plot", "distribution.png")), store.join(rdir, "split_distribution.png")):
        lines += ["", "![distribution](split_distribution.png)"]
    return lines + [""]


def _section_teach(teach_dir: str | None) -> list[str]:
    """The teacher's counters: scalar ones as a table, nested ones as bullet points."""
    m = _manifest(teach_dir)
    if not m:
        return []
    c = m["counts"]
    lines = ["## Teach", "Teacher chain-of-thought for the rows routed to CoT, checked against gold:", ""]
    lines += _table(["counter", "value"], [[k, v] for k, v in c.items() if not isinstance(v, dict)])
    lines += [f"- {k}: {v}" for k, v in c.items() if isinstance(v, dict)]
    return lines + [""]


def _section_select(sel: str | None, rdir: str) -> list[str]:
    """InstructDiff's cuts, pool counts and value quantiles; copies the selection plot."""
    m = _manifest(sel)
    if not m:
        return []
    c, cuts, sm = m["counts"], m["cuts"], m["summary"]
    lines = ["## Select: InstructDiff", f"Parameters {m['params']}. Pool {c['rows_in']:,} items, {c.get('unscored', 0)} "
             f"without a score; dNLL tails cut at [{_fmt(cuts['dnll_low'])}, {_fmt(cuts['dnll_high'])}] "
             f"({c.get('dnll_low', 0)} + {c.get('dnll_high', 0)} dropped), {c.get('over_budget', 0)} over the budget "
             f"({_fmt(cuts['budget'], 1)} {m['params']['budget_by']}), {c.get('selected', 0)} selected "
             f"(max dH {_fmt(cuts['dh_max_selected'])}). Rounds: {m['timings']['rounds']}.", ""]
    lines += _table(["value (p10 / p50 / p90)", *sm.get("dnll", {})],
                    [[k, *v.values()] for k, v in sm.items() if k != "selected_mean"]) + [""]
    if _copy(store.join(sel, "select.png"), store.join(rdir, "select.png")):
        lines += ["![select](select.png)", ""]
    return lines


def _acc(part: dict) -> str:
    """Accuracy with its 95% Wilson interval (older runs: ± binomial s.e.)."""
    if not part:
        return "-"
    if "ci95" in part:
        return f"{part['accuracy']:.3f} [{part['ci95'][0]:.3f}, {part['ci95'][1]:.3f}]"
    return f"{part['accuracy']:.3f} ± {part['stderr']:.3f}"


PROTOCOLS = {"generate": "greedy decoding of the arm's own prompt, last [[k]] parsed (unparseable = wrong)",
             "direct": "direct prompt, the label whose whole answer '[[k]]' is likeliest (one forward)"}


def _phases(arm: dict) -> list:
    """[name, epochs(, why skipped)] per training phase in training order, from the arm's train manifest
    (it also names the phases that had too few rows to train), else from its metrics."""
    tm_path = store.join(arm["train_dir"], "train_manifest.json") if arm.get("train_dir") else None
    if tm_path and store.exists(tm_path):
        return [[p["name"], p["epochs"], *([p["skipped"]] if p.get("skipped") else [])]
                for p in store.read_json(tm_path)["phases"] if p["steps"] or p.get("skipped")]
    e = arm.get("epochs") or []
    return list(e.items()) if isinstance(e, dict) else e  # a dict: metrics written before the list


def phase_epochs(phases: list) -> str:
    """Epochs per training phase in training order, named when there are several: "0.5 easy + 0.5 medium + 1 hard";
    a phase that could not train shows 0 epochs and why."""
    if len(phases) == 1 and len(phases[0]) == 2:
        return f"{phases[0][1]:g}"
    return " + ".join(f"{e:g} {name}" if not why else f"0 {name} (skipped: {why[0]})"
                      for name, e, *why in phases) or "-"


def _section_arms(run_dir: str, rdir: str) -> list[str]:
    """Held-out accuracy and data spent per arm under the headline protocol (other protocols as extra
    columns), CAFT's saving over distillation; draws the arm plots."""
    arms_path = store.join(run_dir, "arms.json")
    if not store.exists(arms_path):
        return []
    arms = store.read_json(arms_path)
    headline = next(iter(arms.values())).get("mode", "?")
    extra = [m for m in next(iter(arms.values())).get("by_mode") or {} if m != headline]
    rows = []
    for a, v in arms.items():
        t, b = v["sets"]["test"], v["sets"].get("test_balanced", {})
        d = v["data_spent"]
        epochs = phase_epochs(_phases(v))
        rows.append([a, v["prompt"], epochs, _acc(t), t["n"], _acc(b), t["parse_failure_rate"],
                     *[_acc(v["by_mode"][m]["test"]) for m in extra],
                     d["target_tokens"], d["teacher_calls"], d["teacher_tokens_out"]])
    lines = ["## Arms: held-out accuracy and the data each spent", "",
             f"Protocol: **{headline}** for every arm ({PROTOCOLS.get(headline, headline)})"
             + "".join(f"; also {m} ({PROTOCOLS.get(m, m)})" for m in extra) + ". Accuracy: share of test items "
             "answered right, with its 95% Wilson interval; prompt = what the arm was trained to answer; epochs per "
             "training phase; data spent = supervised answer tokens x epochs.", ""]
    lines += _table(["arm", "prompt", "epochs", "test acc [95% CI]", "n", "balanced acc [95% CI]", "parse failures",
                     *[f"{m}: test acc [95% CI]" for m in extra],
                     "target tokens x epochs", "teacher calls", "teacher tokens out"], rows)
    if "caft" in arms and "distill" in arms and arms["distill"]["data_spent"]["target_tokens"]:
        saving = 1 - arms["caft"]["data_spent"]["target_tokens"] / arms["distill"]["data_spent"]["target_tokens"]
        lines += ["", f"CAFT spends {saving:.1%} fewer supervised target tokens than full distillation "
                      "(the paper's measure; paper: 81%)."]
    plot_arms(arms, store.join(rdir, "arms_accuracy.png"))
    plot_spent(arms, store.join(rdir, "arms_spent.png"))
    return lines + ["", "![accuracy](arms_accuracy.png)", "", "![spent](arms_spent.png)", ""] + _section_comparisons(run_dir)


def _section_comparisons(run_dir: str) -> list[str]:
    """The paired comparison table, per protocol (the headline first): difference, its bootstrap
    interval, exact McNemar p, significance."""
    path = store.join(run_dir, "comparisons.json")
    if not store.exists(path):
        return []
    comp = store.read_json(path)
    rows = []
    for mode, pairs in comp["by_mode"].items():
        for r in pairs:
            for name in ("test", "test_balanced"):
                c = r.get(name)
                if c:
                    rows.append([f"{r['a']} vs {r['b']}", mode, name, c["n"], f"{c['diff']:+.3f}",
                                 f"[{c['diff_ci95'][0]:+.3f}, {c['diff_ci95'][1]:+.3f}]", f"{c['n10']} / {c['n01']}",
                                 f"{c['p_value']:.3g}", "yes" if c["significant"] else "no", f"{c['detectable_diff']:.3f}"])
    lines = ["## Paired comparisons (same test items, same protocol)", "",
             f"{comp['test']}; significant = p < {comp['alpha']}. 'detectable' is the smallest difference this many items "
             f"would show with power 0.8 at that discordance (normal approximation). Headline protocol: {comp['protocol']}.", ""]
    return lines + _table(["comparison", "protocol", "set", "n", "difference", "95% CI", "only a / only b right",
                           "p (McNemar)", "significant", "detectable"], rows) + [""]


def _section_times(stages: dict) -> list[str]:
    """Wall time and status (ran or why skipped) of each pipeline stage."""
    if not stages:
        return []
    return (["## Time per stage", ""]
            + _table(["stage", "wall s", "status"], [[s, v.get("wall_s"), v.get("skipped") or "ran"] for s, v in stages.items()])
            + [""])


def _section_plan(run_dir: str, dirs: dict) -> list[str]:
    """The cost plan's estimates against what the stages counted (see plan_vs_actual)."""
    plan_path = store.join(run_dir, "plan.json")
    if not store.exists(plan_path):
        return []
    p = store.read_json(plan_path)
    rows = [[f"{k} ({s})", v, a, a / v if a is not None and v else None] for k, s, v, a in plan_vs_actual(p, dirs, run_dir)]
    lines = ["## Plan vs actual", f"What `cft-ray plan` estimated before the run (priced on {p['gpu']}: "
             f"{p['total_gpu_hours']:.3f} GPU-hours in total) against what the stages counted:", ""]
    return lines + _table(["quantity", "planned", "actual", "actual / planned"], rows) + [""]


def _write_text(path: str, text: str) -> None:
    fs, p = store._fs(path)
    fs.create_dir(p.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(p) as f:
        f.write(text.encode())


def render(run_dir: str) -> str:
    """Write report.md (+ plots) for a run directory; returns its path."""
    rdir = store.join(run_dir, "report")
    run_path = store.join(run_dir, "run_manifest.json")
    run = store.read_json(run_path) if store.exists(run_path) else {}
    dirs = run.get("stage_dirs", {})
    lines = (_section_setup(run, run_dir)
             + _section_data(dirs.get("data"))
             + _section_warmup(dirs.get("warmup"))
             + _section_score(dirs.get("score"), rdir)
             + _section_split(dirs.get("split"), rdir)
             + _section_teach(dirs.get("teach"))
             + _section_select(dirs.get("select"), rdir)
             + _section_arms(run_dir, rdir)
             + _section_times(run.get("stages", {}))
             + _section_plan(run_dir, dirs))
    path = store.join(rdir, "report.md")
    _write_text(path, "\n".join(lines))
    return path


def main(cfg) -> str:
    return render(cfg.run_dir)


def main_dir(run_dir: str) -> str:
    """`cft-ray report RUN_DIR`: a mistyped directory is an error, not an empty report written there."""
    if not store.exists(run_dir):
        raise ConfigError(f"report: no run directory at {run_dir}; give the run_dir of a run")
    return render(run_dir)
