// Dense KD loss on the CPU: OpenMP over rows, one row at a time in per-thread scratch.
//
// Per row: load both rows once, transformed (z = f(x) / T), into scratch; row maxima; one
// vectorised pass of exp for both softmax numerators (kept, so no exp is computed twice);
// one pass for the divergence (and the quantity its gradient needs); one pass for the
// gradient, written straight in the student's dtype. Everything after the first load works
// on scratch that stays in L2 for V up to ~128k.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "kernels.h"
#include "row_io.h"
#include "row_math.h"

namespace distill_ops::cpu {
namespace {

// The largest tau among [lo, hi) with sum_{v >= tau} v >= need (the smallest value of the
// head; ties at the boundary all in): a three-way partition around a pivot keeps the side
// that holds the boundary (expected O(n)). 0 where even the whole range falls short.
template <typename Acc>
Acc select_head(Acc* lo, Acc* hi, double need) {
  Acc tau = Acc(0);
  while (lo < hi) {
    const Acc pivot = std::max(std::min(lo[0], hi[-1]), std::min(std::max(lo[0], hi[-1]),
                                                                  lo[(hi - lo) / 2]));
    if (!(pivot == pivot)) break;  // a NaN row: its loss is NaN anyway
    Acc* gt_end = std::partition(lo, hi, [&](Acc v) { return v > pivot; });
    Acc* eq_end = std::partition(gt_end, hi, [&](Acc v) { return v == pivot; });
    double above = 0, at = 0;
    for (Acc* v = lo; v < gt_end; ++v) above += double(*v);
    for (Acc* v = gt_end; v < eq_end; ++v) at += double(*v);
    if (gt_end > lo && above >= need) {
      hi = gt_end;  // the boundary lies among the larger values
    } else if (above + at >= need || eq_end == hi) {
      tau = pivot;  // the pivot's ties close the head (or nothing smaller is left)
      break;
    } else {
      need -= above + at;
      tau = pivot;
      lo = eq_end;
    }
  }
  return tau;
}

// p's bin in AKL's mass histogram: the top bits of its fp32 pattern (p >= 0 orders as its
// bits, and rounding a double p to fp32 keeps that order), 1/8 of a binade a bin.
constexpr int kHeadBinShift = 20;
constexpr int kHeadBins = 1 << (31 - kHeadBinShift);

template <typename Acc>
inline int head_bin(Acc p) {
  uint32_t bits;
  const float f = float(p);
  std::memcpy(&bits, &f, sizeof bits);
  return int((bits & 0x7FFFFFFFu) >> kHeadBinShift);
}

// AKL's scratch, one per thread: the boundary bin's values and the mass histogram.
template <typename Acc>
struct HeadScratch {
  std::vector<Acc> values;
  std::vector<double> bins;
};

// AKL's head threshold: the largest tau with sum_{p_j >= tau} p_j >= head_mass, i.e. the
// smallest probability of the head (the teacher's most probable ids up to that cumulative
// mass, its top-1 always, ties at the boundary all in). Found by selection, not a sort: one
// pass sums p into a histogram of its bits, the bins above the boundary's are the head for
// certain, and select_head runs over that one bin's values alone (a row shorter than the
// histogram goes to select_head whole).
template <typename Acc>
Acc akl_threshold(const Acc* et, Acc inv_s, int64_t n, Acc head_mass, HeadScratch<Acc>& scr) {
  if (head_mass >= Acc(1)) return Acc(0);  // the whole vocabulary, whatever its sum rounds to
  double need = double(head_mass);
  std::vector<Acc>& buf = scr.values;
  if (n < 2 * kHeadBins) {
    buf.resize(size_t(n));
    for (int64_t j = 0; j < n; ++j) buf[size_t(j)] = et[j] * inv_s;
    return select_head(buf.data(), buf.data() + n, need);
  }
  std::vector<double>& bins = scr.bins;
  bins.assign(size_t(kHeadBins), 0.0);
  for (int64_t j = 0; j < n; ++j) {
    const Acc p = et[j] * inv_s;
    bins[size_t(head_bin(p))] += double(p);
  }
  int b = kHeadBins - 1;
  for (; b >= 0; --b) {
    if (bins[size_t(b)] >= need) break;
    need -= bins[size_t(b)];
  }
  if (b < 0) return Acc(0);  // the whole row falls short (its sum rounds below head_mass)
  buf.clear();
  for (int64_t j = 0; j < n; ++j) {
    const Acc p = et[j] * inv_s;
    if (head_bin(p) == b) buf.push_back(p);
  }
  return select_head(buf.data(), buf.data() + buf.size(), need);
}

// (sum of the terms, sum of h) of an element-separable divergence whose `term(lp, lq, p, q,
// h)` returns an element's loss term and sets its h = dL/dlog q, which goes into et[j]. One
// loop per divergence (a lambda each), so that each vectorises.
template <typename Acc, typename Term>
std::pair<double, double> separable_sums(int64_t n, const Acc* zs, const Acc* zt, const Acc* es,
                                         Acc* et, RowStats<Acc> s, RowStats<Acc> t, Term term) {
  return blocked_sum2(n, [&](int64_t j0, int64_t j1) {
    Acc part = 0, part_h = 0;
#pragma omp simd reduction(+ : part, part_h)
    for (int64_t j = j0; j < j1; ++j) {
      const Acc lq = (zs[j] - s.m) - s.log_s;
      const Acc lp = (zt[j] - t.m) - t.log_s;
      Acc h;
      part += term(lp, lq, et[j] * t.inv_s, es[j] * s.inv_s, h);
      part_h += h;
      et[j] = h;
    }
    return std::pair<Acc, Acc>(part, part_h);
  });
}

// The research divergences of one row: the loss, with h_j = dL/dlog q_j left in et[j].
template <typename Acc>
Acc research_row(Divergence div, Acc prm, Acc prm2, const Acc* zs, const Acc* zt,
                 const Acc* es, Acc* et, RowStats<Acc> s, RowStats<Acc> t, int64_t n,
                 HeadScratch<Acc>& scr) {
  if (div == Divergence::AKL) {
    const Acc tau = akl_threshold(et, t.inv_s, n, prm, scr);
    double fkl = 0, rkl = 0, g_head = 0, g_tail = 0;
    for (int64_t j0 = 0; j0 < n; j0 += kSumBlock) {
      const int64_t j1 = std::min(n, j0 + kSumBlock);
      Acc f = 0, r = 0, gh = 0, gt = 0;
#pragma omp simd reduction(+ : f, r, gh, gt)
      for (int64_t j = j0; j < j1; ++j) {
        const Acc lq = (zs[j] - s.m) - s.log_s;
        const Acc lp = (zt[j] - t.m) - t.log_s;
        const Acc q = es[j] * s.inv_s;
        const Acc p = et[j] * t.inv_s;
        f += xlogratio(p, lp, lq);
        r += xlogratio(q, lq, lp);
        const Acc gap = std::abs(p - q);
        gh += p >= tau ? gap : Acc(0);
        gt += p >= tau ? Acc(0) : gap;
      }
      fkl += double(f);
      rkl += double(r);
      g_head += double(gh);
      g_tail += double(gt);
    }
    const Acc w = akl_head_weight(Acc(g_head), Acc(g_tail));
    // The gradient written directly (q and p both sum to one): w (q - p) + (1 - w) q (lq - lp
    // - RKL); et takes it with h's meaning for a zero sum.
    const Acc rk = Acc(rkl);
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) {
      const Acc lq = (zs[j] - s.m) - s.log_s;
      const Acc lp = (zt[j] - t.m) - t.log_s;
      const Acc q = es[j] * s.inv_s;
      const Acc p = et[j] * t.inv_s;
      et[j] = w * (q - p) + (Acc(1) - w) * (q > Acc(0) ? q * ((lq - lp) - rk) : Acc(0));
    }
    return w * Acc(fkl) + (Acc(1) - w) * rk;
  }
  const Acc log_s = div == Divergence::AB ? Acc(0) : log_acc(prm);
  const Acc log_1ms = div == Divergence::AB ? Acc(0) : log_acc(Acc(1) - prm);
  std::pair<double, double> sums;
  switch (div) {
    case Divergence::SkewKL:
      sums = separable_sums(n, zs, zt, es, et, s, t, [&](Acc lp, Acc lq, Acc p, Acc, Acc& h) {
        return skew_kl_term(lp, lq, p, prm, log_s, log_1ms, h);
      });
      break;
    case Divergence::SkewReverseKL:
      sums = separable_sums(n, zs, zt, es, et, s, t, [&](Acc lp, Acc lq, Acc, Acc q, Acc& h) {
        const Acc term = skew_reverse_kl_term(lp, lq, q, prm, log_s, log_1ms, h);
        h -= q;  // its "+ q" centres to 0 (q sums to one): dropped, less to cancel
        return term;
      });
      break;
    default:
      if (ab_fast(prm, prm2)) {
        const ABFast<Acc> k = ab_fast_consts(prm, prm2);
        sums = separable_sums(n, zs, zt, es, et, s, t, [&](Acc lp, Acc lq, Acc, Acc, Acc& h) {
          return ab_fast_loss(lp, lq, k, h);
        });
      } else {
        sums = separable_sums(n, zs, zt, es, et, s, t, [&](Acc lp, Acc lq, Acc, Acc, Acc& h) {
          h = ab_dlogq(lp, lq, prm, prm2);
          return ab_loss(lp, lq, prm, prm2);
        });
      }
  }
  const Acc sh = Acc(sums.second);
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) et[j] -= es[j] * s.inv_s * sh;
  return Acc(sums.first);
}

