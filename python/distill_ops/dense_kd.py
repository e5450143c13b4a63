"""Dense KD losses: `kd_loss`, its torch.library op, autograd and backend dispatch.

The forward kernel computes each row's loss and its gradient w.r.t. the student logits in
one launch; autograd's backward only scales that saved gradient by the incoming
grad_output (on the device, no host sync; see _fused.py), and on the Triton backend not at
all for a plain `loss.backward()` of a "mean" or "sum" loss: the kernel already applied the
reduction's weight. The op is registered with a fake
impl, so `torch.compile(fullgraph=True)` traces straight through it.
"""

# No `from __future__ import annotations`: torch.library reads the op's annotations, and
# `Optional[Tensor]` is the spelling every torch >= 2.4 understands there.
from typing import Optional

import torch
from torch import Tensor

from . import reference
from .autograd import apply_row_scale, propagate_nan_rows, register_fused_autograd
from .backends import cpu as _cpu
from .backends import cuda as _cuda
from .backends.extension import fused_outputs
from .dispatch import resolve_backend
from .reduction import reduce_rows, reduction_weight, resolve_batchmean, valid_rows
from .validation import (
    REDUCTIONS,
    LossScalars,
    check_choice,
    check_float_tensor,
    check_kernel_dtype,
    check_labels_in_range,
    check_num_items,
    check_row_tensors,
    check_same_device,
    loss_scalars,
    resolve_vocab,
    teacher_wants_grad,
)

__all__ = ["kd_loss"]


def triton_impl():
    """The Triton launchers (imported on first use: triton is optional on CPU-only hosts)."""
    from .backends.triton import dense_kd as triton_dense_kd

    return triton_dense_kd


@torch.library.custom_op("distill_ops::dense_kd", mutates_args=())
def dense_kd(
    student: Tensor,
    teacher: Tensor,
    valid: Optional[Tensor],  # noqa: UP045
    labels: Optional[Tensor],  # noqa: UP045
    divergence: int,
    temperature: float,
    beta: float,
    param2: float,
    interp: float,
    student_scale: float,
    student_softcap: float,
    teacher_scale: float,
    teacher_softcap: float,
    hard_weight: float,
    soft_coef: float,
    vocab: int,
    compute_grad: bool,
    row_scale: Optional[Tensor],  # noqa: UP045
    backend: str,
) -> tuple[Tensor, Tensor]:
    """Per-row dense KD loss [N] and, when compute_grad, d(loss_r)/d(student) [N, V_s]
    times `row_scale` (a 0-dim tensor, see _fused.py) when given."""
    sc = LossScalars(divergence, temperature, beta, student_scale, student_softcap,
                     teacher_scale, teacher_softcap, hard_weight, soft_coef, param2, interp)
    if backend == "triton":
        return triton_impl().dense_kd_forward(student, teacher, valid, labels, sc, vocab,
                                              compute_grad, row_scale=row_scale)
    impl = _cuda if backend == "cuda" else _cpu
    loss, grad = impl.dense_kd_forward(student, teacher, valid, labels, sc, vocab, compute_grad)
    return loss, apply_row_scale(grad, row_scale, backend)


@dense_kd.register_fake
def _(student, teacher, valid, labels, divergence, temperature, beta, param2, interp,
      student_scale,
      student_softcap, teacher_scale, teacher_softcap, hard_weight, soft_coef, vocab,
      compute_grad, row_scale, backend):
    return fused_outputs(student, torch.float64 in (student.dtype, teacher.dtype), compute_grad)


