"""Plain-PyTorch reference of every op: the specification the kernels are tested against.

Differentiable by autograd, float64-capable (inputs in float64 are computed in float64,
everything else in float32), and written for clarity, not speed: it materialises every
intermediate. `backend="torch"` runs these functions.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["divergence_rows", "kd_loss", "transform_logits"]


def _compute_dtype(*tensors: Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def transform_logits(
    x: Tensor, scale: float, softcap: float | None, temperature: float, dtype: torch.dtype
) -> Tensor:
    """z = f(x) / T with f(x) = softcap * tanh(scale * x / softcap), or scale * x.

    A -inf logit is a masked vocabulary entry: it stays -inf through the softcap.
    """
    x = x.to(dtype)
    if softcap is None:
        y = scale * x
    else:
        y = torch.where(x == -math.inf, x, softcap * torch.tanh(scale * x / softcap))
    return y / temperature


def _xlogratio(p: Tensor, lp: Tensor, lo: Tensor) -> Tensor:
    """p * (lp - lo) with 0 * log 0 = 0, differentiable without NaN."""
    pos = p > 0
    zero = torch.zeros((), dtype=p.dtype, device=p.device)
    return torch.where(pos, p * (torch.where(pos, lp, zero) - torch.where(pos, lo, zero)), zero)


def divergence_rows(zs: Tensor, zt: Tensor, divergence: str, beta: float = 0.5) -> Tensor:
    """Per-row divergence between softmax(zs) (student q) and softmax(zt) (teacher p).

    forward_kl = KL(p||q); reverse_kl = KL(q||p); tvd = 0.5 * sum|q - p|;
    jsd = beta * KL(p||m) + (1 - beta) * KL(q||m) with m = beta * p + (1 - beta) * q, which
    is defined as forward KL at beta = 0 and reverse KL at beta = 1 (TRL and Liger's
    convention: the formula itself tends to 0 at both ends).
    """
    lq = torch.log_softmax(zs, dim=-1)
    lp = torch.log_softmax(zt, dim=-1)
    q, p = lq.exp(), lp.exp()
    if divergence == "jsd" and beta == 0.0:
        divergence = "forward_kl"
    if divergence == "jsd" and beta == 1.0:
        divergence = "reverse_kl"
    if divergence == "forward_kl":
        return _xlogratio(p, lp, lq).sum(-1)
    if divergence == "reverse_kl":
        return _xlogratio(q, lq, lp).sum(-1)
    if divergence == "jsd":
        # Where both probabilities are 0, m is 0 too and no term reads log m: give logaddexp
        # finite inputs there, else its gradient is NaN (exp(-inf - -inf)).
        both_zero = (p == 0) & (q == 0)
        zero = torch.zeros((), dtype=lp.dtype, device=lp.device)
        lm = torch.logaddexp(torch.where(both_zero, zero, lp + math.log(beta)),
                             torch.where(both_zero, zero, lq + math.log1p(-beta)))
        kl_p = _xlogratio(p, lp, lm).sum(-1)
        kl_q = _xlogratio(q, lq, lm).sum(-1)
        return beta * kl_p + (1.0 - beta) * kl_q
    if divergence == "tvd":
        return 0.5 * (q - p).abs().sum(-1)
    raise ValueError(f"unknown divergence {divergence!r}")


def kd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    divergence: str = "forward_kl",
    temperature: float = 1.0,
    beta: float = 0.5,
    labels: Tensor | None = None,
    ignore_index: int = -100,
    mask: Tensor | None = None,
    hard_weight: float = 0.0,
    soft_weight: float = 1.0,
    scale_by_t2: bool = False,
    reduction: str = "mean",
    num_items_in_batch: int | Tensor | None = None,
    vocab_size: int | None = None,
    student_logit_scale: float = 1.0,
    teacher_logit_scale: float = 1.0,
    student_softcap: float | None = None,
    teacher_softcap: float | None = None,
) -> Tensor:
    """Reference of `distill_ops.kd_loss` (same arguments, no validation, no backend)."""
    lead = student_logits.shape[:-1]
    k = vocab_size if vocab_size is not None else student_logits.shape[-1]
    dtype = _compute_dtype(student_logits, teacher_logits)
    xs = student_logits.reshape(-1, student_logits.shape[-1])[:, :k]
    xt = teacher_logits.reshape(-1, teacher_logits.shape[-1])[:, :k].detach()
    n = xs.shape[0]

    valid = torch.ones(n, dtype=torch.bool, device=xs.device)
    if labels is not None:
        valid = valid & (labels.reshape(-1) != ignore_index)
    if mask is not None:
        valid = valid & mask.reshape(-1)
    # Ignored rows may hold anything (all -inf padding included): replace them before any
    # maths, so neither their loss nor their gradient can leak a NaN.
    xs = torch.where(valid[:, None], xs, torch.zeros((), dtype=xs.dtype, device=xs.device))
    xt = torch.where(valid[:, None], xt, torch.zeros((), dtype=xt.dtype, device=xt.device))

    zs = transform_logits(xs, student_logit_scale, student_softcap, temperature, dtype)
    zt = transform_logits(xt, teacher_logit_scale, teacher_softcap, temperature, dtype)
    coef = soft_weight * (temperature**2 if scale_by_t2 else 1.0)
    rows = coef * divergence_rows(zs, zt, divergence, beta)
    if hard_weight != 0.0:
        z1 = transform_logits(xs, student_logit_scale, student_softcap, 1.0, dtype)
        safe_labels = torch.where(valid, labels.reshape(-1), 0)
        rows = rows + hard_weight * F.cross_entropy(z1, safe_labels, reduction="none")
    rows = torch.where(valid, rows, torch.zeros((), dtype=rows.dtype, device=rows.device))

    if reduction == "none":
        return rows.reshape(lead)
    total = rows.sum()
    if reduction == "sum":
        return total
    if num_items_in_batch is not None:
        return total / num_items_in_batch
    return total / valid.sum().clamp(min=1)
