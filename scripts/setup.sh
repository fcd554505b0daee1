#!/usr/bin/env bash
# Create a virtual environment and install ptserve from the committed lock. Safe to run again.
#
#   bash scripts/setup.sh            # .venv with the test tools (requirements/test.txt): what CI runs
#   bash scripts/setup.sh --serve    # .venv with what serving needs only (requirements/serve.txt)
#
# The lock pins every package with its hashes except torch, which is installed on its own
# (TORCH_SPEC): these machines keep the CPU wheel of torch 2.13.0 on disk and the lock was resolved
# against it; a bare "torch" would pull a multi-GB CUDA build. GPU hosts: TORCH_SPEC=torch (or
# torch==2.13.0 from their CUDA index). PTSERVE_VENV and PTSERVE_LOCK_DIR pick another environment
# or lock directory (scripts/lock.sh and scripts/test.sh --latest use them).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
VENV=${PTSERVE_VENV:-.venv}
LOCK_DIR=${PTSERVE_LOCK_DIR:-requirements}
LOCK="$LOCK_DIR/test.txt"
if [ "${1:-}" = "--serve" ]; then
  LOCK="$LOCK_DIR/serve.txt"
elif [ -n "${1:-}" ]; then
  echo "usage: scripts/setup.sh [--serve]" >&2
  exit 2
fi

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP=(pip_install "$VENV/bin/python" -m pip install -q --disable-pip-version-check)
# These machines' pip configuration names local index folders that lack most packages; pip warns about
# each one it looks in. The warnings are dropped, everything else pip prints is kept.
pip_install() {
  "$@" 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }
  return "${PIPESTATUS[0]}"
}
# Every pinned package, hash-checked; --no-deps: the lock is complete (pip check below proves it).
"${PIP[@]}" --require-hashes --no-deps -r "$LOCK"
# torch last: its dependencies are already in place at the locked versions, so this adds torch only.
"${PIP[@]}" "$TORCH_SPEC"
# ptserve itself, built with the locked setuptools rather than a freshly downloaded one.
"${PIP[@]}" --no-deps --no-build-isolation -e .
"$VENV/bin/python" -m pip check --disable-pip-version-check >/dev/null || {
  "$VENV/bin/python" -m pip check --disable-pip-version-check
  echo "the installed set is inconsistent (see above): refresh the lock with scripts/lock.sh" >&2
  exit 1
}
echo "ptserve installed in $(pwd)/$VENV from $LOCK"
