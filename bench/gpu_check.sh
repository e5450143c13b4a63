#!/usr/bin/env bash
# The one prepared GPU check (H100/H200 from the device tool): build, GPU tests, benchmarks.
# Writes everything under $OUT (default ./gpu_out) and prints a short summary last.
# Budget: about 5 minutes. Usage, from the repository root on the GPU machine:
#   bash bench/gpu_check.sh
set -uo pipefail
OUT=${OUT:-$PWD/gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
log() { echo "[gpu_check $(date +%H:%M:%S)] $*"; }

{
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,driver_version --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  nvcc --version | tail -1
  git rev-parse --short HEAD 2>/dev/null
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

log "build"
python3 -m pip install --no-deps --no-build-isolation -q . > "$OUT/build.log" 2>&1 \
  || { log "BUILD FAILED"; tail -40 "$OUT/build.log"; exit 1; }

log "tests on the GPU (triton and cuda backends)"
timeout 150 python3 -m pytest tests -q -x -p no:cacheprovider \
  --ignore=tests/test_triton_aot.py > "$OUT/tests.log" 2>&1
tests_rc=$?
tail -5 "$OUT/tests.log"

log "benchmarks (dense, sparse k=64, topk), N=8192 V=128256 and 32000, bf16"
timeout 240 distill-ops bench --device cuda --dtype bf16 --shape 8192x128256 \
  --shape 8192x32000 --reps 10 --out "$OUT" > "$OUT/bench.log" 2>&1
bench_rc=$?

echo "==== summary ===="
grep -E "passed|failed|error" "$OUT/tests.log" | tail -2
cat "$OUT/bench.md" 2>/dev/null || tail -20 "$OUT/bench.log"
echo "tests rc=$tests_rc bench rc=$bench_rc"
