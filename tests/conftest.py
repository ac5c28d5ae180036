"""Shared fixtures: one local Ray for the session, tiny random models built here, the real SmolLM2."""
from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def ray_local():
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, object_store_memory=1 << 30, include_dashboard=False,
                 log_to_driver=False, runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    from cft_ray.config import RayConfig
    from cft_ray.runtime import init_ray

    init_ray(RayConfig())  # the Data settings a run gets
    yield ray


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory):
    """Converted-model cache shared by the session (the GGUF -> safetensors conversion runs once)."""
    return os.environ.get("CFT_TEST_MODEL_CACHE") or str(tmp_path_factory.mktemp("model-cache"))


@pytest.fixture(scope="session")
def smollm2_dir(model_cache):
    """The real embedded SmolLM2-135M-Instruct, converted to a safetensors directory."""
    from cft_ray.config import ModelConfig
    from cft_ray.models import resolve

    return resolve(ModelConfig(cache_dir=model_cache))


def build_tiny(out_dir, tokenizer_dir, chat_template: str | None = None, seed: int = 0, layers: int = 2,
               special: dict | None = None):
    """A randomly initialised Llama-architecture model with a real tokenizer: fast, deterministic.
    `special`: another model's special tokens (bos_token, eos_token, additional_special_tokens)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    if chat_template is not None:
        tok.chat_template = chat_template
    if special:
        tok.add_special_tokens(special)
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id, tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(out_dir, safe_serialization=True)
    tok.save_pretrained(out_dir)
    return str(out_dir)


@pytest.fixture(scope="session")
def base_model_dir(tmp_path_factory, smollm2_dir):
    """A tiny 1-layer model with SmolLM2's tokenizer and no chat template: a base model (`student.chat_template=plain`)."""
    from transformers import AutoTokenizer

    d = build_tiny(tmp_path_factory.mktemp("base"), smollm2_dir, layers=1)
    tok = AutoTokenizer.from_pretrained(d)
    tok.chat_template = None
    for f in Path(d).glob("chat_template.jinja"):
        f.unlink()
    tok.save_pretrained(d)
    assert not getattr(AutoTokenizer.from_pretrained(d), "chat_template", None), "the fixture must have no template"
    return d


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, smollm2_dir):
    """Tiny random Llama with SmolLM2's tokenizer and ChatML template (vocab 49,152, 2 layers)."""
    return build_tiny(tmp_path_factory.mktemp("tiny"), smollm2_dir)


@pytest.fixture(scope="session")
def lora_run(ray_local, tiny_model_dir, tmp_path_factory):
    """(out dir, model dir, train manifest) of one uninterrupted ZeRO-2 LoRA run on 2 workers: checked
    in test_train.py, and the reference a run with a killed worker must end like (tests/reliability)."""
    from test_train import _train

    out = tmp_path_factory.mktemp("lora")
    return (out, *_train(ray_local, tiny_model_dir, out))


TEMPLATES = Path(__file__).parent / "fixtures" / "templates"
# The paper's students: their hub chat templates (tests/fixtures/templates/README.md) and special tokens.
PAPER_STUDENTS = {
    "qwen2.5": ("qwen2.5-instruct.jinja", {"eos_token": "<|im_end|>"}),
    "phi-4-mini": ("phi-4-mini-instruct.jinja", {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>",
                   "additional_special_tokens": ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>", "<|tool|>", "<|/tool|>"]}),
    "llama-3.2": ("llama-3.2-instruct.jinja", {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>",
                  "additional_special_tokens": ["<|start_header_id|>", "<|end_header_id|>"]}),
}

QWEN_TEMPLATE = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' + "
    "m['content'] + '<|eot_id|>' }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}")


@pytest.fixture
def items():
    """A handful of valid canonical items (4 and 10 options, with and without subject)."""
    return [
        {"item_id": f"i{k}", "question": f"What is {k} + {k}?", "options": [str(2 * k + d) for d in (-1, 0, 1, 2)],
         "answer": 1, "subject": "elementary_mathematics", "category": "math", "source": "test"}
        for k in range(8)
    ] + [{"item_id": "ten", "question": "Pick the tenth.", "options": [f"opt{j}" for j in range(10)],
          "answer": 9, "subject": None, "category": None, "source": "test"}]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3():
    """An S3 endpoint on loopback with a bucket `cft`; the AWS_* variables a user would export."""
    import pyarrow.fs as pafs
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    fs = pafs.S3FileSystem(endpoint_override=f"127.0.0.1:{port}", scheme="http", access_key="test", secret_key="test",
                           region="us-east-1", allow_bucket_creation=True)
    fs.create_dir("cft")
    try:
        yield fs
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def upload(fs, local, key: str) -> None:
    """A local directory to `key` (bucket/prefix) on the S3 fixture."""
    import pyarrow.fs as pafs

    fs.create_dir(key, recursive=True)
    pafs.copy_files(str(local), key, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)


_MLFLOW: dict = {}  # the tracking server of this session, started once the collected tests are known


def pytest_collection_finish(session):
    """A real MLflow tracking server on loopback (sqlite backend, proxied artefacts), as a team runs one, started
    right after collection when a collected test uses it: its ~25 s start-up overlaps the tests that run first. It
    lives in its own venv next to the test venv (`<venv>-mlflow`, made by scripts/install.sh): the full server pins
    an older pyarrow than cft-ray's; cft-ray itself only needs the client (mlflow-skinny)."""
    import subprocess
    import sys
    import tempfile

    if not any("mlflow_server" in getattr(item, "fixturenames", ()) for item in session.items):
        return
    exe = Path(sys.prefix).with_name(Path(sys.prefix).name + "-mlflow") / "bin" / "mlflow"
    if not exe.exists():
        _MLFLOW["missing"] = f"{exe}: run `make test` (scripts/install.sh makes the server's venv)"
        return
    d, port = Path(tempfile.mkdtemp(prefix="cft-mlflow-")), _free_port()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}  # its first start compiles once
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"  # no background job workers (5 processes) for a tracking test
    proc = subprocess.Popen([str(exe), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
                             "--backend-store-uri", f"sqlite:///{d}/mlflow.db", "--artifacts-destination", str(d / "artifacts")],
                            stdout=open(d / "server.log", "w"), stderr=subprocess.STDOUT, env=env)
    _MLFLOW.update(proc=proc, dir=d, url=f"http://127.0.0.1:{port}")


