// Dense KD loss and its student gradient on CUDA, one row per block (portable, sm_80+) or per
// thread-block cluster (sm_90, dense_kd_sm90.cu). The portable kernel makes the same passes
// as the Triton kernel: statistics of both rows with one running max / sum per thread and
// group (the KL cross term folded in), one more read for JSD / TVD and the research
// divergences, and the gradient pass. Each kernel is instantiated per (student dtype,
// teacher dtype, divergence, plain or general path): no run-time switch per logit; rows are
// read and the gradient written with 16-byte vectors (dense_row.cuh), the row's tail one
// logit at a time.
//
// Byte account per logit (s, t: the two rows; g: the gradient): KL: read s, t; read s, t
// again and write g: 5 transfers against the floor of 3. JSD / TVD / skew / AB: 7. The sm_90
// cluster kernel (dense_kd_sm90.cu) reads each logit once: 3.
//
// Instruction account (sm_90 SASS of the built extension, bf16, plain path:
// `python -m distill_ops.backends.triton.isa --cuda`; bench/results/isa-cuda-2026-12-02.md):
// forward KL 20 instructions and 2.25 ex2 a logit in the statistics pass, 16 and 2 in the
// gradient pass, against the Triton kernel's 24 and 25 (tests/test_cuda_isa.py holds every
// pass of every divergence at or below Triton's).
#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include "common.cuh"
#include "dense_row.cuh"
#include "kernels.cuh"
#include "vec_io.cuh"

