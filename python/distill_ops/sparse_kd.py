"""Sparse KD losses: `sparse_kd_loss` against top-k or sampled teacher targets.

The teacher is k (id, log-probability) pairs per row; the student a full row of logits.
The divergence is taken over coarse classes, the support ids plus, for tail="bucket", one
class holding the mass outside the support; its gradient w.r.t. every student logit is
q_j * (g_c(j) - sum_c q_hat_c g_c) (DESIGN.md section 3). One kernel computes the loss and that
gradient per row; no dense teacher tensor is ever built.
"""

# No `from __future__ import annotations`: torch.library reads the op's annotations.
import math
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
    TAIL_CODES,
    TAILS,
    check_choice,
    check_float_tensor,
    check_indices_in_range,
    check_kernel_dtype,
    check_labels_in_range,
    check_num_items,
    check_positive,
    check_row_tensors,
    check_same_device,
    check_sparse_targets,
    check_teacher_logprobs,
    loss_scalars,
    teacher_wants_grad,
)

__all__ = ["sparse_kd_loss"]


@torch.library.custom_op("distill_ops::sparse_kd", mutates_args=())
def sparse_kd(
    student: Tensor,
    indices: Tensor,
    teacher_logprobs: Tensor,
    valid: Optional[Tensor],  # noqa: UP045
    labels: Optional[Tensor],  # noqa: UP045
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
    row_scale: Optional[Tensor],  # noqa: UP045
    backend: str,
) -> tuple[Tensor, Tensor]:
    """Per-row sparse KD loss [N] and, when compute_grad, d(loss_r)/d(student) [N, V]
    times `row_scale` (a 0-dim tensor, see _fused.py) when given."""
    args = (student, indices, teacher_logprobs, valid, labels, divergence, tail, temperature,
            source_temperature, beta, param2, interp, hard_weight, soft_coef, compute_grad)
    if backend == "triton":
        from .backends.triton import sparse_kd as tsparse

        return tsparse.sparse_kd_forward(*args, row_scale=row_scale)
    impl = _cuda if backend == "cuda" else _cpu
    loss, grad = impl.sparse_kd_forward(*args)
    return loss, apply_row_scale(grad, row_scale, backend)


@sparse_kd.register_fake
def _(student, indices, teacher_logprobs, valid, labels, divergence, tail, temperature,
      source_temperature, beta, param2, interp, hard_weight, soft_coef, compute_grad, row_scale,
      backend):
    return fused_outputs(student, student.dtype == torch.float64, compute_grad)


register_fused_autograd(sparse_kd, n_inputs=17)


