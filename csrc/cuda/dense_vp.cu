// The dense KD loss of vocab-parallel logits on CUDA: each rank holds a slice [n_rows, width]
// of the student and teacher, the row statistics are global. The phases of the C++ CPU
// kernel (csrc/cpu/dense_vp.cpp) and the Triton one (backends/triton/dense_vp.py), on their
// record (fp64, 8 fields a row), around the Python layer's collectives
// (distributed/kernel_rows.py), built from the portable dense kernel's pieces
// (dense_math.cuh, dense_row.cuh: the same instructions a logit):
//   0 (statistics): the slice's maxima and sums of both sides (-inf, 0 where it holds
//     nothing), the student's T = 1 sum, z at the label, the KLs' centred cross term;
//   1 (JSD, TVD, the research divergences): with the global statistics, the slice's partial
//     sums (A, B) of the loss and of sum_j h_j (dense_second_sums);
//   2: with the global divergence and sum_j h_j (AKL: its head weight), d loss / d x of the
//     slice in the student's dtype (write_grads);
//   AKL: 3, the slice's teacher mass at p >= tau (one bisection step), 4, with the global
//     tau, both KLs and the head's and tail's sum |p - q|.
// One row per block, instantiated per (student dtype, teacher dtype, divergence, plain or
// general path) as the portable kernel is; the phase is a launch argument.
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
// Record fields (dense_vp.cpp's VpField).
constexpr int kMs = 0, kSs = 1, kMt = 2, kSt = 3, kS1 = 4, kZy = 5, kCross = 6;
constexpr int kA = 5, kB = 6, kDv = 5, kSumH = 6, kTau = 7, kFields = 8;

// The row's global statistics from the record (phases 1-4: max and log-sum of each side, the
// T = 1 log-sum; phase 2: the divergence, sum_j h_j, AKL's head weight).
template <int DIV>
__device__ DenseRow vp_row(const DenseArgs& a, const double* f) {
  DenseRow r;
  r.ms = float(f[kMs]);
  r.log_ss = float(f[kSs]);
  r.mt = float(f[kMt]);
  r.log_st = float(f[kSt]);
  r.log_s1 = float(f[kS1]);
  r.dv = float(f[kDv]);
  r.sum_qg = float(f[kSumH]);
  r.akl_w = static_cast<Divergence>(DIV) == Divergence::AKL ? float(f[kTau]) : 0.0f;
  r.found = true;  // the label's range is the Python layer's (a column here, or -1)
  if constexpr (static_cast<Divergence>(DIV) == Divergence::AB) r.ab = ab_consts(a.beta, a.param2);
  return r;
}

template <class TS, class TT, int DIV, bool GENERAL>
__global__ void __launch_bounds__(kThreads, DIV == 7 ? 1 : 2)
    dense_vp_kernel(DenseArgs a, double* rec, int phase) {
  constexpr int kMode = DivTraits<DIV>::kMode;
  constexpr Divergence kDivergence = static_cast<Divergence>(DIV);
  __shared__ DensePartial sm_partial[32];
  __shared__ Sum2 sm_sum[32];
  const int64_t row = blockIdx.x;
  const bool is_valid = a.valid == nullptr || a.valid[row] != 0;
  const int64_t n = is_valid ? a.vocab : 0;  // an ignored row reads nothing
  const char* s_row = static_cast<const char*>(a.s) + row * a.s_stride * TS::kBytes;
  const char* t_row = static_cast<const char*>(a.t) + row * a.t_stride * TT::kBytes;
  // The label's column in this slice, -1 where it lies in another.
  const int64_t label = GENERAL && a.hard_weight != 0.0f && is_valid ? a.labels[row] : -1;
  const bool aligned =
      ((reinterpret_cast<uintptr_t>(s_row) | reinterpret_cast<uintptr_t>(t_row)) & 15u) == 0;
  constexpr int VEC = group_width<TS, TT>();
  const int64_t n_vec = aligned ? n - n % VEC : 0;
  const Scales k = dense_scales<GENERAL>(a);
  auto walk = [&](auto&& fn) { walk_row<TS, TT, GENERAL>(a, s_row, t_row, n_vec, n, fn); };
  double* f = rec + row * kFields;

  if (phase == 0) {
    DensePartial st = dense_partial_start();
    walk([&](const auto& zs, const auto& zt, int64_t j0) {
      dense_push_group<kMode, GENERAL>(st, a, k, zs, zt, j0, label);
    });
    st = block_reduce(dense_partial_close(st), MergePartial<kMode>{a.temperature * kLog2E},
                      dense_partial_empty(), sm_partial);
    if (threadIdx.x == 0) {
      f[kMs] = st.kl.ms;
      f[kSs] = st.kl.as;
      f[kMt] = st.kl.mt;
      f[kSt] = st.kl.at;
      f[kS1] = st.a1;
      f[kZy] = label >= 0 && label < n ? st.z_label : 0.0f;
      f[kCross] = kMode != OnlineKLMode::kNone ? st.kl.c : 0.0f;
    }
    return;
  }
  const DenseRow r = vp_row<DIV>(a, f);
  if (phase == 1) {
    if constexpr (DivTraits<DIV>::kSecond) {
      const Sum2 acc = block_reduce(dense_second_sums<DIV>(a, r, k, walk), AddSum2{},
                                    Sum2{0.0f, 0.0f}, sm_sum);
      // JSD and TVD: the raw sums (the Python layer combines them); the research
      // divergences: the loss and sum h, AB's one-series sums scaled as one device does.
      DenseRow done = r;
      dense_finish_second<DIV>(done, a, acc);
      const bool research = DivTraits<DIV>::kResearch || kDivergence == Divergence::AB;
      if (threadIdx.x == 0) {
        f[kA] = research ? done.dv : acc.x;
        f[kB] = research ? done.sum_qg : acc.y;
      }
    }
    return;
  }
  if constexpr (kDivergence == Divergence::AKL) {
    __shared__ float sm_float[32];
    const float tau = float(f[kTau]);
    if (phase == 3) {  // the slice's teacher mass at p >= tau
      const float mass = block_reduce(akl_mass_part(r, k, tau, walk), AddFloat{}, 0.0f,
                                      sm_float);
      if (threadIdx.x == 0) f[kA] = mass;
      return;
    }
    if (phase == 4) {  // both KLs, the head's and the tail's sum |p - q|
      Sum2 kl{0.0f, 0.0f}, gap{0.0f, 0.0f};
      walk([&](const auto& zs, const auto& zt, int64_t) {
#pragma unroll
        for (int i = 0; i < int(sizeof(zs) / sizeof(float)); ++i)
          akl_push(kl, gap, r, k, tau, zs[i], zt[i]);
      });
      kl = block_reduce(kl, AddSum2{}, Sum2{0.0f, 0.0f}, sm_sum);
      gap = block_reduce(gap, AddSum2{}, Sum2{0.0f, 0.0f}, sm_sum);
      if (threadIdx.x == 0) {
        f[kA] = kl.x;
        f[kB] = kl.y;
        f[kTau] = gap.x;
        f[kS1] = gap.y;
      }
      return;
    }
  }
  // Phase 2: the gradient (0 past the columns that count and on ignored rows).
  char* g_row = static_cast<char*>(a.grad) + row * a.g_stride * TS::kBytes;
  write_grads<TS, TT, DIV, GENERAL>(a, r, s_row, t_row, g_row, n_vec, n, 0, label);
  zero_range<TS>(g_row, n, a.grad_cols);
}

