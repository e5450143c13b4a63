// The per-row maths of the dense KD kernels (portable and sm_90 cluster), so that both
// compute the same statistics, loss and gradient from the same formulas. Everything is
// templated on the divergence (no run-time switch per logit) and works on groups of logits
// that one thread loaded with 16-byte loads (dense_row.cuh walks the rows).
//
// Pass 1 keeps, per thread, one running maximum per side for each group: the group's
// maximum moves the state once, then each logit costs one ex2 a side (exp(x) is
// ex2(x log2 e), kd_math.h fast_exp2), where a per-logit running maximum costs two. The
// logits stay in natural units, so z - max is exact near the maximum and the fp32 error is
// PyTorch's even at logits of 1e4.
//
// The file compiles as host C++ too (tests/cpp/dense_math_check.cpp drives it in the
// kernels' order against the float64 reference: tests/test_cuda_math_host.py).
#pragma once

#include <cmath>
#include <cstdint>
#include <type_traits>

#include "distill_ops/kd_math.h"
#include "scalars.cuh"

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
  // AB's one-series form (set_ab_series): whether the loss pass takes it, w = b / (a + b),
  // its series' coefficients. Kernel parameters live in the constant bank: the series'
  // FMAs read them there, no registers.
  bool ab_one_series;
  float ab_w;
  float ab_c[ABFast<float>::kLast + 1];
};

// Fills DenseArgs' AB fields from beta and param2 (host side, at launch).
inline void set_ab_series(DenseArgs& a) {
  a.ab_one_series = a.divergence == int(Divergence::AB) && ab_fast(a.beta, a.param2);
  if (!a.ab_one_series) return;
  const ABFast<float> k = ab_fast_consts(a.beta, a.param2);
  a.ab_w = k.w;
  for (int n = 0; n <= ABFast<float>::kLast; ++n) a.ab_c[n] = k.c[n];
}

// JSD's and the skew KLs' mixture is floored at 2^-100 before its log: a term below it
// weighs < 1e-28 (as the Triton kernels).
constexpr float kMixFloor = 7.888609052210118e-31f;

// What a divergence needs, at compile time.
template <int DIV>
struct DivTraits {
  static constexpr Divergence kDiv = static_cast<Divergence>(DIV);
  static constexpr int kMode = kDiv == Divergence::ForwardKL   ? OnlineKLMode::kForward
                               : kDiv == Divergence::ReverseKL ? OnlineKLMode::kReverse
                                                               : OnlineKLMode::kNone;
  static constexpr bool kResearch = kDiv == Divergence::SkewKL ||
                                    kDiv == Divergence::SkewReverseKL ||
                                    kDiv == Divergence::AB;
  static constexpr bool kSecond = kResearch || kDiv == Divergence::JSD ||
                                  kDiv == Divergence::TVD;
};

// A plain row (no softcap, no TAID, no hard term) takes the short path; any of them, the
// general one (GENERAL below).
DOPS_HD bool dense_is_general(const DenseArgs& a) {
  return a.cap_s > 0.0f || a.cap_t > 0.0f || a.interp != 1.0f || a.hard_weight != 0.0f;
}

// What one pass over a (part of a) row accumulates: student / teacher statistics with the
// KL's centred cross term (OnlineKL, kd_math.h: the host tests run the same code), the
// student's sum at T = 1 relative to its maximum times T, and its z at the label (0 where
// the label is elsewhere).
struct DensePartial {
  OnlineKL<float> kl;
  float a1;
  float z_label;
};

DOPS_DEV DensePartial dense_partial_empty() {
  return {online_kl_empty<float>(), 0.0f, 0.0f};
}

// exp((m_old - m_new) k) for m_new >= m_old: 1 where equal, 0 from an empty state.
DOPS_DEV float rescale_k(float m_old, float m_new, float k) {
  if (m_new == m_old) return 1.0f;
  return m_old == kNegInf ? 0.0f : fast_exp2((m_old - m_new) * k);
}

