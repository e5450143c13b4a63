// Top-k of log-softmax(f(x) / T) per row on CUDA: one block per row.
//
//   pass 1   the softmax statistics (online max / sum) and a histogram of the top 11 bits of
//            each value's order-preserving 32-bit key;
//   pass 2-3 radix selection of the k-th largest key on the next 11 and 10 bits (each pass
//            counts only the values that share the prefix selected so far);
//   pass 4   collection: every value above the k-th key, and of those equal to it the ones
//            with the lowest ids (an ordered block-wide scan), into shared memory;
//   then a bitonic sort by (value descending, id ascending) and the log-probabilities.
//
// Exact and deterministic, ties broken by the lower id as on the CPU and in Triton.
//
// Byte account per logit: passes 1-4 each read the row (4 transfers against the floor of
// one read); pass 1's statistics and histogram could share the read with the selection only
// if the row stayed on chip (a cluster, as the dense sm_90 kernel keeps its rows).
#include <cuda_runtime.h>

#include <cstdint>

#include "common.cuh"
#include "kernels.cuh"

namespace distill_ops::cuda {
namespace {

constexpr int kThreads = 512;
constexpr int kBins = 2048;  // 11-bit digits

// Larger value <=> larger key; -0 and +0 share one key.
__device__ __forceinline__ uint32_t order_key(float z) {
  const uint32_t u = float_to_bits(z == 0.0f ? 0.0f : z);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

struct Entry {
  float v;
  int32_t id;
};

// a goes before b: larger value, then lower id.
__device__ __forceinline__ bool before(const Entry& a, const Entry& b) {
  return a.v > b.v || (a.v == b.v && a.id < b.id);
}

// Finds, from the top bin down, the bin where the running count reaches `want`; returns it
// and sets `want` to the rank still wanted inside it. All threads get the same answer.
__device__ int select_bin(const int* hist, int& want, int* scratch) {
  // Each thread owns kBins / blockDim consecutive bins, counted from the top.
  const int per = kBins / int(blockDim.x);
  const int hi = kBins - 1 - int(threadIdx.x) * per;  // this thread's highest bin
  int mine = 0;
  for (int b = 0; b < per; ++b) mine += hist[hi - b];
  // Inclusive prefix over threads (thread 0 holds the top bins).
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  int incl = mine;
  for (int off = 1; off < 32; off <<= 1) {
    const int o = __shfl_up_sync(0xffffffffu, incl, off);
    if (lane >= off) incl += o;
  }
  if (lane == 31) scratch[warp] = incl;
  __syncthreads();
  int before_warp = 0;
  for (int w = 0; w < warp; ++w) before_warp += scratch[w];
  incl += before_warp;
  const int excl = incl - mine;
  __syncthreads();
  if (excl < want && want <= incl) {  // exactly one thread
    int cum = excl;
    for (int b = 0; b < per; ++b) {
      const int c = hist[hi - b];
      if (cum + c >= want) {
        scratch[32] = hi - b;
        scratch[33] = want - cum;
        break;
      }
      cum += c;
    }
  }
  __syncthreads();
  const int bin = scratch[32];
  want = scratch[33];
  __syncthreads();
  return bin;
}

// hist[bin] += 1 for every active lane, one shared-memory atomic per distinct bin of the
// warp (the bins of real logits are few and crowded). Called by all 32 lanes.
__device__ __forceinline__ void hist_add(int* hist, bool active, int bin) {
  const unsigned act = __ballot_sync(0xffffffffu, active);
  if (active) {
    const unsigned peers = __match_any_sync(act, bin);
    if (int(threadIdx.x & 31) == __ffs(peers) - 1) atomicAdd(&hist[bin], __popc(peers));
  }
}

struct TopKArgs {
  const void* x;
  int dtype;
  int64_t stride;
  int64_t vocab, k, k_pad;
  float scale, cap, inv_t;
  int32_t* out_idx;
  float* out_lp;
};

__global__ void __launch_bounds__(kThreads) topk_kernel(TopKArgs a) {
  extern __shared__ __align__(16) unsigned char dyn[];
  Entry* buf = reinterpret_cast<Entry*>(dyn);  // k_pad entries
  __shared__ int hist[kBins];
  __shared__ int scratch[40];
  __shared__ Online red[32];
  __shared__ int counter;

  const int64_t row = blockIdx.x;
  const char* x_row = row_base(a.x, a.dtype, row, a.stride);
  auto z_at = [&](int64_t j) {
    return transform_logit(load_as_float(x_row, a.dtype, j), a.scale, a.cap, a.inv_t);
  };
  for (int b = threadIdx.x; b < kBins; b += blockDim.x) hist[b] = 0;
  __syncthreads();

  // Pass 1: statistics and the histogram of the first digit (bits 31..21).
  // (Loops run the same trip count in every lane: the histogram's warp votes need it.)
  Online st = online_empty();
  for (int64_t base = 0; base < a.vocab; base += blockDim.x) {
    const int64_t j = base + threadIdx.x;
    const bool in = j < a.vocab;
    const float z = in ? z_at(j) : kNegInf;
    if (in) st = push(st, z, 0.0f);
    hist_add(hist, in, int(order_key(z) >> 21));
  }
  st = block_reduce(st, MergeOnline{}, online_empty(), red);
  const float lse = st.m + logf(st.a);
  __syncthreads();

  int want = int(a.k);
  uint32_t prefix = uint32_t(select_bin(hist, want, scratch)) << 21;
  uint32_t mask = 0xffe00000u;
  // Passes 2 and 3: bits 20..10, then 9..0.
  for (int digit = 1; digit < 3; ++digit) {
    const int shift = digit == 1 ? 10 : 0;
    const uint32_t dmask = digit == 1 ? 0x7ffu : 0x3ffu;
    for (int b = threadIdx.x; b < kBins; b += blockDim.x) hist[b] = 0;
    __syncthreads();
    for (int64_t base = 0; base < a.vocab; base += blockDim.x) {
      const int64_t j = base + threadIdx.x;
      const uint32_t key = j < a.vocab ? order_key(z_at(j)) : 0u;
      hist_add(hist, j < a.vocab && (key & mask) == prefix, int((key >> shift) & dmask));
    }
    __syncthreads();
    prefix |= uint32_t(select_bin(hist, want, scratch)) << shift;
    mask |= dmask << shift;
  }
  const uint32_t kth = prefix;  // the k-th largest key; `want` of its equals are taken
  const int n_gt = int(a.k) - want;

  // Pass 4: everything above kth (any order), and the `want` lowest-id equals, in id order.
  if (threadIdx.x == 0) counter = 0;
  __syncthreads();
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  int taken = 0;
  for (int64_t base = 0; base < a.vocab; base += blockDim.x) {
    const int64_t j = base + threadIdx.x;
    const float z = j < a.vocab ? z_at(j) : kNegInf;
    const uint32_t key = j < a.vocab ? order_key(z) : 0u;
    if (j < a.vocab && key > kth) buf[atomicAdd(&counter, 1)] = Entry{z, int32_t(j)};
    const bool eq = j < a.vocab && key == kth;
    if (taken < want) {  // uniform across the block
      const unsigned ballot = __ballot_sync(0xffffffffu, eq);
      if (lane == 0) scratch[warp] = __popc(ballot);
      __syncthreads();
      int before_me = taken + __popc(ballot & ((1u << lane) - 1u));
      int chunk_total = 0;
      for (int w = 0; w < int(blockDim.x >> 5); ++w) {
        if (w < warp) before_me += scratch[w];
        chunk_total += scratch[w];
      }
      if (eq && before_me < want) buf[n_gt + before_me] = Entry{z, int32_t(j)};
      taken += chunk_total;
      __syncthreads();
    }
  }
  // Pad to a power of two, then sort.
  for (int64_t i = a.k + threadIdx.x; i < a.k_pad; i += blockDim.x)
    buf[i] = Entry{kNegInf, 0x7fffffff};
  __syncthreads();
  for (int64_t size = 2; size <= a.k_pad; size <<= 1) {
    for (int64_t stride = size >> 1; stride > 0; stride >>= 1) {
      for (int64_t i = threadIdx.x; i < a.k_pad; i += blockDim.x) {
        const int64_t partner = i ^ stride;
        if (partner > i) {
          const bool up = (i & size) == 0;  // this run sorts in the "before" order
          const Entry x = buf[i], y = buf[partner];
          if (up ? before(y, x) : before(x, y)) {
            buf[i] = y;
            buf[partner] = x;
          }
        }
      }
      __syncthreads();
    }
  }
  for (int64_t i = threadIdx.x; i < a.k; i += blockDim.x) {
    a.out_idx[row * a.k + i] = buf[i].id;
    a.out_lp[row * a.k + i] = buf[i].v - lse;
  }
}

}  // namespace

void topk_logprobs(const void* x, int x_dtype, int64_t x_stride, int64_t n_rows, int64_t vocab,
                   int64_t k, float scale, float softcap, float temperature, int32_t* out_idx,
                   float* out_lp, void* stream) {
  if (n_rows == 0) return;
  if (k < 1 || k > kTopKMax || k > vocab)
    throw std::runtime_error("distill_ops: CUDA top-k takes 1 <= k <= min(V, " +
                             std::to_string(kTopKMax) + "), got k=" + std::to_string(k));
  if (n_rows >= (int64_t(1) << 31)) throw std::runtime_error("distill_ops: too many rows");
  int64_t k_pad = 1;
  while (k_pad < k) k_pad <<= 1;
  const int64_t smem = k_pad * int64_t(sizeof(Entry));
  if (smem > 48 * 1024) {
    check_cuda(cudaFuncSetAttribute(topk_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                    int(smem)),
               "cudaFuncSetAttribute(dynamic shared memory)");
  }
  TopKArgs a{x, x_dtype, x_stride, vocab, k, k_pad, scale, softcap, 1.0f / temperature,
             out_idx, out_lp};
  topk_kernel<<<dim3(unsigned(n_rows)), kThreads, size_t(smem),
                static_cast<cudaStream_t>(stream)>>>(a);
  check_launch("topk_kernel");
}

}  // namespace distill_ops::cuda
