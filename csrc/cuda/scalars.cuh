// Scalars and small structs the CUDA kernels share, free of CUDA headers so that the maths
// built on them (dense_math.cuh) also compiles as host C++ for the tests.
#pragma once

#include <cmath>
#include <limits>

// DOPS_DEV: device functions on a GPU build, plain inline functions where the maths headers
// (dense_math.cuh, sparse_math.cuh) compile as host C++ for the tests, with the intrinsics
// they use spelled as their host equivalents.
#if defined(__CUDACC__)
#define DOPS_DEV __device__ __forceinline__
#else
#define DOPS_DEV inline
#define __fdividef(a, b) ((a) / (b))
using std::isnan;
#endif

namespace distill_ops::cuda {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();
// The finite start of a thread's running maxima (exp of the first move is 0, and no
// -inf - -inf): dense_partial_start, the sparse kernel's statistics.
constexpr float kFltMax = std::numeric_limits<float>::max();

// Running log-sum-exp state: max m, sum a of exp(z - m), and a cross term c = sum of
// exp(z - m) * w, all relative to m.
struct Online {
  float m, a, c;
};

struct Sum2 {
  float x, y;
};

}  // namespace distill_ops::cuda