register_fused_autograd(dense_kd, n_inputs=19)


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
    skew: float = 0.1,
    ab_alpha: float = 0.5,
    ab_beta: float = 0.5,
    akl_head_mass: float = 0.5,
    teacher_interpolation: float = 1.0,
    process_group: object | None = None,
    backend: str = "auto",
) -> Tensor:
    r"""Distillation loss between full student and teacher next-token distributions.

    With z = f(x) / T, f(x) = softcap * tanh(scale * x / softcap) (or scale * x),
    q = softmax(z_s), p = softmax(z_t), each valid row contributes
    ``hard_weight * CE(f(x_s), label) + soft_weight * (T^2 if scale_by_t2) * D(p, q)`` with
    D one of ``forward_kl`` KL(p||q), ``reverse_kl`` KL(q||p), ``jsd``
    beta*KL(p||m) + (1-beta)*KL(q||m), m = beta*p + (1-beta)*q (forward KL at beta=0,
    reverse KL at beta=1, as TRL and Liger define the endpoints), ``tvd`` 0.5*sum|q - p|,
    or one of the research family (docs/api.md has each one's maths and paper):
    ``skew_kl`` KL(p||skew*p + (1-skew)*q), ``skew_reverse_kl`` KL(q||skew*q + (1-skew)*p),
    ``ab`` the alpha-beta divergence -1/(a*b) sum[p^a q^b - a/(a+b) p^(a+b) - b/(a+b) q^(a+b)],
    ``akl`` w*KL(p||q) + (1-w)*KL(q||p) with w = g_head / (g_head + g_tail) from sum|p - q|
    over the teacher's head (cumulative mass ``akl_head_mass``) and tail. With
    ``teacher_interpolation`` t < 1 (TAID) p is softmax((1-t)*stopgrad(z_s) + t*z_t).

    Args:
        student_logits: ``[..., V_s]`` fp32/bf16/fp16 (fp64 on the cpu and torch backends).
            Receives the gradient.
        teacher_logits: ``[..., V_t]``, same leading shape. Receives its exact gradient when
            it requires grad (mutual / online distillation: the PyTorch path), else none
            and costs nothing.
        divergence: ``"forward_kl"``, ``"reverse_kl"``, ``"jsd"``, ``"tvd"``, ``"skew_kl"``,
            ``"skew_reverse_kl"``, ``"ab"`` or ``"akl"``.
        temperature: T > 0 of the soft term (the hard term is always at T = 1).
        beta: JSD mixing weight in [0, 1].
        skew: the skew KLs' mixing weight in [0, 1) (0: forward / reverse KL).
        ab_alpha, ab_beta: the alpha-beta divergence's a > 0, b > 0.
        akl_head_mass: AKL's head, the teacher's most probable ids up to this cumulative
            mass, in (0, 1].
        teacher_interpolation: TAID's t in [0, 1] (1: the plain teacher; 0: the student
            itself, loss 0), for any divergence.
        labels: integer ``[...]``; rows equal to ``ignore_index`` contribute nothing. Needed
            when ``hard_weight > 0``.
        mask: ``[...]``, bool or 0/1 of any dtype; rows where False (0) contribute nothing.
        hard_weight, soft_weight, scale_by_t2: weights of the two terms.
        reduction: ``"mean"`` (over valid rows, or over ``num_items_in_batch``), ``"sum"``,
            ``"none"`` (shape ``[...]``), ``"batchmean"`` (``F.kl_div`` and TRL: the sum
            over valid rows / their number with labels or a mask, else / the input's first
            dimension).
        vocab_size: use only the first K columns of both sides (padded vocabularies).
        process_group: vocab-parallel logits: each rank of the group holds a contiguous
            slice ``[..., V_r]`` of the vocabulary (rank order, possibly uneven; student and
            teacher sliced alike) and the same rows; the loss equals the unsharded one and
            each rank's gradient is its slice of the unsharded gradient. Per row only a few
            floats cross the group (see :mod:`distill_ops.distributed.vocab_parallel`). It
            runs the fused kernels in phases around the all-reduces (``auto``: C++ for CPU
            tensors, Triton for CUDA ones; ``"cuda"`` has none and is refused; float64
            runs in PyTorch row chunks, as does ``"torch"``).
        student_logit_scale, teacher_logit_scale, student_softcap, teacher_softcap: the
            per-side logit transform f. A -inf logit stays -inf (masked vocabulary entry).
        backend: ``"auto"`` (cpu for CPU tensors, triton for CUDA), ``"cpu"``, ``"triton"``,
            ``"cuda"`` (the csrc/cuda kernels), ``"torch"`` (the reference);
            ``DISTILL_OPS_BACKEND`` overrides ``"auto"``.

    Returns:
        fp32 loss (fp64 for fp64 inputs): a scalar, or ``[...]`` for ``reduction="none"``.

    Example:
        >>> s = torch.randn(4, 7, 32000, requires_grad=True)
        >>> t = torch.randn(4, 7, 32000)
        >>> loss = kd_loss(s, t, divergence="jsd", beta=0.5, temperature=2.0)
        >>> loss.backward()
    """
    check_float_tensor("student_logits", student_logits, allow_empty=process_group is not None)
    check_float_tensor("teacher_logits", teacher_logits, allow_empty=process_group is not None)
    if student_logits.shape[:-1] != teacher_logits.shape[:-1]:
        raise ValueError(
            "student_logits and teacher_logits must share their leading dims, got "
            f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}"
        )
    lead = student_logits.shape[:-1]
    mask = check_row_tensors(lead, labels, mask, ignore_index)
    device = check_same_device(student_logits=student_logits, teacher_logits=teacher_logits,
                               labels=labels, mask=mask)
    check_choice("reduction", reduction, REDUCTIONS)
    check_num_items(num_items_in_batch)
    reduction, num_items_in_batch = resolve_batchmean(
        reduction, lead, labels is not None or mask is not None, num_items_in_batch)
    shard = None
    if process_group is not None:
        shard, vocab = _vocab_parallel_shard(process_group, student_logits, teacher_logits,
                                             vocab_size)
    else:
        vocab = resolve_vocab(student_logits.shape[-1], teacher_logits.shape[-1], vocab_size)
    sc = loss_scalars(
        divergence=divergence, temperature=temperature, beta=beta, hard_weight=hard_weight,
        soft_weight=soft_weight, scale_by_t2=scale_by_t2,
        student_logit_scale=student_logit_scale, teacher_logit_scale=teacher_logit_scale,
        student_softcap=student_softcap, teacher_softcap=teacher_softcap,
        has_labels=labels is not None, skew=skew, ab_alpha=ab_alpha, ab_beta=ab_beta,
        akl_head_mass=akl_head_mass, teacher_interpolation=teacher_interpolation,
    )
    if labels is not None and sc.hard_weight > 0:
        check_labels_in_range(labels, ignore_index, vocab)
    teacher_grad = teacher_wants_grad(teacher_logits)
    if shard is not None:
        if teacher_grad:
            raise ValueError("teacher_logits requires grad, but the vocab-parallel kd_loss "
                             "(process_group=) gives the teacher no gradient: detach it")
        return _vocab_parallel_kd(student_logits, teacher_logits, labels, ignore_index, mask,
                                  sc, shard, vocab, reduction, num_items_in_batch, backend)
    be = resolve_backend(backend, device, "dense")
    check_kernel_dtype(be, student_logits=student_logits, teacher_logits=teacher_logits)

    # A teacher that requires grad (mutual or online distillation) gets its exact gradient
    # from the PyTorch path, autograd through both sides; the fused kernels write the
    # student's only. A detached teacher (the usual case) costs nothing here.
    if be == "torch" or teacher_grad:
        return reference.kd_loss(
            student_logits, teacher_logits, divergence=divergence, temperature=temperature,
            beta=beta, labels=labels, ignore_index=ignore_index, mask=mask,
            hard_weight=hard_weight, soft_weight=soft_weight, scale_by_t2=scale_by_t2,
            reduction=reduction, num_items_in_batch=num_items_in_batch, vocab_size=vocab_size,
            student_logit_scale=student_logit_scale, teacher_logit_scale=teacher_logit_scale,
            student_softcap=student_softcap, teacher_softcap=teacher_softcap, skew=skew,
            ab_alpha=ab_alpha, ab_beta=ab_beta, akl_head_mass=akl_head_mass,
            teacher_interpolation=teacher_interpolation,
        )

    student = _rows(student_logits)
    teacher = _rows(teacher_logits.detach())
    valid = valid_rows(labels, mask, ignore_index)
    flat_labels = labels.reshape(-1).to(torch.int64).contiguous() if sc.hard_weight > 0 else None
    compute_grad = student.requires_grad and torch.is_grad_enabled()
    # The Triton kernel folds the reduction's weight into the gradient it writes, so that a
    # plain loss.backward() has nothing left to scale (_fused.py).
    row_scale = reduction_weight(student, valid, reduction, num_items_in_batch) \
        if compute_grad and be == "triton" else None
    rows, _ = dense_kd(
        student, teacher, valid, flat_labels, sc.divergence, sc.temperature, sc.beta, sc.param2,
        sc.interp, sc.student_scale, sc.student_softcap, sc.teacher_scale, sc.teacher_softcap,
        sc.hard_weight, sc.soft_coef, vocab, compute_grad, row_scale, be,
    )
    return reduce_rows(propagate_nan_rows(rows), valid, reduction, num_items_in_batch, lead,
                       row_scale)


