#!/usr/bin/env bash
# The main job: install, then start a 1 prefill + 1 decode cluster on a local Ray with the
# embedded SmolLM2-135M-Instruct and stream a two-turn chat through the router.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python scripts/demo.py "$@"
