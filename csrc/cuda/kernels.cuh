// CUDA kernels of distill_ops, callable from plain C++ (no CUDA headers needed: the stream
// is a cudaStream_t passed as void*). Launched on the caller's stream, on the current
// device; every launch is checked and a failure throws std::runtime_error.
#pragma once

#include <cstdint>

#include "distill_ops/kd_math.h"

namespace distill_ops::cuda {

// Dense KD loss per row with the student gradient fused in (see cpu::dense_kd); fp32/bf16/
// fp16 inputs, fp32 loss, gradient in the student's dtype (nullptr: loss only).
void dense_kd(const void* s, int s_dtype, int64_t s_stride, const void* t, int t_dtype,
              int64_t t_stride, const uint8_t* valid, const int64_t* labels, float* loss,
              void* grad, int64_t g_stride, int64_t grad_cols, int64_t n_rows, int64_t vocab,
              const KDParams& params, void* stream);

// grad[r, :] *= scale[r * scale_stride], in fp32, in place (contiguous rows of n_cols).
void scale_rows_(void* grad, int dtype, const float* scale, int64_t scale_stride,
                 int64_t n_rows, int64_t n_cols, void* stream);

}  // namespace distill_ops::cuda
