"""Launchers of the CUDA C++ kernels (csrc/cuda) on validated CUDA tensors, on the caller's
current stream and device.

Two dense kernels: the portable one (a read of both rows per pass, sm_80+) and the sm_90
cluster one (each logit read once). ``DISTILL_OPS_CUDA_DENSE`` picks: ``portable``,
``cluster`` (an error where it cannot run) or ``auto``; unset, the one measured faster on
this GPU model (auto_backends.json, ``dense_cuda_variant``, written by ``distill-ops bench
--write-auto-table``), else ``auto`` (the cluster kernel where the device and the row size
allow it, else the portable one).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch
from torch import Tensor

from ..validation import LossScalars
from .cpu import kd_params, sparse_params
from .extension import dtype_code, fused_outputs, native, ptr

DENSE_VARIANTS = {"auto": 0, "portable": 1, "cluster": 2}
_override: list[str] = []  # cuda_dense_variant's stack


@contextlib.contextmanager
def cuda_dense_variant(name: str) -> Iterator[None]:
    """Run the dense CUDA kernel `name` ("portable", "cluster", "auto") inside the block
    (the benchmark times both designs this way); DISTILL_OPS_CUDA_DENSE still wins."""
    if name not in DENSE_VARIANTS:
        raise ValueError(f"variant must be one of {sorted(DENSE_VARIANTS)}, got {name!r}")
    _override.append(name)
    try:
        yield
    finally:
        _override.pop()


def dense_variant(device: torch.device | None = None) -> int:
    """The dense kernel's code for the launcher: DISTILL_OPS_CUDA_DENSE, else the innermost
    cuda_dense_variant block, else the measured winner for this GPU model, else auto."""
    name = os.environ.get("DISTILL_OPS_CUDA_DENSE")
    if name is not None and name not in DENSE_VARIANTS:
        raise ValueError(f"DISTILL_OPS_CUDA_DENSE must be one of {sorted(DENSE_VARIANTS)}, "
                         f"got {name!r}")
    if name is None and _override:
        name = _override[-1]
    if name is None and device is not None:
        from ..dispatch import measured_cuda_dense_variant

        name = measured_cuda_dense_variant(torch.cuda.get_device_name(device))
    return DENSE_VARIANTS[name or "auto"]


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
            n, vocab, kd_params(sc), dense_variant(student.device), _stream(student),
        )
    return loss, grad


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
    """(loss [N] fp32, grad [N, V] in the student's dtype or an empty tensor)."""
    n, vocab = student.shape
    loss, grad = fused_outputs(student, False, compute_grad)
    p = sparse_params(divergence, tail, temperature, source_temperature, beta, param2, interp,
                      hard_weight, soft_coef)
    with torch.cuda.device(student.device):
        native().sparse_kd_cuda(
            ptr(student), dtype_code(student), student.stride(0), ptr(indices),
            ptr(teacher_logprobs), indices.shape[1], ptr(valid), ptr(labels), ptr(loss),
            ptr(grad) if compute_grad else 0, n, vocab, p, _stream(student),
        )
    return loss, grad


def topk_forward(x: Tensor, k: int, temperature: float, logit_scale: float,
                 softcap: float) -> tuple[Tensor, Tensor]:
    """(indices int32 [N, k], logprobs fp32 [N, k])."""
    n, vocab = x.shape
    if k > native().cuda_topk_max:
        raise ValueError(f"backend='cuda' top-k takes k <= {native().cuda_topk_max}, got {k}: "
                         "use backend='triton'")
    idx = x.new_empty((n, k), dtype=torch.int32)
    lp = x.new_empty((n, k), dtype=torch.float32)
    with torch.cuda.device(x.device):
        native().topk_logprobs_cuda(ptr(x), dtype_code(x), x.stride(0), n, vocab, k,
                                    logit_scale, softcap, temperature, ptr(idx), ptr(lp),
                                    _stream(x))
    return idx, lp


def scale_rows_(grad: Tensor, scale: Tensor) -> None:
    """grad *= scale[:, None] in place, in fp32."""
    n, n_cols = grad.shape
    with torch.cuda.device(grad.device):
        native().scale_rows_cuda(ptr(grad), dtype_code(grad), ptr(scale), scale.stride(0), n,
                                 n_cols, _stream(grad))
