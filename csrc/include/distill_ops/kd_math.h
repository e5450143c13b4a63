// Header-only maths shared by the CPU (csrc/cpu) and CUDA (csrc/cuda) kernels.
//
// Everything here is a pure function of a few scalars, so the CPU tests exercise exactly the
// formulas the GPU kernels run. `Acc` is the accumulation type: float for fp32/bf16/fp16
// inputs, double for float64 inputs (used by gradcheck).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

// Always inlined: these run inside `omp simd` loops, which vectorise only if no call is
// left in them (and link-time optimisation is free to out-line a plain `inline` function
// that several translation units use).
#if defined(__CUDACC__)
#define DOPS_HD __host__ __device__ __forceinline__
#else
#define DOPS_HD inline __attribute__((always_inline))
#endif

namespace distill_ops {

// Codes shared with python/distill_ops/backends/extension.py.
enum class DType : int { F32 = 0, BF16 = 1, F16 = 2, F64 = 3 };
enum class Divergence : int {
  ForwardKL = 0, ReverseKL = 1, JSD = 2, TVD = 3,
  // The research family: their parameter in `beta` (skew, AB's alpha, AKL's head mass) and
  // `param2` (AB's beta).
  SkewKL = 4, SkewReverseKL = 5, AB = 6, AKL = 7
};
enum class Tail : int { Bucket = 0, Renorm = 1, Support = 2, None = 3 };

// Scalars of a dense or sparse KD loss, as the Python layer resolved them.
struct KDParams {
  int divergence;       // Divergence
  double temperature;   // T > 0
  double beta;          // JSD beta (strictly inside (0, 1): endpoints become KL), skew, AB
                        // alpha or AKL head mass
  double param2;        // AB beta
  double interp;        // TAID teacher interpolation t in [0, 1] (1 = the plain teacher)
  double scale_s;       // student logit scale
  double cap_s;         // student softcap, 0 = none
  double scale_t;       // teacher logit scale
  double cap_t;         // teacher softcap, 0 = none
  double hard_weight;   // weight of the cross-entropy term at T = 1
  double soft_coef;     // soft_weight, times T^2 when scale_by_t2
};

// Scalars of a sparse KD loss (student logits against k teacher targets per row).
struct SparseParams {
  int divergence;             // Divergence
  int tail;                   // Tail
  double temperature;         // T > 0 of the loss
  double source_temperature;  // T at which the targets were recorded
  double beta;                // the divergence's parameter, as KDParams::beta
  double param2;              // AB beta
  double interp;              // TAID t over the coarse classes (1 = the plain targets)
  double hard_weight;         // weight of the cross-entropy term at T = 1
  double soft_coef;           // soft_weight, times T^2 when scale_by_t2
};

// ---------------------------------------------------------------------------------------
// Bit-level conversions (no intrinsics, so they compile on host and device alike).

DOPS_HD float bits_to_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

DOPS_HD uint32_t float_to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

DOPS_HD float bf16_to_float(uint16_t h) { return bits_to_float(uint32_t(h) << 16); }

DOPS_HD uint16_t float_to_bf16(float f) {
  uint32_t u = float_to_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40u);  // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest even
  return uint16_t(u >> 16);
}

// IEEE half -> float. Normal and subnormal halves both come out of one multiply by 2^112.
DOPS_HD float half_to_float(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000u) << 16;
  const uint32_t em = h & 0x7fffu;
  uint32_t bits = float_to_bits(bits_to_float(em << 13) * 5.192296858534828e33f);  // 2^112
  if (em >= 0x7c00u) bits = (em << 13) | 0x7f800000u;  // inf / NaN
  return bits_to_float(bits | sign);
}

