#!/usr/bin/env bash
# Wheels of the benchmark peers that the GPU image lacks (Python 3.12, x86-64), into .whl/
# (ignored by git), for `run` with carry [".whl"]; bench/gpu_check.sh installs them there.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform any -d .whl \
  "liger-kernel==0.8.5" "trl==1.16.0" "datasets" "dill" "multiprocess" "xxhash"
ls -la .whl
