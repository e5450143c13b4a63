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
#include <string>

#include "common.cuh"
#include "dense_row.cuh"
#include "vec_io.cuh"

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

#endif

// Two blocks an SM (their slices fit: ~112 KB each), so 64 registers a thread; the research
// divergences' second pass needs more in some instantiations (fp16 skew KL spilled): one.
template <int DIV>
constexpr int kClusterMinBlocks = DIV >= 4 ? 1 : 2;

template <class TS, class TT, int DIV, bool GENERAL>
__global__ void __launch_bounds__(kThreads, kClusterMinBlocks<DIV>) dense_kd_cluster_kernel(DenseArgs a, int64_t chunk) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  constexpr int VEC = group_width<TS, TT>();
  constexpr int kMode = DivTraits<DIV>::kMode;
  constexpr int es = TS::kBytes, et = TT::kBytes;
  extern __shared__ __align__(16) unsigned char slices[];
  __shared__ ClusterShared sh;
  cg::cluster_group cluster = cg::this_cluster();
  const unsigned csize = cluster.num_blocks();
  const unsigned rank = cluster.block_rank();
  const int64_t row = blockIdx.x / csize;
  const int64_t c0 = int64_t(rank) * chunk;
  const int64_t c1 = c0 + chunk < a.vocab ? c0 + chunk : a.vocab;
  const int64_t n_local = c1 > c0 ? c1 - c0 : 0;
  char* g_row = a.grad == nullptr ? nullptr
                                  : static_cast<char*>(a.grad) + row * a.g_stride * es;

  // An ignored row: the whole cluster takes this branch, before any shared-memory exchange.
  if (a.valid != nullptr && a.valid[row] == 0) {
    if (g_row != nullptr) {
      zero_range<TS>(g_row, c0, c1);
      if (rank == csize - 1) zero_range<TS>(g_row, a.vocab, a.grad_cols);
    }
    if (rank == 0 && threadIdx.x == 0) a.loss[row] = 0.0f;
    return;
  }
  const int64_t label = GENERAL && a.hard_weight != 0.0f ? a.labels[row] : -1;

  char* s_sm = reinterpret_cast<char*>(slices);
  char* t_sm = s_sm + chunk * es;  // chunk is a multiple of 8: 16-byte aligned
  load_slice(reinterpret_cast<unsigned char*>(s_sm),
             static_cast<const char*>(a.s) + (row * a.s_stride + c0) * es, n_local, es);
  load_slice(reinterpret_cast<unsigned char*>(t_sm),
             static_cast<const char*>(a.t) + (row * a.t_stride + c0) * et, n_local, et);
  __pipeline_commit();  // both slices in flight at once
  __pipeline_wait_prior(0);
  __syncthreads();

  // The slices sit 16-byte aligned in shared memory: groups of VEC up to the slice's tail.
  const int64_t n_vec = n_local - n_local % VEC;
  const Scales k = dense_scales<GENERAL>(a);
  auto walk = [&](auto&& f) { walk_row<TS, TT, GENERAL>(a, s_sm, t_sm, n_vec, n_local, f); };

  // Statistics of this block's slice, then of the row: every block merges the cluster's
  // partials in rank order (identical results everywhere).
  DensePartial st = dense_partial_start();
  walk([&](const auto& zs, const auto& zt, int64_t j0) {
    dense_push_group<kMode, GENERAL>(st, a, k, zs, zt, c0 + j0, label);
  });
  const MergePartial<kMode> merge_op{a.temperature * kLog2E};
  st = block_reduce(dense_partial_close(st), merge_op, dense_partial_empty(), sh.reduce_partial);
  if (threadIdx.x == 0) sh.partial = st;
  cluster.sync();
  if (threadIdx.x == 0) {
    DensePartial all = dense_partial_empty();
    for (unsigned q = 0; q < csize; ++q) all = merge_op(all, *cluster.map_shared_rank(&sh.partial, q));
    sh.merged = all;
  }
  __syncthreads();
  const DensePartial all = sh.merged;
  DenseRow r = dense_row<DIV>(a, all);

  if constexpr (DivTraits<DIV>::kSecond) {
    Sum2 acc = dense_second_sums<DIV>(a, r, k, walk);
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
    dense_finish_second<DIV>(r, a, sh.second_merged);
  }
  const float row_loss = dense_loss(a, r, all.z_label, label);
  if (rank == 0 && threadIdx.x == 0) a.loss[row] = row_loss;

  if (g_row != nullptr) {
    // 16-byte stores where the slice's gradient is aligned (write_grads checks), then the rest.
    write_grads<TS, TT, DIV, GENERAL>(a, r, s_sm, t_sm, g_row + c0 * es, n_vec, n_local, c0,
                                      label);
    if (rank == csize - 1) zero_range<TS>(g_row, a.vocab, a.grad_cols);
  }
  // No block may leave while another can still read its shared memory.
  cluster.sync();
