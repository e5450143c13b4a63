"""nn.Module wrappers of the functional losses, holding their options."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .dense_kd import kd_loss
from .fused_linear import fused_linear_kd_loss
from .sparse_kd import sparse_kd_loss

__all__ = ["FusedLinearKDLoss", "KDLoss", "SparseKDLoss"]

_PER_BATCH = ("labels", "mask", "num_items_in_batch")


class _LossModule(torch.nn.Module):
    """Holds a functional loss's options; per-batch tensors go to forward()."""

    def __init__(self, **options: Any) -> None:
        super().__init__()
        for name in _PER_BATCH:
            if name in options:
                raise TypeError(f"{name} is per batch: pass it to forward(), not to "
                                f"{type(self).__name__}()")
        self.options = options

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())


class KDLoss(_LossModule):
    """Module form of :func:`distill_ops.kd_loss`; constructor keywords are its options.

    Example:
        >>> crit = KDLoss(divergence="reverse_kl", temperature=2.0, scale_by_t2=True)
        >>> loss = crit(student_logits, teacher_logits, labels=labels)
    """

    def forward(
        self,
        student_logits: Tensor,
        teacher_logits: Tensor,
        labels: Tensor | None = None,
        mask: Tensor | None = None,
        num_items_in_batch: int | Tensor | None = None,
    ) -> Tensor:
        return kd_loss(student_logits, teacher_logits, labels=labels, mask=mask,
                       num_items_in_batch=num_items_in_batch, **self.options)


class SparseKDLoss(_LossModule):
    """Module form of :func:`distill_ops.sparse_kd_loss`; constructor keywords are its options.

    Example:
        >>> crit = SparseKDLoss(tail="bucket", temperature=2.0, source_temperature=1.0)
        >>> loss = crit(student_logits, top.indices, top.logprobs, labels=labels)
    """

    def forward(
        self,
        student_logits: Tensor,
        indices: Tensor,
        teacher_logprobs: Tensor,
        labels: Tensor | None = None,
        mask: Tensor | None = None,
        num_items_in_batch: int | Tensor | None = None,
    ) -> Tensor:
        return sparse_kd_loss(student_logits, indices, teacher_logprobs, labels=labels,
                              mask=mask, num_items_in_batch=num_items_in_batch, **self.options)


class FusedLinearKDLoss(_LossModule):
    """Module form of :func:`distill_ops.fused_linear_kd_loss`; constructor keywords are its
    options (divergence, temperature, tail, chunk_size, ...).

    Example:
        >>> crit = FusedLinearKDLoss(divergence="jsd", temperature=2.0)
        >>> loss = crit(h_s, student.lm_head.weight, h_t, teacher.lm_head.weight, labels=labels)
    """

    def forward(
        self,
        student_hidden: Tensor,
        student_weight: Tensor,
        teacher_hidden: Tensor | None = None,
        teacher_weight: Tensor | None = None,
        *,
        teacher_indices: Tensor | None = None,
        teacher_logprobs: Tensor | None = None,
        student_bias: Tensor | None = None,
        teacher_bias: Tensor | None = None,
        labels: Tensor | None = None,
        mask: Tensor | None = None,
        num_items_in_batch: int | Tensor | None = None,
    ) -> Tensor:
        return fused_linear_kd_loss(
            student_hidden, student_weight, teacher_hidden, teacher_weight,
            teacher_indices=teacher_indices, teacher_logprobs=teacher_logprobs,
            student_bias=student_bias, teacher_bias=teacher_bias, labels=labels, mask=mask,
            num_items_in_batch=num_items_in_batch, **self.options)
