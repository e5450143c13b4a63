// Device helpers shared by the CUDA kernels: dtype-converting loads and stores, the online
// log-sum-exp state, warp and block reductions, launch checks. The maths itself lives in
// csrc/include/distill_ops/kd_math.h, shared with the CPU kernels.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <limits>
#include <stdexcept>
#include <string>

#include "distill_ops/kd_math.h"
#include "scalars.cuh"

namespace distill_ops::cuda {

__host__ __device__ __forceinline__ int dtype_bytes(int dtype) {
  return dtype == int(DType::F32) ? 4 : 2;
}

__device__ __forceinline__ float load_as_float(const void* p, int dtype, int64_t i) {
  switch (static_cast<DType>(dtype)) {
    case DType::BF16: return bf16_to_float(static_cast<const uint16_t*>(p)[i]);
    case DType::F16: return half_to_float(static_cast<const uint16_t*>(p)[i]);
    default: return static_cast<const float*>(p)[i];
  }
}

__device__ __forceinline__ void store_from_float(void* p, int dtype, int64_t i, float v) {
  switch (static_cast<DType>(dtype)) {
    case DType::BF16: static_cast<uint16_t*>(p)[i] = float_to_bf16(v); break;
    case DType::F16: static_cast<uint16_t*>(p)[i] = float_to_half(v); break;
    default: static_cast<float*>(p)[i] = v;
  }
}

// Element `row * stride` of a matrix of `dtype`, as a byte pointer.
__device__ __forceinline__ const char* row_base(const void* p, int dtype, int64_t row,
                                                int64_t stride) {
  return static_cast<const char*>(p) + row * stride * dtype_bytes(dtype);
}

__device__ __forceinline__ Online online_empty() { return {kNegInf, 0.0f, 0.0f}; }

__device__ __forceinline__ float rescale(float m_old, float m_new) {
  return m_new == kNegInf ? 1.0f : expf(m_old - m_new);
}

__device__ __forceinline__ Online merge(Online x, Online y) {
  const float m = fmaxf(x.m, y.m);
  const float fx = x.m == kNegInf ? 0.0f : rescale(x.m, m);
  const float fy = y.m == kNegInf ? 0.0f : rescale(y.m, m);
  return {m, x.a * fx + y.a * fy, x.c * fx + y.c * fy};
}

__device__ __forceinline__ Online push(Online st, float z, float w) {
  const float m = fmaxf(st.m, z);
  const float f = rescale(st.m, m);
  const float e = z == kNegInf ? 0.0f : expf(z - m);
  return {m, st.a * f + e, st.c * f + (e > 0.0f ? e * w : 0.0f)};
}

struct MergeOnline {
  __device__ Online operator()(Online x, Online y) const { return merge(x, y); }
};
struct AddFloat {
  __device__ float operator()(float x, float y) const { return x + y; }
};
struct MaxFloat {
  __device__ float operator()(float x, float y) const { return fmaxf(x, y); }
};
struct AddSum2 {
  __device__ Sum2 operator()(Sum2 x, Sum2 y) const { return {x.x + y.x, x.y + y.y}; }
};
struct AddInt {
  __device__ int operator()(int x, int y) const { return x + y; }
};

// Reduces v over the warp with op (T made of 32-bit words, shuffled word by word).
template <typename T, typename Op>
__device__ T warp_reduce(T v, Op op) {
  static_assert(sizeof(T) % sizeof(unsigned) == 0, "warp_reduce shuffles 32-bit words");
  for (int off = 16; off > 0; off >>= 1) {
    T o;
    const unsigned* src = reinterpret_cast<const unsigned*>(&v);
    unsigned* dst = reinterpret_cast<unsigned*>(&o);
    for (unsigned k = 0; k < sizeof(T) / sizeof(unsigned); ++k)
      dst[k] = __shfl_xor_sync(0xffffffffu, src[k], off);
    v = op(v, o);
  }
  return v;
}

// Reduces v over the block with op; `identity` pads the lanes past the last warp. Every
// thread gets the result; smem (one T per warp, at least 32) is free again on return.
template <typename T, typename Op>
__device__ T block_reduce(T v, Op op, T identity, T* smem) {
  v = warp_reduce(v, op);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = warp_reduce(lane < int(blockDim.x >> 5) ? smem[lane] : identity, op);
    if (lane == 0) smem[0] = v;
  }
  __syncthreads();
  const T out = smem[0];
  __syncthreads();
  return out;
}

// Throws with the CUDA error of the last launch, if any.
inline void check_launch(const char* what) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("distill_ops: ") + what + " launch failed: " +
                             cudaGetErrorString(err));
  }
}

inline void check_cuda(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("distill_ops: ") + what + ": " +
                             cudaGetErrorString(err));
  }
}

// An attribute of the current device.
inline int device_attribute(cudaDeviceAttr attr) {
  int dev = 0, value = 0;
  check_cuda(cudaGetDevice(&dev), "cudaGetDevice");
  check_cuda(cudaDeviceGetAttribute(&value, attr, dev), "cudaDeviceGetAttribute");
  return value;
}

// What the launchers need to know of the current device, read once per device.
struct DeviceInfo {
  int major = -1;      // compute capability
  int smem_optin = 0;  // the most shared memory a block may opt into
};

inline DeviceInfo device_info() {
  static DeviceInfo cache[64];
  int dev = 0;
  check_cuda(cudaGetDevice(&dev), "cudaGetDevice");
  DeviceInfo& d = cache[dev & 63];
  if (d.major < 0) {
    d.smem_optin = device_attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin);
    d.major = device_attribute(cudaDevAttrComputeCapabilityMajor);
  }
  return d;
}

}  // namespace distill_ops::cuda
