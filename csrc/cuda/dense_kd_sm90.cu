// Dense KD on Hopper (sm_90): each logit is read from global memory once.
//
// A row of both models (512 KB in bf16 at V = 128k) is too big for one SM's shared memory
// but not for a thread-block cluster's: the C blocks of a cluster each copy a 1/C slice of
// the student and the teacher row into their shared memory (asynchronous 16-byte copies,
// cp.async, that bypass the registers), reduce their slice's statistics, and exchange the
// partials through distributed shared memory (every block merges all C partials in rank
// order, so all hold bit-identical row statistics). JSD and TVD need a second sum over the
// row: it is taken from shared memory and exchanged the same way. The gradient is then
// computed from shared memory and written with 16-byte stores. Global traffic: read both
// rows once, write the gradient once, the three-transfer floor.
//
// C is the smallest of 1, 2, 4, 8, 16 whose slices fit in ~112 KB per block (two blocks per
// SM); rows that need more, devices below sm_90 and the portable fallback use
// dense_kd.cu's kernel.
#include <cooperative_groups.h>
#include <cuda_pipeline.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "common.cuh"
#include "dense_row.cuh"

namespace cg = cooperative_groups;

namespace distill_ops::cuda {
namespace {

constexpr int kThreads = 512;
constexpr int64_t kTargetSmem = 112 * 1024;

struct ClusterShared {
  DensePartial reduce_partial[32];  // block_reduce scratch
  Sum2 reduce_sum[32];
  DensePartial partial;  // this block's partial: read by every block of the cluster
  Sum2 second;           // this block's second sums (JSD / TVD): likewise
  DensePartial merged;   // the cluster's merged partial, for this block's threads
  Sum2 second_merged;
};

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900  // device code of the sm_90 kernel only

// Copies `count` elements of `elt` bytes from global src to shared dst: 16-byte async copies
// when src is 16-byte aligned (committed and awaited by the caller), element by element
// otherwise.
__device__ void load_slice(unsigned char* dst, const char* src, int64_t count, int elt) {
  const int64_t bytes = count * elt;
  if ((reinterpret_cast<uintptr_t>(src) & 15u) == 0) {
    const int64_t full = bytes & ~int64_t(15);
    for (int64_t i = int64_t(threadIdx.x) * 16; i < full; i += int64_t(blockDim.x) * 16)
      __pipeline_memcpy_async(dst + i, src + i, 16);
    for (int64_t i = full + threadIdx.x * elt; i < bytes; i += int64_t(blockDim.x) * elt) {
      if (elt == 4) {
        *reinterpret_cast<uint32_t*>(dst + i) = *reinterpret_cast<const uint32_t*>(src + i);
      } else {
        *reinterpret_cast<uint16_t*>(dst + i) = *reinterpret_cast<const uint16_t*>(src + i);
      }
    }
  } else {
    for (int64_t e = threadIdx.x; e < count; e += blockDim.x) {
      if (elt == 4) {
        reinterpret_cast<uint32_t*>(dst)[e] = reinterpret_cast<const uint32_t*>(src)[e];
      } else {
        reinterpret_cast<uint16_t*>(dst)[e] = reinterpret_cast<const uint16_t*>(src)[e];
      }
    }
  }
}

// Packs `n` (16 / elt) floats into 16 bytes of `dtype`.
__device__ __forceinline__ uint4 pack16(const float* v, int dtype) {
  uint4 out;
  uint32_t* w = reinterpret_cast<uint32_t*>(&out);
  if (dtype == int(DType::F32)) {
#pragma unroll
    for (int i = 0; i < 4; ++i) w[i] = float_to_bits(v[i]);
  } else {
    const bool half = dtype == int(DType::F16);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const uint32_t lo = half ? float_to_half(v[2 * i]) : float_to_bf16(v[2 * i]);
      const uint32_t hi = half ? float_to_half(v[2 * i + 1]) : float_to_bf16(v[2 * i + 1]);
      w[i] = lo | (hi << 16);
    }
  }
  return out;
}

// Writes the gradients of the first n_local - n_local % VEC slice elements with one 16-byte
// store per VEC of them; returns how many it wrote.
template <int VEC>
__device__ int64_t store_grads_vec(const DenseArgs& a, const DenseRow& r,
                                   const unsigned char* s_sm, const unsigned char* t_sm,
                                   char* g_row, int64_t c0, int64_t n_local, int64_t label) {
  const int64_t done = n_local - n_local % VEC;
  const int es = dtype_bytes(a.s_dtype);
  for (int64_t v = threadIdx.x; v * VEC < done; v += blockDim.x) {
    float out[8];
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      const int64_t i = v * VEC + e;
      out[e] = dense_grad(a, r, dense_zs(a, load_as_float(s_sm, a.s_dtype, i)),
                          dense_zt(a, load_as_float(t_sm, a.t_dtype, i)), c0 + i, label);
    }
    *reinterpret_cast<uint4*>(g_row + (c0 + v * VEC) * es) = pack16(out, a.s_dtype);
  }
  return done;
}