// Computes the divergence of one row and leaves in d[j] its gradient w.r.t. z_s[j].
// es/et hold exp(z - max) of student/teacher; et is overwritten by d.
template <typename Acc>
Acc divergence_row(Divergence div, Acc beta, Acc prm2, const Acc* zs, const Acc* zt,
                   const Acc* es, Acc* et, RowStats<Acc> s, RowStats<Acc> t, int64_t n,
                   bool want_grad, HeadScratch<Acc>& scr) {
  Acc loss = 0;
  if (int(div) >= int(Divergence::SkewKL))
    return research_row(div, beta, prm2, zs, zt, es, et, s, t, n, scr);
  switch (div) {
    case Divergence::ForwardKL: {
      loss = Acc(blocked_sum(n, [&](int64_t j0, int64_t j1) {
        Acc part = 0;
#pragma omp simd reduction(+ : part)
        for (int64_t j = j0; j < j1; ++j) {
          const Acc lq = (zs[j] - s.m) - s.log_s;
          const Acc lp = (zt[j] - t.m) - t.log_s;
          const Acc p = et[j] * t.inv_s;
          part += xlogratio(p, lp, lq);
          et[j] = es[j] * s.inv_s - p;
        }
        return part;
      }));
      break;
    }
    case Divergence::ReverseKL: {
      loss = Acc(blocked_sum(n, [&](int64_t j0, int64_t j1) {
        Acc part = 0;
#pragma omp simd reduction(+ : part)
        for (int64_t j = j0; j < j1; ++j) {
          const Acc lq = (zs[j] - s.m) - s.log_s;
          const Acc lp = (zt[j] - t.m) - t.log_s;
          const Acc q = es[j] * s.inv_s;
          part += xlogratio(q, lq, lp);
          et[j] = q > Acc(0) ? lq - lp : Acc(0);  // g_j - 1
        }
        return part;
      }));
      if (want_grad) {
#pragma omp simd
        for (int64_t j = 0; j < n; ++j) {
          const Acc q = es[j] * s.inv_s;
          et[j] = q > Acc(0) ? q * (et[j] - loss) : Acc(0);
        }
      }
      break;
    }
    case Divergence::JSD: {
      const Acc log_b = log_acc(beta), log_1mb = log_acc(Acc(1) - beta);
      const auto [sum_p, sum_q] = blocked_sum2(n, [&](int64_t j0, int64_t j1) {
        Acc part_p = 0, part_q = 0;
#pragma omp simd reduction(+ : part_p, part_q)
        for (int64_t j = j0; j < j1; ++j) {
          const Acc lq = (zs[j] - s.m) - s.log_s;
          const Acc lp = (zt[j] - t.m) - t.log_s;
          const Acc q = es[j] * s.inv_s;
          const Acc p = et[j] * t.inv_s;
          const Acc lm = jsd_log_mixture(lp, lq, log_b, log_1mb);
          part_p += xlogratio(p, lp, lm);
          part_q += xlogratio(q, lq, lm);
          et[j] = q > Acc(0) ? (Acc(1) - beta) * (lq - lm) : Acc(0);  // g_j
        }
        return std::pair<Acc, Acc>(part_p, part_q);
      });
      const Acc kl_p = Acc(sum_p), kl_q = Acc(sum_q);
      loss = beta * kl_p + (Acc(1) - beta) * kl_q;
      if (want_grad) {
        const Acc sum_qg = (Acc(1) - beta) * kl_q;
#pragma omp simd
        for (int64_t j = 0; j < n; ++j) et[j] = es[j] * s.inv_s * (et[j] - sum_qg);
      }
      break;
    }
    case Divergence::TVD: {
      const auto [sum_abs, sum_g] = blocked_sum2(n, [&](int64_t j0, int64_t j1) {
        Acc part_abs = 0, part_qg = 0;
#pragma omp simd reduction(+ : part_abs, part_qg)
        for (int64_t j = j0; j < j1; ++j) {
          const Acc q = es[j] * s.inv_s;
          const Acc p = et[j] * t.inv_s;
          const Acc g = tvd_sign(q, p);
          part_abs += std::abs(q - p);
          part_qg += q * g;
          et[j] = g;
        }
        return std::pair<Acc, Acc>(part_abs, part_qg);
      });
      loss = Acc(0.5 * sum_abs);
      const Acc sum_qg = Acc(sum_g);
      if (want_grad) {
#pragma omp simd
        for (int64_t j = 0; j < n; ++j) et[j] = es[j] * s.inv_s * (et[j] - sum_qg);
      }
      break;
    }
    default:
      break;
  }
  return loss;
}

