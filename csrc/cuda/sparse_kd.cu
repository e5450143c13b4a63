// Sparse KD loss on CUDA: one block per row, the k teacher targets and a bitmap of the
// support in shared memory, the student row read twice (statistics, gradient). The maths is
// the CPU kernel's (csrc/cpu/sparse_kd.cpp): a divergence over the coarse classes (the
// support ids, plus "rest" for tail = bucket), whose gradient w.r.t. student logit j is
// q_j (g_c(j) - sum_c q_hat_c g_c). The rest class's student mass is summed over the
// off-support entries themselves (the bitmap says which), never as 1 - support mass.
//
// The student row is streamed with 16-byte loads in groups of 8 (bf16 / fp16) or 4 (fp32)
// logits, one running maximum per group (sparse_math.cuh), the gradient written with 16-byte
// stores; instantiated per student dtype and hard term. The per-class part (O(k) a row)
// keeps its run-time switch on the divergence and tail.
//
// Byte account per student logit: read (statistics), read again and write the gradient: 3
// transfers against the floor of 2 (read, write). The k targets and the bitmap (V / 8 bytes)
// are per row, not per logit. Reaching 2 needs the row on chip across both passes (a cluster
// as dense_kd_sm90.cu does, ~256 KB a bf16 row at V = 128k) or a second read served by L2.
#include <cuda_runtime.h>

#include <cstdint>

#include "common.cuh"
#include "kernels.cuh"
#include "sparse_row.cuh"
#include "vec_io.cuh"

namespace distill_ops::cuda {
namespace {

constexpr int kThreads = 512;

struct SparseArgs {
  const void* s;
  int s_dtype;
  int64_t s_stride;
  const int64_t* indices;
  const float* tlp;
  int64_t k;
  const uint8_t* valid;
  const int64_t* labels;
  float* loss;
  void* grad;
  int64_t vocab;
  float temperature, ratio, beta, hard_weight, soft_coef;
  int divergence, tail;
  float param2, interp;  // AB's beta; TAID t over the classes
};

// log-sum-exp over v[0..n) of shared memory, by the whole block.
__device__ float block_logsumexp(const float* v, int64_t n, float* red) {
  float m = kNegInf;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) m = fmaxf(m, v[i]);
  m = block_reduce(m, MaxFloat{}, kNegInf, red);
  if (m == kNegInf) return m;
  float s = 0.0f;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) s += expf(v[i] - m);
  return m + logf(block_reduce(s, AddFloat{}, 0.0f, red));
}

// The hard-label term of the gradient at T = 1, added to the soft part `gz`.
struct HardTerm {
  bool on, found;
  int64_t label;
  float weight, temperature, m, log_s1;

  __device__ __forceinline__ float finish(float gz, float z, int64_t j) const {
    if (!on) return gz;
    const float sm1 = exp_acc((z - m) * temperature - log_s1);
    gz += weight * (sm1 - (j == label ? 1.0f : 0.0f));
    return found ? gz : NAN;
  }
};