#endif

__global__ void __launch_bounds__(kThreads) dense_kd_cluster_kernel(DenseArgs a, int64_t chunk) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  extern __shared__ __align__(16) unsigned char slices[];
  __shared__ ClusterShared sh;
  cg::cluster_group cluster = cg::this_cluster();
  const unsigned csize = cluster.num_blocks();
  const unsigned rank = cluster.block_rank();
  const int64_t row = blockIdx.x / csize;
  const int es = dtype_bytes(a.s_dtype), et = dtype_bytes(a.t_dtype);
  const int64_t c0 = int64_t(rank) * chunk;
  const int64_t c1 = c0 + chunk < a.vocab ? c0 + chunk : a.vocab;
  const int64_t n_local = c1 > c0 ? c1 - c0 : 0;
  char* g_row = a.grad == nullptr ? nullptr
                                  : static_cast<char*>(a.grad) + row * a.g_stride * es;

  // An ignored row: the whole cluster takes this branch, before any shared-memory exchange.
  if (a.valid != nullptr && a.valid[row] == 0) {
    if (g_row != nullptr) {
      for (int64_t j = c0 + threadIdx.x; j < c1; j += blockDim.x)
        store_from_float(g_row, a.s_dtype, j, 0.0f);
      if (rank == csize - 1)
        for (int64_t j = a.vocab + threadIdx.x; j < a.grad_cols; j += blockDim.x)
          store_from_float(g_row, a.s_dtype, j, 0.0f);
    }
    if (rank == 0 && threadIdx.x == 0) a.loss[row] = 0.0f;
    return;
  }
  const int64_t label = a.hard_weight != 0.0f ? a.labels[row] : -1;

  unsigned char* s_sm = slices;
  unsigned char* t_sm = slices + chunk * es;  // chunk is a multiple of 8: 16-byte aligned
  load_slice(s_sm, row_base(a.s, a.s_dtype, row, a.s_stride) + c0 * es, n_local, es);
  load_slice(t_sm, row_base(a.t, a.t_dtype, row, a.t_stride) + c0 * et, n_local, et);
  __pipeline_commit();  // both slices in flight at once
  __pipeline_wait_prior(0);
  __syncthreads();

  // Statistics of this block's slice, then of the row: every block merges the cluster's
  // partials in rank order (identical results everywhere).
  DensePartial st = dense_partial_empty();
  for (int64_t i = threadIdx.x; i < n_local; i += blockDim.x) {
    dense_push(st, a, dense_zs(a, load_as_float(s_sm, a.s_dtype, i)),
               dense_zt(a, load_as_float(t_sm, a.t_dtype, i)), c0 + i, label);
  }
  const MergePartial merge_op{kl_mode(a.divergence)};
  st = block_reduce(st, merge_op, dense_partial_empty(), sh.reduce_partial);
  if (threadIdx.x == 0) sh.partial = st;
  cluster.sync();
  if (threadIdx.x == 0) {
    DensePartial all = dense_partial_empty();
    for (unsigned q = 0; q < csize; ++q) all = merge_op(all, *cluster.map_shared_rank(&sh.partial, q));
    sh.merged = all;
  }
  __syncthreads();
  const DensePartial all = sh.merged;
  DenseRow r = dense_row(a, all);

  if (dense_needs_second(a)) {
    Sum2 acc{0.0f, 0.0f};
    for (int64_t i = threadIdx.x; i < n_local; i += blockDim.x) {
      dense_push_second(acc, a, r, dense_zs(a, load_as_float(s_sm, a.s_dtype, i)),
                        dense_zt(a, load_as_float(t_sm, a.t_dtype, i)));
    }
    acc = block_reduce(acc, AddSum2{}, Sum2{0.0f, 0.0f}, sh.reduce_sum);
    if (threadIdx.x == 0) sh.second = acc;
    cluster.sync();
    if (threadIdx.x == 0) {
      Sum2 total{0.0f, 0.0f};
      for (unsigned q = 0; q < csize; ++q) {
        const Sum2 part = *cluster.map_shared_rank(&sh.second, q);
        total = Sum2{total.x + part.x, total.y + part.y};
      }
      sh.second_merged = total;
    }
    __syncthreads();
    dense_finish_second(r, a, sh.second_merged);
  }
  const float row_loss = dense_loss(a, r, all.z_label, label);
  if (rank == 0 && threadIdx.x == 0) a.loss[row] = row_loss;

  if (g_row != nullptr) {
    // 16-byte stores of 16 / es gradients each where the slice is aligned, then the rest.
    int64_t done = 0;
    if ((reinterpret_cast<uintptr_t>(g_row + c0 * es) & 15u) == 0) {
      done = es == 2 ? store_grads_vec<8>(a, r, s_sm, t_sm, g_row, c0, n_local, label)
                     : store_grads_vec<4>(a, r, s_sm, t_sm, g_row, c0, n_local, label);
    }
    for (int64_t i = done + threadIdx.x; i < n_local; i += blockDim.x) {
      store_from_float(g_row, a.s_dtype, c0 + i,
                       dense_grad(a, r, dense_zs(a, load_as_float(s_sm, a.s_dtype, i)),
                                  dense_zt(a, load_as_float(t_sm, a.t_dtype, i)), c0 + i,
                                  label));
    }
    if (rank == csize - 1)
      for (int64_t j = a.vocab + threadIdx.x; j < a.grad_cols; j += blockDim.x)
        store_from_float(g_row, a.s_dtype, j, 0.0f);
  }
  // No block may leave while another can still read its shared memory.
  cluster.sync();
