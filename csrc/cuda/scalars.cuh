// Scalars and small structs the CUDA kernels share, free of CUDA headers so that the maths
// built on them (dense_math.cuh) also compiles as host C++ for the tests.
#pragma once

#include <limits>

namespace distill_ops::cuda {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// Running log-sum-exp state: max m, sum a of exp(z - m), and a cross term c = sum of
// exp(z - m) * w, all relative to m.
struct Online {
  float m, a, c;
};

struct Sum2 {
  float x, y;
};

}  // namespace distill_ops::cuda
