// Storage types of the CUDA kernels' logits and gradients, known at compile time, and their
// 16-byte vector loads and stores: a kernel instantiated for (student dtype, teacher dtype)
// has no per-element switch on the dtype, and reads a group of logits with one (bf16/fp16:
// 8 logits) or two (fp32 beside a 2-byte side: 8 logits) 128-bit loads.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "common.cuh"

namespace distill_ops::cuda {

struct F32 {
  static constexpr int kBytes = 4;
  static constexpr DType kCode = DType::F32;
};
struct BF16 {
  static constexpr int kBytes = 2;
  static constexpr DType kCode = DType::BF16;
};
struct F16 {
  static constexpr int kBytes = 2;
  static constexpr DType kCode = DType::F16;
};

// Logits per group: 16 bytes of the narrower side (8 where either side is 2-byte, else 4).
template <class TS, class TT>
constexpr int group_width() {
  return 16 / (TS::kBytes < TT::kBytes ? TS::kBytes : TT::kBytes);
}

// The float of the low (HI = false) or high 16 bits of a word of two 2-byte values.
template <class D, bool HI>
__device__ __forceinline__ float half_word_to_float(uint32_t w) {
  if constexpr (D::kCode == DType::BF16) {
    return __uint_as_float(HI ? (w & 0xffff0000u) : (w << 16));
  } else {
    return __half2float(__ushort_as_half(static_cast<unsigned short>(HI ? w >> 16 : w & 0xffffu)));
  }
}

// VEC logits of type D at p (16-byte aligned; VEC * bytes a multiple of 16), as floats.
template <class D, int VEC>
__device__ __forceinline__ void load_group(const char* p, float (&out)[VEC]) {
  static_assert(VEC * D::kBytes % 16 == 0, "a group is whole 16-byte words");
  const uint4* q = reinterpret_cast<const uint4*>(p);
#pragma unroll
  for (int w = 0; w < VEC * D::kBytes / 16; ++w) {
    const uint4 v = q[w];
    const uint32_t u[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      if constexpr (D::kBytes == 4) {
        out[4 * w + i] = __uint_as_float(u[i]);
      } else {
        out[8 * w + 2 * i] = half_word_to_float<D, false>(u[i]);
        out[8 * w + 2 * i + 1] = half_word_to_float<D, true>(u[i]);
      }
    }
  }
}

// Element i of a row of type D.
template <class D>
__device__ __forceinline__ float load_one(const char* p, int64_t i) {
  if constexpr (D::kCode == DType::F32) {
    return reinterpret_cast<const float*>(p)[i];
  } else {
    return half_word_to_float<D, false>(reinterpret_cast<const uint16_t*>(p)[i]);
  }
}

// Two floats as one word of two 2-byte values (round to nearest even; NaN stays NaN).
template <class D>
__device__ __forceinline__ uint32_t pack_pair(float lo, float hi) {
  if constexpr (D::kCode == DType::BF16) {
    const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&h);
  } else {
    const __half2 h = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&h);
  }
}

// VEC floats stored at p (16-byte aligned) as type D, 16 bytes a store.
template <class D, int VEC>
__device__ __forceinline__ void store_group(char* p, const float (&v)[VEC]) {
  static_assert(VEC * D::kBytes % 16 == 0, "a group is whole 16-byte words");
  uint4* q = reinterpret_cast<uint4*>(p);
#pragma unroll
  for (int w = 0; w < VEC * D::kBytes / 16; ++w) {
    uint32_t u[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      if constexpr (D::kBytes == 4) {
        u[i] = __float_as_uint(v[4 * w + i]);
      } else {
        u[i] = pack_pair<D>(v[8 * w + 2 * i], v[8 * w + 2 * i + 1]);
      }
    }
    q[w] = make_uint4(u[0], u[1], u[2], u[3]);
  }
}

template <class D>
__device__ __forceinline__ void store_one(char* p, int64_t i, float v) {
  if constexpr (D::kCode == DType::F32) {
    reinterpret_cast<float*>(p)[i] = v;
  } else if constexpr (D::kCode == DType::BF16) {
    reinterpret_cast<__nv_bfloat16*>(p)[i] = __float2bfloat16_rn(v);
  } else {
    reinterpret_cast<__half*>(p)[i] = __float2half_rn(v);
  }
}

// Zeroes elements [j0, j1) of a row of type D: element stores up to a 16-byte boundary, 16-byte
// stores, element stores for the rest.
template <class D>
__device__ void zero_range(char* row, int64_t j0, int64_t j1) {
  constexpr int kPer = 16 / D::kBytes;
  int64_t head = j0;
  while (head < j1 && (reinterpret_cast<uintptr_t>(row + head * D::kBytes) & 15u) != 0) ++head;
  const int64_t body_end = head + (j1 - head) / kPer * kPer;
  for (int64_t j = j0 + threadIdx.x; j < head; j += blockDim.x) store_one<D>(row, j, 0.0f);
  for (int64_t j = head + int64_t(threadIdx.x) * kPer; j < body_end; j += int64_t(blockDim.x) * kPer)
    *reinterpret_cast<uint4*>(row + j * D::kBytes) = make_uint4(0u, 0u, 0u, 0u);
  for (int64_t j = body_end + threadIdx.x; j < j1; j += blockDim.x) store_one<D>(row, j, 0.0f);
}

// Calls f(tag) with the storage type of a dtype code (DType::F32 / BF16 / F16).
template <class F>
void with_dtype(int code, F&& f) {
  switch (static_cast<DType>(code)) {
    case DType::BF16: f(BF16{}); break;
    case DType::F16: f(F16{}); break;
    case DType::F32: f(F32{}); break;
    default: throw std::runtime_error("distill_ops: CUDA kernels take fp32, bf16 or fp16");
  }
}

}  // namespace distill_ops::cuda