template <class TS, class TT, int DIV>
void launch_vp(const DenseArgs& a, double* rec, int phase, int64_t n_rows, cudaStream_t stream) {
  const dim3 grid = dim3(static_cast<unsigned>(n_rows));
  if (dense_is_general(a)) {
    dense_vp_kernel<TS, TT, DIV, true><<<grid, kThreads, 0, stream>>>(a, rec, phase);
  } else {
    dense_vp_kernel<TS, TT, DIV, false><<<grid, kThreads, 0, stream>>>(a, rec, phase);
  }
  check_launch("dense_vp_kernel");
}

template <class TS, class TT>
void launch_vp_div(const DenseArgs& a, double* rec, int phase, int64_t n_rows,
                   cudaStream_t stream) {
  switch (static_cast<Divergence>(a.divergence)) {
    case Divergence::ForwardKL: return launch_vp<TS, TT, 0>(a, rec, phase, n_rows, stream);
    case Divergence::ReverseKL: return launch_vp<TS, TT, 1>(a, rec, phase, n_rows, stream);
    case Divergence::JSD: return launch_vp<TS, TT, 2>(a, rec, phase, n_rows, stream);
    case Divergence::TVD: return launch_vp<TS, TT, 3>(a, rec, phase, n_rows, stream);
    case Divergence::SkewKL: return launch_vp<TS, TT, 4>(a, rec, phase, n_rows, stream);
    case Divergence::SkewReverseKL: return launch_vp<TS, TT, 5>(a, rec, phase, n_rows, stream);
    case Divergence::AB: return launch_vp<TS, TT, 6>(a, rec, phase, n_rows, stream);
    case Divergence::AKL: return launch_vp<TS, TT, 7>(a, rec, phase, n_rows, stream);
  }
  throw std::runtime_error("distill_ops: unknown divergence code " + std::to_string(a.divergence));
}

}  // namespace

void dense_vp(int phase, const void* s, int s_dtype, int64_t s_stride, const void* t,
              int t_dtype, int64_t t_stride, const uint8_t* valid, const int64_t* labels,
              double* rec, void* grad, int64_t g_stride, int64_t n_rows, int64_t width,
              const KDParams& p, void* stream) {
  if (n_rows == 0) return;
  if (n_rows >= (int64_t(1) << 31)) throw std::runtime_error("distill_ops: too many rows");
  if (phase < 0 || phase > 4 || (phase == 2 && grad == nullptr))
    throw std::runtime_error("distill_ops: dense_vp phase " + std::to_string(phase) +
                             " (0-4; 2 writes the gradient)");
  DenseArgs a{s, s_dtype, s_stride, t, t_dtype, t_stride, valid, labels, nullptr, grad,
              g_stride, width, width, float(p.temperature), float(p.beta), float(p.scale_s),
              float(p.cap_s), float(p.scale_t), float(p.cap_t), float(p.hard_weight),
              float(p.soft_coef), p.divergence, float(p.param2), float(p.interp)};
  set_ab_series(a);
  with_dtype(s_dtype, [&](auto ts) {
    with_dtype(t_dtype, [&](auto tt) {
      launch_vp_div<decltype(ts), decltype(tt)>(a, rec, phase, n_rows,
                                                static_cast<cudaStream_t>(stream));
    });
  });
}

}  // namespace distill_ops::cuda