template <int MODE>
struct MergePartial {
  float t_log2e;  // T log2(e): the T = 1 sums' rescaling
  DOPS_DEV DensePartial operator()(DensePartial x, DensePartial y) const {
    const float ms = fmaxf(x.kl.ms, y.kl.ms);
    const float a1 = x.a1 * rescale_k(x.kl.ms, ms, t_log2e) + y.a1 * rescale_k(y.kl.ms, ms, t_log2e);
    return {online_kl_merge(x.kl, y.kl, MODE), a1, x.z_label + y.z_label};
  }
};

// The general path's z = f(x) / T of a group in place, the teacher's moved toward the
// student's under TAID. The plain path keeps the raw logits: its z - m is one FMA,
// fma(x, k, -m) with k = scale / T > 0 (rounded once, where z = x k then z - m round twice);
// the general path runs the same code with k = 1 (dense_scales).
template <bool GENERAL, int VEC>
DOPS_DEV void dense_transform(const DenseArgs& a, float (&zs)[VEC],
                                                float (&zt)[VEC]) {
  if constexpr (GENERAL) {
    const float inv_t = 1.0f / a.temperature;
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      zs[i] = transform_logit(zs[i], a.scale_s, a.cap_s, inv_t);
      zt[i] = taid_logit(zs[i], transform_logit(zt[i], a.scale_t, a.cap_t, inv_t), a.interp);
    }
  }
}

// (k_s, k_t): the factors from what the walks hold to z (1 on the general path).
struct Scales {
  float s, t;
};

template <bool GENERAL>
DOPS_DEV Scales dense_scales(const DenseArgs& a) {
  if constexpr (GENERAL) return {1.0f, 1.0f};
  return {a.scale_s / a.temperature, a.scale_t / a.temperature};
}

// A thread's partial starts at finite maxima (-FLT_MAX: exp of the first move is 0, and
// m_new - m_old never meets -inf - -inf), so a group's push needs no guards; partials are
// closed (dense_partial_close) to OnlineKL's -inf empty state before any merge.
DOPS_DEV DensePartial dense_partial_start() {
  return {{-kFltMax, 0.0f, -kFltMax, 0.0f, 0.0f}, 0.0f, 0.0f};
}

DOPS_DEV DensePartial dense_partial_close(DensePartial st) {
  // A maximum still at -FLT_MAX saw only masked logits: its sum is 0.
  if (st.kl.ms == -kFltMax) st.kl.ms = kNegInf;
  if (st.kl.mt == -kFltMax) st.kl.mt = kNegInf;
  return st;
}

// The centred cross term moved to new maxima (kd_math.h cross_shift, for finite maxima): an
// infinite c stays infinite; f_w = 0 or a_w = 0 leave 0.
DOPS_DEV float group_cross_shift(float c, float a_w, float f_w, float d_w,
                                                   float d_o) {
  const float shifted = fmaf(a_w, d_o - d_w, c) * f_w;
  return c == INFINITY ? c : shifted;
}

