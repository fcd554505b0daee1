#!/usr/bin/env bash
# Run here (not on the device) before a GPU session's one `run`: gathers what the device machine lacks
# into .gpu/ (ignored by git; it travels with `carry: [".gpu"]`, under the 64 MiB limit):
#   .gpu/whl/      ptserve's serving dependencies missing from the device image, as CPython 3.12 wheels
#                  at the lock's versions (the image has torch, tokenizers, safetensors, numpy, httpx,
#                  prometheus-client, uvloop), and py-spy (a static binary, not a dependency of ptserve:
#                  perf_http --profile-seconds samples the engine process with it);
#   .gpu/minilm/   the packaged MiniLM's config and tokenizer (its 87 MiB of weights would not travel:
#                  scripts/gpu_issue19.sh gives the same shape random weights there, which run as fast);
#   .gpu/data/     1,000 SST-2 test texts for the load generator (a transient copy, never committed).
set -euo pipefail
cd "$(dirname "$0")/.."
lock=requirements/serve.txt
names="fastapi starlette pydantic pydantic-core pydantic-settings python-dotenv annotated-types
annotated-doc typing-inspection typing-extensions uvicorn click python-multipart redis pyzmq msgspec
transformers huggingface-hub httpx2 httpcore2 truststore opentelemetry-api idna anyio regex h11 hf-xet
certifi"
rm -rf .gpu && mkdir -p .gpu/whl .gpu/minilm .gpu/data/sst2
for name in $names; do
  version=$(grep -i "^${name}==" "$lock" | head -1 | sed 's/.*==\([^ ]*\).*/\1/')
  [ -n "$version" ] || { echo "gpu_prepare: $name is not in $lock" >&2; exit 1; }
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .gpu/whl "${name}==${version}"
done
# py-spy is not in the lock (a profiler for this script only), so its version is pinned here.
python3 -m pip download -q --no-deps --only-binary=:all: --platform manylinux_2_5_x86_64 \
  --platform manylinux1_x86_64 -d .gpu/whl "py-spy==${PY_SPY_VERSION:-0.4.3}"
model=$(.venv/bin/python -c "from prompts.backbone import default_model_path; print(default_model_path())")
for f in "$model"/*; do
  case "$(basename "$f")" in *.safetensors|*.bin|*.onnx|*.h5|*.msgpack) ;; *) [ -f "$f" ] && cp "$f" .gpu/minilm/ ;; esac
done
head -n 1000 "${DATA_ROOT:-../shared/data}/sst2/test.jsonl" > .gpu/data/sst2/test.jsonl
du -sh .gpu
