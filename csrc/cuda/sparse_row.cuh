// How the sparse KD kernels (sparse_kd.cu, and the vocab-parallel phases of sparse_vp.cu)
// read a student row against a bitmap of the support: the statistics pass (16-byte groups
// where the row is aligned, sparse_math.cuh's maths) and the rest at its own maximum.
#pragma once

#include "common.cuh"
#include "sparse_math.cuh"
#include "vec_io.cuh"

namespace distill_ops::cuda {

// A confident student's rest (the ids off the support) below this mass at the row maximum
// is summed again at its own maximum (sparse_rest_at_own_max): its terms there are near or
// past fp32's range. csrc/cpu/row_math.h's kRestFloor.
constexpr float kRestFloor = 0x1p-60f;

__device__ __forceinline__ bool in_support(const uint32_t* bits, int64_t j) {
  return (bits[j >> 5] >> (j & 31)) & 1u;
}

// The block's statistics of z = x / T over the columns [0, n) of a row: st = (max, sum of
// exp(z - max), the part of it off the support), and for the hard term (HARD) one = the
// T = 1 sum at max T and z at the label (0 where it is not in [0, n)). Every thread gets
// them; st.m is -inf where the row holds nothing.
struct SparseStats {
  Online st, one;
  float z_label;
};

template <class TS, bool HARD>
__device__ SparseStats sparse_row_stats(const char* s_row, int64_t n, const uint32_t* bits,
                                        float inv_t, float temperature, int64_t label,
                                        Online* red_online, float* red_f) {
  constexpr int VEC = 16 / TS::kBytes;
  // Groups of VEC logits where the row is 16-byte aligned (VEC divides 32: a group's support
  // bits lie in one bitmap word), single logits for the rest.
  const int64_t n_vec = (reinterpret_cast<uintptr_t>(s_row) & 15u) == 0 ? n - n % VEC : 0;
  Online st{-kFltMax, 0.0f, 0.0f};
  float a1 = 0.0f, z_label = 0.0f;
  for (int64_t j0 = int64_t(threadIdx.x) * VEC; j0 < n_vec; j0 += int64_t(blockDim.x) * VEC) {
    float x[VEC];
    load_group<TS, VEC>(s_row + j0 * TS::kBytes, x);
    const uint32_t word = bits[j0 >> 5] >> (j0 & 31);
    sparse_push_group<HARD>(st, a1, z_label, x, word, inv_t, temperature, j0, label);
  }
  for (int64_t j = n_vec + threadIdx.x; j < n; j += blockDim.x) {
    const float x[1] = {load_one<TS>(s_row, j)};
    const uint32_t word = in_support(bits, j) ? 1u : 0u;
    sparse_push_group<HARD>(st, a1, z_label, x, word, inv_t, temperature, j, label);
  }
  // The T = 1 sums ride on the T statistics' maximum (times T): merged as an Online of
  // their own with maximum m T.
  if (st.m == -kFltMax) st.m = kNegInf;  // only masked logits: empty
  Online one{st.m == kNegInf ? kNegInf : st.m * temperature, a1, 0.0f};
  st = block_reduce(st, MergeOnline{}, online_empty(), red_online);
  if constexpr (HARD) {
    one = block_reduce(one, MergeOnline{}, online_empty(), red_online);
    z_label = block_reduce(z_label, AddFloat{}, 0.0f, red_f);
  }
  return {st, one, z_label};
}

// The rest at its own maximum: {max z over the columns [0, n) off the support, sum of
// exp(z - max) over them} ({-inf, 0} where there are none), for every thread.
template <class TS>
__device__ Online sparse_rest_at_own_max(const char* s_row, int64_t n, const uint32_t* bits,
                                         float inv_t, float* red_f) {
  float mr = kNegInf;
  for (int64_t j = threadIdx.x; j < n; j += blockDim.x)
    if (!in_support(bits, j)) mr = fmaxf(mr, load_one<TS>(s_row, j) * inv_t);
  mr = block_reduce(mr, MaxFloat{}, kNegInf, red_f);
  if (mr == kNegInf) return {mr, 0.0f, 0.0f};
  float sr = 0.0f;
  for (int64_t j = threadIdx.x; j < n; j += blockDim.x)
    if (!in_support(bits, j)) sr += expf(load_one<TS>(s_row, j) * inv_t - mr);
  return {mr, block_reduce(sr, AddFloat{}, 0.0f, red_f), 0.0f};
}

}  // namespace distill_ops::cuda