template <typename Acc>
void dense_kd_impl(RowView student, RowView teacher, const uint8_t* valid, const int64_t* labels,
                   void* loss, int loss_dtype, void* grad, int grad_dtype, int64_t grad_stride,
                   int64_t grad_cols, int64_t n_rows, int64_t vocab, const KDParams& prm,
                   int num_threads) {
  const Acc temperature = Acc(prm.temperature);
  const Acc inv_t = Acc(1) / temperature;
  const Acc scale_s = Acc(prm.scale_s), cap_s = Acc(prm.cap_s);
  const Acc scale_t = Acc(prm.scale_t), cap_t = Acc(prm.cap_t);
  const Acc hard_w = Acc(prm.hard_weight), soft_c = Acc(prm.soft_coef);
  const Acc beta = Acc(prm.beta), prm2 = Acc(prm.param2), interp = Acc(prm.interp);
  const bool hard = prm.hard_weight != 0.0;
  const auto div = static_cast<Divergence>(prm.divergence);
  advise_huge_pages(grad, n_rows * grad_stride * dtype_size(grad_dtype));

#pragma omp parallel num_threads(num_threads)
  {
    std::vector<Acc> scratch(size_t(4 * vocab));
    Acc* zs = scratch.data();
    Acc* zt = zs + vocab;
    Acc* es = zt + vocab;
    Acc* et = es + vocab;
    HeadScratch<Acc> head_scratch;

#pragma omp for schedule(dynamic, 1)
    for (int64_t r = 0; r < n_rows; ++r) {
      void* grow = grad ? row_ptr(grad, grad_dtype, r * grad_stride) : nullptr;
      Acc row_loss = 0;
      if (valid && !valid[r]) {
        if (grow) zero_row(grow, grad_dtype, grad_cols);
      } else {
        load_transformed(row_ptr(student.ptr, student.dtype, r * student.row_stride),
                         student.dtype, vocab, scale_s, cap_s, inv_t, zs);
        load_transformed(row_ptr(teacher.ptr, teacher.dtype, r * teacher.row_stride),
                         teacher.dtype, vocab, scale_t, cap_t, inv_t, zt);
        if (interp != Acc(1)) {  // TAID: the target moves from the student to the teacher
#pragma omp simd
          for (int64_t j = 0; j < vocab; ++j) zt[j] = taid_logit(zs[j], zt[j], interp);
        }
        const RowStats<Acc> s = softmax_stats(zs, vocab, es);
        const RowStats<Acc> t = softmax_stats(zt, vocab, et);
        const bool want_grad = grow != nullptr;
        row_loss = soft_c * divergence_row(div, beta, prm2, zs, zt, es, et, s, t, vocab,
                                             want_grad, head_scratch);
        // A NaN or +inf logit makes its side's sum NaN: the row's loss is NaN whatever the
        // divergence's 0 * log 0 guards would hide (the op layer then makes its gradient
        // row NaN too).
        if (std::isnan(s.log_s) || std::isnan(t.log_s))
          row_loss = std::numeric_limits<Acc>::quiet_NaN();

        // Cross-entropy on the labels at T = 1: z * T is f(x) again.
        const int64_t label = hard ? labels[r] : -1;
        const HardLabel<Acc> ce(zs, hard ? vocab : 0, s, temperature, label);
        if (hard) row_loss += hard_w * ce.ce;

        if (grow) {
          // et now holds dD/dz_s; turn it into dL/dx_s in place, then store.
          const Acc coef = soft_c * inv_t;
          if (hard || cap_s > Acc(0)) {
            if (hard) {
              ce.add_grad(et, zs, es, vocab, s, temperature, coef, hard_w);
            } else {
#pragma omp simd
              for (int64_t j = 0; j < vocab; ++j) et[j] *= coef;
            }
            apply_transform_grad(et, zs, vocab, scale_s, cap_s, temperature);
            store_row(et, vocab, grad_dtype, grow);
          } else {  // one pass: the same two products, rounded alike, stored as they come
            store_scaled_row(et, vocab, coef, scale_s, grad_dtype, grow);
          }
          zero_row(row_ptr(grow, grad_dtype, vocab), grad_dtype, grad_cols - vocab);
        }
      }
      if (loss_dtype == int(DType::F64)) {
        static_cast<double*>(loss)[r] = double(row_loss);
      } else {
        static_cast<float*>(loss)[r] = float(row_loss);
      }
    }
  }
}

