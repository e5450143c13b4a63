// The sparse KD kernel's per-logit statistics (csrc/cuda/sparse_kd.cu), in a header that
// also compiles as host C++ (tests/cpp/sparse_stats_check.cpp runs it in the kernel's order
// against float64: tests/test_cuda_math_host.py).
#pragma once

#include <cmath>
#include <cstdint>

#include "distill_ops/kd_math.h"
#include "scalars.cuh"

namespace distill_ops::cuda {

// Pass 1 over a group of VEC logits x at columns j0..: the running maximum m (finite, from
// -FLT_MAX), sum a of exp(z - m), the off-support part c of that sum (bit j of `word`
// clear), and for the hard term the sum a1 at T = 1 (relative to m T) and z at the label.
template <bool HARD, int VEC>
DOPS_DEV void sparse_push_group(Online& st, float& a1, float& z_label, const float (&x)[VEC],
                                uint32_t word, float inv_t, float temperature, int64_t j0,
                                int64_t label) {
  float g = x[0];
#pragma unroll
  for (int i = 1; i < VEC; ++i) g = fmaxf(g, x[i]);
  const float m = fmaxf(st.m, g * inv_t);
  const float t_log2e = temperature * kLog2E;
  float sum = 0.0f, rest = 0.0f, sum1 = 0.0f;
#pragma unroll
  for (int i = 0; i < VEC; ++i) {
    const float u = fmaf(x[i], inv_t, -m);
    const float e = fast_exp2(u * kLog2E);
    sum += e;
    rest += (word >> i) & 1u ? 0.0f : e;
    if constexpr (HARD) {
      sum1 += fast_exp2(u * t_log2e);
      if (j0 + i == label) z_label = x[i] * inv_t;
    }
  }
  const float f = fast_exp2((st.m - m) * kLog2E);
  if constexpr (HARD) a1 = fmaf(a1, fast_exp2((st.m - m) * t_log2e), sum1);
  st = {m, fmaf(st.a, f, sum), fmaf(st.c, f, rest)};
}

}  // namespace distill_ops::cuda
