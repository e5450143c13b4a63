"""nn.Module wrappers of the functional losses, holding their options."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .dense_kd import kd_loss

__all__ = ["KDLoss"]


class KDLoss(torch.nn.Module):
    """Module form of :func:`distill_ops.kd_loss`; constructor keywords are its options.

    Example:
        >>> crit = KDLoss(divergence="reverse_kl", temperature=2.0, scale_by_t2=True)
        >>> loss = crit(student_logits, teacher_logits, labels=labels)
    """

    def __init__(self, **options: Any) -> None:
        super().__init__()
        for name in ("labels", "mask", "num_items_in_batch"):
            if name in options:
                raise TypeError(f"{name} is per batch: pass it to forward(), not to KDLoss()")
        self.options = options

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

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())