#endif
}

}  // namespace

bool dense_kd_cluster(const DenseArgs& a, int64_t n_rows, bool required, void* stream) {
  const DeviceInfo dev = device_info();
  auto refuse = [&](const char* why) {
    if (required) throw std::runtime_error(std::string("distill_ops: the sm_90 dense kernel ") + why);
    return false;
  };
  if (dev.major < 9) return refuse("needs a Hopper (sm_90) GPU or newer");
  if (static_cast<Divergence>(a.divergence) == Divergence::AKL)
    return refuse("does not take divergence='akl' (its threshold search runs in the portable "
                  "kernel)");
  const int64_t es = dtype_bytes(a.s_dtype), et = dtype_bytes(a.t_dtype);
  const int64_t static_smem = int64_t(sizeof(ClusterShared));
  for (int c = 1; c <= 16; c *= 2) {
    const int64_t chunk = ((a.vocab + c - 1) / c + 7) / 8 * 8;
    const int64_t smem = chunk * (es + et);
    if ((smem > kTargetSmem && c < 16) || smem + static_smem > dev.smem_optin) continue;
    if (n_rows * c >= (int64_t(1) << 31)) return refuse("got too many rows");
    check_cuda(cudaFuncSetAttribute(dense_kd_cluster_kernel,
                                    cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)),
               "cudaFuncSetAttribute(dynamic shared memory)");
    if (c > 8) {
      check_cuda(cudaFuncSetAttribute(dense_kd_cluster_kernel,
                                      cudaFuncAttributeNonPortableClusterSizeAllowed, 1),
                 "cudaFuncSetAttribute(non-portable cluster size)");
    }
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = dim3(unsigned(n_rows * c));
    cfg.blockDim = dim3(kThreads);
    cfg.dynamicSmemBytes = size_t(smem);
    cfg.stream = static_cast<cudaStream_t>(stream);
    cudaLaunchAttribute attr[1];
    attr[0].id = cudaLaunchAttributeClusterDimension;
    attr[0].val.clusterDim.x = unsigned(c);
    attr[0].val.clusterDim.y = 1;
    attr[0].val.clusterDim.z = 1;
    cfg.attrs = attr;
    cfg.numAttrs = 1;
    int clusters = 0;
    if (cudaOccupancyMaxActiveClusters(&clusters, dense_kd_cluster_kernel, &cfg) != cudaSuccess ||
        clusters == 0) {
      (void)cudaGetLastError();  // not schedulable at this size: try a larger cluster
      continue;
    }
    check_cuda(cudaLaunchKernelEx(&cfg, dense_kd_cluster_kernel, a, chunk),
               "dense_kd_cluster_kernel launch");
    check_launch("dense_kd_cluster_kernel");
    return true;
  }
  return refuse("cannot hold this row in a cluster's shared memory");
}

}  // namespace distill_ops::cuda