// float -> IEEE half, round to nearest even, overflow to inf, NaN kept.
DOPS_HD uint16_t float_to_half(float f) {
  uint32_t x = float_to_bits(f);
  const uint32_t sign = (x >> 16) & 0x8000u;
  x &= 0x7fffffffu;
  if (x >= 0x47800000u) return uint16_t(sign | (x > 0x7f800000u ? 0x7e00u : 0x7c00u));
  if (x < 0x38800000u) {
    // Below the smallest normal half: adding 0.5 aligns the half's subnormal unit (2^-24)
    // with the float's last mantissa bit, so the FPU does the rounding.
    const float t = bits_to_float(x) + 0.5f;
    return uint16_t(sign | (float_to_bits(t) - 0x3f000000u));
  }
  const uint32_t odd = (x >> 13) & 1u;
  x += 0xc8000fffu + odd;  // rebias the exponent by -112 and round half to even
  return uint16_t(sign | (x >> 13));
}

// ---------------------------------------------------------------------------------------
// Elementary functions. exp_acc is only ever called on x <= ~0 (values minus their row
// maximum) or on moderate arguments; results under ~1e-38 flush to zero, which changes a
// sum that holds at least 1 by nothing representable.

// On a GPU: one ex2.approx of x log2(e) (two instructions; libm's expf is about eight). Its
// relative error is ~2^-22 near 0 and grows as |x| 2^-24 with the rounding of the product:
// only the terms far below the row maximum, which a sum cannot see, carry more.
DOPS_HD float fast_exp2(float x) {
#if defined(__CUDA_ARCH__)
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
#else
  return std::exp2(x);
#endif
}

// log2 as one lg2.approx on a GPU (absolute error ~2^-22 near 1, relative elsewhere).
DOPS_HD float fast_log2(float x) {
#if defined(__CUDA_ARCH__)
  float y;
  asm("lg2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
#else
  return std::log2(x);
#endif
}

constexpr float kLog2E = 1.44269504088896341f;
constexpr float kLn2 = 0.693147180559945309f;

DOPS_HD float exp_acc(float x) {
#if defined(__CUDA_ARCH__)
  return fast_exp2(x * kLog2E);
#else
  // Range reduction x = k ln2 + r, |r| <= ln2/2, then a degree-7 Taylor polynomial
  // (truncation below 1e-8 relative). Branch-free, so `omp simd` loops vectorise it.
  const float xc = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);  // NaN passes through
  const float shifter = 12582912.0f;                                // 1.5 * 2^23
  const float t = xc * 1.44269504088896341f + shifter;
  const float k = t - shifter;
  const int32_t ki = int32_t(float_to_bits(t) - float_to_bits(shifter));
  float r = std::fma(k, -0.693145751953125f, xc);
  r = std::fma(k, -1.428606765330187e-06f, r);
  float p = 1.9841269841e-4f;
  p = std::fma(p, r, 1.3888888889e-3f);
  p = std::fma(p, r, 8.3333333333e-3f);
  p = std::fma(p, r, 4.1666666667e-2f);
  p = std::fma(p, r, 1.6666666667e-1f);
  p = std::fma(p, r, 0.5f);
  p = std::fma(p, r, 1.0f);
  p = std::fma(p, r, 1.0f);
  const float y = p * bits_to_float(uint32_t(ki + 127) << 23);
  return x < -87.0f ? 0.0f : y;
#endif
}

DOPS_HD double exp_acc(double x) { return exp(x); }

DOPS_HD float log_acc(float x) { return logf(x); }
DOPS_HD double log_acc(double x) { return log(x); }
DOPS_HD float tanh_acc(float x) { return tanhf(x); }
DOPS_HD double tanh_acc(double x) { return tanh(x); }

