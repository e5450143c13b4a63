// CUDA kernels of distill_ops, callable from plain C++ (no CUDA headers needed: the stream
// is a cudaStream_t passed as void*). Launched on the caller's stream, on the current
// device (the Python layer sets it); every launch is checked and a failure throws
// std::runtime_error.
#pragma once

#include <cstdint>

#include "distill_ops/kd_math.h"

namespace distill_ops::cuda {

// Which dense kernel: the sm_90 cluster kernel where it applies (auto), the portable one,
// or the cluster one (an error where it cannot run).
enum class DenseVariant : int { Auto = 0, Portable = 1, Cluster = 2 };

// Dense KD loss per row with the student gradient fused in (see cpu::dense_kd); fp32/bf16/
// fp16 inputs, fp32 loss, gradient in the student's dtype (nullptr: loss only).
void dense_kd(const void* s, int s_dtype, int64_t s_stride, const void* t, int t_dtype,
              int64_t t_stride, const uint8_t* valid, const int64_t* labels, float* loss,
              void* grad, int64_t g_stride, int64_t grad_cols, int64_t n_rows, int64_t vocab,
              const KDParams& params, int variant, void* stream);

// Sparse KD loss per row against k targets (see cpu::sparse_kd): student fp32/bf16/fp16
// [n_rows, vocab] (row stride s_stride), indices int64 [n_rows, k] (-1 pads), teacher
// log-probabilities fp32 [n_rows, k], fp32 loss, gradient [n_rows, vocab] contiguous in the
// student's dtype (nullptr: loss only).
void sparse_kd(const void* s, int s_dtype, int64_t s_stride, const int64_t* indices,
               const float* teacher_logprobs, int64_t k, const uint8_t* valid,
               const int64_t* labels, float* loss, void* grad, int64_t n_rows, int64_t vocab,
               const SparseParams& params, void* stream);

// One phase (0-4) of the vocab-parallel dense KD loss on slices [n_rows, width] of student
// and teacher (see cpu::dense_vp and backends/triton/dense_vp.py): the record rec
// [n_rows, 8] (fp64) in and out, phase 2 writes the gradient (row stride g_stride, the
// student's dtype). labels: each row's label column in the slice, -1 elsewhere.
void dense_vp(int phase, const void* s, int s_dtype, int64_t s_stride, const void* t,
              int t_dtype, int64_t t_stride, const uint8_t* valid, const int64_t* labels,
              double* rec, void* grad, int64_t g_stride, int64_t n_rows, int64_t width,
              const KDParams& params, void* stream);

// One phase of the vocab-parallel sparse KD loss on a slice [n_rows, width] of the student
// (see cpu::sparse_vp; global ids offset .. offset + width): 0 writes the record rec
// [n_rows, 8] and z at the owned support zsup [n_rows, k] (fp64), 1 the gradient [n_rows,
// width] in the student's dtype from rec and sup_grad [n_rows, k] (fp64). labels: each row's
// label column in the slice, -1 elsewhere (nullptr without a hard term).
void sparse_vp(int phase, const void* s, int s_dtype, int64_t s_stride, const int64_t* indices,
               int64_t k, int64_t offset, const uint8_t* valid, const int64_t* labels,
               double* rec, double* zsup, const double* sup_grad, void* grad, int64_t n_rows,
               int64_t width, double temperature, double hard_weight, void* stream);

// The largest k a CUDA top-k launch takes.
constexpr int64_t kTopKMax = 8192;

// Top-k of log-softmax(f(x) / T) per row (see cpu::topk_logprobs): indices int32 [n_rows, k]
// sorted by descending value, ties by lower id; fp32 log-probabilities [n_rows, k].
void topk_logprobs(const void* x, int x_dtype, int64_t x_stride, int64_t n_rows, int64_t vocab,
                   int64_t k, float scale, float softcap, float temperature, int32_t* out_idx,
                   float* out_lp, void* stream);

// grad[r, :] *= scale[r * scale_stride], in fp32, in place (contiguous rows of n_cols).
void scale_rows_(void* grad, int dtype, const float* scale, int64_t scale_stride,
                 int64_t n_rows, int64_t n_cols, void* stream);

}  // namespace distill_ops::cuda