// Accumulates a group of VEC logits (columns j0..j0+VEC-1) into a thread's partial
// (dense_partial_start): the group's maxima move the state once; each logit then costs one
// ex2 a side and, for the KLs, its centred cross term (kd_math.h OnlineKL, whose merge this
// is).
template <int MODE, bool GENERAL, int VEC>
DOPS_DEV void dense_push_group(DensePartial& st, const DenseArgs& a, Scales k,
                                                 const float (&zs)[VEC],
                                                 const float (&zt)[VEC], int64_t j0,
                                                 int64_t label) {
  float gs = zs[0], gt = zt[0];
#pragma unroll
  for (int i = 1; i < VEC; ++i) {
    gs = fmaxf(gs, zs[i]);
    gt = fmaxf(gt, zt[i]);
  }
  const OnlineKL<float> old = st.kl;
  const float ms = fmaxf(old.ms, gs * k.s), mt = fmaxf(old.mt, gt * k.t);
  float sum_s = 0.0f, sum_t = 0.0f, cross = 0.0f, sum_1 = 0.0f;
  const float t_log2e = a.temperature * kLog2E;
#pragma unroll
  for (int i = 0; i < VEC; ++i) {
    const float us = fmaf(zs[i], k.s, -ms), ut = fmaf(zt[i], k.t, -mt);
    const float es = fast_exp2(us * kLog2E), et = fast_exp2(ut * kLog2E);
    sum_s += es;
    sum_t += et;
    // e_w ((z_w - m_w) - (z_o - m_o)); +inf where the other side is masked (infinite KL),
    // 0 where e_w is (the difference is selected, not the product: one FMA).
    if constexpr (MODE == OnlineKLMode::kForward) cross = fmaf(et, et > 0.0f ? ut - us : 0.0f, cross);
    if constexpr (MODE == OnlineKLMode::kReverse) cross = fmaf(es, es > 0.0f ? us - ut : 0.0f, cross);
    if constexpr (GENERAL) {
      if (a.hard_weight != 0.0f) {
        sum_1 += fast_exp2(us * t_log2e);
        if (j0 + i == label) st.z_label = zs[i];
      }
    }
  }
  const float fs = fast_exp2((old.ms - ms) * kLog2E), ft = fast_exp2((old.mt - mt) * kLog2E);
  float c = 0.0f;
  if constexpr (MODE == OnlineKLMode::kForward) {
    c = group_cross_shift(old.c, old.at, ft, mt - old.mt, ms - old.ms) + cross;
  } else if constexpr (MODE == OnlineKLMode::kReverse) {
    c = group_cross_shift(old.c, old.as, fs, ms - old.ms, mt - old.mt) + cross;
  }
  if constexpr (GENERAL) {
    if (a.hard_weight != 0.0f) st.a1 = fmaf(st.a1, fast_exp2((old.ms - ms) * t_log2e), sum_1);
  }
  st.kl = {ms, fmaf(old.as, fs, sum_s), mt, fmaf(old.at, ft, sum_t), c};
}

// The alpha-beta divergence's constants, once per launch (no reciprocal per logit).
struct ABConsts {
  float a, b, s, inv_a, c, inv_ab, inv_as, inv_bs;
  bool around_p;  // the expansion runs around p's side (b <= a)
};

DOPS_DEV ABConsts ab_consts(float a, float b) {
  const float s = a + b;
  const bool around_p = b <= a;
  return {a, b, s, 1.0f / a, (around_p ? b : a) / s, 1.0f / (a * b), 1.0f / (a * s),
          1.0f / (b * s), around_p};
}

// Row statistics once the partials are merged (and, for the second-pass divergences, the
// second sums).
struct DenseRow {
  float ms, log_ss, mt, log_st;  // student / teacher max and log-sum
  float dv;                      // the divergence
  float sum_qg;                  // sum_j q_j g_j of the gradient (sum h; AKL: reverse KL)
  float akl_w;                   // AKL's forward-KL weight
  float log_s1;                  // log-sum at T = 1 (hard term), relative to ms T
  bool found;                    // the label lies in [0, V)
  ABConsts ab;                   // AB's constants (AB only)
};

template <int DIV>
DOPS_DEV DenseRow dense_row(const DenseArgs& a, const DensePartial& st) {
  DenseRow r;
  r.ms = st.kl.ms;
  r.mt = st.kl.mt;
  r.log_ss = logf(st.kl.as);
  r.log_st = logf(st.kl.at);
  r.log_s1 = logf(st.a1);
  r.dv = 0.0f;
  r.sum_qg = 0.0f;
  r.akl_w = 0.0f;
  r.found = true;
  constexpr int kMode = DivTraits<DIV>::kMode;
  if constexpr (kMode != OnlineKLMode::kNone) r.dv = online_kl_value(st.kl, kMode);
  if constexpr (static_cast<Divergence>(DIV) == Divergence::AB) r.ab = ab_consts(a.beta, a.param2);
  return r;
}