// log(1 + exp(-d)) for d >= 0: the correction term of logaddexp. On the host it is
// 2 atanh(s) with s = e / (2 + e), e = exp(-d) in (0, 1]: no rounding of 1 + e, s <= 1/3,
// and the odd series gains a factor 1/9 per term (nine terms: truncation < 2e-10). Being
// branch-free arithmetic, it vectorises where log1pf does not.
DOPS_HD float log1p_exp_neg(float d) {
#if defined(__CUDA_ARCH__)
  // ln(1 + e) through lg2: absolute error ~1e-7, all that log m = hi + this needs.
  return kLn2 * fast_log2(1.0f + fast_exp2(-d * kLog2E));
#else
  const float e = exp_acc(-d);
  const float s = e / (2.0f + e);
  const float s2 = s * s;
  float p = 1.0f / 17.0f;
  p = std::fma(p, s2, 1.0f / 15.0f);
  p = std::fma(p, s2, 1.0f / 13.0f);
  p = std::fma(p, s2, 1.0f / 11.0f);
  p = std::fma(p, s2, 1.0f / 9.0f);
  p = std::fma(p, s2, 1.0f / 7.0f);
  p = std::fma(p, s2, 1.0f / 5.0f);
  p = std::fma(p, s2, 1.0f / 3.0f);
  p = std::fma(p, s2, 1.0f);
  return 2.0f * s * p;
#endif
}

DOPS_HD double log1p_exp_neg(double d) { return log1p(exp(-d)); }

// ---------------------------------------------------------------------------------------
// Logit transform z = f(x) / T with f(x) = cap * tanh(scale * x / cap) (cap > 0) or
// scale * x. A -inf logit is a masked vocabulary entry and stays -inf through the softcap.

template <typename Acc>
DOPS_HD Acc transform_logit(Acc x, Acc scale, Acc cap, Acc inv_t) {
  if (cap > Acc(0)) {
    if (x == -std::numeric_limits<Acc>::infinity()) return x;
    return cap * tanh_acc(scale * x / cap) * inv_t;
  }
  return scale * x * inv_t;
}

// f'(x) expressed through z = f(x) / T, so the gradient pass needs no second tanh.
template <typename Acc>
DOPS_HD Acc transform_grad(Acc z, Acc scale, Acc cap, Acc temperature) {
  if (cap > Acc(0)) {
    if (z == -std::numeric_limits<Acc>::infinity()) return Acc(0);
    const Acc th = z * temperature / cap;
    return scale * (Acc(1) - th * th);
  }
  return scale;
}

// ---------------------------------------------------------------------------------------
// Per-element pieces of the divergences, in log space. lq = log q_j, lp = log p_j,
// q = exp(lq), p = exp(lp). Terms with a zero probability contribute exactly zero
// (0 * log 0 = 0), whatever the other side holds.

// log m_j for m = beta p + (1 - beta) q, by logaddexp (exact where both probabilities
// underflow). log_b = log(beta), log_1mb = log(1 - beta).
template <typename Acc>
DOPS_HD Acc jsd_log_mixture(Acc lp, Acc lq, Acc log_b, Acc log_1mb) {
  const Acc a = log_b + lp;
  const Acc b = log_1mb + lq;
  const Acc hi = a > b ? a : b;
  if (hi == -std::numeric_limits<Acc>::infinity()) return hi;
  const Acc lo = a > b ? b : a;
  return hi + log1p_exp_neg(hi - lo);
}

// p * (lp - lo) with the zero-probability convention.
template <typename Acc>
DOPS_HD Acc xlogratio(Acc p, Acc lp, Acc lo) {
  return p > Acc(0) ? p * (lp - lo) : Acc(0);
}

// 0.5 * sign(q - p): the TVD subgradient, exactly 0 where q == p.
template <typename Acc>
DOPS_HD Acc tvd_sign(Acc q, Acc p) {
  return q > p ? Acc(0.5) : (q < p ? Acc(-0.5) : Acc(0));
}

// ---------------------------------------------------------------------------------------
// The research divergences (docs/api.md has their maths). Each element contributes a loss
// term and h_j = dL/d(log q_j); the gradient w.r.t. z_s is then h_j - q_j sum_k h_k.

// TAID's target logit (1 - t) z_s + t z_t (the student side carries no gradient); a masked
// -inf on either side stays masked for 0 < t < 1.
template <typename Acc>
DOPS_HD Acc taid_logit(Acc zs, Acc zt, Acc t) {
  const Acc ninf = -std::numeric_limits<Acc>::infinity();
  if (t == Acc(1)) return zt;
  if (t == Acc(0)) return zs;
  return (zs == ninf || zt == ninf) ? ninf : (Acc(1) - t) * zs + t * zt;
}

