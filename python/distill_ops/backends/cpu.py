"""Launchers of the C++ CPU kernels (csrc/cpu) on validated, row-major tensors."""

from __future__ import annotations

import torch
from torch import Tensor

from ..validation import LossScalars
from .extension import dtype_code, fused_outputs, native, ptr


def kd_params(sc: LossScalars):
    """The native KDParams of validated loss scalars (shared by the CPU and CUDA launchers)."""
    p = native().KDParams()
    p.divergence = sc.divergence
    p.temperature = sc.temperature
    p.beta = sc.beta
    p.param2 = sc.param2
    p.interp = sc.interp
    p.scale_s = sc.student_scale
    p.cap_s = sc.student_softcap
    p.scale_t = sc.teacher_scale
    p.cap_t = sc.teacher_softcap
    p.hard_weight = sc.hard_weight
    p.soft_coef = sc.soft_coef
    return p


def sparse_params(divergence: int, tail: int, temperature: float, source_temperature: float,
                  beta: float, param2: float, interp: float, hard_weight: float,
                  soft_coef: float):
    """The native SparseParams (shared by the CPU and CUDA launchers)."""
    p = native().SparseParams()
    p.divergence = divergence
    p.tail = tail
    p.temperature = temperature
    p.source_temperature = source_temperature
    p.beta = beta
    p.param2 = param2
    p.interp = interp
    p.hard_weight = hard_weight
    p.soft_coef = soft_coef
    return p


def dense_kd_forward(
    student: Tensor,
    teacher: Tensor,
    valid: Tensor | None,
    labels: Tensor | None,
    sc: LossScalars,
    vocab: int,
    compute_grad: bool,
) -> tuple[Tensor, Tensor]:
    """(loss [N] fp32 (fp64 for fp64 inputs), grad [N, V_s] in the student's dtype or empty)."""
    n, grad_cols = student.shape
    loss, grad = fused_outputs(student, torch.float64 in (student.dtype, teacher.dtype),
                               compute_grad)
    native().dense_kd_cpu(
        ptr(student), dtype_code(student), student.stride(0),
        ptr(teacher), dtype_code(teacher), teacher.stride(0),
        ptr(valid), ptr(labels),
        ptr(loss), dtype_code(loss),
        ptr(grad) if compute_grad else 0, dtype_code(grad), grad_cols, grad_cols,
        n, vocab, kd_params(sc), torch.get_num_threads(),
    )
    return loss, grad


def scale_rows_(grad: Tensor, scale: Tensor) -> None:
    """grad *= scale[:, None] in place, in the accumulation type."""
    n, n_cols = grad.shape
    native().scale_rows_cpu(
        ptr(grad), ptr(grad), dtype_code(grad), ptr(scale), dtype_code(scale), scale.stride(0),
        n, n_cols, torch.get_num_threads(),
    )


def sparse_kd_forward(
    student: Tensor,
    indices: Tensor,
    teacher_logprobs: Tensor,
    valid: Tensor | None,
    labels: Tensor | None,
    divergence: int,
    tail: int,
    temperature: float,
    source_temperature: float,
    beta: float,
    param2: float,
    interp: float,
    hard_weight: float,
    soft_coef: float,
    compute_grad: bool,
) -> tuple[Tensor, Tensor]:
    """(loss [N] fp32 (fp64 for fp64), grad [N, V] in the student's dtype or empty)."""
    n, vocab = student.shape
    k = indices.shape[1]
    loss, grad = fused_outputs(student, student.dtype == torch.float64, compute_grad)
    p = sparse_params(divergence, tail, temperature, source_temperature, beta, param2, interp,
                      hard_weight, soft_coef)
    native().sparse_kd_cpu(
        ptr(student), dtype_code(student), student.stride(0), ptr(indices),
        ptr(teacher_logprobs), dtype_code(teacher_logprobs), k, ptr(valid), ptr(labels),
        ptr(loss), dtype_code(loss), ptr(grad) if compute_grad else 0, dtype_code(grad), vocab,
        n, vocab, p, torch.get_num_threads(),
    )
    return loss, grad


def topk_forward(x: Tensor, k: int, temperature: float, logit_scale: float,
                 softcap: float) -> tuple[Tensor, Tensor]:
    """(indices int32 [N, k], logprobs [N, k] fp32, fp64 for fp64 rows)."""
    n, vocab = x.shape
    idx = torch.empty((n, k), dtype=torch.int32)
    lp = torch.empty((n, k), dtype=torch.float64 if x.dtype == torch.float64 else torch.float32)
    native().topk_logprobs_cpu(ptr(x), dtype_code(x), x.stride(0), n, vocab, k, logit_scale,
                               softcap, temperature, ptr(idx), ptr(lp), dtype_code(lp),
                               torch.get_num_threads())
    return idx, lp
