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
  kOff = 1, kLogS1 = 4,                                          // phase 1 in (kM: global max)
  kSpFields = 8,
};

template <typename Acc>
void sp_impl(int phase, RowView student, const int64_t* idx, int64_t k, int64_t offset,
             const uint8_t* valid, const int64_t* labels, double* rec, double* zsup,
             const double* sup_grad, void* grad, int grad_dtype, int64_t n_rows, int64_t width,
             double temperature, double hard_weight, int num_threads) {
  const Acc t = Acc(temperature), inv_t = Acc(1) / t, hard_w = Acc(hard_weight);
  const bool hard = hard_weight != 0.0;
#pragma omp parallel num_threads(num_threads)
  {
    std::vector<Acc> z(size_t(width) + 1), g(size_t(width) + 1);
    std::vector<int32_t> slot(size_t(width), -1);  // support slot of each owned column
#pragma omp for schedule(dynamic, 1)
    for (int64_t r = 0; r < n_rows; ++r) {
      double* f = rec + r * kSpFields;
      const int64_t* ids = idx + r * k;
      const bool ok = valid == nullptr || valid[r] != 0;
      if (ok) {
        load_transformed(row_ptr(student.ptr, student.dtype, r * student.row_stride),
                         student.dtype, width, Acc(1), Acc(0), inv_t, z.data());
      } else {
        std::fill(z.begin(), z.begin() + width, Acc(0));
      }
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
        const Acc m = width ? row_max(z.data(), width) : -std::numeric_limits<Acc>::infinity();
        // A slice whose logits are all -inf (or none) holds nothing: m = -inf, sums 0.
        const bool empty = m == -std::numeric_limits<Acc>::infinity();
        const auto sums = empty ? std::pair<double, double>(0.0, 0.0)
                                : blocked_sum2(width, [&](int64_t j0, int64_t j1) {
          Acc a = 0, b = 0;
#pragma omp simd reduction(+ : a, b)
          for (int64_t j = j0; j < j1; ++j) {
            const Acc e = exp_acc(z[j] - m);
            a += e;
            b += slot[size_t(j)] < 0 ? e : Acc(0);
          }
          return std::pair<Acc, Acc>(a, b);
        });
        f[kM] = double(m);
        f[kSum] = sums.first;
        f[kRest] = sums.second;
        f[kOwn] = double(owned);
        f[kSum1] = hard && !empty ? blocked_sum(width, [&](int64_t j0, int64_t j1) {
          Acc s = 0;
#pragma omp simd reduction(+ : s)
          for (int64_t j = j0; j < j1; ++j) s += exp_acc((z[j] - m) * t);
          return s;
        }) : 0.0;
        f[kZy] = label >= 0 && label < width ? double(z[size_t(label)]) : 0.0;
        double* zs = zsup + r * k;
        for (int64_t i = 0; i < k; ++i) {
          const int64_t c = ids[i] - offset;
          zs[i] = ids[i] >= 0 && c >= 0 && c < width ? double(z[size_t(c)]) : 0.0;
        }
      } else {
        void* grow = row_ptr(grad, grad_dtype, r * width);
        if (!ok) {
          zero_row(grow, grad_dtype, width);
        } else {
          const Acc m = Acc(f[kM]), off = Acc(f[kOff]), log_s1 = Acc(f[kLogS1]);
#pragma omp simd
          for (int64_t j = 0; j < width; ++j) g[j] = off * exp_acc(z[j] - m);
          const double* sg = sup_grad + r * k;
          for (int64_t i = 0; i < k; ++i) {
            const int64_t c = ids[i] - offset;
            if (ids[i] >= 0 && c >= 0 && c < width) g[size_t(c)] = Acc(sg[i]);
          }
          if (hard) {
#pragma omp simd
            for (int64_t j = 0; j < width; ++j)
              g[j] += hard_w * (exp_acc((z[j] - m) * t - log_s1) - Acc(j == label ? 1 : 0));
          }
          store_row(g.data(), width, grad_dtype, grow);
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
               int64_t width, double temperature, double hard_weight, int num_threads) {
  if (student.dtype == int(DType::F64)) {
    sp_impl<double>(phase, student, indices, k, offset, valid, labels, rec, zsup, sup_grad,
                    grad, grad_dtype, n_rows, width, temperature, hard_weight, num_threads);
  } else {
    sp_impl<float>(phase, student, indices, k, offset, valid, labels, rec, zsup, sup_grad,
                   grad, grad_dtype, n_rows, width, temperature, hard_weight, num_threads);
  }
}

}  // namespace distill_ops::cpu