def _vocab_parallel_shard(group, student_logits: Tensor, teacher_logits: Tensor,
                          vocab_size: object):
    """The agreed vocabulary split of a vocab-parallel kd_loss, and the ids that count."""
    from .distributed.comm import vocab_shard

    vs, vt = student_logits.shape[-1], teacher_logits.shape[-1]
    n = student_logits.shape[:-1].numel()
    shard = vocab_shard(group, vs, [("the number of rows", n)],
                        [("student_logits and teacher_logits slices differ in width (both "
                          "must cover the same ids)", vs == vt)], device=student_logits.device)
    if vocab_size is None:
        return shard, shard.total
    vocab = resolve_vocab(shard.total, shard.total, vocab_size)
    return shard, vocab


def _vocab_parallel_kd(student_logits, teacher_logits, labels, ignore_index, mask, sc, shard,
                       vocab, reduction, num_items_in_batch, backend):
    from .distributed import vocab_parallel as vp

    lead = student_logits.shape[:-1]
    n = lead.numel()
    student = student_logits.reshape(n, student_logits.shape[-1])
    teacher = teacher_logits.detach().reshape(n, teacher_logits.shape[-1])
    valid = valid_rows(labels, mask, ignore_index)
    flat_labels = labels.reshape(-1).to(torch.int64) if sc.hard_weight > 0 else None

    # On the CPU the reduction's weight goes into the gradient the kernel writes, so that a
    # plain backward leaves it alone (autograd.py, row_scale); on a GPU that would cost a
    # host sync, and backward scales instead.
    weight = vp.folded_weight(student, valid, reduction, num_items_in_batch)

    def compute(x, want):
        return vp.dense_rows(x, teacher, valid, flat_labels, sc, shard, vocab, want, backend,
                             weight or 1.0)

    rows = vp.saved_grad_rows(student, compute, weight)
    return reduce_rows(rows, valid, reduction, num_items_in_batch, lead)


def _rows(x: Tensor) -> Tensor:
    """[..., V] -> [N, V] with unit column stride (a view whenever the layout allows)."""
    x = x.reshape(-1, x.shape[-1])
    return x if x.stride(-1) == 1 else x.contiguous()
