// The sparse KD loss of vocab-parallel student logits on CUDA: each rank holds a slice
// [n_rows, width] of the vocabulary (global ids offset .. offset + width), the k teacher
// targets are global ids. The two phases of the C++ CPU kernel (csrc/cpu/sparse_vp.cpp), on
// its record (fp64, 8 fields a row; z at the support [n_rows, k]), around the Python layer's
// collectives and its divergence over the coarse classes (distributed/kernel_rows.py):
//   0 (statistics), z = x / T: the slice's max m (-inf where it holds nothing), sum
//     exp(z - m), the part off the support (summed over its own terms: the support bitmap in
//     shared memory says which, as in sparse_kd.cu; below kRestFloor again at its own
//     maximum, recorded as its log-mass relative to m, < 0), the owned support ids, the hard
//     term's T = 1 sum and z at the label; z at each owned support id. An ignored row counts
//     as logits of 0.
//   1 (gradient): every column's off * exp(z - base) (+ the hard term), then, after a
//     barrier, each owned support id's own gradient over it.
// One block per row; the row streamed in 16-byte groups where aligned (sparse_math.cuh's
// sparse_push_group for the statistics). Bytes per logit: one read (statistics), one read and
// one write (gradient): the one-device CUDA sparse kernel's three transfers.
#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include "common.cuh"
#include "kernels.cuh"
#include "sparse_row.cuh"
#include "vec_io.cuh"

