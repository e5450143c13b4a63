"""distill_ops: fused kernels for knowledge distillation of language models.

Public API (DESIGN.md section 2): :func:`kd_loss` / :class:`KDLoss` (dense losses over the
full vocabulary), :func:`topk_logprobs` and :func:`sample_targets` (teacher-side sparse
targets), :func:`sparse_kd_loss` / :class:`SparseKDLoss` (losses against them), with backends
``cpu`` (C++), ``triton`` (CUDA, or the CPU interpreter), ``cuda`` (csrc/cuda, dense only)
and ``torch`` (the reference in :mod:`distill_ops.reference`).
"""

from . import reference
from .dense_kd import kd_loss
from .fused_linear import fused_linear_kd_loss, fused_linear_topk
from .modules import FusedLinearKDLoss, KDLoss, SparseKDLoss
from .sampling import SparseTargets, sample_targets
from .sparse_kd import sparse_kd_loss
from .topk import TopK, topk_logprobs

__version__ = "0.1.0"
__all__ = [
    "FusedLinearKDLoss",
    "KDLoss",
    "SparseKDLoss",
    "SparseTargets",
    "TopK",
    "__version__",
    "fused_linear_kd_loss",
    "fused_linear_topk",
    "kd_loss",
    "reference",
    "sample_targets",
    "sparse_kd_loss",
    "topk_logprobs",
]
