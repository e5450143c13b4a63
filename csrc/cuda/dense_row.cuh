// How the dense KD kernels (portable and sm_90 cluster) walk a row pair: groups of logits
// with 16-byte loads (vec_io.cuh), the tail one logit at a time, and the gradient written
// with 16-byte stores. The maths is dense_math.cuh's.
#pragma once

#include "common.cuh"
#include "dense_math.cuh"
#include "vec_io.cuh"

namespace distill_ops::cuda {

// Calls f(zs, zt, j0) over the columns [0, n) of a row pair (global memory or a cluster's
// shared slices), each thread taking every blockDim-th group: groups of VEC logits read with
// 16-byte loads up to n_vec (0 where a row is not 16-byte aligned), then single logits
// (arrays of one) for the row's tail; f sees what dense_transform leaves (dense_scales).
template <class TS, class TT, bool GENERAL, class F>
__device__ __forceinline__ void walk_row(const DenseArgs& a, const char* s_row, const char* t_row, int64_t n_vec,
                                         int64_t n, F&& f) {
  constexpr int VEC = group_width<TS, TT>();
  for (int64_t j0 = int64_t(threadIdx.x) * VEC; j0 < n_vec; j0 += int64_t(blockDim.x) * VEC) {
    float zs[VEC], zt[VEC];
    load_group<TS, VEC>(s_row + j0 * TS::kBytes, zs);
    load_group<TT, VEC>(t_row + j0 * TT::kBytes, zt);
    dense_transform<GENERAL>(a, zs, zt);
    f(zs, zt, j0);
  }
  for (int64_t j = n_vec + threadIdx.x; j < n; j += blockDim.x) {
    float zs[1] = {load_one<TS>(s_row, j)}, zt[1] = {load_one<TT>(t_row, j)};
    dense_transform<GENERAL>(a, zs, zt);
    f(zs, zt, j);
  }
}

// Writes the gradient of columns [0, n) of a row (z read as walk_row reads it) to g_row, 16
// bytes a store where the gradient row is aligned too; label and column ids are offset by c0
// (a cluster block's slice).
template <class TS, class TT, int DIV, bool GENERAL>
__device__ __forceinline__ void write_grads(const DenseArgs& a, const DenseRow& r,
                                            const char* s_row, const char* t_row,
                                            char* g_row, int64_t n_vec, int64_t n, int64_t c0,
                                            int64_t label) {
  constexpr int VEC = group_width<TS, TT>();
  const float coef = a.soft_coef / a.temperature;
  const Scales k = dense_scales<GENERAL>(a);
  const int64_t g_vec = (reinterpret_cast<uintptr_t>(g_row) & 15u) == 0 ? n_vec : 0;
  for (int64_t j0 = int64_t(threadIdx.x) * VEC; j0 < g_vec; j0 += int64_t(blockDim.x) * VEC) {
    float zs[VEC], zt[VEC], g[VEC];
    load_group<TS, VEC>(s_row + j0 * TS::kBytes, zs);
    load_group<TT, VEC>(t_row + j0 * TT::kBytes, zt);
    dense_transform<GENERAL>(a, zs, zt);
#pragma unroll
    for (int i = 0; i < VEC; ++i)
      g[i] = dense_grad<DIV, GENERAL>(a, r, k, coef, zs[i], zt[i], c0 + j0 + i, label);
    store_group<TS, VEC>(g_row + j0 * TS::kBytes, g);
  }
  for (int64_t j = g_vec + threadIdx.x; j < n; j += blockDim.x) {
    float zs[1] = {load_one<TS>(s_row, j)}, zt[1] = {load_one<TT>(t_row, j)};
    dense_transform<GENERAL>(a, zs, zt);
    store_one<TS>(g_row, j, dense_grad<DIV, GENERAL>(a, r, k, coef, zs[0], zt[0], c0 + j, label));
  }
}

// AKL: this thread's part of the teacher's mass at p >= tau over a row walk (walk_row).
template <class Walk>
__device__ __forceinline__ float akl_mass_part(const DenseRow& r, Scales k, float tau,
                                               Walk&& walk) {
  float mass = 0.0f;
  walk([&](const auto&, const auto& zt, int64_t) {
#pragma unroll
    for (int i = 0; i < int(sizeof(zt) / sizeof(float)); ++i) {
      const float p = dense_p(r, k, zt[i]);
      mass += p >= tau ? p : 0.0f;
    }
  });
  return mass;
}

}  // namespace distill_ops::cuda

namespace distill_ops::cuda {

// Launches the sm_90 cluster kernel (dense_kd_sm90.cu) when the device and the row size allow
// it; returns false when it does not apply (an error instead when `required`).
bool dense_kd_cluster(const DenseArgs& a, int64_t n_rows, bool required, void* stream);

}  // namespace distill_ops::cuda
