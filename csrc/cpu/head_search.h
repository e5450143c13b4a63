// AKL's head-threshold search over a vocab-parallel slice whose stash holds the teacher's
// p (dense_vp.cpp's phases 7-11; the search itself, its collectives and its proofs are
// distributed/head.py's head_threshold_exchange): masses at three points of a range of p's
// fp32 bit patterns over the stash, the range's values gathered into a candidate buffer,
// masses over those alone, and the few left for the ranks to exchange.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "row_math.h"

namespace distill_ops::cpu {

// AKL's stashed search record (double [n_rows, kAuxFields]), phases 7-11.
enum AuxField : int {
  kAuxLo = 0, kAuxHi = 1,        // in: the search's range [lo, hi) as fp32 bit patterns of p
  kAuxMass = 2,                  // out: the masses at p >= t for 3 points t: the range's
                                 // inner quarter points (8, 9), kAuxPoints' (7)
  kAuxBase = 5, kAuxCount = 6,   // 10 out: the mass at p >= hi, the values gathered
  kAuxKept = 7, kAuxValues = 8,  // 11 out: how many lie in [lo, hi), the first kExchange
  kAuxPoints = 8,                // 7 in: its three points (bit patterns in (lo, hi))
  kAuxFields = 16,
};
constexpr int kExchange = 8;

// The probability whose fp32 bit pattern is `bits` (a double holding an integer in [0, 2^31)).
inline float p_at(double bits) {
  const auto b = uint32_t(int64_t(bits));
  float p;
  std::memcpy(&p, &b, sizeof p);
  return p;
}

// The slice's masses at p >= t[i] (i < 3) into out, p the stash's values v.
template <typename Acc>
void quarter_masses(const Acc* v, int64_t width, const Acc (&t)[3], double* out) {
  double m0 = 0, m1 = 0, m2 = 0;
  for (int64_t j0 = 0; j0 < width; j0 += kSumBlock) {
    const int64_t j1 = std::min(width, j0 + kSumBlock);
    const Acc t0 = t[0], t1 = t[1], t2 = t[2];
    Acc a = 0, b = 0, c = 0;
#pragma omp simd reduction(+ : a, b, c)
    for (int64_t j = j0; j < j1; ++j) {
      const Acc p = v[j];
      a += p >= t0 ? p : Acc(0);
      b += p >= t1 ? p : Acc(0);
      c += p >= t2 ? p : Acc(0);
    }
    m0 += double(a);
    m1 += double(b);
    m2 += double(c);
  }
  out[0] = m0;
  out[1] = m1;
  out[2] = m2;
}

// gather_range's values from j to j1 one at a time: returns part plus those at or above hi.
template <typename Acc>
Acc gather_tail(const Acc* v, int64_t j, int64_t j1, Acc lo, Acc hi, Acc* cand, int64_t& c,
                int64_t cap, Acc part) {
  for (; j < j1; ++j) {
    if (v[j] >= hi) {
      part += v[j];
    } else if (v[j] >= lo) {
      if (c < cap) cand[c] = v[j];
      ++c;
    }
  }
  return part;
}

// A pass over the block [j0, j1) of v: returns the sum of its values at or above hi, and
// appends those in [lo, hi) to cand at c, at most `cap` in all (c counts them all: c > cap
// tells the caller the buffer was short). cand may be v itself (c <= j: a value is read
// before its slot can be written). Where the range holds a few per cent of the values: 8
// (fp32; 4 fp64) at a time, one vector compare finds the rare group that holds one (3x the
// scalar loop's speed, whose two branches a value cost ~3.5 cycles).
template <typename Acc>
Acc gather_range(const Acc* v, int64_t j0, int64_t j1, Acc lo, Acc hi, Acc* cand, int64_t& c,
                 int64_t cap) {
  typedef Acc Vec __attribute__((vector_size(32)));
  constexpr int kLanes = int(32 / sizeof(Acc));
  Vec acc = {};
  const Vec lov = lo - Vec{}, hiv = hi - Vec{};
  int64_t j = j0;
  for (; j + kLanes <= j1; j += kLanes) {
    Vec x;
    std::memcpy(&x, v + j, sizeof x);
    const auto above = x >= hiv;
    acc += (Vec)((decltype(above))x & above);
    const auto in = (x >= lov) & ~above;
    uint64_t words[4];
    std::memcpy(words, &in, sizeof words);
    if ((words[0] | words[1] | words[2] | words[3]) == 0) continue;
    for (int k = 0; k < kLanes; ++k) {
      if (!in[k]) continue;
      if (c < cap) cand[c] = x[k];
      ++c;
    }
  }
  Acc part = 0;
  for (int k = 0; k < kLanes; ++k) part += acc[k];
  return gather_tail(v, j, j1, lo, hi, cand, c, cap, part);
}

#if defined(__AVX512F__)
// fp32 with AVX-512: 16 values a step, those in range compressed into cand whatever their
// share (a flat row's range can hold a few per cent of it, where a group of 8 above would
// often hold one). The store writes 16 lanes at cand + c: c + 16 <= cap, and c <= j
// where cand is v.
inline float gather_range(const float* v, int64_t j0, int64_t j1, float lo, float hi,
                          float* cand, int64_t& c, int64_t cap) {
  __m512 acc = _mm512_setzero_ps();
  const __m512 lov = _mm512_set1_ps(lo), hiv = _mm512_set1_ps(hi);
  int64_t j = j0;
  for (; j + 16 <= j1 && c + 16 <= cap; j += 16) {
    const __m512 x = _mm512_loadu_ps(v + j);
    const __mmask16 above = _mm512_cmp_ps_mask(x, hiv, _CMP_GE_OQ);
    acc = _mm512_mask_add_ps(acc, above, acc, x);
    const __mmask16 in = _mm512_mask_cmp_ps_mask(__mmask16(~above), x, lov, _CMP_GE_OQ);
    _mm512_storeu_ps(cand + c, _mm512_maskz_compress_ps(in, x));
    c += __builtin_popcount(unsigned(in));
  }
  alignas(64) float lanes[16];  // (GCC 12's _mm512_reduce_add_ps trips -Wmaybe-uninitialized)
  _mm512_store_ps(lanes, acc);
  float part = 0;
  for (float x : lanes) part += x;
  return gather_tail(v, j, j1, lo, hi, cand, c, cap, part);
}
#endif

// One phase of the search on a row (7, 9, 10 or 11; dense_vp.cpp's 8 writes p, then runs
// 9): its stash of p (width values), its candidates' buffer cand (room for cap values) and
// its record a (AuxField).
template <typename Acc>
void head_search_phase(int phase, const Acc* stash, int64_t width, Acc* cand, int64_t cap,
                       double* a) {
  const auto lo = int64_t(a[kAuxLo]), hi = int64_t(a[kAuxHi]);
  if (phase == 7) {  // the masses at three points from the candidates, kept to [lo, hi)
    // The values at or above hi join the mass above (base), those below lo leave: each
    // step reads the range it narrowed to, not the gathered one.
    const Acc vlo = Acc(p_at(double(lo))), vhi = Acc(p_at(double(hi)));
    const auto n_in = int64_t(a[kAuxCount]);
    int64_t c = 0;
    a[kAuxBase] += blocked_sum(n_in, [&](int64_t j0, int64_t j1) {
      return gather_range(cand, j0, j1, vlo, vhi, cand, c, n_in);
    });
    a[kAuxCount] = double(c);
    const Acc t0 = Acc(p_at(a[kAuxPoints])), t1 = Acc(p_at(a[kAuxPoints + 1])),
              t2 = Acc(p_at(a[kAuxPoints + 2]));
    Acc m0 = 0, m1 = 0, m2 = 0;
#pragma omp simd reduction(+ : m0, m1, m2)
    for (int64_t j = 0; j < c; ++j) {
      const Acc x = cand[j];
      m0 += x >= t0 ? x : Acc(0);
      m1 += x >= t1 ? x : Acc(0);
      m2 += x >= t2 ? x : Acc(0);
    }
    a[kAuxMass] = a[kAuxBase] + double(m0);
    a[kAuxMass + 1] = a[kAuxBase] + double(m1);
    a[kAuxMass + 2] = a[kAuxBase] + double(m2);
  } else if (phase == 11) {  // the candidates in [lo, hi): their count, the first few
    const Acc vlo = Acc(p_at(double(lo))), vhi = Acc(p_at(double(hi)));
    const auto c = int64_t(a[kAuxCount]);
    int64_t kept = 0;
    for (int64_t j = 0; j < c; ++j) {
      if (cand[j] < vlo || cand[j] >= vhi) continue;
      if (kept < kExchange) a[kAuxValues + kept] = double(cand[j]);
      ++kept;
    }
    a[kAuxKept] = double(kept);
  } else if (phase == 10) {  // the range's values, and the mass above it
    const Acc vlo = Acc(p_at(double(lo))), vhi = Acc(p_at(double(hi)));
    int64_t c = 0;
    a[kAuxBase] = blocked_sum(width, [&](int64_t j0, int64_t j1) {
      return gather_range(stash, j0, j1, vlo, vhi, cand, c, cap);
    });
    a[kAuxCount] = double(c);
  } else {  // 9: the masses at the range's inner quarter points
    const Acc t[3] = {Acc(p_at(double(lo + (hi - lo) / 4))),
                      Acc(p_at(double(lo + (hi - lo) * 2 / 4))),
                      Acc(p_at(double(lo + (hi - lo) * 3 / 4)))};
    quarter_masses(stash, width, t, a + kAuxMass);
  }
}

// The outputs of a phase of the search on a row without values (masked or empty): zeros.
inline void clear_head_search(int phase, double* a) {
  for (int k = kAuxMass; k <= kAuxKept; ++k)
    if (k != kAuxBase && k != kAuxCount) a[k] = 0.0;
  if (phase == 10) a[kAuxBase] = a[kAuxCount] = 0.0;
}

}  // namespace distill_ops::cpu