// log m for the floored mixture m = w_a x_a + (1 - w_a) x_b, as one lg2.
DOPS_DEV float log_mixture(float xa, float xb, float wa) {
  return kLn2 * fast_log2(fmaxf(wa * xa + (1.0f - wa) * xb, kMixFloor));
}

// (e^x - 1) / x for |x| < 1/2 to x^7 (truncation < 1e-8 relative: fp32's; kd_math.h's
// exprel_small goes to x^8 for the CPU's float and double paths alike).
DOPS_DEV float exprel_to_x7(float x) {
  float acc = 1.0f / 40320.0f;
  acc = fmaf(acc, x, 1.0f / 5040.0f);
  acc = fmaf(acc, x, 1.0f / 720.0f);
  acc = fmaf(acc, x, 1.0f / 120.0f);
  acc = fmaf(acc, x, 1.0f / 24.0f);
  acc = fmaf(acc, x, 1.0f / 6.0f);
  acc = fmaf(acc, x, 0.5f);
  return fmaf(acc, x, 1.0f);
}

// Pins v as computed here: the compiler may not sink its computation into one arm of a later
// select turned branch (a branch costs its BSSY/BSYNC bookkeeping per element, both arms
// issue when a warp diverges). An empty asm on the GPU, nothing on the host.
DOPS_DEV void keep_computed(float& v) {
#if defined(__CUDA_ARCH__)
  asm("" : "+f"(v));
#else
  (void)v;
#endif
}

// The alpha-beta divergence's element (kd_math.h ab_loss, when WANT_LOSS) and h = dL/dlog q
// (ab_dlogq), from three exponentials shared by both: U = p^s, W = q^s, G = p^a q^b
// (s = a + b; the gradient pass needs only W and G).
template <bool WANT_LOSS>
DOPS_DEV float ab_terms(float lp, float lq, const ABConsts& k, float& h) {
  const bool pinf = lp == kNegInf, qinf = lq == kNegInf;
  const float lp0 = pinf ? 0.0f : lp, lq0 = qinf ? 0.0f : lq;
  const float w = fast_exp2((k.s * kLog2E) * lq0);
  const float g = fast_exp2(fmaf(k.a, lp0, k.b * lq0) * kLog2E);
  // h = p^a q^b expm1(a d) / a, d = log q - log p: its series where |a d| < 1/2.
  const float d = lq0 - lp0, x = k.a * d;
  // Branch-free: both forms computed, then selected (a branch around a series costs its
  // BSSY/BSYNC bookkeeping on every element, taken or not).
  const bool small_x = fabsf(x) < 0.5f;
  float series = exprel_to_x7(small_x ? x : 0.0f);
  keep_computed(series);
  h = small_x ? g * d * series : (w - g) * k.inv_a;
  h = qinf ? 0.0f : (pinf ? w * k.inv_a : h);
  if constexpr (!WANT_LOSS) {
    return 0.0f;
  } else {
    // Around the side of the smaller weight c = min(a, b) / s: u its p^s (or q^s), v the
    // other's, r = s log(v / u); A - G = c u phi(r) - u phi(c r), phi(y) = e^y - 1 - y.
    const float up = fast_exp2((k.s * kLog2E) * lp0);
    const float u = k.around_p ? up : w, v = k.around_p ? w : up;
    const float r = k.s * (k.around_p ? d : -d), cr = k.c * r;
    const bool small_r = fabsf(r) < 0.5f, small_cr = fabsf(cr) < 0.5f;
    const float rs = small_r ? r : 0.0f, crs = small_cr ? cr : 0.0f;
    float phi_r = phi_small_over_x2(rs), phi_cr = phi_small_over_x2(crs);
    keep_computed(phi_r);
    keep_computed(phi_cr);
    const float u_phi_r = small_r ? u * rs * rs * phi_r : v - u - u * r;
    const float u_phi_cr = small_cr ? u * crs * crs * phi_cr : g - u - u * cr;
    const float amg = ((r < 0.0f) & (cr <= -1.0f)) ? (1.0f - k.c) * u + k.c * v - g
                                                    : k.c * u_phi_r - u_phi_cr;
    const float edge = qinf ? 0.0f : w * k.inv_as;
    return pinf ? edge : (qinf ? up * k.inv_bs : amg * k.inv_ab);
  }
}

