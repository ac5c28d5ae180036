"""`cft-ray export RUN_DIR --arm ARM OUT`: one trained arm as a folder a user can publish.

OUT gets the arm's merged model (safetensors, tokenizer, chat template), its LoRA adapter in `adapter/`,
the run's config (`cft_ray_config.yaml`), and a model card (`README.md`) that states what the arm trained
on, the data it spent and its held-out accuracy with the interval, paired comparisons included. If the arm
trained on teacher chain-of-thought, `cot/` holds that data set: exactly the CoT rows the arm trained on
(question, options, answer, the verified reasoning), Parquet + a dataset card.
`--push-to-hub REPO` uploads the model folder (and `--dataset-repo REPO` the CoT set) with huggingface_hub,
the token from the environment (HF_TOKEN), never from a file or the command line.

Stage directories are found by name under RUN_DIR (arms.json records them as the run saw them, which may
be relative to another working directory or a moved bucket).
"""
from __future__ import annotations

import os

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import yaml

from cft_ray import store
from cft_ray.arms import DESCRIPTIONS
from cft_ray.config import ConfigError, error_line
from cft_ray.report import PROTOCOLS, phase_epochs


def _under(run_dir: str, path: str) -> str:
    """A stage dir as recorded by the run, re-rooted at the run dir the user gave."""
    return store.join(run_dir, str(path).rstrip("/").rsplit("/", 1)[-1])


def _arm_entry(run_dir: str, arm: str) -> dict:
    path = store.join(run_dir, "arms.json")
    if not store.exists(path):
        raise ConfigError(f"export: no arms.json under {run_dir}; give the run_dir of a run whose arms finished "
                          "(`cft-ray arms` or `cft-ray run`)")
    arms = store.read_json(path)
    if arm not in arms:
        raise ConfigError(f"--arm: '{arm}' is not an arm of {run_dir} (its arms: {', '.join(arms)})")
    entry = arms[arm]
    if not entry.get("train_dir"):
        raise ConfigError(f"--arm: '{arm}' trained nothing (its model is the student itself); export a trained arm "
                          f"({', '.join(a for a, v in arms.items() if v.get('train_dir')) or 'none in this run'})")
    return entry


def _acc(part: dict) -> str:
    return f"{part['accuracy']:.3f} [{part['ci95'][0]:.3f}, {part['ci95'][1]:.3f}]"


def _card_results(arm: str, entry: dict, comparisons: dict) -> list[str]:
    lines = ["## Held-out accuracy", "", "Share of the run's test items answered right, with the 95% Wilson interval.",
             "", "| protocol | set | accuracy [95% CI] | n |", "|---|---|---|---|"]
    for mode, sets in (entry.get("by_mode") or {entry["mode"]: entry["sets"]}).items():
        lines += [f"| {mode}: {PROTOCOLS.get(mode, mode)} | {name} | {_acc(s)} | {s['n']} |" for name, s in sets.items()]
    pairs = [(mode, p) for mode, ps in comparisons.get("by_mode", {}).items() for p in ps if arm in (p["a"], p["b"])]
    if pairs:
        lines += ["", f"Paired on the same test items ({comparisons.get('test', 'exact McNemar test')}):", "",
                  "| comparison | protocol | n | difference [95% CI] | p | significant |", "|---|---|---|---|---|---|"]
        lines += [f"| {p['a']} vs {p['b']} | {mode} | {c['n']} | {c['diff']:+.3f} [{c['diff_ci95'][0]:+.3f}, "
                  f"{c['diff_ci95'][1]:+.3f}] | {c['p_value']:.3g} | {'yes' if c['significant'] else 'no'} |"
                  for mode, p in pairs for c in [p["test"]]]
    return lines