def pytest_sessionfinish(session):
    if "proc" in _MLFLOW:
        import shutil

        _MLFLOW["proc"].terminate()
        _MLFLOW["proc"].wait(timeout=30)
        shutil.rmtree(_MLFLOW["dir"], ignore_errors=True)


@pytest.fixture(scope="session")
def mlflow_server():
    """The URL of the session's MLflow server, once it answers."""
    import time
    import urllib.request

    assert "missing" not in _MLFLOW, _MLFLOW.get("missing")
    proc, url, deadline = _MLFLOW["proc"], _MLFLOW["url"], time.time() + 180
    while True:
        try:
            if urllib.request.urlopen(f"{url}/health", timeout=2).status == 200:
                return url
        except OSError:
            assert proc.poll() is None and time.time() < deadline, (_MLFLOW["dir"] / "server.log").read_text()[-2000:]
            time.sleep(0.5)


@pytest.fixture
def hub(tmp_path):
    """A stand-in for the Hugging Face Hub on loopback (the real one is not reachable here): the three endpoints
    huggingface_hub's HfFileSystem calls to list and read a data set's files (revision, tree, resolve with ranges),
    served from `root/<org>/<name>/<revision>/...`. Yields (endpoint URL, root)."""
    import json
    import re
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    from urllib.parse import unquote, urlsplit

    root = tmp_path / "hub"

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def _send(self, code: int, body: bytes, headers: dict | None = None):
            self.send_response(code)
            for k, v in {"Content-Length": str(len(body)), **(headers or {})}.items():
                self.send_header(k, v)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def do_GET(self):
            path = unquote(urlsplit(self.path).path)
            api = re.match(r"^/api/datasets/([^/]+/[^/]+)/(revision|tree)/(refs/convert/parquet|[^/]+)/?(.*)$", path)
            get = re.match(r"^/datasets/([^/]+/[^/]+)/resolve/(refs/convert/parquet|[^/]+)/(.+)$", path)
            if api:
                d = root / api[1] / api[3] / api[4]
                if not d.is_dir():
                    return self._send(404, b'{"error": "not found"}', {"X-Error-Code": "RepoNotFound"})
                body = {"id": api[1], "sha": "0" * 40, "private": False} if api[2] == "revision" else [
                    {"type": "directory", "path": str(p.relative_to(root / api[1] / api[3])), "oid": "0" * 40}
                    if p.is_dir() else {"type": "file", "path": str(p.relative_to(root / api[1] / api[3])),
                                        "size": p.stat().st_size, "oid": "1" * 40} for p in sorted(d.iterdir())]
                return self._send(200, json.dumps(body).encode(), {"Content-Type": "application/json"})
            if get and (root / get[1] / get[2] / get[3]).is_file():
                data = (root / get[1] / get[2] / get[3]).read_bytes()
                first, last = 0, len(data) - 1
                if rng := self.headers.get("Range"):
                    a, b = rng.split("=")[1].split("-")
                    first, last = int(a), min(int(b) if b else last, last)
                return self._send(206 if rng else 200, data[first:last + 1],
                                  {"ETag": '"e"', "X-Repo-Commit": "0" * 40, "Content-Range": f"bytes {first}-{last}/{len(data)}"})
            self._send(404, b'{"error": "not found"}')

        do_HEAD = do_GET

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", root
    finally:
        server.shutdown()
