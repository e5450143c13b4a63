// Dense KD loss and its student gradient on CUDA, one row per block (portable, sm_80+) or per
// thread-block cluster (sm_90, dense_kd_sm90.cu). The portable kernel makes the same passes
// as the Triton kernel: statistics of both rows with an online max / sum per thread (the KL
// cross term folded in), one more read for JSD / TVD, and the gradient pass.
//
// Byte account per logit (s, t: the two rows; g: the gradient): KL: read s, t; read s, t
// again and write g: 5 transfers against the floor of 3. JSD / TVD: 7. The sm_90 cluster
// kernel (dense_kd_sm90.cu) reads each logit once: 3.
#include <cuda_runtime.h>

#include <cstdint>

#include "common.cuh"
#include "dense_row.cuh"
#include "kernels.cuh"

namespace distill_ops::cuda {
namespace {

constexpr int kThreads = 512;

__global__ void __launch_bounds__(kThreads) dense_kd_kernel(DenseArgs a) {
  __shared__ DensePartial sm_partial[32];
  __shared__ Sum2 sm_sum[32];
  const int64_t row = blockIdx.x;
  const bool is_valid = a.valid == nullptr || a.valid[row] != 0;
  const int64_t n = is_valid ? a.vocab : 0;
  const char* s_row = row_base(a.s, a.s_dtype, row, a.s_stride);
  const char* t_row = row_base(a.t, a.t_dtype, row, a.t_stride);
  const int64_t label = a.hard_weight != 0.0f && is_valid ? a.labels[row] : -1;

  // Pass 1: statistics of student and teacher, KL cross terms, T = 1 statistics, z_label.
  DensePartial st = dense_partial_empty();
  for (int64_t j = threadIdx.x; j < n; j += blockDim.x) {
    const float zs = dense_zs(a, load_as_float(s_row, a.s_dtype, j));
    const float zt = dense_zt(a, load_as_float(t_row, a.t_dtype, j));
    dense_push(st, a, zs, zt, j, label);
  }
  st = block_reduce(st, MergePartial{kl_mode(a.divergence)}, dense_partial_empty(),
                    sm_partial);
  DenseRow r = dense_row(a, st);

  // Pass 2 (JSD, TVD): the sums that need the final statistics.
  if (dense_needs_second(a)) {
    Sum2 acc{0.0f, 0.0f};
    for (int64_t j = threadIdx.x; j < n; j += blockDim.x) {
      dense_push_second(acc, a, r, dense_zs(a, load_as_float(s_row, a.s_dtype, j)),
                        dense_zt(a, load_as_float(t_row, a.t_dtype, j)));
    }
    dense_finish_second(r, a, block_reduce(acc, AddSum2{}, Sum2{0.0f, 0.0f}, sm_sum));
  }
  if (static_cast<Divergence>(a.divergence) == Divergence::AKL) {
    // The head threshold (the largest tau with sum_{p >= tau} p >= head mass): bisection over
    // tau's fp32 bits, one read of the teacher row a step; then both KLs and the head's and
    // tail's sum |p - q| in one more pass.
    __shared__ float sm_float[32];
    int lo = 0, hi = 0x3F800001;  // [0, 1.0 + 1 ulp)
    for (int step = 0; step < 31; ++step) {
      const int mid = lo + (hi - lo) / 2;
      const float tau = __int_as_float(mid);
      float mass = 0.0f;
      for (int64_t j = threadIdx.x; j < n; j += blockDim.x) {
        const float p = dense_p(a, r, dense_zs(a, load_as_float(s_row, a.s_dtype, j)),
                                dense_zt(a, load_as_float(t_row, a.t_dtype, j)));
        mass += p >= tau ? p : 0.0f;
      }
      mass = block_reduce(mass, AddFloat{}, 0.0f, sm_float);
      if (mass >= a.beta) lo = mid; else hi = mid;
    }
    const float tau = a.beta >= 1.0f ? 0.0f : __int_as_float(lo);
    Sum2 kl{0.0f, 0.0f}, gap{0.0f, 0.0f};
    for (int64_t j = threadIdx.x; j < n; j += blockDim.x) {
      akl_push(kl, gap, a, r, tau, dense_zs(a, load_as_float(s_row, a.s_dtype, j)),
               dense_zt(a, load_as_float(t_row, a.t_dtype, j)));
    }
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
  const int64_t g_off = row * a.g_stride;
  for (int64_t j = threadIdx.x; j < a.grad_cols; j += blockDim.x) {
    float gx = 0.0f;
    if (j < n) {
      gx = dense_grad(a, r, dense_zs(a, load_as_float(s_row, a.s_dtype, j)),
                      dense_zt(a, load_as_float(t_row, a.t_dtype, j)), j, label);
    }
    store_from_float(a.grad, a.s_dtype, g_off + j, gx);
  }
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
  if (variant != int(DenseVariant::Portable) &&
      dense_kd_cluster(a, n_rows, variant == int(DenseVariant::Cluster), stream)) {
    return;
  }
  dense_kd_kernel<<<dim3(unsigned(n_rows)), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(a);
  check_launch("dense_kd_kernel");
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
