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


def resolve_batchmean(
    reduction: str,
    lead: torch.Size,
    counted: bool,
    num_items_in_batch: int | float | Tensor | None,
) -> tuple[str, int | float | Tensor | None]:
    """``"batchmean"`` as ``F.kl_div`` and TRL's ``generalized_jsd_loss`` define it: the sum
    over counted rows divided by their number where labels or a mask say which rows count
    (or by ``num_items_in_batch``), else by the input's first dimension (B of [B, T, V]).
    Returns the equivalent ("mean", denominator); other reductions pass through."""
    if reduction != "batchmean":
        return reduction, num_items_in_batch
    if num_items_in_batch is None and not counted:
        num_items_in_batch = max(lead[0], 1) if len(lead) else 1
    return "mean", num_items_in_batch


def reduce_rows(
    rows: Tensor,
    valid: Tensor | None,
    reduction: str,
    num_items_in_batch: int | float | Tensor | None,
    lead: torch.Size,
    weight: Tensor | None = None,
) -> Tensor:
    """`none`: rows shaped like the logits' leading dims; `sum`; `mean`: the sum over valid
    rows divided by their count (a device tensor), or by `num_items_in_batch` when given, so
    gradient accumulation and data parallelism see the same scale as one big batch.

    The sum is multiplied by reduction_weight(...) (or `weight`, that factor when the caller
    already computed it), so each row's gradient under a plain `loss.backward()` is that
    weight bit for bit (the fused ops rely on it: _fused.py)."""
    if reduction == "none":
        return rows.reshape(lead)
    if weight is None:
        weight = reduction_weight(rows, valid, reduction, num_items_in_batch)
    return rows.sum() * weight


def reduction_weight(
    rows: Tensor,
    valid: Tensor | None,
    reduction: str,
    num_items_in_batch: int | float | Tensor | None,
) -> Tensor | None:
    """The factor reduce_rows puts on every row: a 0-dim tensor of the loss's dtype (fp32,
    fp64 for fp64 rows) on the rows' device, 1 for "sum", 1 / count for "mean"; None for
    "none"."""
    if reduction == "none":
        return None
    dt = torch.float64 if rows.dtype == torch.float64 else torch.float32
    one = torch.ones((), dtype=dt, device=rows.device)
    if reduction == "sum":
        return one
    if num_items_in_batch is not None:
        if isinstance(num_items_in_batch, Tensor):
            return one / num_items_in_batch.to(device=rows.device, dtype=dt).reshape(())
        return one / num_items_in_batch
    if valid is None:
        return one / max(rows.shape[0], 1)
    return one / valid.sum().clamp(min=1)
