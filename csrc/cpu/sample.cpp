// Inverse-CDF sampling of ids from softmax(x / T) on the CPU, per row: the unnormalised
// cumulative distribution (exp(z - max) in float, summed in double), then a binary search for
// each uniform draw scaled by the row's total. The draws come from the caller (torch.rand
// with its generator), so results are reproducible exactly as on the other devices.
#include <algorithm>
#include <cmath>
#include <vector>

#include "kernels.h"
#include "row_io.h"
#include "row_math.h"

namespace distill_ops::cpu {

void sample_cdf(RowView x, int64_t n_rows, int64_t vocab, double inv_t, const double* u,
                int64_t n_draws, int64_t* draws, double* totals, int num_threads) {
#pragma omp parallel num_threads(num_threads)
  {
    std::vector<float> z(static_cast<size_t>(vocab)), e(static_cast<size_t>(vocab));
    std::vector<double> cdf(static_cast<size_t>(vocab));
#pragma omp for schedule(dynamic, 4)
    for (int64_t r = 0; r < n_rows; ++r) {
      load_transformed(row_ptr(x.ptr, x.dtype, r * x.row_stride), x.dtype, vocab, 1.0f, 0.0f,
                       float(inv_t), z.data());
      const float m = row_max(z.data(), vocab);
      exp_shifted(z.data(), m, vocab, e.data());  // e[j] = exp(z[j] - m); NaN rows stay NaN
      double c = 0.0;
      for (int64_t j = 0; j < vocab; ++j) {
        c += double(e[size_t(j)]);
        cdf[size_t(j)] = c;
      }
      totals[r] = (m == -std::numeric_limits<float>::infinity() || std::isnan(m))
                      ? std::numeric_limits<double>::quiet_NaN()
                      : c;
      for (int64_t s = 0; s < n_draws; ++s) {
        const double target = u[r * n_draws + s] * c;
        const int64_t id = std::upper_bound(cdf.begin(), cdf.end(), target) - cdf.begin();
        draws[r * n_draws + s] = id < vocab ? id : vocab - 1;
      }
    }
  }
}

}  // namespace distill_ops::cpu
