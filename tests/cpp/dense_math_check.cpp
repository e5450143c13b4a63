// Host driver of the CUDA dense kernels' maths (csrc/cuda/dense_math.cuh), run in the order
// the portable kernel runs it: 512 threads, each taking every 512th group of VEC logits (the
// 16-byte loads) and then every 512th logit of the row's tail; partials merged by the warps'
// xor trees and then across warps (common.cuh block_reduce); the second pass and AKL's
// threshold search likewise; then each logit's gradient. For tests/test_cuda_math_host.py.
//
// stdin: divergence general vec rows vocab, then T beta param2 scale_s cap_s scale_t cap_t
// interp hard_weight soft_coef, then `rows` labels, then rows x vocab student logits and rows
// x vocab teacher logits (text). stdout per row: the loss, then its vocab gradients.
#include <cstdio>
#include <vector>

#include "dense_math.cuh"

using namespace distill_ops;
using namespace distill_ops::cuda;

namespace {

constexpr int kThreads = 512;

template <class T, class Op>
T block_reduce_host(std::vector<T> v, Op op, T identity) {
  auto warp = [&](std::vector<T> lane) {
    for (int off = 16; off > 0; off >>= 1) {
      std::vector<T> next(32);
      for (int l = 0; l < 32; ++l) next[l] = op(lane[l], lane[l ^ off]);
      lane = next;
    }
    return lane[0];
  };
  std::vector<T> warps;
  for (int w = 0; w < kThreads / 32; ++w)
    warps.push_back(warp(std::vector<T>(v.begin() + 32 * w, v.begin() + 32 * w + 32)));
  while (warps.size() < 32) warps.push_back(identity);
  return warp(warps);
}

template <bool GENERAL, int VEC, class F>
void walk(const DenseArgs& a, const float* xs, const float* xt, long n, int tid, F&& f) {
  const long n_vec = n - n % VEC;
  for (long j0 = long(tid) * VEC; j0 < n_vec; j0 += long(kThreads) * VEC) {
    float zs[VEC], zt[VEC];
    for (int i = 0; i < VEC; ++i) {
      zs[i] = xs[j0 + i];
      zt[i] = xt[j0 + i];
    }
    dense_transform<GENERAL>(a, zs, zt);
    f(zs, zt, j0);
  }
  for (long j = n_vec + tid; j < n; j += kThreads) {
    float zs[1] = {xs[j]}, zt[1] = {xt[j]};
    dense_transform<GENERAL>(a, zs, zt);
    f(zs, zt, j);
  }
}

template <int DIV, bool GENERAL, int VEC>
void run_row(const DenseArgs& a, const float* xs, const float* xt, long label) {
  constexpr int kMode = DivTraits<DIV>::kMode;
  const long n = a.vocab;
  const Scales k = dense_scales<GENERAL>(a);
  std::vector<DensePartial> th(kThreads);
  for (int tid = 0; tid < kThreads; ++tid) {
    DensePartial st = dense_partial_start();
    walk<GENERAL, VEC>(a, xs, xt, n, tid, [&](const auto& zs, const auto& zt, long j0) {
      dense_push_group<kMode, GENERAL>(st, a, k, zs, zt, j0, label);
    });
    th[tid] = dense_partial_close(st);
  }
  const DensePartial all = block_reduce_host(th, MergePartial<kMode>{a.temperature * kLog2E},
                                             dense_partial_empty());
  DenseRow r = dense_row<DIV>(a, all);
  auto add2 = [](Sum2 x, Sum2 y) { return Sum2{x.x + y.x, x.y + y.y}; };
  if constexpr (DivTraits<DIV>::kSecond) {
    std::vector<Sum2> acc(kThreads, Sum2{0.0f, 0.0f});
    for (int tid = 0; tid < kThreads; ++tid)  // dense_second_sums's choice of AB's form
      walk<GENERAL, VEC>(a, xs, xt, n, tid, [&](const auto& zs, const auto& zt, long) {
        for (int i = 0; i < int(sizeof(zs) / sizeof(float)); ++i) {
          if (static_cast<Divergence>(DIV) == Divergence::AB && a.ab_one_series)
            dense_push_second<DIV, true>(acc[tid], a, r, k, zs[i], zt[i]);
          else
            dense_push_second<DIV>(acc[tid], a, r, k, zs[i], zt[i]);
        }
      });
    dense_finish_second<DIV>(r, a, block_reduce_host(acc, add2, Sum2{0.0f, 0.0f}));
  }
  if constexpr (static_cast<Divergence>(DIV) == Divergence::AKL) {
    const AklRange range = akl_search_range(a.beta, r.log_st, n);
    int lo = range.lo, hi = range.hi;
    while (hi - lo > 1) {
      const int mid = lo + (hi - lo) / 2;
      const float tau = bits_to_float(uint32_t(mid));
      std::vector<float> mass(kThreads, 0.0f);
      for (int tid = 0; tid < kThreads; ++tid)
        walk<GENERAL, VEC>(a, xs, xt, n, tid, [&](const auto&, const auto& zt, long) {
          for (int i = 0; i < int(sizeof(zt) / sizeof(float)); ++i) {
            const float p = dense_p(r, k, zt[i]);
            mass[tid] += p >= tau ? p : 0.0f;
          }
        });
      const float total = block_reduce_host(mass, [](float x, float y) { return x + y; }, 0.0f);
      if (total >= a.beta) lo = mid; else hi = mid;
    }
    const float tau = a.beta >= 1.0f ? 0.0f : bits_to_float(uint32_t(lo));
    std::vector<Sum2> kl(kThreads, Sum2{0.0f, 0.0f}), gap(kThreads, Sum2{0.0f, 0.0f});
    for (int tid = 0; tid < kThreads; ++tid)
      walk<GENERAL, VEC>(a, xs, xt, n, tid, [&](const auto& zs, const auto& zt, long) {
        for (int i = 0; i < int(sizeof(zs) / sizeof(float)); ++i)
          akl_push(kl[tid], gap[tid], r, k, tau, zs[i], zt[i]);
      });
    const Sum2 klr = block_reduce_host(kl, add2, Sum2{0.0f, 0.0f});
    const Sum2 gapr = block_reduce_host(gap, add2, Sum2{0.0f, 0.0f});
    r.akl_w = akl_head_weight(gapr.x, gapr.y);
    r.sum_qg = klr.y;
    r.dv = r.akl_w * klr.x + (1.0f - r.akl_w) * klr.y;
  }
  std::printf("%.9g\n", double(dense_loss(a, r, all.z_label, label)));
  std::vector<float> grad(size_t(n), 0.0f);
  const float coef = a.soft_coef / a.temperature;
  for (int tid = 0; tid < kThreads; ++tid)
    walk<GENERAL, VEC>(a, xs, xt, n, tid, [&](const auto& zs, const auto& zt, long j0) {
      for (int i = 0; i < int(sizeof(zs) / sizeof(float)); ++i)
        grad[size_t(j0 + i)] = dense_grad<DIV, GENERAL>(a, r, k, coef, zs[i], zt[i], j0 + i,
                                                        label);
    });
  for (long j = 0; j < n; ++j) std::printf("%.9g%c", double(grad[size_t(j)]), j + 1 < n ? ' ' : '\n');
}

template <int DIV, bool GENERAL>
void run_vec(int vec, const DenseArgs& a, const float* xs, const float* xt, long label) {
  if (vec == 8) run_row<DIV, GENERAL, 8>(a, xs, xt, label);
  else run_row<DIV, GENERAL, 4>(a, xs, xt, label);
}

template <int DIV>
void run_div(bool general, int vec, const DenseArgs& a, const float* xs, const float* xt,
             long label) {
  if (general) run_vec<DIV, true>(vec, a, xs, xt, label);
  else run_vec<DIV, false>(vec, a, xs, xt, label);
}

}  // namespace

