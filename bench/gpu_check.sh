#!/usr/bin/env bash
# The one prepared GPU check (H100/H200 from the device tool): build, GPU tests, the harness at
# canonical sizes. Writes everything under $OUT (default ./gpu_out): env.txt, build.log,
# tests.log, <device>-<date>.{json,md} and -plots/ (canonical sizes, no torch.compile),
# compile/<device>-<date>.{json,md} (the torch.compile peer on a subset), and prints a short
# summary last. Budget: about 5 minutes. From the repository root on the GPU machine:
#   bash bench/gpu_check.sh
set -uo pipefail
OUT=${OUT:-$PWD/gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
log() { echo "[gpu_check $(date +%H:%M:%S)] $*"; }
start=$(date +%s)

{
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,driver_version --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  nvcc --version | tail -1
  git rev-parse --short HEAD 2>/dev/null
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

log "build (ptxas register/spill report in build.log)"
python3 -m pip install --no-deps --no-build-isolation -v . > "$OUT/build.log" 2>&1 \
  || { log "BUILD FAILED"; tail -40 "$OUT/build.log"; exit 1; }
grep -E "registers|spill" "$OUT/build.log" | sort | uniq | head -40 > "$OUT/ptxas.txt"

log "tests on the GPU (triton and cuda backends, store, harness)"
timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_cuda_gpu.py \
  tests/test_dense_kd.py tests/test_sparse_kd.py tests/test_topk_sampling.py \
  tests/test_fused_linear.py tests/test_autograd_and_compile.py tests/test_store.py \
  > "$OUT/tests.log" 2>&1
tests_rc=$?
tail -5 "$OUT/tests.log"

log "harness: every op at canonical sizes (dense: forward KL and JSD), bf16, no torch.compile"
timeout 170 distill-ops bench --device cuda --dtype bf16 --reps 7 --no-compile --no-progress \
  --divergence forward_kl jsd \
  --budget 110 --out "$OUT" > "$OUT/bench.log" 2>&1
bench_rc=$?

log "harness: the torch.compile peer, dense forward_kl/jsd and sparse bucket at V=128256"
timeout 70 distill-ops bench --device cuda --dtype bf16 --reps 7 --op dense sparse --budget 30 \
  --shape 8192x128256 --divergence forward_kl jsd --tail bucket --k 64 --extra \
  --no-progress --no-plots --out "$OUT/compile" > "$OUT/compile.log" 2>&1
compile_rc=$?

echo "==== summary ($(( $(date +%s) - start )) s) ===="
head -1 "$OUT/env.txt"
grep -E "passed|failed|error" "$OUT/tests.log" | tail -2
grep -E "^\| dense \| forward_kl \| N=8192 V=128256 " "$OUT"/*.md 2>/dev/null | cut -c1-160
grep -E "^\| (sparse|topk|fused_linear)[a-z_]* \|.*distill_ops" "$OUT"/*.md 2>/dev/null \
  | cut -c1-160 | head -12
[ "$bench_rc" = 0 ] || tail -20 "$OUT/bench.log"
echo "tests rc=$tests_rc bench rc=$bench_rc compile rc=$compile_rc"
