// Per-row softmax statistics over contiguous scratch, shared by the CPU kernels.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <utility>

#include "distill_ops/kd_math.h"

namespace distill_ops::cpu {

// Whether x * k is exact for every x (short of underflow): k a power of two. A row read in
// place as x * k then has the same z as one loaded into scratch, even where the product
// contracts into the next operation (an fma).
template <typename Acc>
bool power_of_two(Acc k) {
  int e = 0;
  return k > Acc(0) && std::frexp(k, &e) == Acc(0.5);
}

template <typename Acc>
Acc row_max(const Acc* z, int64_t n) {
  Acc m = -std::numeric_limits<Acc>::infinity();
#pragma omp simd reduction(max : m)
  for (int64_t j = 0; j < n; ++j) m = z[j] > m ? z[j] : m;  // std::max does not vectorise here
  return m;
}

// Row sums in blocks: within a block of kSumBlock terms a vectorised reduction in the
// accumulation type, across blocks in double. A row's rounding error is then that of a sum of
// kSumBlock / lanes terms (like PyTorch's cascaded fp32 sums), not of V / lanes: a plain
// `omp simd` sum of a 32000-wide fp32 row was ~4x further from float64 than PyTorch's.
constexpr int64_t kSumBlock = 256;

// sum over blocks [j0, j1) of body(j0, j1), which returns the block's sum.
template <typename Body>
double blocked_sum(int64_t n, Body body) {
  double total = 0;
  for (int64_t j0 = 0; j0 < n; j0 += kSumBlock)
    total += double(body(j0, std::min(n, j0 + kSumBlock)));
  return total;
}

// The same for two sums at once: body returns a pair.
template <typename Body>
std::pair<double, double> blocked_sum2(int64_t n, Body body) {
  double a = 0, b = 0;
  for (int64_t j0 = 0; j0 < n; j0 += kSumBlock) {
    const auto part = body(j0, std::min(n, j0 + kSumBlock));
    a += double(part.first);
    b += double(part.second);
  }
  return {a, b};
}

// e[j] = exp(z[j] - m); returns the sum.
template <typename Acc>
Acc exp_shifted(const Acc* z, Acc m, int64_t n, Acc* e) {
  return Acc(blocked_sum(n, [&](int64_t j0, int64_t j1) {
    Acc s = 0;
#pragma omp simd reduction(+ : s)
    for (int64_t j = j0; j < j1; ++j) {
      e[j] = exp_acc(z[j] - m);
      s += e[j];
    }
    return s;
  }));
}

// The sparse loss's rest class (the ids off the teacher's support) below this mass at the
// row maximum is taken again at its own maximum: its largest term exp(z - m) would be near
// or past underflow (2^-126 in fp32), a confident student's rest would read 0 (an infinite
// loss, a NaN gradient in double). Above it the terms that matter are normal numbers.
constexpr double kRestFloor = 0x1p-60;

// The rest at its own maximum: {max_j z_off(j), sum_j exp(z_off(j) - max)} over j < n, with
// z_off(j) = -inf for the ids not in it; {-inf, 0} where it holds nothing.
template <typename Acc>
struct RestMass {
  Acc m, s;
};

template <typename Acc, typename ZOff>
RestMass<Acc> rest_at_own_max(int64_t n, ZOff z_off) {
  Acc m = -std::numeric_limits<Acc>::infinity();
  for (int64_t j = 0; j < n; ++j) m = std::max(m, z_off(j));
  if (m == -std::numeric_limits<Acc>::infinity()) return {m, Acc(0)};
  const double s = blocked_sum(n, [&](int64_t j0, int64_t j1) {
    Acc part = 0;
    for (int64_t j = j0; j < j1; ++j) part += exp_acc(z_off(j) - m);
    return part;
  });
  return {m, Acc(s)};
}

template <typename Acc>
struct RowStats {
  Acc m;      // max of z
  Acc log_s;  // log sum exp(z - m)
  Acc inv_s;  // 1 / sum exp(z - m)
};

template <typename Acc>
RowStats<Acc> softmax_stats(const Acc* z, int64_t n, Acc* e) {
  const Acc m = row_max(z, n);
  const Acc s = exp_shifted(z, m, n, e);
  return {m, log_acc(s), Acc(1) / s};
}

// g[j] *= f'(x_j) through z_j = f(x_j) / T (the softcap's derivative, or the scale).
template <typename Acc>
void apply_transform_grad(Acc* g, const Acc* z, int64_t n, Acc scale, Acc cap, Acc temperature) {
  if (cap > Acc(0)) {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) g[j] *= transform_grad(z[j], scale, cap, temperature);
  } else {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) g[j] *= scale;
  }
}

// The hard-label term at T = 1 on f(x) = z * T, for a row whose softmax statistics at T are
// `s` (es[j] = exp(z[j] - s.m)).
template <typename Acc>
struct HardLabel {
  int64_t y;      // the label; outside [0, n) makes the row NaN (loud, never a wrong number)
  Acc lse_shift;  // log sum exp(f(x) - max f(x))
  Acc ce;         // cross-entropy, NaN for an out-of-range label

  HardLabel(const Acc* z, int64_t n, RowStats<Acc> s, Acc temperature, int64_t label)
      : y(label), lse_shift(s.log_s) {
    if (temperature != Acc(1)) {
      const Acc m1 = s.m * temperature;
      const Acc s1 = Acc(blocked_sum(n, [&](int64_t j0, int64_t j1) {
        Acc part = 0;
#pragma omp simd reduction(+ : part)
        for (int64_t j = j0; j < j1; ++j) part += exp_acc(z[j] * temperature - m1);
        return part;
      }));
      lse_shift = log_acc(s1);
    }
    ce = (y >= 0 && y < n) ? (s.m - z[y]) * temperature + lse_shift
                           : std::numeric_limits<Acc>::quiet_NaN();
  }

  // g[j] = coef * g[j] + weight * (softmax(f(x))_j - [j == y]).
  void add_grad(Acc* g, const Acc* z, const Acc* es, int64_t n, RowStats<Acc> s,
                Acc temperature, Acc coef, Acc weight) const {
    const Acc m1 = s.m * temperature;
    const bool unit_t = temperature == Acc(1);
    const int64_t yy = y;
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) {
      const Acc sm1 = unit_t ? es[j] * s.inv_s : exp_acc(z[j] * temperature - m1 - lse_shift);
      g[j] = coef * g[j] + weight * (sm1 - Acc(j == yy ? 1 : 0));
    }
    if (yy < 0 || yy >= n) {
      for (int64_t j = 0; j < n; ++j) g[j] = std::numeric_limits<Acc>::quiet_NaN();
    }
  }
};

}  // namespace distill_ops::cpu