// (e^x - 1) / x = sum_n x^n / (n + 1)! and (e^x - 1 - x) / x^2 = sum_n x^n / (n + 2)! for
// |x| < 1/2 by Horner (float: to x^8, truncation < 3e-9 relative; double: to x^16, < 1e-17).
template <int K0, int Last>
struct InvFactorials {  // v[n] = 1 / (n + K0)!
  double v[Last + 1];
  constexpr InvFactorials() : v() {
    for (int n = 0; n <= Last; ++n) {
      double f = 1.0;
      for (int i = 2; i <= n + K0; ++i) f *= double(i);
      v[n] = 1.0 / f;
    }
  }
};

template <typename Acc, int K0>
DOPS_HD Acc exp_series_tail(Acc x) {
  constexpr int kLast = sizeof(Acc) == 4 ? 8 : 16;
  constexpr InvFactorials<K0, kLast> c{};
  Acc acc = Acc(c.v[kLast]);  // (not 0 * x + c: 0 * x is not 0 for every x, so it issues)
  for (int n = kLast - 1; n >= 0; --n) acc = acc * x + Acc(c.v[n]);
  return acc;
}

template <typename Acc>
DOPS_HD Acc exprel_small(Acc x) { return exp_series_tail<Acc, 1>(x); }
template <typename Acc>
DOPS_HD Acc phi_small_over_x2(Acc x) { return exp_series_tail<Acc, 2>(x); }

// The alpha-beta divergence's element (A - G) / (a b) with A = (a p^s + b q^s) / s, G = p^a
// q^b, s = a + b (ABKD): 0 where p = q, stable as either parameter tends to 0. Expanded around
// the side whose weight w = min(a, b) / s is smaller: with U its p^s (or q^s), V the other's
// and r = log(V / U), A - G = U (w phi(r) - phi(w r)), phi(x) = e^x - 1 - x, which keeps O(w)
// accuracy as w -> 0; for r << 0 the direct form (1 - w) U + w V - G has no cancellation.
// Branch-free (selects), so the CPU's `omp simd` loops vectorise it.
template <typename Acc>
DOPS_HD Acc ab_loss(Acc lp, Acc lq, Acc a, Acc b) {
  const Acc ninf = -std::numeric_limits<Acc>::infinity();
  const Acc s = a + b;
  const bool pinf = lp == ninf, qinf = lq == ninf;
  const Acc lpz = pinf ? Acc(0) : lp, lqz = qinf ? Acc(0) : lq;
  const Acc lp0 = qinf ? Acc(0) : lpz, lq0 = pinf ? Acc(0) : lqz;
  const bool around_p = b <= a;
  const Acc w = (around_p ? b : a) / s;
  const Acc up = exp_acc(s * lp0), wq = exp_acc(s * lq0), g = exp_acc(a * lp0 + b * lq0);
  const Acc u = around_p ? up : wq, v = around_p ? wq : up;
  const Acc r = s * (around_p ? lq0 - lp0 : lp0 - lq0);
  const Acc wr = w * r;
  const bool small_r = r < Acc(0.5) && r > Acc(-0.5);
  const bool small_wr = wr < Acc(0.5) && wr > Acc(-0.5);
  const Acc rs = small_r ? r : Acc(0), wrs = small_wr ? wr : Acc(0);
  const Acc u_phi_r = small_r ? u * rs * rs * phi_small_over_x2(rs) : v - u - u * r;
  const Acc u_phi_wr = small_wr ? u * wrs * wrs * phi_small_over_x2(wrs) : g - u - u * wr;
  const Acc a_minus_g = (r < Acc(0) && wr <= Acc(-1)) ? (Acc(1) - w) * u + w * v - g
                                                      : w * u_phi_r - u_phi_wr;
  const Acc only_q = exp_acc(s * lqz) / (a * s), only_p = exp_acc(s * lpz) / (b * s);
  return pinf ? (qinf ? Acc(0) : only_q) : (qinf ? only_p : a_minus_g / (a * b));
}

