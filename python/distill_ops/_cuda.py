"""Launchers of the CUDA C++ kernels (csrc/cuda) on validated CUDA tensors, on the caller's
current stream and device."""

from __future__ import annotations

import torch
from torch import Tensor

from ._cpu import kd_params
from ._ext import dtype_code, fused_outputs, native, ptr
from ._validation import LossScalars


def _stream(t: Tensor) -> int:
    return torch.cuda.current_stream(t.device).cuda_stream


def dense_kd_forward(
    student: Tensor,
    teacher: Tensor,
    valid: Tensor | None,
    labels: Tensor | None,
    sc: LossScalars,
    vocab: int,
    compute_grad: bool,
) -> tuple[Tensor, Tensor]:
    """(loss [N] fp32, grad [N, V_s] in the student's dtype or an empty tensor)."""
    n, grad_cols = student.shape
    loss, grad = fused_outputs(student, False, compute_grad)
    with torch.cuda.device(student.device):
        native().dense_kd_cuda(
            ptr(student), dtype_code(student), student.stride(0),
            ptr(teacher), dtype_code(teacher), teacher.stride(0),
            ptr(valid), ptr(labels), ptr(loss),
            ptr(grad) if compute_grad else 0, grad_cols, grad_cols,
            n, vocab, kd_params(sc), _stream(student),
        )
    return loss, grad


def scale_rows_(grad: Tensor, scale: Tensor) -> None:
    """grad *= scale[:, None] in place, in fp32."""
    n, n_cols = grad.shape
    with torch.cuda.device(grad.device):
        native().scale_rows_cuda(ptr(grad), dtype_code(grad), ptr(scale), scale.stride(0), n,
                                 n_cols, _stream(grad))
