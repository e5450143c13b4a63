// The sparse KD loss of vocab-parallel student logits on the CPU: each rank holds a slice
// [n_rows, width] of the vocabulary (columns offset .. offset + width of the global ids), the
// k teacher targets are global ids. Two phases around the Python layer's two all-reduces and
// its divergence over the k + 1 coarse classes (distributed/vocab_parallel.py):
//   0 (statistics): per row, z = x / T: the slice's max m, sum exp(z - m), the part of it off
//     the support (summed from its own terms: no cancellation against the support's mass),
//     how many support ids the slice owns, the T = 1 sum exp((z - m) T) of the hard term, z at
//     the label where the label is in the slice; and z at each owned support id ([n_rows, k],
//     0 elsewhere). An ignored row counts as logits of 0, as the PyTorch path does.
//   1 (gradient): with the global max, the per-row coefficient of the off-support ids, each
//     owned support id's own gradient and the hard term's log-sum: d loss / d x of the slice.
// Lean (`lean`; bitwise equal to the plain phases on one process): phase 0 leaves its
// exponentials in the gradient buffer when that holds the accumulation type (m_slice in
// field 6), and phase 1 rescales them there; exact rows are read in place (dense_vp.cpp).
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "kernels.h"
#include "row_io.h"
#include "row_math.h"