// One row per block, instantiated per student dtype and hard term: the student row is read
// with 16-byte loads in groups of 8 (bf16 / fp16) or 4 (fp32) logits, one running maximum
// per group, the gradient written with 16-byte stores; the row's tail one logit at a time.
template <class TS, bool HARD>
__global__ void __launch_bounds__(kThreads) sparse_kd_kernel(SparseArgs a) {
  constexpr int VEC = 16 / TS::kBytes;
  // Dynamic shared memory: support bitmap (ceil(V / 32) words), then per class (k + 1):
  // teacher and student log-probabilities, q_hat * dL/dq_hat; then the k support ids.
  extern __shared__ __align__(16) unsigned char dyn[];
  __shared__ Online red_online[32];
  __shared__ float red_f[32];
  __shared__ int red_i[32];
  const int64_t words = (a.vocab + 31) / 32;
  uint32_t* bits = reinterpret_cast<uint32_t*>(dyn);
  float* lp = reinterpret_cast<float*>(bits + words);
  float* lq = lp + a.k + 1;
  float* qg = lq + a.k + 1;
  int32_t* sid = reinterpret_cast<int32_t*>(qg + a.k + 1);

  const int64_t row = blockIdx.x;
  const int64_t k = a.k, vocab = a.vocab;
  char* g_row = a.grad == nullptr ? nullptr
                                  : static_cast<char*>(a.grad) + row * vocab * TS::kBytes;
  if (a.valid != nullptr && a.valid[row] == 0) {
    if (g_row != nullptr) zero_range<TS>(g_row, 0, vocab);
    if (threadIdx.x == 0) a.loss[row] = 0.0f;
    return;
  }
  const auto div = static_cast<Divergence>(a.divergence);
  constexpr bool hard = HARD;
  const int64_t label = hard ? a.labels[row] : -1;
  const float inv_t = 1.0f / a.temperature;
  const char* s_row = static_cast<const char*>(a.s) + row * a.s_stride * TS::kBytes;
  // Groups of VEC logits where the row is 16-byte aligned (VEC divides 32: a group's support
  // bits lie in one bitmap word), single logits for the rest.
  const int64_t n_vec =
      (reinterpret_cast<uintptr_t>(s_row) & 15u) == 0 ? vocab - vocab % VEC : 0;

  // The support: ids in [0, V) go to the bitmap; an id >= V makes the row NaN (loud).
  for (int64_t w = threadIdx.x; w < words; w += blockDim.x) bits[w] = 0u;
  __syncthreads();
  int n_sup = 0, bad = 0;
  for (int64_t i = threadIdx.x; i < k; i += blockDim.x) {
    const int64_t id = a.indices[row * k + i];
    const bool ok = id >= 0 && id < vocab;
    bad += id >= vocab;
    sid[i] = ok ? int32_t(id) : -1;
    if (ok) {
      atomicOr(&bits[id >> 5], 1u << (id & 31));
      ++n_sup;
    }
  }
  n_sup = block_reduce(n_sup, AddInt{}, 0, red_i);
  const bool ids_ok = block_reduce(bad, AddInt{}, 0, red_i) == 0;
  // A support that is the whole vocabulary leaves no "rest" (as on the CPU).
  const Tail tail = static_cast<Tail>(a.tail) == Tail::Bucket && n_sup == vocab
                        ? Tail::Renorm
                        : static_cast<Tail>(a.tail);

  // Pass 1 over the student: softmax statistics at T, the off-support mass (cross term with
  // weight 1 off the support), and the T = 1 statistics and z_label of the hard term.
  const SparseStats stats = sparse_row_stats<TS, HARD>(s_row, vocab, bits, inv_t, a.temperature,
                                                       label, red_online, red_f);
  const Online st = stats.st;
  const float log_s = logf(st.a), inv_s = 1.0f / st.a;
  // The rest's sum at the row maximum or, below kRestFloor (its terms near or past fp32's
  // range there: a confident student), two more passes at its own maximum m_rest.
  float s_rest = st.c, m_rest = st.m;
  if (tail == Tail::Bucket && s_rest < kRestFloor) {
    const Online rest = sparse_rest_at_own_max<TS>(s_row, vocab, bits, inv_t, red_f);
    if (rest.m != kNegInf) {
      s_rest = rest.a;
      m_rest = rest.m;
    }
  }

  // Teacher classes, re-tempered by ratio = T_source / T.
  for (int64_t i = threadIdx.x; i < k; i += blockDim.x)
    lp[i] = sid[i] >= 0 ? a.tlp[row * k + i] : kNegInf;
  __syncthreads();
  float rest = kNegInf;
  if (tail == Tail::Bucket) {
    const float covered = block_logsumexp(lp, k, red_f);
    const float r0 = covered < 0.0f ? -expm1f(covered) : 0.0f;
    rest = r0 > 0.0f ? logf(r0) : kNegInf;
  }
  if (threadIdx.x == 0) lp[k] = rest;
  __syncthreads();
  if (!(a.ratio == 1.0f && (tail == Tail::Bucket || tail == Tail::None))) {
    for (int64_t i = threadIdx.x; i <= k; i += blockDim.x) lp[i] *= a.ratio;
    __syncthreads();
    const float norm = block_logsumexp(lp, k + 1, red_f);
    if (norm != kNegInf)
      for (int64_t i = threadIdx.x; i <= k; i += blockDim.x) lp[i] -= norm;
    __syncthreads();
  }

  // Student classes.
  for (int64_t i = threadIdx.x; i < k; i += blockDim.x) {
    const int32_t id = sid[i];
    const float z = id >= 0 ? load_one<TS>(s_row, id) * inv_t : kNegInf;
    lq[i] = tail == Tail::Support ? z : (id >= 0 ? (z - st.m) - log_s : kNegInf);
  }
  if (threadIdx.x == 0)
    lq[k] = tail == Tail::Bucket && s_rest > 0.0f ? ((m_rest - st.m) + logf(s_rest)) - log_s
                                                  : kNegInf;
  __syncthreads();
  if (tail == Tail::Support) {
    const float lse = block_logsumexp(lq, k, red_f);
    for (int64_t i = threadIdx.x; i < k; i += blockDim.x) lq[i] -= lse;
    __syncthreads();
  }

  // The divergence over the classes, and q_hat_c * dL/dq_hat_c per class.
  const int64_t n_cls = tail == Tail::Bucket ? k + 1 : k;
  if (a.interp != 1.0f) {  // TAID over the classes: the target moves from the student
    for (int64_t i = threadIdx.x; i < n_cls; i += blockDim.x)
      lp[i] = taid_logit(lq[i], lp[i], a.interp);
    __syncthreads();
    const float norm = block_logsumexp(lp, n_cls, red_f);
    if (norm != kNegInf)
      for (int64_t i = threadIdx.x; i < n_cls; i += blockDim.x) lp[i] -= norm;
    __syncthreads();
  }
  const float log_b = logf(a.beta), log_1mb = log1pf(-a.beta);
  float akl_w = 0.0f, akl_loss = 0.0f;
  if (div == Divergence::AKL) {
    // The head: the classes with less than the head mass (beta) strictly above them.
    Sum2 kl{0.0f, 0.0f}, gap{0.0f, 0.0f};
    for (int64_t i = threadIdx.x; i < n_cls; i += blockDim.x) {
      const float p = expf(lp[i]), q = expf(lq[i]);
      float above = 0.0f;
      for (int64_t c = 0; c < n_cls; ++c) {
        const float pc = expf(lp[c]);
        above += pc > p ? pc : 0.0f;
      }
      kl.x += xlogratio(p, lp[i], lq[i]);
      kl.y += xlogratio(q, lq[i], lp[i]);
      (above < a.beta || a.beta >= 1.0f ? gap.x : gap.y) += fabsf(p - q);
    }
    kl = block_reduce(kl, AddSum2{}, Sum2{0.0f, 0.0f}, reinterpret_cast<Sum2*>(red_online));
    gap = block_reduce(gap, AddSum2{}, Sum2{0.0f, 0.0f}, reinterpret_cast<Sum2*>(red_online));
    akl_w = akl_head_weight(gap.x, gap.y);
    akl_loss = akl_w * kl.x + (1.0f - akl_w) * kl.y;
  }
  Sum2 acc{0.0f, 0.0f};  // (loss, sum_c q_hat_c g_c)
  for (int64_t i = threadIdx.x; i < n_cls; i += blockDim.x) {
    const float p_l = lp[i], q_l = lq[i];
    const float p = expf(p_l), q = expf(q_l);
    float loss_i = 0.0f, g = 0.0f;
    switch (div) {
      case Divergence::ForwardKL:
        loss_i = xlogratio(p, p_l, q_l);
        g = -p;
        break;
      case Divergence::ReverseKL:
        loss_i = xlogratio(q, q_l, p_l);
        g = q > 0.0f ? q * (q_l - p_l + 1.0f) : 0.0f;
        break;
      case Divergence::JSD: {
        const float lm = jsd_log_mixture(p_l, q_l, log_b, log_1mb);
        const float kq = xlogratio(q, q_l, lm);
        loss_i = a.beta * xlogratio(p, p_l, lm) + (1.0f - a.beta) * kq;
        g = (1.0f - a.beta) * kq;
        break;
      }
      case Divergence::SkewKL:
        loss_i = skew_kl_term(p_l, q_l, p, a.beta, log_b, log_1mb, g);
        break;
      case Divergence::SkewReverseKL:
        loss_i = skew_reverse_kl_term(p_l, q_l, q, a.beta, log_b, log_1mb, g);
        break;
      case Divergence::AB:
        loss_i = ab_loss(p_l, q_l, a.beta, a.param2);
        g = ab_dlogq(p_l, q_l, a.beta, a.param2);
        break;
      case Divergence::AKL:  // the loss was summed above
        g = -akl_w * p + (1.0f - akl_w) * (q > 0.0f ? q * (q_l - p_l + 1.0f) : 0.0f);
        break;
      default:
        loss_i = 0.5f * fabsf(q - p);
        g = q * tvd_sign(q, p);
    }
    qg[i] = g;
    acc.x += loss_i;
    acc.y += g;
  }
  acc = block_reduce(acc, AddSum2{}, Sum2{0.0f, 0.0f}, reinterpret_cast<Sum2*>(red_online));
  const float sum_qg = acc.y;
  if (div == Divergence::AKL) acc.x = akl_loss;

  float row_loss = a.soft_coef * (ids_ok ? acc.x : NAN);
  float log_s1 = 0.0f;
  bool found = true;
  if (hard) {
    const float z_label = stats.z_label;
    log_s1 = logf(stats.one.a);
    found = label >= 0 && label < vocab;
    row_loss += a.hard_weight * (found ? (st.m - z_label) * a.temperature + log_s1 : NAN);
  }
  if (threadIdx.x == 0) a.loss[row] = row_loss;
  if (g_row == nullptr) return;

  // Gradient. Off the support: dL/dz_j = q_j (g_rest / q_rest - sum_qg) for bucket,
  // -q_j sum_qg for renorm / none, 0 for support, with q_j = e_j / s, q_j / q_rest =
  // e_j / s_rest, e_j = exp(z_j - m_rest) (m_rest = st.m but for a rest summed at its own
  // maximum). On the support (second loop): the class's own gradient.
  const float coef = a.soft_coef * inv_t;
  float off = tail == Tail::Support ? 0.0f : -sum_qg * inv_s;
  if (tail == Tail::Bucket && s_rest > 0.0f) off = off * expf(m_rest - st.m) + qg[k] / s_rest;
  const HardTerm ht{hard, found, label, a.hard_weight, a.temperature, st.m, log_s1};
  // Every id first as off the support (16-byte stores of whole groups), then, after a
  // barrier, each support id's own gradient over it.
  const float off_coef = ids_ok ? off * coef : NAN;
  const float base = st.m == kNegInf ? 0.0f : m_rest;
  const int64_t g_vec = (reinterpret_cast<uintptr_t>(g_row) & 15u) == 0 ? n_vec : 0;
  for (int64_t j0 = int64_t(threadIdx.x) * VEC; j0 < g_vec; j0 += int64_t(blockDim.x) * VEC) {
    float x[VEC], g[VEC];
    load_group<TS, VEC>(s_row + j0 * TS::kBytes, x);
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      const float e = fast_exp2(fmaf(x[i], inv_t, -base) * kLog2E);
      g[i] = HARD ? ht.finish(e * off_coef, x[i] * inv_t, j0 + i) : e * off_coef;
    }
    store_group<TS, VEC>(g_row + j0 * TS::kBytes, g);
  }
  for (int64_t j = g_vec + threadIdx.x; j < vocab; j += blockDim.x) {
    const float x = load_one<TS>(s_row, j);
    const float e = fast_exp2(fmaf(x, inv_t, -base) * kLog2E);
    store_one<TS>(g_row, j, HARD ? ht.finish(e * off_coef, x * inv_t, j) : e * off_coef);
  }
  __syncthreads();  // the support's stores below land after the off-support ones
  for (int64_t i = threadIdx.x; i < k; i += blockDim.x) {
    const int32_t id = sid[i];
    if (id < 0) continue;
    const float z = load_one<TS>(s_row, id) * inv_t;
    store_one<TS>(g_row, id,
                  ht.finish(ids_ok ? (qg[i] - expf(lq[i]) * sum_qg) * coef : NAN, z, id));
  }
}

}  // namespace