namespace distill_ops::cuda {
namespace {

constexpr int kThreads = 512;

// One row per block, instantiated per (student dtype, teacher dtype, divergence, general):
// GENERAL is a softcap, TAID or the hard term on this launch (dense_is_general).
// Two blocks an SM (64 registers a thread) but for AKL, whose threshold search over groups of
// both rows needs more registers than that: one block an SM (128).
template <class TS, class TT, int DIV, bool GENERAL>
__global__ void __launch_bounds__(kThreads, DIV == 7 ? 1 : 2) dense_kd_kernel(DenseArgs a) {
  constexpr int VEC = group_width<TS, TT>();
  constexpr int kMode = DivTraits<DIV>::kMode;
  __shared__ DensePartial sm_partial[32];
  __shared__ Sum2 sm_sum[32];
  const int64_t row = blockIdx.x;
  const bool is_valid = a.valid == nullptr || a.valid[row] != 0;
  const int64_t n = is_valid ? a.vocab : 0;
  const char* s_row = static_cast<const char*>(a.s) + row * a.s_stride * TS::kBytes;
  const char* t_row = static_cast<const char*>(a.t) + row * a.t_stride * TT::kBytes;
  const int64_t label = GENERAL && a.hard_weight != 0.0f && is_valid ? a.labels[row] : -1;
  const bool aligned =
      ((reinterpret_cast<uintptr_t>(s_row) | reinterpret_cast<uintptr_t>(t_row)) & 15u) == 0;
  const int64_t n_vec = aligned ? n - n % VEC : 0;
  const Scales k = dense_scales<GENERAL>(a);
  auto walk = [&](auto&& f) { walk_row<TS, TT, GENERAL>(a, s_row, t_row, n_vec, n, f); };

  // Pass 1: statistics of student and teacher, KL cross terms, T = 1 statistics, z_label.
  DensePartial st = dense_partial_start();
  walk([&](const auto& zs, const auto& zt, int64_t j0) {
    dense_push_group<kMode, GENERAL>(st, a, k, zs, zt, j0, label);
  });
  st = block_reduce(dense_partial_close(st), MergePartial<kMode>{a.temperature * kLog2E}, dense_partial_empty(),
                    sm_partial);
  DenseRow r = dense_row<DIV>(a, st);

  // Pass 2 (JSD, TVD, the research divergences): the sums that need the final statistics.
  if constexpr (DivTraits<DIV>::kSecond) {
    const Sum2 acc = dense_second_sums<DIV>(a, r, k, walk);
    dense_finish_second<DIV>(r, a, block_reduce(acc, AddSum2{}, Sum2{0.0f, 0.0f}, sm_sum));
  }
  if constexpr (static_cast<Divergence>(DIV) == Divergence::AKL) {
    // The head threshold (the largest tau with sum_{p >= tau} p >= head mass): bisection over
    // tau's fp32 bits between the row statistics' bounds (akl_search_range; lo and hi the
    // same in every thread, so the loop is uniform), one read of the rows a step; then both
    // KLs and the head's and tail's sum |p - q| in one more pass.
    __shared__ float sm_float[32];
    const AklRange range = akl_search_range(a.beta, r.log_st, n);
    int lo = range.lo, hi = range.hi;
    while (hi - lo > 1) {
      const int mid = lo + (hi - lo) / 2;
      const float mass = block_reduce(akl_mass_part(r, k, __int_as_float(mid), walk),
                                      AddFloat{}, 0.0f, sm_float);
      if (mass >= a.beta) lo = mid; else hi = mid;
    }
    const float tau = a.beta >= 1.0f ? 0.0f : __int_as_float(lo);
    Sum2 kl{0.0f, 0.0f}, gap{0.0f, 0.0f};
    walk([&](const auto& zs, const auto& zt, int64_t) {
#pragma unroll
      for (int i = 0; i < int(sizeof(zs) / sizeof(float)); ++i) akl_push(kl, gap, r, k, tau, zs[i], zt[i]);
    });
    kl = block_reduce(kl, AddSum2{}, Sum2{0.0f, 0.0f}, sm_sum);
    gap = block_reduce(gap, AddSum2{}, Sum2{0.0f, 0.0f}, sm_sum);
    r.akl_w = akl_head_weight(gap.x, gap.y);
    r.sum_qg = kl.y;
    r.dv = r.akl_w * kl.x + (1.0f - r.akl_w) * kl.y;
  }
  const float row_loss = dense_loss(a, r, st.z_label, label);
  if (threadIdx.x == 0) a.loss[row] = is_valid ? row_loss : 0.0f;
  if (a.grad == nullptr) return;

  // Gradient pass: recompute z, write d loss / d x in the student's dtype (0 past V and on
  // ignored rows).
  char* g_row = static_cast<char*>(a.grad) + row * a.g_stride * TS::kBytes;
  write_grads<TS, TT, DIV, GENERAL>(a, r, s_row, t_row, g_row, n_vec, n, 0, label);
  zero_range<TS>(g_row, n, a.grad_cols);
}

template <class TS, class TT, int DIV>
void launch_dense(const DenseArgs& a, int64_t n_rows, cudaStream_t stream) {
  const dim3 grid = dim3(static_cast<unsigned>(n_rows));
  if (dense_is_general(a)) {
    dense_kd_kernel<TS, TT, DIV, true><<<grid, kThreads, 0, stream>>>(a);
  } else {
    dense_kd_kernel<TS, TT, DIV, false><<<grid, kThreads, 0, stream>>>(a);
  }
  check_launch("dense_kd_kernel");
}

template <class TS, class TT>
void launch_dense_div(const DenseArgs& a, int64_t n_rows, cudaStream_t stream) {
  switch (static_cast<Divergence>(a.divergence)) {
    case Divergence::ForwardKL: return launch_dense<TS, TT, 0>(a, n_rows, stream);
    case Divergence::ReverseKL: return launch_dense<TS, TT, 1>(a, n_rows, stream);
    case Divergence::JSD: return launch_dense<TS, TT, 2>(a, n_rows, stream);
    case Divergence::TVD: return launch_dense<TS, TT, 3>(a, n_rows, stream);
    case Divergence::SkewKL: return launch_dense<TS, TT, 4>(a, n_rows, stream);
    case Divergence::SkewReverseKL: return launch_dense<TS, TT, 5>(a, n_rows, stream);
    case Divergence::AB: return launch_dense<TS, TT, 6>(a, n_rows, stream);
    case Divergence::AKL: return launch_dense<TS, TT, 7>(a, n_rows, stream);
  }
  throw std::runtime_error("distill_ops: unknown divergence code " + std::to_string(a.divergence));
}

// Rows are strided by gridDim.y (at most 65535 of them per launch dimension).
__global__ void scale_rows_kernel(void* g, int dtype, const float* scale, int64_t scale_stride,
                                  int64_t n_rows, int64_t n_cols) {
  for (int64_t row = blockIdx.y; row < n_rows; row += gridDim.y) {
    const float c = scale[row * scale_stride];
    if (c == 1.0f) continue;  // a plain loss.backward() after a pre-scaled forward
    for (int64_t j = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; j < n_cols;
         j += int64_t(gridDim.x) * blockDim.x) {
      const int64_t i = row * n_cols + j;
      store_from_float(g, dtype, i, load_as_float(g, dtype, i) * c);
    }
  }
}

}  // namespace

void dense_kd(const void* s, int s_dtype, int64_t s_stride, const void* t, int t_dtype,
              int64_t t_stride, const uint8_t* valid, const int64_t* labels, float* loss,
              void* grad, int64_t g_stride, int64_t grad_cols, int64_t n_rows, int64_t vocab,
              const KDParams& p, int variant, void* stream) {
  if (n_rows == 0) return;
  if (n_rows >= (int64_t(1) << 31)) throw std::runtime_error("distill_ops: too many rows");
  DenseArgs a{s, s_dtype, s_stride, t, t_dtype, t_stride, valid, labels, loss, grad, g_stride,
              grad_cols, vocab, float(p.temperature), float(p.beta), float(p.scale_s),
              float(p.cap_s), float(p.scale_t), float(p.cap_t), float(p.hard_weight),
              float(p.soft_coef), p.divergence, float(p.param2), float(p.interp)};
  set_ab_series(a);
  if (variant != int(DenseVariant::Portable) &&
      dense_kd_cluster(a, n_rows, variant == int(DenseVariant::Cluster), stream)) {
    return;
  }
  with_dtype(s_dtype, [&](auto ts) {
    with_dtype(t_dtype, [&](auto tt) {
      launch_dense_div<decltype(ts), decltype(tt)>(a, n_rows, static_cast<cudaStream_t>(stream));
    });
  });
}

void scale_rows_(void* grad, int dtype, const float* scale, int64_t scale_stride,
                 int64_t n_rows, int64_t n_cols, void* stream) {
  if (n_rows == 0 || n_cols == 0) return;
  const int64_t blocks = (n_cols + 1023) / 1024;
  const dim3 grid(unsigned(blocks < 64 ? blocks : 64), unsigned(n_rows < 65535 ? n_rows : 65535));
  scale_rows_kernel<<<grid, 256, 0, static_cast<cudaStream_t>(stream)>>>(
      grad, dtype, scale, scale_stride, n_rows, n_cols);
  check_launch("scale_rows_kernel");
}

}  // namespace distill_ops::cuda