namespace distill_ops::cpu {
namespace {

enum SpField : int {
  kM = 0, kSum = 1, kRest = 2, kOwn = 3, kSum1 = 4, kZy = 5,  // phase 0 out
  kMSlice = 6,                                                   // phase 0 out, stashing
  kOff = 1, kBase = 2, kLogS1 = 4,                     // phase 1 in (kM: global max)
  kSpFields = 8,
};

template <typename Acc>
void sp_impl(int phase, RowView student, const int64_t* idx, int64_t k, int64_t offset,
             const uint8_t* valid, const int64_t* labels, double* rec, double* zsup,
             const double* sup_grad, void* grad, int grad_dtype, int64_t n_rows, int64_t width,
             double temperature, double hard_weight, bool lean, int num_threads) {
  const Acc t = Acc(temperature), inv_t = Acc(1) / t, hard_w = Acc(hard_weight);
  const bool hard = hard_weight != 0.0;
  constexpr int acc_dtype = int(sizeof(Acc) == 8 ? DType::F64 : DType::F32);
  // Lean: the gradient buffer (of the accumulation type) carries phase 0's exp(z - m_slice)
  // to phase 1, which then scales it in place (no exponential; the row is read again only
  // for the hard term); a row in that type at a power-of-two 1 / T is read in place, not
  // through scratch (row_math.h: power_of_two).
  const bool stash = lean && grad != nullptr && grad_dtype == acc_dtype;
  const bool in_place = lean && student.dtype == acc_dtype && power_of_two(inv_t);
  const bool load = phase == 0 || !stash || hard;
  if (stash) advise_huge_pages(grad, n_rows * width * dtype_size(grad_dtype));
#pragma omp parallel num_threads(num_threads)
  {
    std::vector<Acc> z(size_t(width) + 1), g(size_t(width) + 1);
    std::vector<int32_t> slot(size_t(width), -1);  // support slot of each owned column
#pragma omp for schedule(dynamic, 1)
    for (int64_t r = 0; r < n_rows; ++r) {
      double* f = rec + r * kSpFields;
      const int64_t* ids = idx + r * k;
      const bool ok = valid == nullptr || valid[r] != 0;
      const bool raw = ok && in_place;
      // Phase 1's off-support e_j at a base other than the maximum (the rest's log-mass,
      // distributed/coarse.py rest_shift): the stash underflowed there, the row is read.
      const bool rebased = phase == 1 && ok && f[kBase] != f[kM];
      if ((load || rebased) && !raw) {
        if (ok) {
          load_transformed(row_ptr(student.ptr, student.dtype, r * student.row_stride),
                           student.dtype, width, Acc(1), Acc(0), inv_t, z.data());
        } else {
          std::fill(z.begin(), z.begin() + width, Acc(0));
        }
      }
      const Acc* src = raw ? static_cast<const Acc*>(row_ptr(student.ptr, student.dtype,
                                                             r * student.row_stride))
                           : z.data();
      const Acc kz = raw ? inv_t : Acc(1);
      auto z_at = [=](int64_t j) { return src[j] * kz; };  // z of the row, either way
      Acc* stash_row = stash ? static_cast<Acc*>(row_ptr(grad, grad_dtype, r * width)) : nullptr;
      int64_t owned = 0;
      for (int64_t i = 0; i < k; ++i) {
        const int64_t c = ids[i] - offset;
        if (ids[i] >= 0 && c >= 0 && c < width) {
          slot[size_t(c)] = int32_t(i);
          ++owned;
        }
      }
      const int64_t label = hard && ok ? labels[r] : -1;  // -1: not in this slice
      if (phase == 0) {
        const Acc m = width ? row_max(src, width) * kz : -std::numeric_limits<Acc>::infinity();
        // A slice whose logits are all -inf (or none) holds nothing: m = -inf, sums 0.
        const bool empty = m == -std::numeric_limits<Acc>::infinity();
        double sum = 0, rest = 0;
        if (!empty) {
          for (int64_t j0 = 0; j0 < width; j0 += kSumBlock) {
            const int64_t j1 = std::min(width, j0 + kSumBlock);
            Acc a = 0, b = 0;
#pragma omp simd reduction(+ : a, b)
            for (int64_t j = j0; j < j1; ++j) {
              const Acc e = exp_acc(z_at(j) - m);
              if (stash) stash_row[j] = e;
              a += e;
              b += slot[size_t(j)] < 0 ? e : Acc(0);
            }
            sum += double(a);
            rest += double(b);
          }
        } else if (stash) {
          std::fill(stash_row, stash_row + width, Acc(0));
        }
        if (rest < kRestFloor && !empty) {  // at the rest's own maximum, as a log-mass
          const RestMass<Acc> rm = rest_at_own_max<Acc>(width, [&](int64_t j) {
            return slot[size_t(j)] < 0 ? z_at(j) : -std::numeric_limits<Acc>::infinity();
          });
          if (rm.s > Acc(0)) rest = double(rm.m - m) + std::log(double(rm.s));  // < 0
        }
        f[kM] = double(m);
        f[kSum] = sum;
        f[kRest] = rest;  // >= 0: a sum at m; < 0: the log-mass relative to m
        f[kOwn] = double(owned);
        if (stash) f[kMSlice] = double(m);  // -inf where empty: its stash of 0s rescales to 0
        f[kSum1] = hard && !empty ? blocked_sum(width, [&](int64_t j0, int64_t j1) {
          Acc s = 0;
#pragma omp simd reduction(+ : s)
          for (int64_t j = j0; j < j1; ++j) s += exp_acc((z_at(j) - m) * t);
          return s;
        }) : 0.0;
        f[kZy] = label >= 0 && label < width ? double(z_at(label)) : 0.0;
        double* zs = zsup + r * k;
        for (int64_t i = 0; i < k; ++i) {
          const int64_t c = ids[i] - offset;
          zs[i] = ids[i] >= 0 && c >= 0 && c < width ? double(z_at(c)) : 0.0;
        }
      } else {
        void* grow = row_ptr(grad, grad_dtype, r * width);
        if (!ok) {
          zero_row(grow, grad_dtype, width);
        } else {
          const Acc m = Acc(f[kM]), off = Acc(f[kOff]), log_s1 = Acc(f[kLogS1]);
          const Acc base = Acc(f[kBase]);
          Acc* gr = stash ? stash_row : g.data();  // the gradient, in place when stashing
          if (stash && !rebased) {  // exp(z - m) = exp(z - m_slice) exp(m_slice - m)
            const Acc oc = off * Acc(std::exp(f[kMSlice] - f[kM]));
#pragma omp simd
            for (int64_t j = 0; j < width; ++j) gr[j] = oc * gr[j];
          } else {
#pragma omp simd
            for (int64_t j = 0; j < width; ++j) gr[j] = off * exp_acc(z_at(j) - base);
          }
          const double* sg = sup_grad + r * k;
          for (int64_t i = 0; i < k; ++i) {
            const int64_t c = ids[i] - offset;
            if (ids[i] >= 0 && c >= 0 && c < width) gr[size_t(c)] = Acc(sg[i]);
          }
          if (hard) {
#pragma omp simd
            for (int64_t j = 0; j < width; ++j)
              gr[j] += hard_w * (exp_acc((z_at(j) - m) * t - log_s1) - Acc(j == label ? 1 : 0));
          }
          if (!stash) store_row(g.data(), width, grad_dtype, grow);
        }
      }
      for (int64_t i = 0; i < k; ++i) {  // the slots back to -1 for the next row
        const int64_t c = ids[i] - offset;
        if (ids[i] >= 0 && c >= 0 && c < width) slot[size_t(c)] = -1;
      }
    }
  }
}

}  // namespace

void sparse_vp(int phase, RowView student, const int64_t* indices, int64_t k, int64_t offset,
               const uint8_t* valid, const int64_t* labels, double* rec, double* zsup,
               const double* sup_grad, void* grad, int grad_dtype, int64_t n_rows,
               int64_t width, double temperature, double hard_weight, bool lean,
               int num_threads) {
  if (student.dtype == int(DType::F64)) {
    sp_impl<double>(phase, student, indices, k, offset, valid, labels, rec, zsup, sup_grad,
                    grad, grad_dtype, n_rows, width, temperature, hard_weight, lean,
                    num_threads);
  } else {
    sp_impl<float>(phase, student, indices, k, offset, valid, labels, rec, zsup, sup_grad,
                   grad, grad_dtype, n_rows, width, temperature, hard_weight, lean,
                   num_threads);
  }
}

}  // namespace distill_ops::cpu
