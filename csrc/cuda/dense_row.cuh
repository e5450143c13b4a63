// The per-row maths of the dense KD kernels (portable and sm_90 cluster), so that both
// compute the same statistics, loss and gradient from the same formulas.
#pragma once

#include "common.cuh"

namespace distill_ops::cuda {

struct DenseArgs {
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
  float param2;  // AB's beta (beta holds the divergence's first parameter)
  float interp;  // TAID t (1: the plain teacher)
};

// The research divergences that sum one element-separable term and h = dL/dlog q.
__device__ __forceinline__ bool is_separable_research(int divergence) {
  const auto div = static_cast<Divergence>(divergence);
  return div == Divergence::SkewKL || div == Divergence::SkewReverseKL || div == Divergence::AB;
}

// What one pass over a (part of a) row accumulates: student / teacher statistics with the
// KL's centred cross term (OnlineKL, kd_math.h: the host tests run the same code), T = 1
// statistics, and the student's z at the label (0 where the label is elsewhere).
struct DensePartial {
  OnlineKL<float> kl;
  Online one;
  float z_label;
};

__device__ __forceinline__ DensePartial dense_partial_empty() {
  return {online_kl_empty<float>(), online_empty(), 0.0f};
}

// OnlineKLMode of a divergence: the KLs carry a cross term, JSD / TVD only the statistics.
__device__ __forceinline__ int kl_mode(int divergence) {
  const auto div = static_cast<Divergence>(divergence);
  return div == Divergence::ForwardKL   ? OnlineKLMode::kForward
         : div == Divergence::ReverseKL ? OnlineKLMode::kReverse
                                        : OnlineKLMode::kNone;
}

struct MergePartial {
  int mode;
  __device__ DensePartial operator()(DensePartial x, DensePartial y) const {
    return {online_kl_merge(x.kl, y.kl, mode), merge(x.one, y.one), x.z_label + y.z_label};
  }
};

__device__ __forceinline__ float dense_zs(const DenseArgs& a, float x) {
  return transform_logit(x, a.scale_s, a.cap_s, 1.0f / a.temperature);
}
__device__ __forceinline__ float dense_zt(const DenseArgs& a, float x) {
  return transform_logit(x, a.scale_t, a.cap_t, 1.0f / a.temperature);
}

// Accumulates element j (z_s, z_t) into a partial.
__device__ __forceinline__ void dense_push(DensePartial& st, const DenseArgs& a, float zs,
                                           float zt, int64_t j, int64_t label) {
  zt = taid_logit(zs, zt, a.interp);
  st.kl = online_kl_push(st.kl, zs, zt, kl_mode(a.divergence));
  if (a.hard_weight != 0.0f) {
    st.one = push(st.one, zs == kNegInf ? zs : zs * a.temperature, 0.0f);
    if (j == label) st.z_label = zs;
  }
}

// Row statistics once the partials are merged (and, for JSD / TVD, the second sums).
struct DenseRow {
  float ms, log_ss, mt, log_st;  // student / teacher max and log-sum
  float dv;                      // the divergence
  float sum_qg;                  // sum_j q_j g_j of the JSD / TVD gradient (sum h, AKL: RKL)
  float akl_w;                   // AKL's forward-KL weight
  float log_s1;                  // log-sum at T = 1 (hard term)
  float log_b, log_1mb;
  bool found;                    // the label lies in [0, V)
};

__device__ __forceinline__ DenseRow dense_row(const DenseArgs& a, const DensePartial& st) {
  DenseRow r;
  r.ms = st.kl.ms;
  r.mt = st.kl.mt;
  r.log_ss = logf(st.kl.as);
  r.log_st = logf(st.kl.at);
  r.log_b = logf(a.beta);
  r.log_1mb = log1pf(-a.beta);
  r.log_s1 = logf(st.one.a);
  r.dv = 0.0f;
  r.sum_qg = 0.0f;
  r.akl_w = 0.0f;
  r.found = true;
  const int mode = kl_mode(a.divergence);
  if (mode != OnlineKLMode::kNone) r.dv = online_kl_value(st.kl, mode);
  return r;
}

// Skew KL, skew reverse KL (skew = beta; log_b, log_1mb its logs) or AB (beta, param2): the
// element's loss term, h = dL/dlog q through `h`.
__device__ __forceinline__ float research_term(const DenseArgs& a, const DenseRow& r, float lp,
                                               float lq, float p, float q, float& h) {
  switch (static_cast<Divergence>(a.divergence)) {
    case Divergence::SkewKL: return skew_kl_term(lp, lq, p, a.beta, r.log_b, r.log_1mb, h);
    case Divergence::SkewReverseKL: {
      const float term = skew_reverse_kl_term(lp, lq, q, a.beta, r.log_b, r.log_1mb, h);
      h -= q;  // its "+ q" centres to 0 (q sums to one): dropped, less to cancel
      return term;
    }
    default:
      h = ab_dlogq(lp, lq, a.beta, a.param2);
      return ab_loss(lp, lq, a.beta, a.param2);
  }
}

// The second sums of JSD (beta KL(p||m), (1 - beta) KL(q||m) halves) and TVD (|q - p|,
// q sign(q - p)) for one element.
__device__ __forceinline__ void dense_push_second(Sum2& acc, const DenseArgs& a,
                                                  const DenseRow& r, float zs, float zt) {
  zt = taid_logit(zs, zt, a.interp);
  const float lq = (zs - r.ms) - r.log_ss, lp = (zt - r.mt) - r.log_st;
  const float q = expf(lq), p = expf(lp);
  if (is_separable_research(a.divergence)) {
    float h;
    acc.x += research_term(a, r, lp, lq, p, q, h);
    acc.y += h;
  } else if (static_cast<Divergence>(a.divergence) == Divergence::JSD) {
    const float lm = jsd_log_mixture(lp, lq, r.log_b, r.log_1mb);
    acc.x += xlogratio(p, lp, lm);
    acc.y += xlogratio(q, lq, lm);
  } else {
    acc.x += fabsf(q - p);
    acc.y += q * tvd_sign(q, p);
  }
}

__device__ __forceinline__ void dense_finish_second(DenseRow& r, const DenseArgs& a, Sum2 acc) {
  if (is_separable_research(a.divergence)) {
    r.dv = acc.x;
    r.sum_qg = acc.y;
  } else if (static_cast<Divergence>(a.divergence) == Divergence::JSD) {
    r.dv = a.beta * acc.x + (1.0f - a.beta) * acc.y;
    r.sum_qg = (1.0f - a.beta) * acc.y;
  } else {
    r.dv = 0.5f * acc.x;
    r.sum_qg = acc.y;
  }
}

__device__ __forceinline__ bool dense_needs_second(const DenseArgs& a) {
  const auto div = static_cast<Divergence>(a.divergence);
  return div == Divergence::JSD || div == Divergence::TVD || is_separable_research(a.divergence);
}

// AKL's pieces of one element at threshold tau: (forward KL, reverse KL) and (|p - q| in the
// head, in the tail).
__device__ __forceinline__ void akl_push(Sum2& kl, Sum2& gap, const DenseArgs& a,
                                         const DenseRow& r, float tau, float zs, float zt) {
  zt = taid_logit(zs, zt, a.interp);
  const float lq = (zs - r.ms) - r.log_ss, lp = (zt - r.mt) - r.log_st;
  const float q = expf(lq), p = expf(lp);
  kl.x += xlogratio(p, lp, lq);
  kl.y += xlogratio(q, lq, lp);
  (p >= tau ? gap.x : gap.y) += fabsf(p - q);
}

// The teacher's probability of an element (AKL's threshold search).
__device__ __forceinline__ float dense_p(const DenseArgs& a, const DenseRow& r, float zs,
                                         float zt) {
  return expf((taid_logit(zs, zt, a.interp) - r.mt) - r.log_st);
}

// The row's loss (soft term, plus the hard term when asked).
__device__ __forceinline__ float dense_loss(const DenseArgs& a, DenseRow& r, float z_label,
                                            int64_t label) {
  float loss = a.soft_coef * r.dv;
  // A NaN or +inf logit makes its side's sum NaN: the row's loss is NaN whatever the
  // divergence's 0 * log 0 guards would hide (the op layer then makes its gradient NaN).
  if (isnan(r.log_ss) || isnan(r.log_st)) loss = NAN;
  if (a.hard_weight != 0.0f) {
    r.found = label >= 0 && label < a.vocab;
    loss += a.hard_weight * (r.found ? (r.ms - z_label) * a.temperature + r.log_s1 : NAN);
  }
  return loss;
}

// d loss / d x_j of the student logit j.
__device__ __forceinline__ float dense_grad(const DenseArgs& a, const DenseRow& r, float zs,
                                            float zt, int64_t j, int64_t label) {
  zt = taid_logit(zs, zt, a.interp);
  const float lq = (zs - r.ms) - r.log_ss, lp = (zt - r.mt) - r.log_st;
  const float q = expf(lq), p = expf(lp);
  float d;
  switch (static_cast<Divergence>(a.divergence)) {
    case Divergence::SkewKL:
    case Divergence::SkewReverseKL:
    case Divergence::AB: {
      float h;
      research_term(a, r, lp, lq, p, q, h);
      d = h - q * r.sum_qg;
      break;
    }
    case Divergence::AKL:
      d = r.akl_w * (q - p) +
          (1.0f - r.akl_w) * (q > 0.0f ? q * ((lq - lp) - r.sum_qg) : 0.0f);
      break;
    case Divergence::ForwardKL: d = q - p; break;
    case Divergence::ReverseKL: d = q > 0.0f ? q * ((lq - lp) - r.dv) : 0.0f; break;
    case Divergence::JSD: {
      const float lm = jsd_log_mixture(lp, lq, r.log_b, r.log_1mb);
      d = q * ((q > 0.0f ? (1.0f - a.beta) * (lq - lm) : 0.0f) - r.sum_qg);
      break;
    }
    default: d = q * (tvd_sign(q, p) - r.sum_qg);
  }
  float gz = a.soft_coef / a.temperature * d;
  if (a.hard_weight != 0.0f) {
    const float sm1 = expf((zs - r.ms) * a.temperature - r.log_s1);
    gz += a.hard_weight * (sm1 - (j == label ? 1.0f : 0.0f));
    if (!r.found) gz = NAN;
  }
  return gz * transform_grad(zs, a.scale_s, a.cap_s, a.temperature);
}

}  // namespace distill_ops::cuda

namespace distill_ops::cuda {

// Launches the sm_90 cluster kernel (dense_kd_sm90.cu) when the device and the row size allow
// it; returns false when it does not apply (an error instead when `required`).
bool dense_kd_cluster(const DenseArgs& a, int64_t n_rows, bool required, void* stream);

}  // namespace distill_ops::cuda
