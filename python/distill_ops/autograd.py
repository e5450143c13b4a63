"""What every fused loss op shares: its backward only scales the gradient the forward saved.

A fused op returns (per-row loss [N], d loss_r / d input [N, V]). Its backward multiplies
that saved gradient by the incoming per-row grad_output, in place, on the device: peak
memory holds one gradient, not two, and there is no host sync. A second backward through
the same graph (retain_graph=True) then fails loudly in autograd's saved-tensor version
check instead of double-scaling.

An op may take a `row_scale` (a 0-dim device tensor: the reduction's weight, 1 / count for
"mean", 1 for "sum") that its kernel already multiplied into the gradient; backward then
scales by grad_output / row_scale, which is exactly 1.0 for a plain `loss.backward()`, and
the scale kernels skip every row whose factor is exactly 1.0 on the device: the
backward moves no gradient bytes at all (2 of the dense forward KL's 7 transfers).
"""

# No `from __future__ import annotations`: torch.library reads the op's annotations.
import torch
from torch import Tensor

from .backends import cpu as _cpu
from .backends import cuda as _cuda


@torch.library.custom_op("distill_ops::scale_rows_", mutates_args=("grad",))
def scale_rows_(grad: Tensor, scale: Tensor, backend: str) -> None:
    """grad *= scale[:, None] in place, accumulated in fp32 (fp64 for fp64); rows whose
    scale is exactly 1 are not touched."""
    if backend == "cpu":
        _cpu.scale_rows_(grad, scale)
    elif backend == "cuda":
        _cuda.scale_rows_(grad, scale)
    else:
        from .backends.triton import dense_kd as triton_dense_kd

        triton_dense_kd.scale_rows_(grad, scale)


def apply_row_scale(grad: Tensor, row_scale: Tensor | None, backend: str) -> Tensor:
    """grad * row_scale in place, for a backend whose kernel does not take the scale."""
    if row_scale is not None and grad.numel():
        scale = row_scale.to(torch.float64 if grad.dtype == torch.float64 else torch.float32)
        scale_rows_(grad, scale.reshape(1).expand(grad.shape[0]), backend)
    return grad


def propagate_nan_rows(rows: Tensor) -> Tensor:
    """rows * (NaN where a row's loss is NaN, else exactly 1).

    A kernel marks a row whose inputs hold a NaN or +inf with a NaN loss; this makes its
    gradient row NaN too (backward scales the saved gradient by NaN), where the divergence's
    own guards (0 * log 0 = 0) could leave it finite. Other rows get a factor of exactly 1,
    so a plain backward still skips them. One [N] pass, no host synchronisation."""
    nan = torch.full((), float("nan"), dtype=rows.dtype, device=rows.device)
    return rows * torch.where(torch.isnan(rows.detach()), nan, torch.ones_like(nan))


def _setup_context(ctx, inputs, output):
    ctx.backend = inputs[-1]
    ctx.save_for_backward(output[1], inputs[-2])
    # Nothing differentiates through the gradient output: without this, autograd would
    # materialise a zero [N, V] "gradient of the gradient" on every backward.
    ctx.set_materialize_grads(False)


def scale_saved_grad_(grad: Tensor, grad_loss: Tensor, row_scale: Tensor | float | None,
                      backend: str | None) -> Tensor:
    """The fused ops' backward: grad[r] *= grad_loss[r] / row_scale in place (fp32, fp64
    for fp64), row_scale being the factor the forward already put on the gradient (the
    reduction's weight; the ratio is exactly 1 under a plain backward, and `backend`'s
    scale_rows_ leaves such rows alone). backend None: a plain multiply."""
    scale = grad_loss.to(torch.float64 if grad.dtype == torch.float64 else torch.float32)
    if row_scale is not None:
        scale = scale / (row_scale.to(scale.dtype) if isinstance(row_scale, Tensor)
                         else row_scale)
    if backend is None:
        return grad.mul_(scale[:, None].to(grad.dtype))
    scale_rows_(grad, scale, backend)
    return grad


def register_fused_autograd(op, n_inputs: int) -> None:
    """Register the scale-the-saved-gradient backward on `op`, whose first input is the one
    differentiated, whose last input is the backend name and whose last but one is the
    optional row_scale already applied to the gradient."""

    def backward(ctx, grad_loss, _grad_of_grad):
        grad, row_scale = ctx.saved_tensors
        return (scale_saved_grad_(grad, grad_loss, row_scale, ctx.backend),) + \
            (None,) * (n_inputs - 1)

    op.register_autograd(backward, setup_context=_setup_context)
