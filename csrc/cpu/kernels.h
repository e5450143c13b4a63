// CPU kernels of distill_ops. They take raw pointers, sizes, strides (in elements) and dtype
// codes; the Python layer has validated every argument and allocated every output.
#pragma once

#include <cstdint>

#include "distill_ops/kd_math.h"

namespace distill_ops::cpu {

// A row-major matrix view: element (r, j) is at ptr + r * row_stride + j.
struct RowView {
  const void* ptr;
  int dtype;  // DType
  int64_t row_stride;
};

// Dense KD loss per row, with its gradient w.r.t. the student logits fused in.
//   valid:  nullable [n_rows] bytes; rows with 0 give loss 0 and gradient 0.
//   labels: nullable [n_rows] int64; needed when params.hard_weight > 0.
//   loss:   [n_rows] of loss_dtype (F32, or F64 for float64 inputs).
//   grad:   nullable [n_rows, grad_cols] of grad_dtype with row stride grad_stride; columns at
//           and past `vocab` are zeroed.
// Only the first `vocab` columns of student and teacher are read.
void dense_kd(RowView student, RowView teacher, const uint8_t* valid, const int64_t* labels,
              void* loss, int loss_dtype, void* grad, int grad_dtype, int64_t grad_stride,
              int64_t grad_cols, int64_t n_rows, int64_t vocab, const KDParams& params,
              int num_threads);

// The dense KD loss of a vocab-parallel slice [n_rows, width] in three phases (0:
// statistics, 1: partial sums, 2: gradient into grad [n_rows, width] of grad_dtype), the
// per-row record `rec` (double [n_rows, 8]) carrying what the phases and the Python layer's
// all-reduces hand each other (dense_vp.cpp lists the fields). labels: nullable [n_rows]
// int64, each row's label as a column of this slice, -1 where it lies elsewhere.
// lean: the phases read rows whose z is exact where they lie, and grad (of the accumulation
// dtype, F32 or F64 for float64 inputs; not otherwise) given to every phase carries per-logit
// work from phase to phase (dense_vp.cpp); bitwise equal to !lean on one process. aux:
// AKL's stashed search record (double [n_rows, 16], phases 7-11; null otherwise).
void dense_vp(int phase, RowView student, RowView teacher, const uint8_t* valid,
              const int64_t* labels, double* rec, double* aux, void* grad, int grad_dtype,
              int64_t n_rows, int64_t width, const KDParams& params, bool lean,
              int num_threads);

// The sparse KD loss of a vocab-parallel slice [n_rows, width] (global columns offset ..
// offset + width; indices [n_rows, k] global ids, -1 pads) in two phases (0: statistics into
// rec (double [n_rows, 8]) and z at the owned support ids into zsup (double [n_rows, k]);
// 1: with rec's global max, off-support coefficient and hard log-sum and each support id's
// gradient sup_grad (double [n_rows, k]), the gradient into grad of grad_dtype). labels:
// nullable [n_rows] int64, the label as a column of this slice or -1 (sparse_vp.cpp).
// lean: rows whose z is exact are read in place, and grad (given to phase 0 too, when of the
// accumulation dtype) carries phase 0's exponentials to phase 1; bitwise equal to !lean on
// one process.
void sparse_vp(int phase, RowView student, const int64_t* indices, int64_t k, int64_t offset,
               const uint8_t* valid, const int64_t* labels, double* rec, double* zsup,
               const double* sup_grad, void* grad, int grad_dtype, int64_t n_rows,
               int64_t width, double temperature, double hard_weight, bool lean,
               int num_threads);

// Sparse KD loss per row against k teacher targets (indices [n_rows, k] int64, -1 = padding;
// teacher_logprobs [n_rows, k] of tlp_dtype F32/F64), gradient w.r.t. the student fused in
// (grad: nullable [n_rows, vocab]). Support ids must be unique within a row.
void sparse_kd(RowView student, const int64_t* indices, const void* teacher_logprobs,
               int tlp_dtype, int64_t k, const uint8_t* valid, const int64_t* labels,
               void* loss, int loss_dtype, void* grad, int grad_dtype, int64_t grad_stride,
               int64_t n_rows, int64_t vocab, const SparseParams& params, int num_threads);

// Top-k of log-softmax(f(x) / T) per row: out_idx int32 [n_rows, k] sorted by descending
// value (ties: lower id first), out_lp [n_rows, k] (F32 or F64) normalised over all `vocab`.
void topk_logprobs(RowView x, int64_t n_rows, int64_t vocab, int64_t k, double scale,
                   double softcap, double temperature, int32_t* out_idx, void* out_lp,
                   int lp_dtype, int num_threads);

// Inverse-CDF draws from softmax(x / T) per row: draws[r, s] (int64) is the id whose interval
// of the cumulative distribution holds u[r, s] (fp64 in [0, 1)); totals[r] is the row's
// sum of exp(z - max), NaN where the row has no distribution (a NaN, or only -inf logits).
void sample_cdf(RowView x, int64_t n_rows, int64_t vocab, double inv_t, const double* u,
                int64_t n_draws, int64_t* draws, double* totals, int num_threads);

// out[r, j] = grad[r, j] * scale[r * scale_stride] for j < n_cols, in the accumulation type,
// stored in `dtype` (both matrices contiguous rows of n_cols; out may be grad: in place).
void scale_rows(const void* grad, void* out, int dtype, const void* scale, int scale_dtype,
                int64_t scale_stride, int64_t n_rows, int64_t n_cols, int num_threads);

}  // namespace distill_ops::cpu
