// Portable CUDA kernels of the dense KD loss (any sm_80+ GPU): one block per row, the same
// passes as the Triton kernel (statistics with an online max/sum per thread, the KL cross
// term folded in; one more read for JSD/TVD; the gradient pass), and the same maths, taken
// from csrc/include/distill_ops/kd_math.h like the CPU kernels.
#include <cuda_runtime.h>

#include <cstdint>
#include <limits>
#include <stdexcept>
#include <string>

#include "distill_ops/kd_math.h"
#include "kernels.cuh"

namespace distill_ops::cuda {
namespace {

constexpr int kThreads = 512;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

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

// Running log-sum-exp state: max m, sum a of exp(z - m), and a cross term c = sum of
// exp(z - m) * w, all relative to m.
struct Online {
  float m, a, c;
};

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

// Reduces v over the warp with op (T made of 32-bit words, shuffled word by word).
template <typename T, typename Op>
__device__ T warp_reduce(T v, Op op) {
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
// thread gets the result; smem (one T per warp) is free again on return.
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

struct Sum2 {
  float x, y;
};

struct Args {
  const void* s;
  int s_dtype;
  int64_t s_stride;
  const void* t;
  int t_dtype;
  int64_t t_stride;
  const uint8_t* valid;
  const int64_t* labels;
  float* loss;
  void* grad;
  int64_t g_stride;
  int64_t grad_cols;
  int64_t vocab;
  float temperature, beta, scale_s, cap_s, scale_t, cap_t, hard_weight, soft_coef;
  int divergence;
};

__global__ void __launch_bounds__(kThreads) dense_kd_kernel(Args a) {
  __shared__ Online sm_online[kThreads / 32];
  __shared__ Sum2 sm_sum[kThreads / 32];
  const int64_t row = blockIdx.x;
  const auto div = static_cast<Divergence>(a.divergence);
  const bool hard = a.hard_weight != 0.0f;
  const bool is_valid = a.valid == nullptr || a.valid[row] != 0;
  const int64_t n = is_valid ? a.vocab : 0;
  const float inv_t = 1.0f / a.temperature;
  const void* s_row = static_cast<const char*>(a.s) +
                      row * a.s_stride * (a.s_dtype == int(DType::F32) ? 4 : 2);
  const void* t_row = static_cast<const char*>(a.t) +
                      row * a.t_stride * (a.t_dtype == int(DType::F32) ? 4 : 2);
  const int64_t label = hard && is_valid ? a.labels[row] : -1;

  auto zs_at = [&](int64_t j) {
    return transform_logit(load_as_float(s_row, a.s_dtype, j), a.scale_s, a.cap_s, inv_t);
  };
  auto zt_at = [&](int64_t j) {
    return transform_logit(load_as_float(t_row, a.t_dtype, j), a.scale_t, a.cap_t, inv_t);
  };

  // Pass 1: statistics of student and teacher, KL cross term, T = 1 statistics and z_label.
  Online st_s{kNegInf, 0.0f, 0.0f}, st_t{kNegInf, 0.0f, 0.0f}, st_1{kNegInf, 0.0f, 0.0f};
  float z_label = 0.0f;
  for (int64_t j = threadIdx.x; j < n; j += blockDim.x) {
    const float zs = zs_at(j), zt = zt_at(j);
    st_s = push(st_s, zs, div == Divergence::ReverseKL ? zs - zt : 0.0f);
    st_t = push(st_t, zt, div == Divergence::ForwardKL ? zt - zs : 0.0f);
    if (hard) {
      st_1 = push(st_1, zs == kNegInf ? zs : zs * a.temperature, 0.0f);
      if (j == label) z_label = zs;
    }
  }
  const Online none{kNegInf, 0.0f, 0.0f};
  st_s = block_reduce(st_s, merge, none, sm_online);
  st_t = block_reduce(st_t, merge, none, sm_online);
  const float log_ss = logf(st_s.a), log_st = logf(st_t.a);

  float dv = 0.0f, sum_qg = 0.0f;
  const float log_b = logf(a.beta), log_1mb = log1pf(-a.beta);
  if (div == Divergence::ForwardKL) {
    dv = st_t.c / st_t.a - (st_t.m - st_s.m) - log_st + log_ss;
  } else if (div == Divergence::ReverseKL) {
    dv = st_s.c / st_s.a - (st_s.m - st_t.m) - log_ss + log_st;
  } else {
    Sum2 acc{0.0f, 0.0f};
    for (int64_t j = threadIdx.x; j < n; j += blockDim.x) {
      const float lq = (zs_at(j) - st_s.m) - log_ss, lp = (zt_at(j) - st_t.m) - log_st;
      const float q = expf(lq), p = expf(lp);
      if (div == Divergence::JSD) {
        const float lm = jsd_log_mixture(lp, lq, log_b, log_1mb);
        acc.x += xlogratio(p, lp, lm);
        acc.y += xlogratio(q, lq, lm);
      } else {
        acc.x += fabsf(q - p);
        acc.y += q * tvd_sign(q, p);
      }
    }
    acc = block_reduce(acc, [](Sum2 u, Sum2 w) { return Sum2{u.x + w.x, u.y + w.y}; },
                       Sum2{0.0f, 0.0f}, sm_sum);
    if (div == Divergence::JSD) {
      dv = a.beta * acc.x + (1.0f - a.beta) * acc.y;
      sum_qg = (1.0f - a.beta) * acc.y;
    } else {
      dv = 0.5f * acc.x;
      sum_qg = acc.y;
    }
  }

  float row_loss = a.soft_coef * dv;
  float log_s1 = 0.0f;
  bool found = true;
  if (hard) {
    st_1 = block_reduce(st_1, merge, none, sm_online);
    const float zy = block_reduce(z_label, [](float u, float w) { return u + w; }, 0.0f,
                                  reinterpret_cast<float*>(sm_sum));
    log_s1 = logf(st_1.a);
    found = label >= 0 && label < a.vocab;
    row_loss += a.hard_weight * (found ? (st_s.m - zy) * a.temperature + log_s1 : NAN);
  }
  if (threadIdx.x == 0) a.loss[row] = is_valid ? row_loss : 0.0f;
  if (a.grad == nullptr) return;

  // Gradient pass: recompute q and p, write dL/dx in the student's dtype.
  const float coef = a.soft_coef * inv_t;
  const int64_t g_off = row * a.g_stride;
  for (int64_t j = threadIdx.x; j < a.grad_cols; j += blockDim.x) {
    float gx = 0.0f;
    if (j < n) {
      const float zs = zs_at(j), zt = zt_at(j);
      const float lq = (zs - st_s.m) - log_ss, lp = (zt - st_t.m) - log_st;
      const float q = expf(lq), p = expf(lp);
      float d;
      switch (div) {
        case Divergence::ForwardKL: d = q - p; break;
        case Divergence::ReverseKL: d = q > 0.0f ? q * ((lq - lp) - dv) : 0.0f; break;
        case Divergence::JSD: {
          const float lm = jsd_log_mixture(lp, lq, log_b, log_1mb);
          d = q * ((q > 0.0f ? (1.0f - a.beta) * (lq - lm) : 0.0f) - sum_qg);
          break;
        }
        default: d = q * (tvd_sign(q, p) - sum_qg);
      }
      float gz = coef * d;
      if (hard) {
        const float sm1 = expf((zs - st_s.m) * a.temperature - log_s1);
        gz += a.hard_weight * (sm1 - (j == label ? 1.0f : 0.0f));
        if (!found) gz = NAN;
      }
      gx = gz * transform_grad(zs, a.scale_s, a.cap_s, a.temperature);
    }
    store_from_float(a.grad, a.s_dtype, g_off + j, gx);
  }
}

__global__ void scale_rows_kernel(void* g, int dtype, const float* scale, int64_t scale_stride,
                                  int64_t n_cols) {
  const int64_t row = blockIdx.y;
  const float c = scale[row * scale_stride];
  for (int64_t j = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; j < n_cols;
       j += int64_t(gridDim.x) * blockDim.x) {
    const int64_t i = row * n_cols + j;
    store_from_float(g, dtype, i, load_as_float(g, dtype, i) * c);
  }
}

void check_launch(const char* what) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("distill_ops: ") + what + " launch failed: " +
                             cudaGetErrorString(err));
  }
}

}  // namespace