int main() {
  int div = 0, general = 0, vec = 8;
  long rows = 0, vocab = 0;
  DenseArgs a{};
  if (std::scanf("%d %d %d %ld %ld", &div, &general, &vec, &rows, &vocab) != 5) return 2;
  float* f[] = {&a.temperature, &a.beta, &a.param2, &a.scale_s, &a.cap_s, &a.scale_t,
                &a.cap_t, &a.interp, &a.hard_weight, &a.soft_coef};
  for (float* p : f)
    if (std::scanf("%f", p) != 1) return 2;
  a.divergence = div;
  a.vocab = vocab;
  set_ab_series(a);
  std::vector<long> labels(static_cast<size_t>(rows));
  for (long& l : labels)
    if (std::scanf("%ld", &l) != 1) return 2;
  std::vector<float> xs(size_t(rows * vocab)), xt(size_t(rows * vocab));
  for (auto* v : {&xs, &xt})
    for (float& x : *v)
      if (std::scanf("%f", &x) != 1) return 2;
  using Fn = void (*)(bool, int, const DenseArgs&, const float*, const float*, long);
  const Fn table[] = {run_div<0>, run_div<1>, run_div<2>, run_div<3>,
                      run_div<4>, run_div<5>, run_div<6>, run_div<7>};
  if (div < 0 || div > 7) return 2;
  for (long r = 0; r < rows; ++r)
    table[div](general != 0, vec, a, xs.data() + r * vocab, xt.data() + r * vocab,
               labels[size_t(r)]);
  return 0;
}
