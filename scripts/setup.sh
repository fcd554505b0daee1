#!/usr/bin/env bash
# Create .venv and install ptserve with its test tools. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
# These machines keep the CPU wheel of torch 2.13.0 on disk; a bare "torch" would pull a multi-GB
# CUDA build. GPU users: TORCH_SPEC=torch bash scripts/setup.sh (pyproject only asks for a range).
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}

[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip
.venv/bin/python -m pip install -q --disable-pip-version-check "$TORCH_SPEC"
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[test]"
echo "ptserve installed in $(pwd)/.venv"
