// Host driver of the one-pass KL statistics the CUDA dense kernels run (OnlineKL in
// csrc/include/distill_ops/kd_math.h), for tests/test_online_kl_host.py.
//
// stdin: mode (1 forward KL, 2 reverse KL), rows, vocab, slices, then rows x vocab student z
// and rows x vocab teacher z as text. For each row it prints two KLs: the elements pushed in
// order by one state, and the CUDA kernels' order: the row cut into `slices` (the sm_90
// cluster's blocks), each slice strided over 512 threads, threads merged by the xor-shuffle
// tree of a warp and then across the 16 warps, slices merged in rank order.
#include <cstdio>
#include <vector>

#include "distill_ops/kd_math.h"

using distill_ops::OnlineKL;

int main() {
  int mode = 0, slices = 1;
  long rows = 0, vocab = 0;
  if (std::scanf("%d %ld %ld %d", &mode, &rows, &vocab, &slices) != 4) return 2;
  std::vector<float> zs(rows * vocab), zt(rows * vocab);
  for (auto* v : {&zs, &zt})
    for (float& x : *v)
      if (std::scanf("%f", &x) != 1) return 2;
  constexpr int kThreads = 512;
  for (long r = 0; r < rows; ++r) {
    const float* s = zs.data() + r * vocab;
    const float* t = zt.data() + r * vocab;
    OnlineKL<float> seq = distill_ops::online_kl_empty<float>();
    for (long j = 0; j < vocab; ++j) seq = distill_ops::online_kl_push(seq, s[j], t[j], mode);

    OnlineKL<float> all = distill_ops::online_kl_empty<float>();
    const long chunk = (vocab + slices - 1) / slices;
    for (int q = 0; q < slices; ++q) {
      const long c0 = q * chunk, c1 = c0 + chunk < vocab ? c0 + chunk : vocab;
      std::vector<OnlineKL<float>> th(kThreads, distill_ops::online_kl_empty<float>());
      for (int i = 0; i < kThreads; ++i)
        for (long j = c0 + i; j < c1; j += kThreads)
          th[i] = distill_ops::online_kl_push(th[i], s[j], t[j], mode);
      std::vector<OnlineKL<float>> warps;
      for (int w = 0; w < kThreads / 32; ++w) {
        std::vector<OnlineKL<float>> lane(th.begin() + 32 * w, th.begin() + 32 * w + 32);
        for (int off = 16; off > 0; off >>= 1) {
          std::vector<OnlineKL<float>> next(32);
          for (int l = 0; l < 32; ++l)
            next[l] = distill_ops::online_kl_merge(lane[l], lane[l ^ off], mode);
          lane = next;
        }
        warps.push_back(lane[0]);
      }
      while (warps.size() < 32) warps.push_back(distill_ops::online_kl_empty<float>());
      for (int off = 16; off > 0; off >>= 1) {
        std::vector<OnlineKL<float>> next(32);
        for (int l = 0; l < 32; ++l)
          next[l] = distill_ops::online_kl_merge(warps[l], warps[l ^ off], mode);
        warps = next;
      }
      all = distill_ops::online_kl_merge(all, warps[0], mode);
    }
    std::printf("%.9g %.9g\n", double(distill_ops::online_kl_value(seq, mode)),
                double(distill_ops::online_kl_value(all, mode)));
  }
  return 0;
}