template <typename Acc>
void scale_rows_impl(const void* grad, void* out, int dtype, const void* scale, int scale_dtype,
                     int64_t scale_stride, int64_t n_rows, int64_t n_cols, int num_threads) {
#pragma omp parallel num_threads(num_threads)
  {
    std::vector<Acc> buf(size_t(std::min<int64_t>(n_cols, 4096)));
#pragma omp for schedule(static)
    for (int64_t r = 0; r < n_rows; ++r) {
      const int64_t si = r * scale_stride;
      const Acc c = scale_dtype == int(DType::F64) ? Acc(static_cast<const double*>(scale)[si])
                                                   : Acc(static_cast<const float*>(scale)[si]);
      if (c == Acc(1) && out == grad) continue;  // in place by exactly 1: nothing to do
      for (int64_t j0 = 0; j0 < n_cols; j0 += int64_t(buf.size())) {
        const int64_t n = std::min<int64_t>(int64_t(buf.size()), n_cols - j0);
        load_transformed(row_ptr(grad, dtype, r * n_cols + j0), dtype, n, c, Acc(0), Acc(1),
                         buf.data());
        store_row(buf.data(), n, dtype, row_ptr(out, dtype, r * n_cols + j0));
      }
    }
  }
}

}  // namespace

void dense_kd(RowView student, RowView teacher, const uint8_t* valid, const int64_t* labels,
              void* loss, int loss_dtype, void* grad, int grad_dtype, int64_t grad_stride,
              int64_t grad_cols, int64_t n_rows, int64_t vocab, const KDParams& params,
              int num_threads) {
  if (student.dtype == int(DType::F64) || teacher.dtype == int(DType::F64)) {
    dense_kd_impl<double>(student, teacher, valid, labels, loss, loss_dtype, grad, grad_dtype,
                          grad_stride, grad_cols, n_rows, vocab, params, num_threads);
  } else {
    dense_kd_impl<float>(student, teacher, valid, labels, loss, loss_dtype, grad, grad_dtype,
                         grad_stride, grad_cols, n_rows, vocab, params, num_threads);
  }
}

void scale_rows(const void* grad, void* out, int dtype, const void* scale, int scale_dtype,
                int64_t scale_stride, int64_t n_rows, int64_t n_cols, int num_threads) {
  if (dtype == int(DType::F64)) {
    scale_rows_impl<double>(grad, out, dtype, scale, scale_dtype, scale_stride, n_rows, n_cols,
                            num_threads);
  } else {
    scale_rows_impl<float>(grad, out, dtype, scale, scale_dtype, scale_stride, n_rows, n_cols,
                           num_threads);
  }
}

}  // namespace distill_ops::cpu
