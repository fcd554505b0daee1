#!/usr/bin/env bash
# Set up, then run the linters, the type checker and the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
.venv/bin/ruff check service prompts tests benchmarks
.venv/bin/ruff format --check service prompts tests benchmarks
.venv/bin/mypy
.venv/bin/python -m pytest -q "$@"