// dL/d(log q) of ab_loss: q^b (q^a - p^a) / a = p^a q^b expm1(a (lq - lp)) / a. (The teacher
// side's is ab_dlogq(lq, lp, b, a).)
template <typename Acc>
DOPS_HD Acc ab_dlogq(Acc lp, Acc lq, Acc a, Acc b) {
  const Acc ninf = -std::numeric_limits<Acc>::infinity();
  const Acc s = a + b;
  const bool pinf = lp == ninf, qinf = lq == ninf;
  const Acc lqz = qinf ? Acc(0) : lq, lp0 = (pinf || qinf) ? Acc(0) : lp;
  const Acc d = lqz - lp0, x = a * d;
  const Acc g = exp_acc(a * lp0 + b * lqz), wq = exp_acc(s * lqz);
  const bool small = x < Acc(0.5) && x > Acc(-0.5);
  const Acc h = small ? g * d * exprel_small(small ? x : Acc(0)) : (wq - g) / a;
  return qinf ? Acc(0) : (pinf ? wq / a : h);
}

// AB's element and h in one, for the parameters ab_fast admits (each at least a quarter of
// the other: w = b / s in [1/5, 4/5]; a kernel decides once a row or launch). The element is
// U F(r) / (a b) with U = p^s, r = s (log q - log p), F(r) = (1 - w) + w e^r - e^(w r) =
// w r^2 (psi(r) - w psi(w r)), psi(x) = (e^x - 1 - x) / x^2: one series in r for |r| < 1/2,
// its coefficients w (1 - w^(n+1)) / (n+2)! in ABFast (float: to r^7, truncation < 1.2e-8 of
// the sum, which is at least 0.074 w there; double: to r^15), the direct form beyond, where
// F >= w (1 - w) / 11 bounds the cancellation by ~110 ulp. Three exponentials serve the
// element and h; -inf needs no select (exp_acc(-inf) = 0 gives the one-sided limits w W and
// (1 - w) U; r and a d are then +-inf or NaN, which take the direct forms). The Triton
// kernels' ab_fast_terms; ab_loss is the form for every a, b.
template <typename Acc>
struct ABFast {
  static constexpr int kLast = sizeof(Acc) == 4 ? 7 : 15;
  Acc a, b, s, w, inv_a, inv_ab;
  Acc c[kLast + 1];
};

template <typename Acc>
DOPS_HD bool ab_fast(Acc a, Acc b) {
  return Acc(4) * b >= a && Acc(4) * a >= b;
}

template <typename Acc>
DOPS_HD ABFast<Acc> ab_fast_consts(Acc a, Acc b) {
  ABFast<Acc> k{};
  k.a = a;
  k.b = b;
  k.s = a + b;
  k.w = b / k.s;
  k.inv_a = Acc(1) / a;
  k.inv_ab = Acc(1) / (a * b);
  const double w = double(b) / (double(a) + double(b));
  double wp = w, fact = 2.0;  // w^(n+2) and (n+2)! as n steps
  for (int n = 0; n <= ABFast<Acc>::kLast; ++n) {
    wp *= w;
    k.c[n] = Acc((w - wp) / fact);
    fact *= double(n + 3);
  }
  return k;
}

template <typename Acc>
DOPS_HD Acc ab_fast_loss(Acc lp, Acc lq, const ABFast<Acc>& k, Acc& h) {
  const Acc d = lq - lp, x = k.a * d, r = k.s * d;
  const Acc up = exp_acc(k.s * lp), wq = exp_acc(k.s * lq), g = exp_acc(k.a * lp + k.b * lq);
  const bool small_x = x < Acc(0.5) && x > Acc(-0.5);
  h = small_x ? g * d * exprel_small(small_x ? x : Acc(0)) : (wq - g) * k.inv_a;
  const bool small_r = r < Acc(0.5) && r > Acc(-0.5);
  const Acc rs = small_r ? r : Acc(0);
  Acc poly = k.c[ABFast<Acc>::kLast];
  for (int n = ABFast<Acc>::kLast - 1; n >= 0; --n) poly = poly * rs + k.c[n];
  const Acc f = small_r ? up * (rs * rs) * poly : (Acc(1) - k.w) * up + (k.w * wq - g);
  return f * k.inv_ab;
}

