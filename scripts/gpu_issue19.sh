#!/usr/bin/env bash
# Issue 19's GPU figures in one device call (device tool: `run` with carry [".gpu"], timeout_s 600):
#   bash scripts/gpu_issue19.sh
# after `bash scripts/gpu_prepare.sh` here. Installs the carried wheels, gives the MiniLM shape random
# weights (speed does not depend on their values), runs the CUDA-graph tests (tests/prompts/test_graphs.py,
# skipped without a GPU), benchmarks/perf_engine.py --scaled --lora 8 (tasks with (IA)^3 scales, and with
# scales and rank-8 LoRA, beside plain ones), benchmarks/perf_link.py (the engine process alone, fed by
# 4 driver front ends without HTTP: its event loop's CPU per call, the bound of serve --frontends N;
# benchmarks/perf_loop.py before it: the loop's own code per call on the host's CPU),
# then benchmarks/perf_http.py on cuda in float16 (as benchmarks/RESULTS.md's H100
# run) with 1, 2, 4 and 8 front-end processes and 4 load-generator processes: single-text and 32-text
# throughput against the raw forward pass, p50/p99, CPU per process and per engine thread, and a py-spy
# sample of the engine process in each closed single-text phase (PROFILE_SECONDS, 0: none).
# Everything lands in $OUT (the device tool brings it back). DEVICE=cpu DURATION=2 FRONTENDS=1 SKIP_INSTALL=1
# PYTHON=.venv/bin/python checks the script itself on a machine without a GPU (about 2 minutes).
set -u -o pipefail
OUT=${OUT:-/tmp/gpu-issue19}
DEVICE=${DEVICE:-cuda}
DURATION=${DURATION:-6}
DTYPE=${DTYPE:-float16}
LOADGENS=${LOADGENS:-4}
OPEN=${OPEN:-0.8}  # open-loop rates as fractions of the closed peak (e.g. 0.3,0.6)
FRONTENDS=${FRONTENDS:-1,2,4,8}
SITE=${SITE:-/tmp/site}
PYTHON=${PYTHON:-python3}
mkdir -p "$OUT"
if [ -z "${SKIP_INSTALL:-}" ]; then  # SKIP_INSTALL=1: a local check in an environment that has them
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
    .gpu/whl/*.whl || exit 1
fi
export PYTHONPATH="$SITE:$PWD" PYTHONUNBUFFERED=1 PATH="$SITE/bin:$PATH"
"$PYTHON" - <<'PY' || exit 1
import shutil
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModel

src, dst = Path(".gpu/minilm"), Path("/tmp/minilm-random")
dst.mkdir(parents=True, exist_ok=True)
for f in src.iterdir():
    shutil.copyfile(f, dst / f.name)
torch.manual_seed(0)
AutoModel.from_config(AutoConfig.from_pretrained(src)).save_pretrained(dst)
print("random-weight MiniLM at", dst, flush=True)
PY
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null; "$PYTHON" -c \
  "import torch, transformers; print(torch.__version__, transformers.__version__, torch.cuda.is_available())"; } \
  | tee "$OUT/machine.txt"
if [ -z "${SKIP_TESTS:-}" ]; then  # every family's captured graphs against the eager encoder, on the GPU
  timeout 240 "$PYTHON" -m pytest -q -p no:cacheprovider tests/prompts/test_graphs.py 2>&1 \
    | tail -n 30 | tee "$OUT/graph_tests.log"
fi
if [ -z "${SKIP_ENGINE:-}" ]; then  # scaled and LoRA tasks beside plain ones: the engine alone, no HTTP
  timeout 180 "$PYTHON" -m benchmarks.perf_engine --device "$DEVICE" --dtype "$DTYPE" --model /tmp/minilm-random \
    --data-root .gpu/data --dataset sst2 --tasks 1,100 --scaled --lora 8 --rounds 5 --batches 8 --batch-size 64 \
    --out "$OUT/perf_engine" 2>&1 | tail -n 20 | tee "$OUT/perf_engine.log"
fi
if [ -z "${SKIP_LINK:-}" ]; then  # the engine loop's own code per call on this host's CPU (no device)
  timeout 60 "$PYTHON" -m benchmarks.perf_loop --data-root .gpu/data --repeat 3 \
    --out "$OUT/perf_loop" 2>&1 | tail -n 6 | tee "$OUT/perf_loop.log"
  timeout 60 "$PYTHON" -m benchmarks.perf_loop --data-root .gpu/data --repeat 3 --tenants 2 \
    --out "$OUT/perf_loop_tenants" 2>&1 | tail -n 6 | tee "$OUT/perf_loop_tenants.log"
fi
if [ -z "${SKIP_LINK:-}" ]; then  # the engine process alone, fed by 4 driver front ends without HTTP
  timeout 150 "$PYTHON" -m benchmarks.perf_link --device "$DEVICE" --dtype "$DTYPE" --model /tmp/minilm-random \
    --data-root .gpu/data --drivers 4 --concurrency 64 --rows 1,32 --duration "$DURATION" \
    --out "$OUT/perf_link" 2>&1 | tail -n 12 | tee "$OUT/perf_link.log"
fi
"$PYTHON" -m benchmarks.perf_http --device "$DEVICE" --dtype "$DTYPE" --model /tmp/minilm-random \
  --data-root .gpu/data --frontends "$FRONTENDS" --loadgens "$LOADGENS" --max-batch-size 64 \
  --duration "$DURATION" --warmup 2 --drain 5 --raw-seconds 2 \
  --closed-single 128 --closed-batch 4 --open-levels "$OPEN" --profile-seconds "${PROFILE_SECONDS:-4}" \
  --out "$OUT/perf_http" 2>&1 | tee "$OUT/perf_http.log"
