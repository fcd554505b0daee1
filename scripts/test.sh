#!/usr/bin/env bash
# Set up from the lock, then run the linters, the type checker and the whole test suite.
#
#   bash scripts/test.sh [pytest args]            # the locked set (requirements/test.txt): what CI runs
#   bash scripts/test.sh --latest [pytest args]   # the newest releases in .venv-latest, apart from CI:
#                                                 # runs every check and prints what fails
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1

if [ "${1:-}" = "--latest" ]; then
  shift
  exec bash scripts/latest.sh "$@"
fi

VENV=${PTSERVE_VENV:-.venv}
bash scripts/setup.sh
"$VENV/bin/ruff" check service prompts tests benchmarks scripts
"$VENV/bin/ruff" format --check service prompts tests benchmarks scripts
"$VENV/bin/mypy"
"$VENV/bin/python" -m pytest -q "$@"