#endif
}

template <class TS, class TT, int DIV, bool GENERAL>
bool launch_cluster(const DenseArgs& a, int64_t n_rows, bool required, void* stream) {
  const DeviceInfo dev = device_info();
  auto refuse = [&](const char* why) {
    if (required) throw std::runtime_error(std::string("distill_ops: the sm_90 dense kernel ") + why);
    return false;
  };
  auto kernel = dense_kd_cluster_kernel<TS, TT, DIV, GENERAL>;
  constexpr int64_t es = TS::kBytes, et = TT::kBytes;
  const int64_t static_smem = int64_t(sizeof(ClusterShared));
  for (int c = 1; c <= 16; c *= 2) {
    const int64_t chunk = ((a.vocab + c - 1) / c + 7) / 8 * 8;
    const int64_t smem = chunk * (es + et);
    if ((smem > kTargetSmem && c < 16) || smem + static_smem > dev.smem_optin) continue;
    if (n_rows * c >= (int64_t(1) << 31)) return refuse("got too many rows");
    check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                    int(smem)),
               "cudaFuncSetAttribute(dynamic shared memory)");
    if (c > 8) {
      check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1),
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
    if (cudaOccupancyMaxActiveClusters(&clusters, kernel, &cfg) != cudaSuccess || clusters == 0) {
      (void)cudaGetLastError();  // not schedulable at this size: try a larger cluster
      continue;
    }
    check_cuda(cudaLaunchKernelEx(&cfg, kernel, a, chunk), "dense_kd_cluster_kernel launch");
    check_launch("dense_kd_cluster_kernel");
    return true;
  }
  return refuse("cannot hold this row in a cluster's shared memory");
}

template <class TS, class TT, int DIV>
bool launch_cluster_general(const DenseArgs& a, int64_t n_rows, bool required, void* stream) {
  return dense_is_general(a) ? launch_cluster<TS, TT, DIV, true>(a, n_rows, required, stream)
                             : launch_cluster<TS, TT, DIV, false>(a, n_rows, required, stream);
}

template <class TS, class TT>
bool launch_cluster_div(const DenseArgs& a, int64_t n_rows, bool required, void* stream) {
  switch (static_cast<Divergence>(a.divergence)) {
    case Divergence::ForwardKL: return launch_cluster_general<TS, TT, 0>(a, n_rows, required, stream);
    case Divergence::ReverseKL: return launch_cluster_general<TS, TT, 1>(a, n_rows, required, stream);
    case Divergence::JSD: return launch_cluster_general<TS, TT, 2>(a, n_rows, required, stream);
    case Divergence::TVD: return launch_cluster_general<TS, TT, 3>(a, n_rows, required, stream);
    case Divergence::SkewKL: return launch_cluster_general<TS, TT, 4>(a, n_rows, required, stream);
    case Divergence::SkewReverseKL:
      return launch_cluster_general<TS, TT, 5>(a, n_rows, required, stream);
    case Divergence::AB: return launch_cluster_general<TS, TT, 6>(a, n_rows, required, stream);
    default: break;
  }
  if (required) {
    throw std::runtime_error("distill_ops: the sm_90 dense kernel does not take divergence='akl' "
                             "(its threshold search runs in the portable kernel)");
  }
  return false;
}

}  // namespace

bool dense_kd_cluster(const DenseArgs& a, int64_t n_rows, bool required, void* stream) {
  if (device_info().major < 9) {
    if (required) throw std::runtime_error("distill_ops: the sm_90 dense kernel needs a Hopper (sm_90) GPU or newer");
    return false;
  }
  bool launched = false;
  with_dtype(a.s_dtype, [&](auto ts) {
    with_dtype(a.t_dtype, [&](auto tt) {
      launched = launch_cluster_div<decltype(ts), decltype(tt)>(a, n_rows, required, stream);
    });
  });
  return launched;
}

}  // namespace distill_ops::cuda