// Skew KL: KL(p || m), m = skew p + (1 - skew) q; log_s = log(skew), log_1ms = log(1 - skew).
// Returns the term, h through `h`.
template <typename Acc>
DOPS_HD Acc skew_kl_term(Acc lp, Acc lq, Acc p, Acc skew, Acc log_s, Acc log_1ms, Acc& h) {
  const Acc lm = jsd_log_mixture(lp, lq, log_s, log_1ms);
  h = p > Acc(0) ? -(Acc(1) - skew) * p * exp_acc(lq - lm) : Acc(0);
  return xlogratio(p, lp, lm);
}

// Skew reverse KL: KL(q || m), m = skew q + (1 - skew) p.
template <typename Acc>
DOPS_HD Acc skew_reverse_kl_term(Acc lp, Acc lq, Acc q, Acc skew, Acc log_s, Acc log_1ms,
                                 Acc& h) {
  const Acc lm = jsd_log_mixture(lq, lp, log_s, log_1ms);
  h = q > Acc(0) ? q * ((lq - lm) + Acc(1) - skew * exp_acc(lq - lm)) : Acc(0);
  return xlogratio(q, lq, lm);
}

// AKL's weight of the forward KL: g_head / (g_head + g_tail), 1/2 where p = q everywhere.
template <typename Acc>
DOPS_HD Acc akl_head_weight(Acc g_head, Acc g_tail) {
  const Acc total = g_head + g_tail;
  return total > Acc(0) ? g_head / total : Acc(0.5);
}

// ---------------------------------------------------------------------------------------
// One-pass statistics of a student row and a teacher row with the KL's cross term, as the
// GPU kernels accumulate them (per thread, then merged across threads and blocks).
//
// The cross term is centred on the running maxima: with the weighting side w (the teacher
// for forward KL, the student for reverse KL) and the other side o,
//   c = sum_j e_j u_j,  e_j = exp(zw_j - mw),  u_j = (zw_j - mw) - (zo_j - mo),
// so that KL = c / sum_j e_j - log sum_w + log sum_o. Accumulating the raw difference
// zw_j - zo_j instead and subtracting mw - mo at the end cancels catastrophically when the
// logits are large and the divergence is not (a student at +-1e4 against a normal teacher:
// reverse KL ~7 built from terms ~1e4 lost 2e-5 of the loss and 3e-4 of the gradient on the
// H200, 2026-11-28). When the maxima move by dw and do, every earlier u_j moves by do - dw:
//   c' = f_w (c + a_w (do - dw)),  f_w = exp(mw - mw').
struct OnlineKLMode {
  static constexpr int kNone = 0, kForward = 1, kReverse = 2;
};

template <typename Acc>
struct OnlineKL {
  Acc ms, as;  // student: running max of z, sum of exp(z - ms)
  Acc mt, at;  // teacher: likewise
  Acc c;       // centred cross term (KL modes only)
};

template <typename Acc>
DOPS_HD OnlineKL<Acc> online_kl_empty() {
  const Acc ninf = -std::numeric_limits<Acc>::infinity();
  return {ninf, Acc(0), ninf, Acc(0), Acc(0)};
}

// exp(m_old - m_new) for m_new >= m_old: 0 from an empty state, 1 while both are -inf.
template <typename Acc>
DOPS_HD Acc online_rescale(Acc m_old, Acc m_new) {
  const Acc ninf = -std::numeric_limits<Acc>::infinity();
  if (m_new == m_old) return Acc(1);
  return m_old == ninf ? Acc(0) : exp_acc(m_old - m_new);
}

