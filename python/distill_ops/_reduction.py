"""Which rows count, and how per-row losses become the returned loss (no host sync)."""

from __future__ import annotations

import torch
from torch import Tensor


def valid_rows(labels: Tensor | None, mask: Tensor | None, ignore_index: int) -> Tensor | None:
    """bool [N]: rows whose label is not ignore_index and whose mask is True; None = all."""
    valid = None
    if labels is not None:
        valid = labels.reshape(-1) != ignore_index
    if mask is not None:
        flat = mask.reshape(-1)
        valid = flat if valid is None else valid & flat
    return None if valid is None else valid.contiguous()


def reduce_rows(
    rows: Tensor,
    valid: Tensor | None,
    reduction: str,
    num_items_in_batch: int | float | Tensor | None,
    lead: torch.Size,
) -> Tensor:
    """`none`: rows shaped like the logits' leading dims; `sum`; `mean`: the sum over valid
    rows divided by their count (a device tensor), or by `num_items_in_batch` when given, so
    gradient accumulation and data parallelism see the same scale as one big batch."""
    if reduction == "none":
        return rows.reshape(lead)
    total = rows.sum()
    if reduction == "sum":
        return total
    if num_items_in_batch is not None:
        if isinstance(num_items_in_batch, Tensor):
            return total / num_items_in_batch.to(device=total.device, dtype=total.dtype).reshape(())
        return total / num_items_in_batch
    if valid is None:
        return total / max(rows.numel(), 1)
    return total / valid.sum().clamp(min=1)


def reduction_weight(
    rows: Tensor,
    valid: Tensor | None,
    reduction: str,
    num_items_in_batch: int | float | Tensor | None,
) -> Tensor | None:
    """The factor reduce_rows puts on every row (0-dim fp32, on the rows' device; None for
    "none"), computed by the same division so that for a plain `loss.backward()` the
    gradient autograd hands each row is bit-identical to it."""
    if reduction == "none":
        return None
    one = torch.ones((), dtype=torch.float32, device=rows.device)
    if reduction == "sum":
        return one
    if num_items_in_batch is not None:
        if isinstance(num_items_in_batch, Tensor):
            return one / num_items_in_batch.to(device=rows.device, dtype=torch.float32).reshape(())
        return one / num_items_in_batch
    if valid is None:
        return one / max(rows.shape[0], 1)
    return one / valid.sum().clamp(min=1)