namespace distill_ops::cuda {
namespace {

constexpr int kThreads = 512;
// Record fields (sparse_vp.cpp's).
constexpr int kM = 0, kSum = 1, kRest = 2, kOwn = 3, kSum1 = 4, kZy = 5, kFields = 8;
constexpr int kOff = 1, kBase = 2, kLogS1 = 4;

struct SparseVpArgs {
  const void* s;
  int64_t s_stride;
  const int64_t* indices;
  int64_t k, offset, width;
  const uint8_t* valid;
  const int64_t* labels;  // the label's column in the slice, -1 elsewhere
  double* rec;
  double* zsup;
  const double* sup_grad;
  void* grad;
  float temperature, hard_weight;
};

template <class TS, bool HARD>
__global__ void __launch_bounds__(kThreads) sparse_vp_stats_kernel(SparseVpArgs a) {
  extern __shared__ __align__(16) unsigned char dyn[];  // the owned support bitmap
  __shared__ Online red_online[32];
  __shared__ float red_f[32];
  __shared__ int red_i[32];
  uint32_t* bits = reinterpret_cast<uint32_t*>(dyn);
  const int64_t row = blockIdx.x, width = a.width, words = (width + 31) / 32;
  const bool ok = a.valid == nullptr || a.valid[row] != 0;
  const float inv_t = 1.0f / a.temperature;
  double* f = a.rec + row * kFields;
  const int64_t* ids = a.indices + row * a.k;
  double* zs = a.zsup + row * a.k;
  const char* s_row = static_cast<const char*>(a.s) + row * a.s_stride * TS::kBytes;

  for (int64_t w = threadIdx.x; w < words; w += blockDim.x) bits[w] = 0u;
  __syncthreads();
  int owned = 0;
  for (int64_t i = threadIdx.x; i < a.k; i += blockDim.x) {
    const int64_t c = ids[i] - a.offset;
    const bool own = ids[i] >= 0 && c >= 0 && c < width;
    zs[i] = own && ok ? double(load_one<TS>(s_row, c) * inv_t) : 0.0;
    if (own) {
      atomicOr(&bits[c >> 5], 1u << (c & 31));
      ++owned;
    }
  }
  owned = block_reduce(owned, AddInt{}, 0, red_i);
  if (!ok) {  // logits of 0: m = 0, every term 1
    if (threadIdx.x == 0) {
      const double w = double(width);
      f[kM] = width ? 0.0 : double(kNegInf);
      f[kSum] = w;
      f[kRest] = w - owned;
      f[kOwn] = owned;
      f[kSum1] = HARD ? w : 0.0;
      f[kZy] = 0.0;
    }
    return;
  }
  const int64_t label = HARD ? a.labels[row] : -1;
  const SparseStats stats = sparse_row_stats<TS, HARD>(s_row, width, bits, inv_t, a.temperature,
                                                       label, red_online, red_f);
  const Online st = stats.st;
  // The rest below the floor at m (its terms near or past fp32's range): at its own maximum,
  // recorded as its log-mass relative to m.
  float rest = st.c;
  if (st.m != kNegInf && rest < kRestFloor) {
    const Online own_max = sparse_rest_at_own_max<TS>(s_row, width, bits, inv_t, red_f);
    if (own_max.m != kNegInf) rest = (own_max.m - st.m) + logf(own_max.a);
  }
  if (threadIdx.x == 0) {
    const bool empty = st.m == kNegInf;
    f[kM] = double(st.m);
    f[kSum] = empty ? 0.0 : double(st.a);
    f[kRest] = empty ? 0.0 : double(rest);  // log_form: < 0 (the mass is below the floor)
    f[kOwn] = owned;
    f[kSum1] = HARD && !empty ? double(stats.one.a) : 0.0;
    f[kZy] = label >= 0 && label < width ? double(stats.z_label) : 0.0;
  }
}

template <class TS, bool HARD>
__global__ void __launch_bounds__(kThreads) sparse_vp_grad_kernel(SparseVpArgs a) {
  constexpr int VEC = 16 / TS::kBytes;
  const int64_t row = blockIdx.x, width = a.width;
  char* g_row = static_cast<char*>(a.grad) + row * width * TS::kBytes;
  if (a.valid != nullptr && a.valid[row] == 0) {
    zero_range<TS>(g_row, 0, width);
    return;
  }
  const double* f = a.rec + row * kFields;
  const float inv_t = 1.0f / a.temperature, m = float(f[kM]), off = float(f[kOff]);
  const float base = float(f[kBase]), log_s1 = float(f[kLogS1]);
  const int64_t label = HARD ? a.labels[row] : -1;
  const char* s_row = static_cast<const char*>(a.s) + row * a.s_stride * TS::kBytes;
  auto value = [&](float x, int64_t j) {
    const float z = x * inv_t;
    float g = off * expf(z - base);
    if (HARD) g += a.hard_weight * (expf((z - m) * a.temperature - log_s1) - (j == label));
    return g;
  };
  const bool aligned = ((reinterpret_cast<uintptr_t>(s_row) | reinterpret_cast<uintptr_t>(g_row)) &
                        15u) == 0;
  const int64_t n_vec = aligned ? width - width % VEC : 0;
  for (int64_t j0 = int64_t(threadIdx.x) * VEC; j0 < n_vec; j0 += int64_t(blockDim.x) * VEC) {
    float x[VEC], g[VEC];
    load_group<TS, VEC>(s_row + j0 * TS::kBytes, x);
#pragma unroll
    for (int i = 0; i < VEC; ++i) g[i] = value(x[i], j0 + i);
    store_group<TS, VEC>(g_row + j0 * TS::kBytes, g);
  }
  for (int64_t j = n_vec + threadIdx.x; j < width; j += blockDim.x)
    store_one<TS>(g_row, j, value(load_one<TS>(s_row, j), j));
  __syncthreads();  // the owned support ids' stores land after the loop's
  const int64_t* ids = a.indices + row * a.k;
  for (int64_t i = threadIdx.x; i < a.k; i += blockDim.x) {
    const int64_t c = ids[i] - a.offset;
    if (ids[i] < 0 || c < 0 || c >= width) continue;
    float g = float(a.sup_grad[row * a.k + i]);
    if (HARD) {
      const float z = load_one<TS>(s_row, c) * inv_t;
      g += a.hard_weight * (expf((z - m) * a.temperature - log_s1) - (c == label));
    }
    store_one<TS>(g_row, c, g);
  }
}

}  // namespace

void sparse_vp(int phase, const void* s, int s_dtype, int64_t s_stride, const int64_t* indices,
               int64_t k, int64_t offset, const uint8_t* valid, const int64_t* labels,
               double* rec, double* zsup, const double* sup_grad, void* grad, int64_t n_rows,
               int64_t width, double temperature, double hard_weight, void* stream) {
  if (n_rows == 0) return;
  if (n_rows >= (int64_t(1) << 31)) throw std::runtime_error("distill_ops: too many rows");
  const SparseVpArgs a{s, s_stride, indices, k, offset, width, valid, labels, rec, zsup,
                       sup_grad, grad, float(temperature), float(hard_weight)};
  const bool hard = hard_weight != 0.0;
  const auto st = static_cast<cudaStream_t>(stream);
  if (phase == 1) {
    with_dtype(s_dtype, [&](auto ts) {
      using TS = decltype(ts);
      auto kernel = hard ? sparse_vp_grad_kernel<TS, true> : sparse_vp_grad_kernel<TS, false>;
      kernel<<<dim3(unsigned(n_rows)), kThreads, 0, st>>>(a);
    });
    check_launch("sparse_vp_grad_kernel");
    return;
  }
  const int64_t smem = (width + 31) / 32 * 4;
  const int optin = device_info().smem_optin;
  if (smem + 1024 > optin) {
    throw std::runtime_error(
        "distill_ops: the CUDA vocab-parallel sparse kernel keeps a bitmap of the slice in "
        "shared memory (" + std::to_string(smem) + " bytes here, the device allows " +
        std::to_string(optin) + "): use backend='triton' for this size");
  }
  with_dtype(s_dtype, [&](auto ts) {
    using TS = decltype(ts);
    auto kernel = hard ? sparse_vp_stats_kernel<TS, true> : sparse_vp_stats_kernel<TS, false>;
    if (smem > 48 * 1024) {
      check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      int(smem)),
                 "cudaFuncSetAttribute(dynamic shared memory)");
    }
    kernel<<<dim3(unsigned(n_rows)), kThreads, size_t(smem), st>>>(a);
  });
  check_launch("sparse_vp_stats_kernel");
}

}  // namespace distill_ops::cuda
