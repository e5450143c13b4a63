// Converting loads and stores of one row, vectorised per dtype (the dtype switch sits
// outside the loops so each loop is a plain `omp simd` over contiguous memory).
#pragma once

#include <cstdint>
#include <cstring>

#include <sys/mman.h>
#include <unistd.h>

#include "distill_ops/kd_math.h"

namespace distill_ops::cpu {

// out[j] = transform_logit(x[j]) for j < n. Softcapped rows go through tanh, which does not
// vectorise; the plain scale path does.
template <typename Acc>
inline void load_transformed(const void* row, int dtype, int64_t n, Acc scale, Acc cap,
                             Acc inv_t, Acc* out) {
  const Acc mul = scale * inv_t;
  auto run = [&](auto load) {
    if (cap > Acc(0)) {
      for (int64_t j = 0; j < n; ++j) out[j] = transform_logit<Acc>(load(j), scale, cap, inv_t);
    } else {
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) out[j] = load(j) * mul;
    }
  };
  switch (static_cast<DType>(dtype)) {
    case DType::F32: {
      const float* p = static_cast<const float*>(row);
      run([p](int64_t j) { return Acc(p[j]); });
      break;
    }
    case DType::BF16: {
      const uint16_t* p = static_cast<const uint16_t*>(row);
      run([p](int64_t j) { return Acc(bf16_to_float(p[j])); });
      break;
    }
    case DType::F16: {
      const uint16_t* p = static_cast<const uint16_t*>(row);
      run([p](int64_t j) { return Acc(half_to_float(p[j])); });
      break;
    }
    case DType::F64: {
      const double* p = static_cast<const double*>(row);
      run([p](int64_t j) { return Acc(p[j]); });
      break;
    }
  }
}

// row[j] = (in[j] * a) * b converted to dtype, for j < n: the twice-scaled
// values in one pass (each product rounded to Acc as two separate passes would round it).
template <typename Acc>
inline void store_scaled_row(const Acc* in, int64_t n, Acc a, Acc b, int dtype, void* row) {
  switch (static_cast<DType>(dtype)) {
    case DType::F32: {
      float* p = static_cast<float*>(row);
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) p[j] = float(Acc(in[j] * a) * b);
      break;
    }
    case DType::BF16: {
      uint16_t* p = static_cast<uint16_t*>(row);
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) p[j] = float_to_bf16(float(Acc(in[j] * a) * b));
      break;
    }
    case DType::F16: {
      uint16_t* p = static_cast<uint16_t*>(row);
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) p[j] = float_to_half(float(Acc(in[j] * a) * b));
      break;
    }
    case DType::F64: {
      double* p = static_cast<double*>(row);
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) p[j] = double(Acc(in[j] * a) * b);
      break;
    }
  }
}

// row[j] = in[j] converted to dtype, for j < n (the products by 1 are exact and fold away).
template <typename Acc>
inline void store_row(const Acc* in, int64_t n, int dtype, void* row) {
  store_scaled_row(in, n, Acc(1), Acc(1), dtype, row);
}

inline int64_t dtype_size(int dtype) {
  switch (static_cast<DType>(dtype)) {
    case DType::F32: return 4;
    case DType::BF16:
    case DType::F16: return 2;
    case DType::F64: return 8;
  }
  return 0;
}

inline const void* row_ptr(const void* base, int dtype, int64_t offset) {
  return static_cast<const char*>(base) + offset * dtype_size(dtype);
}

inline void* row_ptr(void* base, int dtype, int64_t offset) {
  return static_cast<char*>(base) + offset * dtype_size(dtype);
}

// Ask for transparent huge pages on a large output that is about to be written for the
// first time: a fresh [N, V] gradient otherwise costs one page fault per 4 KiB, which on a
// 250 MB gradient is as long as the kernel itself. Only advice: no effect where THP is off.
inline void advise_huge_pages(void* p, int64_t bytes) {
#ifdef MADV_HUGEPAGE
  if (p == nullptr || bytes < (int64_t(8) << 20)) return;
  const uintptr_t page = uintptr_t(sysconf(_SC_PAGESIZE));
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(p) + page - 1) & ~(page - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(p) + uintptr_t(bytes)) & ~(page - 1);
  if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#else
  (void)p;
  (void)bytes;
#endif
}

// Zero n elements of dtype.
inline void zero_row(void* row, int dtype, int64_t n) {
  if (n > 0) std::memset(row, 0, size_t(n * dtype_size(dtype)));
}

}  // namespace distill_ops::cpu
