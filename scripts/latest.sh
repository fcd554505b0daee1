#!/usr/bin/env bash
# The suite against the newest releases of every dependency (pyproject's ranges, no lock), in its own
# environment (.venv-latest), so that CI's locked set stays untouched. Every check runs even when an
# earlier one fails; the summary names the versions and what failed. Exit status: 0 only if all passed.
# torch stays at TORCH_SPEC (torch==2.13.0, the CPU wheel on disk): a newer torch is a CUDA download.
set -uo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1

VENV=${PTSERVE_LATEST_VENV:-.venv-latest}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
PYTHON=${PYTHON:-python3}
LOG="$VENV/latest-report.txt"

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV" || exit 1
quiet() { "$@" 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }; return "${PIPESTATUS[0]}"; }
PIP=(quiet "$VENV/bin/python" -m pip install -q --disable-pip-version-check)
"${PIP[@]}" "$TORCH_SPEC" || exit 1
# Everything else at its newest; torch held at TORCH_SPEC (on a machine without a local wheel, the
# newest torch is a multi-GB CUDA download).
echo "$TORCH_SPEC" > "$VENV/torch-constraint.txt"
"${PIP[@]}" --upgrade --upgrade-strategy eager -c "$VENV/torch-constraint.txt" -e ".[test]" || exit 1
"$VENV/bin/python" -m pip check --disable-pip-version-check || true

failed=()
run() {
  local name=$1
  shift
  echo "== $name"
  if ! "$@"; then failed+=("$name"); fi
}
run "ruff check" "$VENV/bin/ruff" check service prompts tests benchmarks
run "ruff format" "$VENV/bin/ruff" format --check service prompts tests benchmarks
run "mypy" "$VENV/bin/mypy"
echo "== pytest"
"$VENV/bin/python" -m pytest -q -rfEs -p no:cacheprovider "$@" 2>&1 | tee "$VENV/pytest.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || failed+=("pytest")

{
  echo "== newest releases tried ($(date -u +%FT%TZ)):"
  "$VENV/bin/python" -m pip list --disable-pip-version-check 2>/dev/null |
    grep -iE '^(torch|transformers|peft|tokenizers|safetensors|huggingface.hub|fastapi|starlette|pydantic|pydantic.settings|uvicorn|redis|numpy|ruff|mypy|pytest|schemathesis) '
  echo "== failed checks: ${failed[*]:-none}"
  grep -E '^(FAILED|ERROR|SKIPPED)' "$VENV/pytest.log" || true
  tail -n 1 "$VENV/pytest.log"
} | tee "$LOG"
[ ${#failed[@]} -eq 0 ]
