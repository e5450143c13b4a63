#!/usr/bin/env bash
# The one prepared GPU check (an H100/H200 lent by the device tool). From the repository root:
#   bash bench/gpu_check.sh            # OUT defaults to ./gpu_out
# Steps, each with its own time box so the whole run ends inside ~9 minutes (run it with
# timeout_s=600): build (~30 s); the GPU tests with -v (each failure shows in tests.log even
# if the run is cut), 16 xdist workers, then the `serial` ones (inductor) alone; the harness
# at canonical sizes; the demo's quick mode on cuda. Only 8 files come back from $OUT (two
# folders deep at most), so $OUT holds: summary.txt, env.txt, tests.log, failures.txt,
# bench.md, bench.json, auto_backends.json (the fastest of our backends per op here: commit
# it into python/distill_ops/backends/auto_backends.json) and results.tar.gz with everything
# else (build log, ptxas report, plots with the bandwidth floor, the autotuner's picks in
# bench.log (TRITON_PRINT_AUTOTUNING), the compile-peer run, the demo's table and plots).
set -uo pipefail
OUT=${OUT:-$PWD/gpu_out}
WORK=$(mktemp -d)
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
log() { echo "[gpu_check $(date +%H:%M:%S) +$(( $(date +%s) - start ))s] $*"; }
start=$(date +%s)
left() { echo $(( ${GPU_CHECK_BUDGET:-540} - ($(date +%s) - start) )); }

