// Sparse KD loss on the CPU: the teacher is k (id, log-probability) pairs per row, the
// student a full row of logits. Per row: the student row is read once into scratch
// (z = x / T, its softmax numerators kept), the k targets are gathered, the divergence is
// taken over the coarse classes (the support ids, plus "rest" for tail = bucket), and the
// gradient is written in one pass: off the support it is a multiple of q_j, on the support
// it is overwritten with its own value. No dense teacher tensor exists.
#include <cmath>
#include <limits>
#include <vector>

#include "kernels.h"
#include "row_io.h"
#include "row_math.h"

namespace distill_ops::cpu {
namespace {

template <typename Acc>
constexpr Acc kNegInf = -std::numeric_limits<Acc>::infinity();

template <typename Acc>
Acc logsumexp(const Acc* x, int64_t n) {
  Acc m = kNegInf<Acc>;
  for (int64_t i = 0; i < n; ++i) m = x[i] > m ? x[i] : m;
  if (m == kNegInf<Acc>) return m;
  Acc s = 0;
  for (int64_t i = 0; i < n; ++i) s += exp_acc(x[i] - m);
  return m + log_acc(s);
}

// The per-row working set of the coarse classes: slots 0..k-1 are the support, slot k is
// the tail class ("rest"; -inf log-probabilities unless tail == bucket).
template <typename Acc>
struct Coarse {
  std::vector<Acc> lp, lq, qg;  // teacher / student log-probabilities, q_hat * dL/dq_hat
  std::vector<int64_t> id;      // vocabulary id of each support slot, -1 for padding
  explicit Coarse(int64_t k) : lp(size_t(k + 1)), lq(size_t(k + 1)), qg(size_t(k + 1)),
                               id(size_t(k)) {}
};

// Teacher log-probabilities over the classes, re-tempered by ratio = T_source / T.
template <typename Acc>
void teacher_classes(Coarse<Acc>& c, const void* tlp, int tlp_dtype, int64_t k, Tail tail,
                     Acc ratio) {
  for (int64_t i = 0; i < k; ++i) {
    const Acc v = tlp_dtype == int(DType::F64) ? Acc(static_cast<const double*>(tlp)[i])
                                               : Acc(static_cast<const float*>(tlp)[i]);
    c.lp[size_t(i)] = c.id[size_t(i)] >= 0 ? v : kNegInf<Acc>;
  }
  Acc rest = kNegInf<Acc>;
  if (tail == Tail::Bucket) {
    // log(1 - sum p) as log(-expm1(log sum p)): no cancellation in the log domain.
    const Acc covered = logsumexp(c.lp.data(), k);
    const Acc r0 = covered < Acc(0) ? -std::expm1(covered) : Acc(0);
    rest = r0 > Acc(0) ? log_acc(r0) : kNegInf<Acc>;
  }
  c.lp[size_t(k)] = rest;
  if (ratio == Acc(1) && (tail == Tail::Bucket || tail == Tail::None)) return;
  for (int64_t i = 0; i <= k; ++i) c.lp[size_t(i)] *= ratio;
  const Acc norm = logsumexp(c.lp.data(), k + 1);
  if (norm == kNegInf<Acc>) return;  // no target at all: every class keeps probability 0
  for (int64_t i = 0; i <= k; ++i) c.lp[size_t(i)] -= norm;
}

// Divergence over the classes; fills c.qg with q_hat_c * dL/dq_hat_c, the product the
// gradient needs (forward KL's is -p_c, finite even where q_hat_c underflows), and returns
// (loss, sum_c q_hat_c g_c). An id j of class c then gets q_j / q_hat_c * qg_c.
template <typename Acc>
std::pair<Acc, Acc> class_divergence(Coarse<Acc>& c, int64_t n_cls, Divergence div, Acc beta,
                                     Acc prm2) {
  Acc loss = 0, sum_qg = 0;
  const bool mixes = div == Divergence::JSD || div == Divergence::SkewKL ||
                     div == Divergence::SkewReverseKL;
  const Acc log_b = mixes ? log_acc(beta) : Acc(0);
  const Acc log_1mb = mixes ? std::log1p(-beta) : Acc(0);
  Acc akl_w = 0, rkl = 0;
  if (div == Divergence::AKL) {
    // The head among the classes: those with less than head_mass (beta) strictly above them.
    Acc fkl = 0, g_head = 0, g_tail = 0;
    for (int64_t i = 0; i < n_cls; ++i) {
      const Acc lp = c.lp[size_t(i)], lq = c.lq[size_t(i)];
      const Acc p = exp_acc(lp), q = exp_acc(lq);
      Acc above = 0;
      for (int64_t j = 0; j < n_cls; ++j) {
        const Acc pj = exp_acc(c.lp[size_t(j)]);
        above += pj > p ? pj : Acc(0);
      }
      fkl += xlogratio(p, lp, lq);
      rkl += xlogratio(q, lq, lp);
      (above < beta || beta >= Acc(1) ? g_head : g_tail) += std::abs(p - q);
    }
    akl_w = akl_head_weight(g_head, g_tail);
    loss = akl_w * fkl + (Acc(1) - akl_w) * rkl;
  }
  for (int64_t i = 0; i < n_cls; ++i) {
    const Acc lp = c.lp[size_t(i)], lq = c.lq[size_t(i)];
    const Acc p = exp_acc(lp), q = exp_acc(lq);
    Acc qg = 0;
    switch (div) {
      case Divergence::ForwardKL:
        loss += xlogratio(p, lp, lq);
        qg = -p;
        break;
      case Divergence::ReverseKL:
        loss += xlogratio(q, lq, lp);
        qg = q > Acc(0) ? q * (lq - lp + Acc(1)) : Acc(0);
        break;
      case Divergence::JSD: {
        const Acc lm = jsd_log_mixture(lp, lq, log_b, log_1mb);
        const Acc kq = xlogratio(q, lq, lm);
        loss += beta * xlogratio(p, lp, lm) + (Acc(1) - beta) * kq;
        qg = (Acc(1) - beta) * kq;
        break;
      }
      case Divergence::TVD:
        loss += Acc(0.5) * std::abs(q - p);
        qg = q * tvd_sign(q, p);
        break;
      case Divergence::SkewKL:
        loss += skew_kl_term(lp, lq, p, beta, log_b, log_1mb, qg);
        break;
      case Divergence::SkewReverseKL:
        loss += skew_reverse_kl_term(lp, lq, q, beta, log_b, log_1mb, qg);
        break;
      case Divergence::AB:
        loss += ab_loss(lp, lq, beta, prm2);
        qg = ab_dlogq(lp, lq, beta, prm2);
        break;
      case Divergence::AKL:  // loss summed above
        qg = -akl_w * p + (Acc(1) - akl_w) * (q > Acc(0) ? q * (lq - lp + Acc(1)) : Acc(0));
        break;
    }
    c.qg[size_t(i)] = qg;
    sum_qg += qg;
  }
  return {loss, sum_qg};
}

template <typename Acc>
void sparse_kd_impl(RowView student, const int64_t* indices, const void* tlp, int tlp_dtype,
                    int64_t k, const uint8_t* valid, const int64_t* labels, void* loss,
                    int loss_dtype, void* grad, int grad_dtype, int64_t grad_stride,
                    int64_t n_rows, int64_t vocab, const SparseParams& prm, int num_threads) {
  const Acc temperature = Acc(prm.temperature), inv_t = Acc(1) / temperature;
  const Acc beta = Acc(prm.beta), prm2 = Acc(prm.param2), interp = Acc(prm.interp);
  const Acc hard_w = Acc(prm.hard_weight), soft_c = Acc(prm.soft_coef);
  const Acc ratio = Acc(prm.source_temperature / prm.temperature);
  const auto div = static_cast<Divergence>(prm.divergence);
  const auto tail = static_cast<Tail>(prm.tail);
  const bool hard = prm.hard_weight != 0.0;
  const Acc nan = std::numeric_limits<Acc>::quiet_NaN();
  const int64_t tlp_size = tlp_dtype == int(DType::F64) ? 8 : 4;
  advise_huge_pages(grad, n_rows * grad_stride * dtype_size(grad_dtype));

#pragma omp parallel num_threads(num_threads)
  {
    std::vector<Acc> scratch(size_t(3 * vocab));
    Acc* zs = scratch.data();
    Acc* es = zs + vocab;
    Acc* gz = es + vocab;
    Coarse<Acc> c(k);
    std::vector<Acc> e_sup(static_cast<size_t>(k));

#pragma omp for schedule(dynamic, 1)
    for (int64_t r = 0; r < n_rows; ++r) {
      void* grow = grad ? row_ptr(grad, grad_dtype, r * grad_stride) : nullptr;
      Acc row_loss = 0;
      if (valid && !valid[r]) {
        if (grow) zero_row(grow, grad_dtype, vocab);
      } else {
        load_transformed(row_ptr(student.ptr, student.dtype, r * student.row_stride),
                         student.dtype, vocab, Acc(1), Acc(0), inv_t, zs);
        const RowStats<Acc> s = softmax_stats(zs, vocab, es);
        bool ids_ok = true;
        int64_t n_sup = 0;
        for (int64_t i = 0; i < k; ++i) {
          const int64_t id = indices[r * k + i];
          ids_ok = ids_ok && id < vocab;
          c.id[size_t(i)] = id < vocab ? id : -1;
          n_sup += id >= 0 && id < vocab;
        }
        // A support that is the whole vocabulary leaves no "rest": its teacher mass is
        // rounding residue, and it has no student entry to go to.
        const Tail row_tail = tail == Tail::Bucket && n_sup == vocab ? Tail::Renorm : tail;
        teacher_classes(c, static_cast<const char*>(tlp) + r * k * tlp_size, tlp_dtype, k,
                        row_tail, ratio);

        // Student classes. The tail's mass is summed over the off-support entries
        // themselves (support zeroed, then restored), never as 1 - (support mass).
        if (row_tail == Tail::Support) {
          for (int64_t i = 0; i < k; ++i)
            c.lq[size_t(i)] = c.id[size_t(i)] >= 0 ? zs[c.id[size_t(i)]] : kNegInf<Acc>;
          const Acc lse = logsumexp(c.lq.data(), k);
          for (int64_t i = 0; i < k; ++i) c.lq[size_t(i)] -= lse;
        } else {
          for (int64_t i = 0; i < k; ++i) {
            const int64_t id = c.id[size_t(i)];
            c.lq[size_t(i)] = id >= 0 ? (zs[id] - s.m) - s.log_s : kNegInf<Acc>;
          }
        }
        // The rest's mass at the row maximum (s_rest); where that is below kRestFloor, at
        // the rest's own maximum (rest.m > -inf, rest.s), its log mass relative to s.m
        // either way in l_rest.
        Acc s_rest = 0, l_rest = kNegInf<Acc>;
        RestMass<Acc> rest{kNegInf<Acc>, Acc(0)};
        if (row_tail == Tail::Bucket) {
          for (int64_t i = 0; i < k; ++i) {
            const int64_t id = c.id[size_t(i)];
            if (id >= 0) {
              e_sup[size_t(i)] = es[id];
              es[id] = 0;
            }
          }
          s_rest = Acc(blocked_sum(vocab, [&](int64_t j0, int64_t j1) {
            Acc part = 0;
#pragma omp simd reduction(+ : part)
            for (int64_t j = j0; j < j1; ++j) part += es[j];
            return part;
          }));
          for (int64_t i = k - 1; i >= 0; --i)  // backwards: a repeated id gets its first save
            if (c.id[size_t(i)] >= 0) es[c.id[size_t(i)]] = e_sup[size_t(i)];
          if (s_rest >= Acc(kRestFloor)) {
            l_rest = log_acc(s_rest);
          } else {  // the same with the support's z at -inf, at the rest's own maximum
            for (int64_t i = 0; i < k; ++i)
              if (c.id[size_t(i)] >= 0) e_sup[size_t(i)] = zs[c.id[size_t(i)]];
            for (int64_t i = 0; i < k; ++i)
              if (c.id[size_t(i)] >= 0) zs[c.id[size_t(i)]] = kNegInf<Acc>;
            rest = rest_at_own_max<Acc>(vocab, [&](int64_t j) { return zs[j]; });
            for (int64_t i = 0; i < k; ++i)
              if (c.id[size_t(i)] >= 0) zs[c.id[size_t(i)]] = e_sup[size_t(i)];
            if (rest.s > Acc(0)) l_rest = (rest.m - s.m) + log_acc(rest.s);
          }
        }
        const bool rare = rest.s > Acc(0);  // the rest taken at its own maximum
        c.lq[size_t(k)] = l_rest - s.log_s;
        const int64_t n_cls = row_tail == Tail::Bucket ? k + 1 : k;
        if (interp != Acc(1)) {  // TAID over the classes: the target moves from the student
          for (int64_t i = 0; i < n_cls; ++i)
            c.lp[size_t(i)] = taid_logit(c.lq[size_t(i)], c.lp[size_t(i)], interp);
          const Acc norm = logsumexp(c.lp.data(), n_cls);
          if (norm != kNegInf<Acc>)
            for (int64_t i = 0; i < n_cls; ++i) c.lp[size_t(i)] -= norm;
        }
        const auto [div_loss, sum_qg] = class_divergence(c, n_cls, div, beta, prm2);
        row_loss = soft_c * (ids_ok ? div_loss : nan);

        const int64_t label = hard ? labels[r] : -1;
        const HardLabel<Acc> ce(zs, hard ? vocab : 0, s, temperature, label);
        if (hard) row_loss += hard_w * ce.ce;

        if (grow) {
          // Off the support: dL/dz_j = q_j (g_rest - sum_qg) for bucket, -q_j sum_qg for
          // renorm/none, 0 for support; with q_j = es[j] / s and q_j / q_rest = es[j] / s_rest.
          Acc off = row_tail == Tail::Support ? Acc(0) : -sum_qg * s.inv_s;
          if (rare) {  // e_j at the rest's maximum: q_j = e_j exp(rest.m - m) / s
            off = off * exp_acc(rest.m - s.m) + c.qg[size_t(k)] / rest.s;
            for (int64_t j = 0; j < vocab; ++j) gz[j] = exp_acc(zs[j] - rest.m) * off;
          } else {
            if (row_tail == Tail::Bucket && s_rest > Acc(0)) off += c.qg[size_t(k)] / s_rest;
#pragma omp simd
            for (int64_t j = 0; j < vocab; ++j) gz[j] = es[j] * off;
          }
          // On the support: the class's own gradient (q_j is its q_hat).
          for (int64_t i = 0; i < k; ++i) {
            const int64_t id = c.id[size_t(i)];
            if (id >= 0) gz[id] = c.qg[size_t(i)] - exp_acc(c.lq[size_t(i)]) * sum_qg;
          }
          if (!ids_ok) {
            for (int64_t j = 0; j < vocab; ++j) gz[j] = nan;
          }
          if (hard) {
            ce.add_grad(gz, zs, es, vocab, s, temperature, soft_c * inv_t, hard_w);
          } else {
            const Acc coef = soft_c * inv_t;
#pragma omp simd
            for (int64_t j = 0; j < vocab; ++j) gz[j] *= coef;
          }
          store_row(gz, vocab, grad_dtype, grow);
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

}  // namespace

void sparse_kd(RowView student, const int64_t* indices, const void* teacher_logprobs,
               int tlp_dtype, int64_t k, const uint8_t* valid, const int64_t* labels,
               void* loss, int loss_dtype, void* grad, int grad_dtype, int64_t grad_stride,
               int64_t n_rows, int64_t vocab, const SparseParams& params, int num_threads) {
  if (student.dtype == int(DType::F64)) {
    sparse_kd_impl<double>(student, indices, teacher_logprobs, tlp_dtype, k, valid, labels,
                           loss, loss_dtype, grad, grad_dtype, grad_stride, n_rows, vocab,
                           params, num_threads);
  } else {
    sparse_kd_impl<float>(student, indices, teacher_logprobs, tlp_dtype, k, valid, labels,
                          loss, loss_dtype, grad, grad_dtype, grad_stride, n_rows, vocab,
                          params, num_threads);
  }
}

}  // namespace distill_ops::cpu