def model_card(arm: str, entry: dict, config: dict, train: dict, comparisons: dict, cot_rows: int | None) -> str:
    """The model card: front matter for the Hub, then what the arm is, what it scored and what it cost."""
    student = config.get("student", {}).get("name", "?")
    front = {"library_name": "transformers", "pipeline_tag": "text-generation",
             "tags": ["cft-ray", "complexity-aware-fine-tuning", arm]}
    if "/" in student and "://" not in student and not os.path.isabs(student):  # a hub id, not a path or an alias
        front["base_model"] = student
    d = entry["data_spent"]
    lines = ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "",
             f"# `{arm}` arm of a cft-ray run", "",
             f"Fine-tuned from `{student}` with cft-ray (complexity-aware fine-tuning): {DESCRIPTIONS.get(arm, arm)}. "
             f"It answers in the `{entry['prompt']}` format it was trained on (the final answer as `[[k]]`).", ""]
    lines += _card_results(arm, entry, comparisons)
    lines += ["", "## Data spent", "", "| supervised target tokens x epochs | training tokens | teacher calls | "
              "teacher tokens in / out | CoT rows trained on |", "|---|---|---|---|---|",
              f"| {d['target_tokens']} | {d.get('train_tokens', 0):.0f} | {d['teacher_calls']} | "
              f"{d['teacher_tokens_in']} / {d['teacher_tokens_out']} | {cot_rows if cot_rows is not None else 0} |", "",
              "## Training", "",
              f"{train.get('method')} fine-tuning ({train.get('precision')}, ZeRO-{train.get('zero_stage')}, "
              f"{train.get('num_workers')} workers, effective batch {train.get('effective_batch')}), "
              f"{train.get('steps')} optimizer steps; epochs per phase: {phase_epochs(_trained_phases(train))}; "
              f"{train.get('tokens_per_s')} tokens/s, MFU {train.get('mfu')}.", "",
              "The whole run's configuration is `cft_ray_config.yaml`: `cft-ray run -c cft_ray_config.yaml` "
              "re-runs it (the same seeds, splits and budgets).", ""]
    return "\n".join(lines)


def _trained_phases(train: dict) -> list:
    return [[p["name"], p["epochs"]] for p in train.get("phases", []) if p.get("steps")]


def cot_dataset(run_dir: str, stage_dirs: dict, train_dir: str) -> pa.Table | None:
    """The CoT rows the arm trained on (its examples of kind cot without error), with their items' text."""
    ex = store.columns(store.join(train_dir, "examples"), ["item_id", "kind", "error"])
    ids = pc.filter(ex["item_id"], pc.and_(pc.equal(ex["kind"], "cot"), pc.is_null(ex["error"])))
    if len(ids) == 0:
        return None
    cot = store.columns(store.join(_under(run_dir, stage_dirs["teach"]), "cot"), ["item_id", "text"])
    items = store.columns(store.join(_under(run_dir, stage_dirs["data"]), "items"), ["item_id", "question", "options", "answer"])
    rows = items.filter(pc.is_in(items["item_id"], value_set=ids)).sort_by("item_id")
    # the examples were built from these texts, so every id has one (pyarrow's join takes no list columns)
    return rows.append_column("rationale", cot["text"].take(pc.index_in(rows["item_id"], value_set=cot["item_id"])))


def _copy_dir(src: str, dst: str) -> None:
    sfs, sp = store._fs(src)
    dfs, dp = store._fs(dst)
    dfs.create_dir(dp, recursive=True)
    pafs.copy_files(sp, dp, source_filesystem=sfs, destination_filesystem=dfs)


def _write(path: str, text: str) -> None:
    fs, p = store._fs(path)
    with fs.open_output_stream(p) as f:
        f.write(text.encode())