// AB's one-series element for the parameters ab_fast admits (kd_math.h ab_fast_loss's maths,
// as the Triton kernel's ab_fast_terms lays it out, its coefficients in DenseArgs): (a b
// times the element, a h), which dense_finish_second scales once a row; log2(e) folded
// into the scalars, -inf by IEEE arithmetic (ex2.approx(-inf) = 0: the one-sided limits;
// r and a d are then +-inf or NaN, which take the direct forms), both series computed and
// pinned, as in ab_terms.
DOPS_DEV Sum2 ab_one_series_terms(float lp, float lq, const DenseArgs& a, const ABConsts& k) {
  const float d = lq - lp, sl = k.s * kLog2E, w = a.ab_w;
  const float up = fast_exp2(lp * sl), wq = fast_exp2(lq * sl);
  const float g = fast_exp2(fmaf(lp, k.a * kLog2E, lq * (k.b * kLog2E)));
  const float x = k.a * d, r = k.s * d;
  float series = exprel_to_x7(x);
  constexpr int kLast = ABFast<float>::kLast;
  float poly = a.ab_c[kLast];
#pragma unroll
  for (int n = kLast - 1; n >= 0; --n) poly = fmaf(poly, r, a.ab_c[n]);
  keep_computed(series);
  keep_computed(poly);
  const float ah = fabsf(x) < 0.5f ? (g * x) * series : wq - g;
  const float f = fabsf(r) < 0.5f ? (up * (r * r)) * poly : fmaf(1.0f - w, up, fmaf(w, wq, -g));
  return Sum2{f, ah};
}

// The element-separable research divergences: the loss term (when WANT_LOSS) and h = dL/dlog q.
// Skew KL: KL(p || m), m = skew p + (1 - skew) q, h = -(1 - skew) p q / m. Skew reverse KL:
// KL(q || m), m = skew q + (1 - skew) p, h = q (log q - log m) - skew q^2 / m (its "+ q"
// centres away: q sums to one). AB: kd_math.h ab_loss / ab_dlogq.
template <int DIV, bool WANT_LOSS>
DOPS_DEV float research_term(const DenseArgs& a, const DenseRow& r, float lp,
                                               float lq, float p, float q, float& h) {
  constexpr Divergence kDiv = static_cast<Divergence>(DIV);
  const float skew = a.beta;
  if constexpr (kDiv == Divergence::SkewKL) {
    const float m = fmaxf(skew * p + (1.0f - skew) * q, kMixFloor);
    h = -(1.0f - skew) * p * __fdividef(q, m);
    if constexpr (WANT_LOSS) return p > 0.0f ? p * (lp - kLn2 * fast_log2(m)) : 0.0f;
    return 0.0f;
  } else if constexpr (kDiv == Divergence::SkewReverseKL) {
    const float m = fmaxf(skew * q + (1.0f - skew) * p, kMixFloor);
    const float kq = q > 0.0f ? q * (lq - kLn2 * fast_log2(m)) : 0.0f;
    h = kq - skew * q * __fdividef(q, m);
    return kq;
  } else {
    return ab_terms<WANT_LOSS>(lp, lq, r.ab, h);
  }
}

