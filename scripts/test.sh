#!/usr/bin/env bash
# Install with the dev extras, lint, and run the whole CPU test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh "[dev]"
.venv/bin/ruff check .
exec .venv/bin/python -m pytest -q -m "not gpu" "$@"
