// The dense KD loss of vocab-parallel logits on the CPU: each rank holds a slice of the
// vocabulary, and the row statistics are global. Three phases, with the Python layer's
// all-reduces of a few floats a row between them (distributed/kernel_rows.py):
//   0 (statistics): per row the slice's max and sum exp(z - max) of both sides, the T = 1 sum
//     of the student, and z at the label where the label is in the slice (each phase computes
//     its exponentials again: caching them in [N, V] buffers measured slower, by their memory
//     traffic and page faults);
//   1 (sums): with the global maxima and log-sums, the slice's part of the divergence's sums
//     (the loss, and sum_j h_j where the gradient needs it);
//   2 (gradient): with the global sums too, d loss / d x of the slice, in the student's dtype.
//   AKL: 3 (one bisection step of its global head threshold tau: the slice's teacher mass at
//     p >= tau; ~28 steps, distributed/head.py), 4 (both KLs and the head's and tail's sum
//     |p - q| at the global tau), then 2 with the head's weight. Stashing, the search runs
//     on the stash of p and its own record `aux` (head_search.h; head.py's
//     head_threshold_exchange): 8 (the stash to p, and the slice's masses at the search
//     range's three inner quarter points), 9 (the masses alone), 10 (the range's values
//     gathered into a candidate buffer, passed in the student's place, and the mass above
//     the range), 7 (the masses at three points of the range from the candidates alone,
//     which it keeps to the range: a few hundred values a row, then fewer, not the row), 11
//     (this slice's count of candidates in the range and up to kExchange of them, which the ranks
//     exchange to read tau off); 5 (the stash to p alone) where no step runs.
// Lean phases (`lean`; on one process bitwise equal to the plain ones, AKL to an fp32 rounding
// of p): rows whose z is exact are read where they lie (below, "in place"), and, stashing, a
// stashed phase 2 without the hard term or a student softcap is one pass that overwrites the
// stash with the gradient (AKL's too, its p from the stash).
// Stashing (fp32 gradients of fp32 work, or fp64 of fp64): the gradient buffer, written by
// phase 2 anyway, carries per-logit work between the phases. Phase 0 leaves
// exp(z_s - m_slice) there (m_slice in field 7), and the next phase takes q from it instead
// of an exponential: phase 2 for the KLs (they have no phase 1), phase 1 for the others,
// which leaves the gradient's per-logit term h there in its place, for phase 2 to read
// instead of computing the divergence's terms again (JSD: an exponential and a logarithm
// less a logit, AB: its whole element). AKL stashes nothing in phase 0; phase 5 or 8 writes
// the teacher's p there from the global statistics (the plain phases' p, bit for bit: tied
// logits on two ranks stay tied), its search reads the stash alone, and phases 4 and 2
// take p from it.
// The per-element maths is kd_math.h's, as in dense_kd.cpp.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <utility>
#include <vector>

#include "head_search.h"
#include "kernels.h"
#include "row_io.h"
#include "row_math.h"