// Sum2 of the second pass for one element: research (term, h), JSD (beta KL(p||m),
// (1 - beta) KL(q||m) halves), TVD (|q - p|, q sign(q - p)).
template <int DIV, bool AB_ONE_SERIES = false>
DOPS_DEV void dense_push_second(Sum2& acc, const DenseArgs& a,
                                                  const DenseRow& r, Scales k, float zs,
                                                  float zt) {
  constexpr Divergence kDiv = static_cast<Divergence>(DIV);
  const float lq = fmaf(zs, k.s, -r.ms) - r.log_ss, lp = fmaf(zt, k.t, -r.mt) - r.log_st;
  if constexpr (kDiv == Divergence::AB) {  // its own exponentials: neither p nor q
    if constexpr (AB_ONE_SERIES) {  // a b times the element and a h: scaled once a row
      const Sum2 t = ab_one_series_terms(lp, lq, a, r.ab);
      acc.x += t.x;
      acc.y += t.y;
    } else {
      float h;
      acc.x += ab_terms<true>(lp, lq, r.ab, h);
      acc.y += h;
    }
    return;
  }
  const float q = fast_exp2(lq * kLog2E), p = fast_exp2(lp * kLog2E);
  if constexpr (DivTraits<DIV>::kResearch) {
    float h;
    acc.x += research_term<DIV, true>(a, r, lp, lq, p, q, h);
    acc.y += h;
  } else if constexpr (kDiv == Divergence::JSD) {
    const float lm = log_mixture(p, q, a.beta);
    acc.x += xlogratio(p, lp, lm);
    acc.y += xlogratio(q, lq, lm);
  } else {
    acc.x += fabsf(q - p);
    acc.y += q * tvd_sign(q, p);
  }
}

// The second pass's sums over the row through `walk` (the kernel's row walker): AB takes its
// one-series form where ab_fast admits its parameters, as a second instantiation of the loop
// (the branch is the row's, outside it).
template <int DIV, class Walk>
DOPS_DEV Sum2 dense_second_sums(const DenseArgs& a, const DenseRow& r, Scales k, Walk&& walk) {
  Sum2 acc{0.0f, 0.0f};
  auto run = [&](auto one_series) {
    walk([&](const auto& zs, const auto& zt, int64_t) {
#pragma unroll
      for (int i = 0; i < int(sizeof(zs) / sizeof(float)); ++i)
        dense_push_second<DIV, decltype(one_series)::value>(acc, a, r, k, zs[i], zt[i]);
    });
  };
  if constexpr (static_cast<Divergence>(DIV) == Divergence::AB) {
    if (a.ab_one_series) {
      run(std::true_type{});
    } else {
      run(std::false_type{});
    }
  } else {
    run(std::false_type{});
  }
  return acc;
}

template <int DIV>
DOPS_DEV void dense_finish_second(DenseRow& r, const DenseArgs& a, Sum2 acc) {
  constexpr Divergence kDiv = static_cast<Divergence>(DIV);
  if constexpr (kDiv == Divergence::AB) {
    const bool one = a.ab_one_series;  // ab_one_series_terms' sums are a b A and a B
    r.dv = one ? acc.x * r.ab.inv_ab : acc.x;
    r.sum_qg = one ? acc.y * r.ab.inv_a : acc.y;
  } else if constexpr (DivTraits<DIV>::kResearch) {
    r.dv = acc.x;
    r.sum_qg = acc.y;
  } else if constexpr (kDiv == Divergence::JSD) {
    r.dv = a.beta * acc.x + (1.0f - a.beta) * acc.y;
    r.sum_qg = (1.0f - a.beta) * acc.y;
  } else {
    r.dv = 0.5f * acc.x;
    r.sum_qg = acc.y;
  }
}

// The teacher's probability of an element (AKL's threshold search and its split).
DOPS_DEV float dense_p(const DenseRow& r, Scales k, float zt) {
  return fast_exp2((fmaf(zt, k.t, -r.mt) - r.log_st) * kLog2E);
}

// AKL's bisection range over tau's fp32 bits: [lo, hi), lo passing (mass >= head mass) and
// hi failing, bounded by the row statistics as backends/triton/akl.py bounds its search:
// tau <= max p = 1 / S_t (2^-7 above it for the rounding of exp), tau > (1 - m) / n (half
// that for the fp32 sums) unless m > 1 - 2^-10; a head mass of 1 searches nothing (tau = 0).
// ~27 steps at n = 128256, m = 1/2, not 31.
struct AklRange {
  int lo, hi;
};