def export(run_dir: str, arm: str, out: str) -> str:
    """Write the arm's publishable folder to `out`; returns it."""
    entry = _arm_entry(run_dir, arm)
    train_dir = _under(run_dir, entry["train_dir"])
    if not store.is_done(train_dir):
        raise ConfigError(f"export: the {arm} arm's training is not finished ({train_dir}); re-run `cft-ray arms`")
    run_path = store.join(run_dir, "run_manifest.json")
    run = store.read_json(run_path) if store.exists(run_path) else {}
    comp_path = store.join(run_dir, "comparisons.json")
    comparisons = store.read_json(comp_path) if store.exists(comp_path) else {}
    _copy_dir(store.join(train_dir, "model"), out)
    if store.exists(store.join(train_dir, "adapter")):
        _copy_dir(store.join(train_dir, "adapter"), store.join(out, "adapter"))
    cot = cot_dataset(run_dir, run.get("stage_dirs", {}), train_dir) if entry["prompt"] == "cot" else None
    if cot is not None:
        store.write_table(cot, store.join(out, "cot", "data.parquet"))
        _write(store.join(out, "cot", "README.md"), dataset_card(arm, run.get("config", {}), cot.num_rows))
    _write(store.join(out, "cft_ray_config.yaml"), yaml.safe_dump(run.get("config", {}), sort_keys=False))
    train = store.read_json(store.join(train_dir, "train_manifest.json"))
    _write(store.join(out, "README.md"),
           model_card(arm, entry, run.get("config", {}), train, comparisons, None if cot is None else cot.num_rows))
    return out


def dataset_card(arm: str, config: dict, n: int) -> str:
    teacher = config.get("teach", {})
    source = teacher.get("model", {}).get("name") if teacher.get("backend") != "rationale" else "the items' own rationale column"
    checked = ("kept whether its final answer was right or not (teach.policy=keep_all)" if teacher.get("policy") == "keep_all"
               else "each kept only if its last `[[k]]` names the right option")
    size = next(name for bound, name in ((1e3, "n<1K"), (1e4, "1K<n<10K"), (1e5, "10K<n<100K"), (float("inf"), "n>100K"))
                if n < bound)
    front = {"tags": ["cft-ray", "chain-of-thought", "distillation"], "size_categories": [size]}
    return "\n".join(["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "",
                      f"# Chain-of-thought rows the `{arm}` arm trained on", "",
                      f"{n} multiple-choice items (`question`, `options`, `answer` = the index of the right option) with a "
                      f"`rationale` from {source}, {checked}. Written by `cft-ray export`.", ""])


def push(out: str, repo: str | None, dataset_repo: str | None, private: bool) -> None:
    """Upload the model folder (and the CoT set) to the Hub, the token from HF_TOKEN."""
    from huggingface_hub import HfApi

    if dataset_repo and not store.exists(store.join(out, "cot", "data.parquet")):
        raise ConfigError(f"--dataset-repo: this arm trained on no chain-of-thought, there is no data set in {out}/cot")
    api = HfApi(token=os.environ["HF_TOKEN"])
    try:
        if repo:
            api.create_repo(repo, private=private, exist_ok=True)
            api.upload_folder(folder_path=out, repo_id=repo, ignore_patterns=["cot/*"], commit_message="cft-ray export")
        if dataset_repo:
            api.create_repo(dataset_repo, repo_type="dataset", private=private, exist_ok=True)
            api.upload_folder(folder_path=os.path.join(out, "cot"), repo_id=dataset_repo, repo_type="dataset",
                              commit_message="cft-ray export")
    except Exception as e:  # noqa: BLE001 - the client's transport errors change with its version (requests, httpx)
        raise ConfigError(f"--push-to-hub: the Hub at {api.endpoint} refused or could not be reached "
                          f"({type(e).__name__}: {error_line(e)}); check HF_TOKEN's write access, the repo name "
                          f"and HF_ENDPOINT; the export itself is in {out}") from None


def main(run_dir: str, arm: str, out: str, repo: str | None = None, dataset_repo: str | None = None,
         private: bool = False) -> str:
    if (repo or dataset_repo) and not os.environ.get("HF_TOKEN"):  # before copying gigabytes
        raise ConfigError("--push-to-hub: no token in the environment; export HF_TOKEN (a write token) and run again")
    if (repo or dataset_repo) and "://" in out:
        raise ConfigError(f"OUT: {out} is on an object store; export to a local folder to push it to the Hub")
    out = store.shown(out)  # pyarrow's local filesystem takes absolute paths
    export(run_dir, arm, out)
    if repo or dataset_repo:
        push(out, repo, dataset_repo, private)
    return out