void dense_kd(const void* s, int s_dtype, int64_t s_stride, const void* t, int t_dtype,
              int64_t t_stride, const uint8_t* valid, const int64_t* labels, float* loss,
              void* grad, int64_t g_stride, int64_t grad_cols, int64_t n_rows, int64_t vocab,
              const KDParams& p, void* stream) {
  if (n_rows == 0) return;
  Args a{s, s_dtype, s_stride, t, t_dtype, t_stride, valid, labels, loss, grad, g_stride,
         grad_cols, vocab, float(p.temperature), float(p.beta), float(p.scale_s),
         float(p.cap_s), float(p.scale_t), float(p.cap_t), float(p.hard_weight),
         float(p.soft_coef), p.divergence};
  dense_kd_kernel<<<dim3(unsigned(n_rows)), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(a);
  check_launch("dense_kd_kernel");
}

void scale_rows_(void* grad, int dtype, const float* scale, int64_t scale_stride,
                 int64_t n_rows, int64_t n_cols, void* stream) {
  if (n_rows == 0 || n_cols == 0) return;
  const int64_t blocks = (n_cols + 1023) / 1024;
  scale_rows_kernel<<<dim3(unsigned(blocks < 64 ? blocks : 64), unsigned(n_rows)), 256, 0,
                      static_cast<cudaStream_t>(stream)>>>(grad, dtype, scale, scale_stride,
                                                           n_cols);
  check_launch("scale_rows_kernel");
}

}  // namespace distill_ops::cuda