DOPS_DEV AklRange akl_search_range(float head_mass, float log_st, int64_t n) {
  const float top = fminf(fast_exp2(-log_st * kLog2E) * 1.0078125f, 1.0f);
  const int top_bits = int(float_to_bits(top)) + 2;
  const int hi = top_bits < 0x3F800001 ? top_bits : 0x3F800001;  // [0, 1.0 + 1 ulp) at most
  const float low_p = (1.0f - head_mass) / (2.0f * float(n > 0 ? n : 1));
  int lo = head_mass <= 1.0f - 0x1p-10f ? int(float_to_bits(low_p)) : 0;
  lo = head_mass >= 1.0f || lo > hi - 1 ? hi - 1 : lo;
  return {lo, hi};
}

// AKL's pieces of one element at threshold tau: (forward KL, reverse KL) and (|p - q| in the
// head, in the tail).
DOPS_DEV void akl_push(Sum2& kl, Sum2& gap, const DenseRow& r, Scales k,
                                         float tau, float zs, float zt) {
  const float lq = fmaf(zs, k.s, -r.ms) - r.log_ss, lp = fmaf(zt, k.t, -r.mt) - r.log_st;
  const float q = fast_exp2(lq * kLog2E), p = dense_p(r, k, zt);
  kl.x += xlogratio(p, lp, lq);
  kl.y += xlogratio(q, lq, lp);
  (p >= tau ? gap.x : gap.y) += fabsf(p - q);
}

// The row's loss (soft term, plus the hard term when asked).
DOPS_DEV float dense_loss(const DenseArgs& a, DenseRow& r, float z_label,
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

// d loss / d x_j of student logit j (z already through the transform and TAID); coef =
// soft_coef / T.
template <int DIV, bool GENERAL>
DOPS_DEV float dense_grad(const DenseArgs& a, const DenseRow& r, Scales k,
                                            float coef, float zs, float zt, int64_t j,
                                            int64_t label) {
  constexpr Divergence kDiv = static_cast<Divergence>(DIV);
  const float lq = fmaf(zs, k.s, -r.ms) - r.log_ss, lp = fmaf(zt, k.t, -r.mt) - r.log_st;
  const float q = fast_exp2(lq * kLog2E);
  // p where the divergence reads it (AB does not: an unused asm ex2 still issues).
  const float p = kDiv == Divergence::AB ? 0.0f : fast_exp2(lp * kLog2E);
  float d;
  if constexpr (DivTraits<DIV>::kResearch) {
    float h;
    research_term<DIV, false>(a, r, lp, lq, p, q, h);
    d = h - q * r.sum_qg;
  } else if constexpr (kDiv == Divergence::AKL) {
    d = r.akl_w * (q - p) + (1.0f - r.akl_w) * (q > 0.0f ? q * ((lq - lp) - r.sum_qg) : 0.0f);
  } else if constexpr (kDiv == Divergence::ForwardKL) {
    d = q - p;
  } else if constexpr (kDiv == Divergence::ReverseKL) {
    d = q > 0.0f ? q * ((lq - lp) - r.dv) : 0.0f;
  } else if constexpr (kDiv == Divergence::JSD) {
    const float lm = log_mixture(p, q, a.beta);
    d = q * ((q > 0.0f ? (1.0f - a.beta) * (lq - lm) : 0.0f) - r.sum_qg);
  } else {
    d = q * (tvd_sign(q, p) - r.sum_qg);
  }
  float gz = coef * d;
  if constexpr (GENERAL) {
    if (a.hard_weight != 0.0f) {
      const float sm1 = fast_exp2(((zs - r.ms) * a.temperature - r.log_s1) * kLog2E);
      gz += a.hard_weight * (sm1 - (j == label ? 1.0f : 0.0f));
      if (!r.found) gz = NAN;
    }
    return gz * transform_grad(zs, a.scale_s, a.cap_s, a.temperature);
  } else {
    return gz * a.scale_s;
  }
}

}  // namespace distill_ops::cuda