def sparse_kd_loss(
    student_logits: Tensor,
    indices: Tensor,
    teacher_logprobs: Tensor,
    *,
    divergence: str = "forward_kl",
    tail: str = "bucket",
    temperature: float = 1.0,
    source_temperature: float = 1.0,
    beta: float = 0.5,
    labels: Tensor | None = None,
    ignore_index: int = -100,
    mask: Tensor | None = None,
    hard_weight: float = 0.0,
    soft_weight: float = 1.0,
    scale_by_t2: bool = False,
    reduction: str = "mean",
    num_items_in_batch: int | Tensor | None = None,
    skew: float = 0.1,
    ab_alpha: float = 0.5,
    ab_beta: float = 0.5,
    akl_head_mass: float = 0.5,
    teacher_interpolation: float = 1.0,
    process_group: object | None = None,
    backend: str = "auto",
) -> Tensor:
    r"""Distillation loss of full student logits against sparse teacher targets.

    The teacher gives, per row, k ids (``-1`` pads) and their log-probabilities, recorded at
    ``source_temperature`` (top-k from :func:`topk_logprobs`, or sampled targets). With
    q = softmax(x_s / T) over the full vocabulary, the loss is a divergence over the coarse
    classes: the support ids, plus one class for the mass outside it when
    ``tail="bucket"``. ``tail`` says how each side is normalised:

    - ``"bucket"``: both sides get the extra "rest" class (teacher: 1 - its support mass;
      student: the mass of every id outside the support, summed without cancellation).
    - ``"renorm"``: teacher renormalised over its support; student normalised over the full V.
    - ``"support"``: both renormalised over the support.
    - ``"none"``: targets used as given (sampled targets, which already sum to one).

    Targets are re-tempered to ``temperature`` as p^(source_temperature / temperature),
    renormalised over the support (+ rest for bucket). Every divergence of :func:`kd_loss`
    applies over the coarse classes with every tail (AKL's head is taken among the classes,
    the rest class included), and ``teacher_interpolation`` t < 1 (TAID) makes the target
    the softmax over the classes of (1-t)*stopgrad(log q_hat) + t*log p_hat.
    ``divergence``, ``beta``, ``skew``, ``ab_alpha``, ``ab_beta``, ``akl_head_mass``, ``labels``,
    ``mask``, ``hard_weight``, ``soft_weight``, ``scale_by_t2``, ``reduction`` and
    ``num_items_in_batch`` mean what they mean in :func:`kd_loss`. With ``process_group``
    the student logits are a vocab-parallel slice (as in :func:`kd_loss`) and ``indices``
    are global ids; each rank handles the ids in its slice and the mass outside the support.

    Example:
        >>> s = torch.randn(4, 7, 32000, requires_grad=True)
        >>> top = distill_ops.topk_logprobs(teacher_logits, 64)
        >>> loss = sparse_kd_loss(s, top.indices, top.logprobs, tail="bucket")
        >>> loss.backward()
    """
    check_float_tensor("student_logits", student_logits, allow_empty=process_group is not None)
    lead = student_logits.shape[:-1]
    vocab = student_logits.shape[-1]
    shard = None
    if process_group is not None:
        from .distributed.comm import vocab_shard

        shard = vocab_shard(process_group, vocab,
                            [("the number of rows", student_logits.shape[:-1].numel()),
                             ("k (the last dim of indices)",
                              indices.shape[-1] if isinstance(indices, Tensor) else -1)],
                            device=student_logits.device)
        vocab = shard.total
    k = check_sparse_targets(lead, vocab, indices, teacher_logprobs)
    mask = check_row_tensors(lead, labels, mask, ignore_index)
    device = check_same_device(student_logits=student_logits, indices=indices,
                               teacher_logprobs=teacher_logprobs, labels=labels, mask=mask)
    check_choice("reduction", reduction, REDUCTIONS)
    check_choice("tail", tail, TAILS)
    check_num_items(num_items_in_batch)
    reduction, num_items_in_batch = resolve_batchmean(
        reduction, lead, labels is not None or mask is not None, num_items_in_batch)
    source_t = check_positive("source_temperature", source_temperature)
    sc = loss_scalars(
        divergence=divergence, temperature=temperature, beta=beta, hard_weight=hard_weight,
        soft_weight=soft_weight, scale_by_t2=scale_by_t2, student_logit_scale=1.0,
        teacher_logit_scale=1.0, student_softcap=None, teacher_softcap=None,
        has_labels=labels is not None, skew=skew, ab_alpha=ab_alpha, ab_beta=ab_beta,
        akl_head_mass=akl_head_mass, teacher_interpolation=teacher_interpolation,
    )
    if labels is not None and sc.hard_weight > 0:
        check_labels_in_range(labels, ignore_index, vocab)
    check_indices_in_range(indices, vocab)
    valid = valid_rows(labels, mask, ignore_index)
    bad_targets = check_teacher_logprobs(indices, teacher_logprobs, valid)
    teacher_grad = teacher_wants_grad(teacher_logprobs)
    if shard is not None:
        if teacher_grad:
            raise ValueError("teacher_logprobs requires grad, but the vocab-parallel "
                             "sparse_kd_loss (process_group=) gives the teacher no gradient: "
                             "detach it")
        return _vocab_parallel_sparse(student_logits, indices, teacher_logprobs, labels,
                                      ignore_index, mask, sc, tail, source_t, shard,
                                      reduction, num_items_in_batch, backend)
    be = resolve_backend(backend, device, "sparse")
    # Teacher log-probabilities that require grad get their exact gradient from the PyTorch
    # path (autograd through both sides); the fused kernels write the student's only.
    if be == "torch" or teacher_grad:
        return reference.sparse_kd_loss(
            student_logits, indices, teacher_logprobs, divergence=divergence, tail=tail,
            temperature=temperature, source_temperature=source_temperature, beta=beta,
            labels=labels, ignore_index=ignore_index, mask=mask, hard_weight=hard_weight,
            soft_weight=soft_weight, scale_by_t2=scale_by_t2, reduction=reduction,
            num_items_in_batch=num_items_in_batch, skew=skew, ab_alpha=ab_alpha, ab_beta=ab_beta,
            akl_head_mass=akl_head_mass, teacher_interpolation=teacher_interpolation,
        )

    check_kernel_dtype(be, student_logits=student_logits)
    student = student_logits.reshape(-1, vocab)
    if student.stride(-1) != 1:
        student = student.contiguous()
    wide = student.dtype == torch.float64
    idx = indices.reshape(-1, k).to(torch.int64).contiguous()
    tlp = teacher_logprobs.detach().reshape(-1, k).to(
        torch.float64 if wide else torch.float32).contiguous()
    flat_labels = labels.reshape(-1).to(torch.int64).contiguous() if sc.hard_weight > 0 else None
    compute_grad = student.requires_grad and torch.is_grad_enabled()
    row_scale = reduction_weight(student, valid, reduction, num_items_in_batch) \
        if compute_grad and be == "triton" else None
    rows, _ = sparse_kd(
        student, idx, tlp, valid, flat_labels, sc.divergence, TAIL_CODES[tail],
        sc.temperature, source_t, sc.beta, sc.param2, sc.interp, sc.hard_weight, sc.soft_coef,
        compute_grad, row_scale, be,
    )
    if bad_targets is not None:  # invalid targets on a GPU: their rows are NaN, no host sync
        one = torch.ones((), dtype=rows.dtype, device=rows.device)
        rows = rows * torch.where(bad_targets, one * math.nan, one)
    return reduce_rows(propagate_nan_rows(rows), valid, reduction, num_items_in_batch, lead,
                       row_scale)


def _vocab_parallel_sparse(student_logits, indices, teacher_logprobs, labels, ignore_index,
                           mask, sc, tail, source_t, shard, reduction, num_items_in_batch,
                           backend):
    from .distributed import vocab_parallel as vp

    lead = student_logits.shape[:-1]
    student = student_logits.reshape(lead.numel(), student_logits.shape[-1])
    k = indices.shape[-1]
    idx = indices.reshape(-1, k).to(torch.int64)
    tlp = teacher_logprobs.detach().reshape(-1, k)
    valid = valid_rows(labels, mask, ignore_index)
    flat_labels = labels.reshape(-1).to(torch.int64) if sc.hard_weight > 0 else None

    weight = vp.folded_weight(student, valid, reduction, num_items_in_batch)  # autograd.py

    def compute(x, want):
        return vp.sparse_rows(x, idx, tlp, valid, flat_labels, sc.divergence, tail,
                              sc.temperature, source_t / sc.temperature, sc,
                              shard, want, backend, weight or 1.0)

    rows = vp.saved_grad_rows(student, compute, weight)
    return reduce_rows(rows, valid, reduction, num_items_in_batch, lead)