{
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,driver_version --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  nvcc --version | tail -1
  git rev-parse --short HEAD 2>/dev/null
  nproc
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

log "build (ptxas register/spill report in results.tar.gz)"
python3 -m pip install --no-deps --no-build-isolation -v . > "$WORK/build.log" 2>&1 \
  || { log "BUILD FAILED"; tail -40 "$WORK/build.log" | tee "$OUT/summary.txt"; \
       cp "$WORK/build.log" "$OUT/"; exit 1; }
grep -E "registers|spill" "$WORK/build.log" | sort | uniq > "$WORK/ptxas.txt"

# The peers the image lacks (liger-kernel, trl) travel as wheels in .whl/
# (bench/fetch_gpu_wheels.sh here, then run with carry [".whl"]).
if ls .whl/*.whl > /dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
# The image has pytest-xdist and pytest-timeout; without them the tests run in one process.
XDIST=""
python3 -c "import xdist" 2>/dev/null && XDIST="-n 16"
TIMEOUT=""
python3 -c "import pytest_timeout" 2>/dev/null && TIMEOUT="--timeout 120"
TESTS="tests/test_cuda_gpu.py tests/test_dense_kd.py tests/test_sparse_kd.py \
  tests/test_topk_sampling.py tests/test_fused_linear.py tests/test_fused_linear_gpu_math.py \
  tests/test_autograd_and_compile.py tests/test_store.py \
  tests/test_vocab_parallel.py::test_triton_phases_on_a_gpu_dense \
  tests/test_vocab_parallel.py::test_triton_phases_on_a_gpu_sparse \
  tests/test_vocab_parallel.py::test_the_vocab_parallel_kernel_follows_the_backend"
log "GPU tests ($XDIST $TIMEOUT), then the serial ones"
timeout $(( $(left) > 300 ? 240 : $(left) / 2 )) python3 -m pytest -v -p no:cacheprovider \
  $XDIST $TIMEOUT -k "not cpu" -m "not serial" $TESTS > "$OUT/tests.log" 2>&1
tests_rc=$?
timeout 150 python3 -m pytest -v -p no:cacheprovider -m serial -k "not cpu" \
  tests/test_autograd_and_compile.py >> "$OUT/tests.log" 2>&1
serial_rc=$?
grep -E "^(FAILED|ERROR)" "$OUT/tests.log" > "$OUT/failures.txt"
# Tracebacks of the failures too, for reading without a rerun.
sed -n '/^=* FAILURES =*$/,/^=* short test summary/p' "$OUT/tests.log" >> "$OUT/failures.txt"

log "harness: every op at canonical sizes, bf16, no torch.compile ($(left) s left)"
bench_budget=$(( $(left) - 90 ))
[ "$bench_budget" -gt 240 ] && bench_budget=240
TRITON_PRINT_AUTOTUNING=1 timeout $(( bench_budget + 40 )) distill-ops bench --device cuda \
  --dtype bf16 --reps 7 --no-compile --no-progress --divergence forward_kl jsd \
  --budget "$bench_budget" --out "$WORK/bench" \
  --write-auto-table "$OUT/auto_backends.json" > "$WORK/bench.log" 2>&1
bench_rc=$?
cp "$WORK"/bench/*.md "$OUT/bench.md" 2>/dev/null
cp "$WORK"/bench/*.json "$OUT/bench.json" 2>/dev/null

if [ "$(left)" -gt 70 ]; then
  log "harness: the torch.compile peer on dense forward_kl/jsd and sparse bucket, V=128256"
  timeout $(( $(left) - 20 )) distill-ops bench --device cuda --dtype bf16 --reps 7 \
    --op dense sparse --budget $(( $(left) - 40 )) --shape 8192x128256 \
    --divergence forward_kl jsd --tail bucket --k 64 --extra --no-progress --no-plots \
    --out "$WORK/compile" > "$WORK/compile.log" 2>&1
  compile_rc=$?
else
  compile_rc=skipped
fi

if [ "$(left)" -gt 60 ]; then
  log "harness: the research divergences (skew KL, AB, AKL; TAID by the tests), V=128256"
  timeout $(( $(left) - 20 )) distill-ops bench --device cuda --dtype bf16 --reps 5 \
    --op dense --budget $(( $(left) - 40 )) --shape 8192x128256 --no-compile \
    --divergence forward_kl skew_kl skew_reverse_kl ab akl --no-progress --no-plots \
    --out "$WORK/research" > "$WORK/research.log" 2>&1
  research_rc=$?
else
  research_rc=skipped
fi

if [ "$(left)" -gt 100 ]; then
  log "vocab-parallel through the Triton phases: 2 ranks sharing the GPU over gloo"
  timeout 80 distill-ops bench --world 2 --divergence forward_kl jsd akl --reps 5 \
    --no-progress --out "$WORK/world2" > "$WORK/world2.log" 2>&1
  world_rc=$?
  if [ "$(left)" -gt 100 ]; then
    log "vocab-parallel through the CUDA C++ phases (DISTILL_OPS_BACKEND=cuda), the same run"
    DISTILL_OPS_BACKEND=cuda timeout 80 distill-ops bench --world 2 \
      --divergence forward_kl jsd akl --reps 5 --no-progress --out "$WORK/world2-cuda" \
      > "$WORK/world2-cuda.log" 2>&1 || world_rc="$world_rc/cuda:$?"
  fi
else
  world_rc=skipped
fi

if [ "$(left)" -gt 45 ]; then
  log "the demo, quick mode, --device cuda (the same code as on the CPU)"
  timeout $(( $(left) - 15 )) distill-ops demo --quick --device cuda --no-progress \
    --cache "$WORK/demo-cache" --out "$WORK/demo" > "$WORK/demo.log" 2>&1
  demo_rc=$?
else
  demo_rc=skipped
fi

{
  echo "==== summary ($(( $(date +%s) - start )) s) ===="
  head -1 "$OUT/env.txt"
  grep -E "passed|failed|error" "$OUT/tests.log" | grep -E "^=+ " | tail -3
  grep -E "^\| dense \| forward_kl \| N=8192 V=128256 " "$OUT/bench.md" 2>/dev/null | cut -c1-160
  grep -E "^\| (sparse|topk|sample|fused_linear)[a-z_]* \|.*distill_ops" "$OUT/bench.md" \
    2>/dev/null | cut -c1-160 | head -16
  grep -c "best config" "$WORK/bench.log" 2>/dev/null | sed 's/^/autotuned keys: /'
  cat "$OUT/auto_backends.json" 2>/dev/null | tr -d '\n' | cut -c1-300; echo
  [ "$bench_rc" = 0 ] || tail -20 "$WORK/bench.log"
  echo "tests rc=$tests_rc serial rc=$serial_rc bench rc=$bench_rc compile rc=$compile_rc" \
    "research rc=$research_rc world rc=$world_rc demo rc=$demo_rc"
  grep -E "^\| dense \| (skew|ab|akl)" "$WORK"/research/*.md 2>/dev/null | grep distill_ops \
    | cut -c1-160
  # The two CUDA dense designs side by side (issue 26: portable vs the sm_90 cluster kernel;
  # auto_backends.json's dense_cuda_variant records the faster).
  grep -E "^\| dense \|.*distill_ops\[cuda:" "$OUT/bench.md" 2>/dev/null | cut -c1-160
  grep -E "^\| (dense|sparse|topk) \|" "$WORK"/world2/*.md 2>/dev/null | cut -c1-200
  grep -E "^\| (dense|sparse) \|" "$WORK"/world2-cuda/*.md 2>/dev/null | sed 's/^/cuda /' \
    | cut -c1-200
  grep -E "^\| (ce|dense|sampled) \|" "$WORK/demo/demo.md" 2>/dev/null
} > "$OUT/summary.txt"
tar -C "$WORK" -czf "$OUT/results.tar.gz" . 2>/dev/null
cat "$OUT/summary.txt"