void sparse_kd(const void* s, int s_dtype, int64_t s_stride, const int64_t* indices,
               const float* teacher_logprobs, int64_t k, const uint8_t* valid,
               const int64_t* labels, float* loss, void* grad, int64_t n_rows, int64_t vocab,
               const SparseParams& p, void* stream) {
  if (n_rows == 0) return;
  if (n_rows >= (int64_t(1) << 31)) throw std::runtime_error("distill_ops: too many rows");
  const int64_t smem = (vocab + 31) / 32 * 4 + (k + 1) * 3 * 4 + k * 4;
  const int optin = device_info().smem_optin;
  if (smem + 1024 > optin) {
    throw std::runtime_error(
        "distill_ops: the CUDA sparse kernel keeps a bitmap of the vocabulary and the k "
        "targets in shared memory (" + std::to_string(smem) + " bytes here, the device allows " +
        std::to_string(optin) + "): use backend='triton' for this size");
  }

  SparseArgs a{s, s_dtype, s_stride, indices, teacher_logprobs, k, valid, labels, loss, grad,
               vocab, float(p.temperature), float(p.source_temperature / p.temperature),
               float(p.beta), float(p.hard_weight), float(p.soft_coef), p.divergence, p.tail,
               float(p.param2), float(p.interp)};
  with_dtype(s_dtype, [&](auto ts) {
    using TS = decltype(ts);
    auto kernel = a.hard_weight != 0.0f ? sparse_kd_kernel<TS, true> : sparse_kd_kernel<TS, false>;
    if (smem > 48 * 1024) {
      check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      int(smem)),
                 "cudaFuncSetAttribute(dynamic shared memory)");
    }
    kernel<<<dim3(unsigned(n_rows)), kThreads, size_t(smem), static_cast<cudaStream_t>(stream)>>>(a);
  });
  check_launch("sparse_kd_kernel");
}

}  // namespace distill_ops::cuda
