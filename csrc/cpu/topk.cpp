// Teacher-side top-k on the CPU: one pass over each row computes both the log-softmax
// normaliser at T and the k most probable ids. A min-heap of the current best k rejects
// almost every entry with one comparison against its root; blocks of 64 whose maximum cannot
// enter are skipped whole (a vectorised max).
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "kernels.h"
#include "row_io.h"
#include "row_math.h"

namespace distill_ops::cpu {
namespace {

// Heap order: the root is the worst kept entry. Worse = smaller value, or the same value at
// a larger id (ties keep the lower id).
template <typename Acc>
struct Entry {
  Acc v;
  int64_t id;
};

template <typename Acc>
bool worse(const Entry<Acc>& a, const Entry<Acc>& b) {
  return a.v < b.v || (a.v == b.v && a.id > b.id);
}

template <typename Acc>
struct TopKHeap {
  std::vector<Entry<Acc>> h;
  int64_t k;
  explicit TopKHeap(int64_t kk) : k(kk) { h.reserve(size_t(kk)); }

  // Comparator making the worst entry the top of std::push_heap/pop_heap's max-heap.
  static bool cmp(const Entry<Acc>& a, const Entry<Acc>& b) { return worse(b, a); }

  Acc threshold() const {
    return int64_t(h.size()) < k ? -std::numeric_limits<Acc>::infinity() : h.front().v;
  }
  bool full() const { return int64_t(h.size()) == k; }

  // Entries arrive in increasing id order, so an equal value never displaces a kept one.
  void offer(Acc v, int64_t id) {
    if (!full()) {
      h.push_back({v, id});
      std::push_heap(h.begin(), h.end(), cmp);
    } else if (v > h.front().v) {
      std::pop_heap(h.begin(), h.end(), cmp);
      h.back() = {v, id};
      std::push_heap(h.begin(), h.end(), cmp);
    }
  }
};

template <typename Acc>
void topk_impl(RowView x, int64_t n_rows, int64_t vocab, int64_t k, Acc scale, Acc cap,
               Acc inv_t, int32_t* out_idx, void* out_lp, int lp_dtype, int num_threads) {
  constexpr int64_t kChunk = 64;
#pragma omp parallel num_threads(num_threads)
  {
    std::vector<Acc> z(static_cast<size_t>(vocab)), e(static_cast<size_t>(vocab));
    TopKHeap<Acc> heap(k);
#pragma omp for schedule(dynamic, 1)
    for (int64_t r = 0; r < n_rows; ++r) {
      load_transformed(row_ptr(x.ptr, x.dtype, r * x.row_stride), x.dtype, vocab, scale, cap,
                       inv_t, z.data());
      const RowStats<Acc> s = softmax_stats(z.data(), vocab, e.data());
      heap.h.clear();
      for (int64_t j0 = 0; j0 < vocab; j0 += kChunk) {
        const int64_t n = std::min(kChunk, vocab - j0);
        const Acc* zc = z.data() + j0;
        if (heap.full()) {
          Acc m = -std::numeric_limits<Acc>::infinity();
#pragma omp simd reduction(max : m)
          for (int64_t j = 0; j < n; ++j) m = zc[j] > m ? zc[j] : m;
          // NaN never compares greater: a NaN row still yields its NaN normaliser below.
          if (!(m > heap.threshold())) continue;
        }
        for (int64_t j = 0; j < n; ++j) heap.offer(zc[j], j0 + j);
      }
      std::sort(heap.h.begin(), heap.h.end(),
                [](const Entry<Acc>& a, const Entry<Acc>& b) { return worse(b, a); });
      for (int64_t i = 0; i < k; ++i) {
        const Entry<Acc>& en = heap.h[size_t(i)];
        out_idx[r * k + i] = int32_t(en.id);
        const Acc lp = (en.v - s.m) - s.log_s;
        if (lp_dtype == int(DType::F64)) {
          static_cast<double*>(out_lp)[r * k + i] = double(lp);
        } else {
          static_cast<float*>(out_lp)[r * k + i] = float(lp);
        }
      }
    }
  }
}

}  // namespace

void topk_logprobs(RowView x, int64_t n_rows, int64_t vocab, int64_t k, double scale,
                   double softcap, double temperature, int32_t* out_idx, void* out_lp,
                   int lp_dtype, int num_threads) {
  if (x.dtype == int(DType::F64)) {
    topk_impl<double>(x, n_rows, vocab, k, scale, softcap, 1.0 / temperature, out_idx, out_lp,
                      lp_dtype, num_threads);
  } else {
    topk_impl<float>(x, n_rows, vocab, k, float(scale), float(softcap),
                     float(1.0 / temperature), out_idx, out_lp, lp_dtype, num_threads);
  }
}

}  // namespace distill_ops::cpu