// m_new - m_old, 0 where they are equal (so -inf to -inf is no move, not NaN).
template <typename Acc>
DOPS_HD Acc online_step(Acc m_old, Acc m_new) {
  return m_new == m_old ? Acc(0) : m_new - m_old;
}

// The cross term of a state whose weighting sum is a_w, moved to new maxima. A state with no
// weight (or whose weight underflows at the new maximum) carries nothing.
template <typename Acc>
DOPS_HD Acc cross_shift(Acc c, Acc a_w, Acc f_w, Acc dw, Acc d_o) {
  return (a_w > Acc(0) && f_w > Acc(0)) ? f_w * (c + a_w * (d_o - dw)) : Acc(0);
}

// e_w u of one element; +inf where the other side is -inf (that KL is infinite).
template <typename Acc>
DOPS_HD Acc cross_term(Acc e_w, Acc zw, Acc mw, Acc zo, Acc mo) {
  if (!(e_w > Acc(0))) return Acc(0);
  if (zo == -std::numeric_limits<Acc>::infinity()) return std::numeric_limits<Acc>::infinity();
  return e_w * ((zw - mw) - (zo - mo));
}

template <typename Acc>
DOPS_HD OnlineKL<Acc> online_kl_push(OnlineKL<Acc> st, Acc zs, Acc zt, int mode) {
  const Acc ninf = -std::numeric_limits<Acc>::infinity();
  const Acc ms = zs > st.ms ? zs : st.ms, mt = zt > st.mt ? zt : st.mt;
  const Acc fs = online_rescale(st.ms, ms), ft = online_rescale(st.mt, mt);
  const Acc es = zs == ninf ? Acc(0) : exp_acc(zs - ms);
  const Acc et = zt == ninf ? Acc(0) : exp_acc(zt - mt);
  Acc c = Acc(0);
  if (mode == OnlineKLMode::kForward) {
    c = cross_shift(st.c, st.at, ft, online_step(st.mt, mt), online_step(st.ms, ms)) +
        cross_term(et, zt, mt, zs, ms);
  } else if (mode == OnlineKLMode::kReverse) {
    c = cross_shift(st.c, st.as, fs, online_step(st.ms, ms), online_step(st.mt, mt)) +
        cross_term(es, zs, ms, zt, mt);
  }
  return {ms, st.as * fs + es, mt, st.at * ft + et, c};
}

// The state of the union of two disjoint sets of elements.
template <typename Acc>
DOPS_HD OnlineKL<Acc> online_kl_merge(OnlineKL<Acc> x, OnlineKL<Acc> y, int mode) {
  const Acc ms = x.ms > y.ms ? x.ms : y.ms, mt = x.mt > y.mt ? x.mt : y.mt;
  const Acc fxs = online_rescale(x.ms, ms), fys = online_rescale(y.ms, ms);
  const Acc fxt = online_rescale(x.mt, mt), fyt = online_rescale(y.mt, mt);
  Acc c = Acc(0);
  if (mode == OnlineKLMode::kForward) {
    c = cross_shift(x.c, x.at, fxt, online_step(x.mt, mt), online_step(x.ms, ms)) +
        cross_shift(y.c, y.at, fyt, online_step(y.mt, mt), online_step(y.ms, ms));
  } else if (mode == OnlineKLMode::kReverse) {
    c = cross_shift(x.c, x.as, fxs, online_step(x.ms, ms), online_step(x.mt, mt)) +
        cross_shift(y.c, y.as, fys, online_step(y.ms, ms), online_step(y.mt, mt));
  }
  return {ms, x.as * fxs + y.as * fys, mt, x.at * fxt + y.at * fyt, c};
}

// The KL of a finished state (mode kForward: KL(p||q); kReverse: KL(q||p)).
template <typename Acc>
DOPS_HD Acc online_kl_value(const OnlineKL<Acc>& st, int mode) {
  const Acc log_ss = log_acc(st.as), log_st = log_acc(st.at);
  return mode == OnlineKLMode::kForward ? st.c / st.at - log_st + log_ss
                                        : st.c / st.as - log_ss + log_st;
}

}  // namespace distill_ops
