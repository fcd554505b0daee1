#!/usr/bin/env bash
# Re-resolve the lock (requirements/test.txt and serve.txt) to the newest releases that pyproject's
# ranges and requirements/constraints.in allow, run the whole suite (scripts/test.sh) on it in a
# scratch environment, and rewrite requirements/ only if the suite passed.
#
#   bash scripts/lock.sh           # refresh
#   bash scripts/lock.sh --check   # resolve and test, print the differences, write nothing
#
# Resolves for CPython 3.11 on x86_64 Linux against the CPU torch wheel in TORCH_FIND_LINKS
# (/opt/wheels on these machines), so the lock pulls no CUDA packages.
set -euo pipefail
cd "$(dirname "$0")/.."

UV_SPEC=${UV_SPEC:-uv==0.13.9}
TORCH_FIND_LINKS=${TORCH_FIND_LINKS:-/opt/wheels}
check_only=false
[ "${1:-}" = "--check" ] && check_only=true

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/lock"
python3 -m venv "$work/tools"
"$work/tools/bin/python" -m pip install -q --disable-pip-version-check "$UV_SPEC"

compile=(
  "$work/tools/bin/uv" pip compile --quiet --upgrade --generate-hashes
  --python-version 3.11 --python-platform x86_64-unknown-linux-gnu
  --find-links "$TORCH_FIND_LINKS" --no-emit-package torch
  --custom-compile-command "bash scripts/lock.sh"
  -c requirements/constraints.in
)
"${compile[@]}" pyproject.toml --extra test -o "$work/lock/test.txt"
# The serving set is the test set minus the test tools, at the same versions.
"${compile[@]}" pyproject.toml -c "$work/lock/test.txt" -o "$work/lock/serve.txt"
sed -i "s|$work/lock/|requirements/|g" "$work/lock/serve.txt"

versions() { grep -E '^[A-Za-z0-9_.-]+==' "$1" | sed 's/ .*//' | sort; }
echo "== changes against the committed lock (test set):"
diff <(versions requirements/test.txt) <(versions "$work/lock/test.txt") || true

echo "== running the suite on the new lock (scratch environment $work/venv)"
if ! PTSERVE_VENV="$work/venv" PTSERVE_LOCK_DIR="$work/lock" bash scripts/test.sh -p no:cacheprovider; then
  echo "the suite failed on the re-resolved set: requirements/ left as it was" >&2
  exit 1
fi
if $check_only; then
  echo "--check: the new set passed; requirements/ left as it was"
  exit 0
fi
cp "$work/lock/test.txt" "$work/lock/serve.txt" requirements/
echo "requirements/ rewritten: the suite passed on the new set"
