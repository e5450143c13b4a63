// Host driver of the sparse KD kernel's statistics pass (sparse_push_group,
// csrc/cuda/sparse_math.cuh) in the kernel's order: 512 threads, each taking every 512th
// group of VEC logits and then every 512th logit of the row's tail; the threads' states
// merged as the kernel's block reduction merges them (common.cuh merge, written here with
// exp). For tests/test_cuda_math_host.py.
//
// stdin: vec rows vocab T label_or_-1, then rows lines of the support flags (0/1 per id), then
// rows x vocab student logits. stdout per row: log-sum-exp of z = x / T, of z off the
// support, of z T (the hard term's, relative to 0), and z at the label.
#include <cmath>
#include <cstdio>
#include <vector>

#include "sparse_math.cuh"

using namespace distill_ops::cuda;

namespace {

constexpr int kThreads = 512;
constexpr float kStart = -kFltMax;  // the kernel's start (sparse_kd.cu)

Online merge_host(Online x, Online y) {
  const float m = std::fmax(x.m, y.m);
  const float fx = x.m == kNegInf ? 0.0f : std::exp(x.m - m);
  const float fy = y.m == kNegInf ? 0.0f : std::exp(y.m - m);
  return {m, x.a * fx + y.a * fy, x.c * fx + y.c * fy};
}

template <int VEC>
void run_row(const float* x, const std::vector<int>& sup, long n, float t, long label) {
  std::vector<Online> st(kThreads), one(kThreads);
  std::vector<float> zl(kThreads, 0.0f);
  const long n_vec = n - n % VEC;
  for (int tid = 0; tid < kThreads; ++tid) {
    Online s{kStart, 0.0f, 0.0f};
    float a1 = 0.0f, z_label = 0.0f;
    for (long j0 = long(tid) * VEC; j0 < n_vec; j0 += long(kThreads) * VEC) {
      float g[VEC];
      uint32_t word = 0;
      for (int i = 0; i < VEC; ++i) {
        g[i] = x[j0 + i];
        word |= uint32_t(sup[size_t(j0 + i)] != 0) << i;
      }
      sparse_push_group<true>(s, a1, z_label, g, word, 1.0f / t, t, j0, label);
    }
    for (long j = n_vec + tid; j < n; j += kThreads) {
      const float g[1] = {x[j]};
      sparse_push_group<true>(s, a1, z_label, g, uint32_t(sup[size_t(j)] != 0), 1.0f / t, t, j,
                              label);
    }
    if (s.m == kStart) s.m = kNegInf;
    st[tid] = s;
    one[tid] = {s.m == kNegInf ? kNegInf : s.m * t, a1, 0.0f};
    zl[tid] = z_label;
  }
  Online all{kNegInf, 0.0f, 0.0f}, all1{kNegInf, 0.0f, 0.0f};
  float z_label = 0.0f;
  for (int tid = 0; tid < kThreads; ++tid) {
    all = merge_host(all, st[tid]);
    all1 = merge_host(all1, one[tid]);
    z_label += zl[tid];
  }
  std::printf("%.9g %.9g %.9g %.9g\n", double(all.m + std::log(all.a)),
              double(all.m + std::log(all.c)), double(all1.m + std::log(all1.a)),
              double(z_label));
}

}  // namespace

int main() {
  int vec = 8;
  long rows = 0, vocab = 0, label = -1;
  float t = 1.0f;
  if (std::scanf("%d %ld %ld %f %ld", &vec, &rows, &vocab, &t, &label) != 5) return 2;
  std::vector<std::vector<int>> sup(static_cast<size_t>(rows),
                                    std::vector<int>(static_cast<size_t>(vocab)));
  for (auto& row : sup)
    for (int& f : row)
      if (std::scanf("%d", &f) != 1) return 2;
  std::vector<float> x(size_t(rows * vocab));
  for (float& v : x)
    if (std::scanf("%f", &v) != 1) return 2;
  for (long r = 0; r < rows; ++r) {
    if (vec == 8) run_row<8>(x.data() + r * vocab, sup[size_t(r)], vocab, t, label);
    else run_row<4>(x.data() + r * vocab, sup[size_t(r)], vocab, t, label);
  }
  return 0;
}