namespace distill_ops::cpu {
namespace {

// The row record's fields (double [n_rows, kVpFields]).
enum VpField : int {
  kMs = 0, kSs = 1, kMt = 2, kSt = 3,  // phase 0 out: slice max / sum; in: global max / log-sum
  kS1 = 4,                             // phase 0 out: slice T=1 sum; in: global log T=1 sum
  kZy = 5,                             // phase 0 out: z at the label (0 off the slice)
  kCross = 6,                          // phase 0 out (KLs): the centred cross term (kd_math.h)
  kA = 5, kB = 6,                      // phase 1 out: the two partial sums
  kDiv = 5, kSumH = 6,                 // phase 2 in: the divergence, sum_j h_j (or q g)
  kTau = 7,                            // AKL: tau (phases 3, 4 in), head weight (phase 2 in)
  kMsSlice = 7,                        // stashing (not AKL): the slice's student max
                                       // (phase 0 out)
  // TVD stashing (phase 1 out): -1 where the stash holds sign(q - p) / 2; else it holds q
  // signed by q - p (a lean phase 2 reads q and the sign from it, no exponential), and the
  // field counts the ids with q == p > 0 (sign 0, which that cannot carry: then phase 2
  // computes the row from its logits).
  kTvdStash = 7,
  kVpFields = 8,
};

// One instantiation per divergence and stash mode, so that no inner loop switches on them
// (they vectorise).
template <typename Acc, int kDivergence, bool kStash>
void vp_impl(int phase, RowView student, RowView teacher, const uint8_t* valid,
             const int64_t* labels, double* rec, double* aux, void* grad, int grad_dtype,
             int64_t n_rows, int64_t width, const KDParams& prm, bool reads_in_place,
             int num_threads) {
  const Acc temperature = Acc(prm.temperature), inv_t = Acc(1) / temperature;
  const Acc scale_s = Acc(prm.scale_s), cap_s = Acc(prm.cap_s);
  const Acc scale_t = Acc(prm.scale_t), cap_t = Acc(prm.cap_t);
  const Acc beta = Acc(prm.beta), prm2 = Acc(prm.param2), interp = Acc(prm.interp);
  const Acc hard_w = Acc(prm.hard_weight), soft_c = Acc(prm.soft_coef);
  const bool hard = prm.hard_weight != 0.0;
  constexpr auto div = static_cast<Divergence>(kDivergence);
  const bool mixes = div == Divergence::JSD || div == Divergence::SkewKL ||
                     div == Divergence::SkewReverseKL;
  const Acc log_b = mixes ? log_acc(beta) : Acc(0);
  const Acc log_1mb = mixes ? Acc(std::log1p(-double(beta))) : Acc(0);
  constexpr bool kl = div == Divergence::ForwardKL || div == Divergence::ReverseKL;
  constexpr bool akl = div == Divergence::AKL;
  // AKL stashes p: its search reads the stash alone (phases 5 and 8 write it, from the rows).
  const bool no_rows = kStash && akl && (phase == 3 || phase == 7 || phase >= 9);
  // Phases 5 and 8 write p into the stash from the teacher's row (and TAID's student's).
  const bool p_only = kStash && akl && (phase == 5 || phase == 8);
  // Phase 2 with a stash: the KLs and AKL need both rows (z_s only for the hard term or the
  // softcap in forward KL's case), the others z_s alone (q, and h from the stash).
  const bool load_s = !no_rows && (!p_only || interp != Acc(1)) &&
                      (!kStash || div != Divergence::ForwardKL || hard || cap_s > Acc(0) ||
                       interp != Acc(1) || phase != 2);
  const bool load_t = !no_rows && (!kStash || kl || akl || phase != 2);
  // Phase 2, stashed, without the hard term or a student softcap: one pass that writes the
  // gradient over the stash in place.
  const bool lean = kStash && phase == 2 && !hard && cap_s == Acc(0);
  const bool tvd_lean = kStash && div == Divergence::TVD && !hard && cap_s == Acc(0);
  // Every phase but a scratch-bound phase 2 reads a row where it lies instead of loading it
  // into scratch when its z = x * scale / T is exact: the accumulation type, no softcap or
  // TAID, scale / T a power of two (T = 1 or 2 at scale 1). Under another scale the product
  // would contract into the next subtraction (an fma: z never rounded), and z_max - m would
  // no longer be 0 for phase 0's rounded maximum m; scratch reads are times 1. Either way
  // the same operations in the same order: bitwise equal.
  constexpr int acc_dtype = int(sizeof(Acc) == 8 ? DType::F64 : DType::F32);
  const Acc ks = scale_s * inv_t, kt = scale_t * inv_t;
  const bool in_place = reads_in_place && interp == Acc(1) && (phase != 2 || lean);
  const bool raw_s = in_place && cap_s == Acc(0) && student.dtype == acc_dtype && power_of_two(ks);
  const bool raw_t = in_place && cap_t == Acc(0) && teacher.dtype == acc_dtype && power_of_two(kt);
  const Acc ks_row = raw_s ? ks : Acc(1), kt_row = raw_t ? kt : Acc(1);
  if (phase == 2 || (kStash && phase == 0))
    advise_huge_pages(grad, n_rows * width * dtype_size(grad_dtype));

#pragma omp parallel num_threads(num_threads)
  {
    std::vector<Acc> scratch(size_t(3 * width));
    Acc* zs = scratch.data();
    Acc* zt = zs + width;
    Acc* gz = zt + width;

#pragma omp for schedule(dynamic, 1)
    for (int64_t r = 0; r < n_rows; ++r) {
      double* f = rec + r * kVpFields;
      void* grow = phase == 2 ? row_ptr(grad, grad_dtype, r * width) : nullptr;
      Acc* stash = kStash ? static_cast<Acc*>(row_ptr(grad, grad_dtype, r * width)) : nullptr;
      if ((valid && !valid[r]) || width == 0) {
        if (grow) zero_row(grow, grad_dtype, width);
        if (phase == 0) {
          const double ninf = -std::numeric_limits<double>::infinity();
          f[kMs] = f[kMt] = ninf;
          f[kSs] = f[kSt] = f[kS1] = f[kZy] = f[kCross] = 0.0;
        } else if (phase == 1 || phase == 3) {
          f[kA] = f[kB] = 0.0;
        } else if (kStash && phase >= 7) {
          clear_head_search(phase, aux + r * kAuxFields);
        } else if (phase == 4) {
          f[kA] = f[kB] = f[kTau] = f[kS1] = 0.0;
        }
        continue;
      }
      // TVD's lean phase 2: 0 (the stash holds signed q), 1 (it holds signs), 2 (a tie: the
      // row from its logits).
      const int tvd_mode = !(lean && div == Divergence::TVD) ? 1
                           : f[kTvdStash] < 0.0          ? 1
                           : f[kTvdStash] == 0.0         ? 0
                                                         : 2;
      const bool row_s = load_s || tvd_mode == 2, row_t = load_t || tvd_mode == 2;
      if (row_s && !raw_s) {
        load_transformed(row_ptr(student.ptr, student.dtype, r * student.row_stride),
                         student.dtype, width, scale_s, cap_s, inv_t, zs);
      }
      if (row_t && !raw_t) {
        load_transformed(row_ptr(teacher.ptr, teacher.dtype, r * teacher.row_stride),
                         teacher.dtype, width, scale_t, cap_t, inv_t, zt);
      }
      if (interp != Acc(1) && row_t) {
#pragma omp simd
        for (int64_t j = 0; j < width; ++j) zt[j] = taid_logit(zs[j], zt[j], interp);
      }
      const int64_t label = hard ? labels[r] : -1;  // -1: not in this slice
      const Acc* src_s = raw_s ? static_cast<const Acc*>(row_ptr(student.ptr, student.dtype,
                                                                 r * student.row_stride))
                               : zs;
      const Acc* src_t = raw_t ? static_cast<const Acc*>(row_ptr(teacher.ptr, teacher.dtype,
                                                                 r * teacher.row_stride))
                               : zt;
      auto zs_at = [=](int64_t j) { return src_s[j] * ks_row; };  // z of the row, either way
      auto zt_at = [=](int64_t j) { return src_t[j] * kt_row; };
      if (phase == 0) {
        const Acc ninf = -std::numeric_limits<Acc>::infinity();
        const Acc ms_row = row_max(src_s, width) * ks_row;  // exact: k > 0, a power of two
        const Acc mt_row = row_max(src_t, width) * kt_row;
        f[kMs] = double(ms_row);
        f[kMt] = double(mt_row);
        // A side whose slice is all -inf (a masked range on this rank) holds nothing: its
        // terms exp(-inf - 0) are 0 (exp(-inf - -inf) would be NaN), its maximum stays -inf.
        const Acc ms = ms_row == ninf ? Acc(0) : ms_row, mt = mt_row == ninf ? Acc(0) : mt_row;
        // Both sums (and the KLs' cross term) in one loop: two exponentials a logit.
        constexpr bool fwd = div == Divergence::ForwardKL;
        double sum_s = 0, sum_t = 0, cross = 0;
        for (int64_t j0 = 0; j0 < width; j0 += kSumBlock) {
          const int64_t j1 = std::min(width, j0 + kSumBlock);
          Acc a = 0, b = 0, c = 0;
#pragma omp simd reduction(+ : a, b, c)
          for (int64_t j = j0; j < j1; ++j) {
            const Acc e_s = exp_acc(zs_at(j) - ms), e_t = exp_acc(zt_at(j) - mt);
            if constexpr (kStash && !akl) stash[j] = e_s;
            a += e_s;
            b += e_t;
            // sum_j e_w u_j with u = (zw - mw) - (zo - mo): the weighting side w is the
            // teacher for forward KL, the student for reverse KL. With it the KLs need no
            // sums pass: the Python layer moves each rank's term to the global maxima.
            if constexpr (kl) {
              c += fwd ? cross_term(e_t, zt_at(j), mt, zs_at(j), ms)
                       : cross_term(e_s, zs_at(j), ms, zt_at(j), mt);
            }
          }
          sum_s += double(a);
          sum_t += double(b);
          cross += double(c);
        }
        f[kSs] = sum_s;
        f[kSt] = sum_t;
        f[kCross] = cross;
        f[kS1] = hard ? blocked_sum(width, [&](int64_t j0, int64_t j1) {
          Acc part = 0;
#pragma omp simd reduction(+ : part)
          for (int64_t j = j0; j < j1; ++j) part += exp_acc((zs_at(j) - ms) * temperature);
          return part;
        }) : 0.0;
        f[kZy] = label >= 0 && label < width ? double(zs_at(label)) : 0.0;
        // The slice's own maximum, -inf where it holds nothing: its stash of 0s then rescales
        // by exp(-inf) = 0 (not by exp(0 - m), which overflows where m < -88).
        if constexpr (kStash && !akl) f[kMsSlice] = double(ms_row);
        continue;
      }
      const Acc ms = Acc(f[kMs]), log_ss = Acc(f[kSs]), mt = Acc(f[kMt]), log_st = Acc(f[kSt]);
      // By value: a store to a stash row must not look as if it could change them.
      auto lq_of = [=](int64_t j) { return (zs_at(j) - ms) - log_ss; };
      auto lp_of = [=](int64_t j) { return (zt_at(j) - mt) - log_st; };
      // q and p as e / S, e = exp(z - m), the one-device kernel's form (exp(lq) rounds its
      // argument at |lq|, larger than |z - m| by log S; over 12 seeds on 4 ranks the worst
      // gradient errors fell or held: forward KL 4.8e-8 -> 2.5e-8, skew KL 1.3e-7 -> 2.3e-8).
      const Acc inv_ss = Acc(std::exp(-f[kSs])), inv_st = Acc(std::exp(-f[kSt]));
      auto q_of = [=](int64_t j) { return exp_acc(zs_at(j) - ms) * inv_ss; };
      auto p_of = [=](int64_t j) { return exp_acc(zt_at(j) - mt) * inv_st; };
      // q from phase 0's stashed exp(z_s - m_slice): e * exp(m_slice - m - log S).
      const Acc cq = kStash ? Acc(std::exp(f[kMsSlice] - f[kMs] - f[kSs])) : Acc(0);
      const Acc dv = Acc(f[kDiv]), sum_h = Acc(f[kSumH]);  // phase 2's inputs
      const Acc akl_w = Acc(f[kTau]);                      // AKL: the head's weight
      // Phase 2's d (the gradient w.r.t. z_s over soft_coef / T) of one logit from its stash
      // value sj, which holds exp(z_s - m_slice) (KLs), p (AKL) or h (the others).
      auto stash_d = [=](Acc sj, Acc zsj, Acc ztj) {
        const Acc lq = (zsj - ms) - log_ss;
        if constexpr (div == Divergence::ForwardKL) {
          return sj * cq - exp_acc(ztj - mt) * inv_st;
        } else if constexpr (div == Divergence::ReverseKL) {
          const Acc q = sj * cq;
          return q > Acc(0) ? q * ((lq - ((ztj - mt) - log_st)) - dv) : Acc(0);
        } else if constexpr (div == Divergence::JSD || div == Divergence::TVD) {
          return exp_acc(zsj - ms) * inv_ss * (sj - sum_h);
        } else if constexpr (div == Divergence::AKL) {  // sum_h is the reverse KL
          const Acc q = exp_acc(zsj - ms) * inv_ss, lp = (ztj - mt) - log_st;
          return akl_w * (q - sj) +
                 (Acc(1) - akl_w) * (q > Acc(0) ? q * ((lq - lp) - sum_h) : Acc(0));
        } else {
          return sj - exp_acc(zsj - ms) * inv_ss * sum_h;
        }
      };
      if constexpr (div == Divergence::AKL) {
        if (kStash && (phase == 5 || phase == 8)) {
          // p into the stash, as the plain phases compute it: the global statistics' p of
          // each logit, whatever the slice (tied logits on two ranks stay tied; e * exp(m_slice
          // - M - log S) from phase 0's exponentials rounded them apart by rank).
#pragma omp simd
          for (int64_t j = 0; j < width; ++j) stash[j] = p_of(j);
          if (phase == 5) continue;
        }
        if (kStash && phase >= 7) {  // the stashed search's steps (head_search.h; 8 as 9)
          Acc* cand = const_cast<Acc*>(static_cast<const Acc*>(student.ptr)) +
                      r * student.row_stride;
          head_search_phase(phase == 8 ? 9 : phase, stash, width, cand, student.row_stride,
                            aux + r * kAuxFields);
          continue;
        }
        if (phase == 3) {  // one bisection step: the slice's teacher mass at p >= tau
          const Acc tau = Acc(f[kTau]);
          f[kA] = blocked_sum(width, [&](int64_t j0, int64_t j1) {
            Acc part = 0;
#pragma omp simd reduction(+ : part)
            for (int64_t j = j0; j < j1; ++j) {
              const Acc p = kStash ? stash[j] : p_of(j);
              part += p >= tau ? p : Acc(0);
            }
            return part;
          });
          continue;
        }
        if (phase == 4) {  // both KLs and the head's and tail's sum |p - q| at the global tau
          const Acc tau = Acc(f[kTau]);
          double fkl = 0, rkl = 0, g_head = 0, g_tail = 0;
          for (int64_t j0 = 0; j0 < width; j0 += kSumBlock) {
            const int64_t j1 = std::min(width, j0 + kSumBlock);
            Acc a = 0, b = 0, gh = 0, gt = 0;
#pragma omp simd reduction(+ : a, b, gh, gt)
            for (int64_t j = j0; j < j1; ++j) {
              const Acc lq = lq_of(j), lp = lp_of(j), q = q_of(j);
              const Acc p = kStash ? stash[j] : p_of(j);
              a += xlogratio(p, lp, lq);
              b += xlogratio(q, lq, lp);
              const Acc gap = std::abs(p - q);
              gh += p >= tau ? gap : Acc(0);
              gt += p >= tau ? Acc(0) : gap;
            }
            fkl += double(a);
            rkl += double(b);
            g_head += double(gh);
            g_tail += double(gt);
          }
          f[kA] = fkl;
          f[kB] = rkl;
          f[kTau] = g_head;
          f[kS1] = g_tail;
          continue;
        }
      }
      if (phase == 1) {
        double sum_a = 0, sum_b = 0, ties = 0;
        // AB's one-series form where ab_fast admits the parameters: a second instantiation of
        // the loop (a branch inside it would not vectorise as two loops do).
        const bool ab_one_series = div == Divergence::AB && ab_fast(beta, prm2);
        const ABFast<Acc> abk = ab_one_series ? ab_fast_consts(beta, prm2) : ABFast<Acc>{};
        auto sums = [=, &sum_a, &sum_b, &ties](auto one_series) {
          for (int64_t j0 = 0; j0 < width; j0 += kSumBlock) {
            const int64_t j1 = std::min(width, j0 + kSumBlock);
            Acc a = 0, b = 0, c = 0;
#pragma omp simd reduction(+ : a, b, c)
            for (int64_t j = j0; j < j1; ++j) {
              const Acc lq = lq_of(j), lp = lp_of(j), p = p_of(j);
              const Acc q = kStash ? stash[j] * cq : q_of(j);
              Acc ta = 0, tb = 0;
              if constexpr (div == Divergence::ForwardKL) {
                ta = xlogratio(p, lp, lq);
              } else if constexpr (div == Divergence::ReverseKL) {
                ta = xlogratio(q, lq, lp);
              } else if constexpr (div == Divergence::JSD) {
                const Acc lm = jsd_log_mixture(lp, lq, log_b, log_1mb);
                ta = xlogratio(p, lp, lm);
                tb = xlogratio(q, lq, lm);
                if constexpr (kStash) {  // phase 2's d = q (h - sum_h)
                  stash[j] = q > Acc(0) ? (Acc(1) - beta) * (lq - lm) : Acc(0);
                }
              } else if constexpr (div == Divergence::TVD) {
                ta = std::abs(q - p);
                tb = q * tvd_sign(q, p);
                if constexpr (kStash) {  // d = q (h - sum_h): see kTvdStash
                  stash[j] = tvd_lean ? (q > p ? q : -q) : tvd_sign(q, p);
                  c += q == p && q > Acc(0) ? Acc(1) : Acc(0);
                }
              } else if constexpr (div == Divergence::SkewKL) {
                ta = skew_kl_term(lp, lq, p, beta, log_b, log_1mb, tb);
              } else if constexpr (div == Divergence::SkewReverseKL) {
                ta = skew_reverse_kl_term(lp, lq, q, beta, log_b, log_1mb, tb);
                tb -= q;  // its "+ q" centres to 0 (q sums to one over the whole row)
              } else if constexpr (decltype(one_series)::value) {  // AB
                ta = ab_fast_loss(lp, lq, abk, tb);
              } else {
                ta = ab_loss(lp, lq, beta, prm2);
                tb = ab_dlogq(lp, lq, beta, prm2);
              }
              // The skew KLs and AB: phase 2's d = h - q sum_h, h the sum's own term.
              constexpr bool h_is_tb = div == Divergence::SkewKL ||
                                       div == Divergence::SkewReverseKL || div == Divergence::AB;
              if constexpr (kStash && h_is_tb) stash[j] = tb;
              a += ta;
              b += tb;
            }
            sum_a += double(a);
            sum_b += double(b);
            ties += double(c);
          }
        };
        if (ab_one_series) {
          if constexpr (div == Divergence::AB) sums(std::true_type{});
        } else {
          sums(std::false_type{});
        }
        f[kA] = sum_a;
        f[kB] = sum_b;
        if constexpr (kStash && div == Divergence::TVD) f[kTvdStash] = tvd_lean ? ties : -1.0;
        continue;
      }
      // Phase 2: the gradient w.r.t. z_s, then the hard term, then f'(x) / T.
      const Acc log_s1 = Acc(f[kS1]);
      const Acc coef = soft_c * inv_t;
      if (lean) {
        if (tvd_mode == 0) {
#pragma omp simd
          for (int64_t j = 0; j < width; ++j) {
            const Acc sj = stash[j];
            const Acc h = sj > Acc(0) ? Acc(0.5) : (sj < Acc(0) ? Acc(-0.5) : Acc(0));
            stash[j] = (coef * (std::abs(sj) * (h - sum_h))) * scale_s;
          }
        } else if (tvd_mode == 2) {
#pragma omp simd
          for (int64_t j = 0; j < width; ++j) {
            const Acc q = q_of(j);
            stash[j] = (coef * (q * (tvd_sign(q, p_of(j)) - sum_h))) * scale_s;
          }
        } else {
#pragma omp simd
          for (int64_t j = 0; j < width; ++j)
            stash[j] = (coef * stash_d(stash[j], zs_at(j), zt_at(j))) * scale_s;
        }
        continue;
      }
#pragma omp simd
      for (int64_t j = 0; j < width; ++j) {
        Acc d;
        if constexpr (kStash && !akl) {
          d = stash_d(stash[j], zs_at(j), zt_at(j));
        } else {
          const Acc lq = lq_of(j), lp = lp_of(j), q = q_of(j);
          const Acc p = kStash ? stash[j] : p_of(j);  // AKL stashes p
          if constexpr (div == Divergence::ForwardKL) {
            d = q - p;
          } else if constexpr (div == Divergence::ReverseKL) {
            d = q > Acc(0) ? q * ((lq - lp) - dv) : Acc(0);
          } else if constexpr (div == Divergence::JSD) {
            const Acc lm = jsd_log_mixture(lp, lq, log_b, log_1mb);
            d = q * ((q > Acc(0) ? (Acc(1) - beta) * (lq - lm) : Acc(0)) - sum_h);
          } else if constexpr (div == Divergence::TVD) {
            d = q * (tvd_sign(q, p) - sum_h);
          } else if constexpr (div == Divergence::SkewKL) {
            Acc h;
            skew_kl_term(lp, lq, p, beta, log_b, log_1mb, h);
            d = h - q * sum_h;
          } else if constexpr (div == Divergence::SkewReverseKL) {
            Acc h;
            skew_reverse_kl_term(lp, lq, q, beta, log_b, log_1mb, h);
            d = (h - q) - q * sum_h;
          } else if constexpr (div == Divergence::AB) {
            d = ab_dlogq(lp, lq, beta, prm2) - q * sum_h;
          } else {  // AKL: w (q - p) + (1 - w) q (lq - lp - RKL); sum_h is the reverse KL
            d = akl_w * (q - p) +
                (Acc(1) - akl_w) * (q > Acc(0) ? q * ((lq - lp) - sum_h) : Acc(0));
          }
        }
        Acc g = coef * d;
        if (hard) {
          const Acc sm1 = exp_acc((zs[j] - ms) * temperature - log_s1);
          g += hard_w * (sm1 - Acc(j == label ? 1 : 0));
        }
        gz[j] = g;
      }
      apply_transform_grad(gz, zs, width, scale_s, cap_s, temperature);
      store_row(gz, width, grad_dtype, grow);
    }
  }
}

template <typename Acc, bool kStash>
void vp_dispatch(int phase, RowView student, RowView teacher, const uint8_t* valid,
                 const int64_t* labels, double* rec, double* aux, void* grad, int grad_dtype,
                 int64_t n_rows, int64_t width, const KDParams& p, bool in_place,
                 int threads) {
  switch (static_cast<Divergence>(p.divergence)) {
#define DOPS_VP_CASE(D, S)                                                                    \
  case Divergence::D:                                                                         \
    vp_impl<Acc, int(Divergence::D), S>(phase, student, teacher, valid, labels, rec, aux,     \
                                        grad, grad_dtype, n_rows, width, p, in_place,     \
                                        threads);                                         \
    break;
    DOPS_VP_CASE(ForwardKL, kStash)
    DOPS_VP_CASE(ReverseKL, kStash)
    DOPS_VP_CASE(JSD, kStash)
    DOPS_VP_CASE(TVD, kStash)
    DOPS_VP_CASE(SkewKL, kStash)
    DOPS_VP_CASE(SkewReverseKL, kStash)
    DOPS_VP_CASE(AB, kStash)
    DOPS_VP_CASE(AKL, kStash)
#undef DOPS_VP_CASE
    default:
      break;
  }
}

}  // namespace

void dense_vp(int phase, RowView student, RowView teacher, const uint8_t* valid,
              const int64_t* labels, double* rec, double* aux, void* grad, int grad_dtype,
              int64_t n_rows, int64_t width, const KDParams& params, bool lean,
              int num_threads) {
  const bool f64 = student.dtype == int(DType::F64) || teacher.dtype == int(DType::F64);
  // The stash holds the accumulation type: only a gradient of that dtype can carry it.
  const bool stash = lean && grad != nullptr && grad_dtype == int(f64 ? DType::F64 : DType::F32);
  auto run = [&](auto acc, auto stashing) {
    vp_dispatch<decltype(acc), decltype(stashing)::value>(phase, student, teacher, valid, labels,
                                                          rec, aux, grad, grad_dtype, n_rows,
                                                          width, params, lean, num_threads);
  };
  if (f64) {
    stash ? run(0.0, std::true_type{}) : run(0.0, std::false_type{});
  } else {
    stash ? run(0.0f, std::true_type{}) : run(0.0f, std::false_type{});
  }
}

}  // namespace distill_ops::cpu
