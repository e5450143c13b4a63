"""Teacher-side targets: `topk_logprobs` (fused log-softmax + top-k in one pass over V) and
`sample_targets` (unbiased sampled targets)."""

# No `from __future__ import annotations`: torch.library reads the op's annotations.
import math
from typing import NamedTuple

import torch
from torch import Tensor

from . import reference
from .backends import cpu as _cpu
from .backends import cuda as _cuda
from .dispatch import resolve_backend
from .validation import check_float_tensor, check_kernel_dtype, check_positive

__all__ = ["TopK", "topk_logprobs"]


class TopK(NamedTuple):
    """Top-k teacher targets: ids (int32) and their log-probabilities over the full
    vocabulary (fp32), both ``[..., k]``, sorted by descending probability."""

    indices: Tensor
    logprobs: Tensor


@torch.library.custom_op("distill_ops::topk_logprobs", mutates_args=())
def topk_op(x: Tensor, k: int, temperature: float, logit_scale: float, softcap: float,
            backend: str) -> tuple[Tensor, Tensor]:
    """Rows x [N, V] -> (indices int32 [N, k], logprobs [N, k])."""
    if backend == "cpu":
        return _cpu.topk_forward(x, k, temperature, logit_scale, softcap)
    if backend == "cuda":
        return _cuda.topk_forward(x, k, temperature, logit_scale, softcap)
    from .backends.triton import topk as triton_topk

    return triton_topk.topk_forward(x, k, temperature, logit_scale, softcap)


@topk_op.register_fake
def _(x, k, temperature, logit_scale, softcap, backend):
    lp_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    return (x.new_empty((x.shape[0], k), dtype=torch.int32),
            x.new_empty((x.shape[0], k), dtype=lp_dtype))


def topk_logprobs(
    teacher_logits: Tensor,
    k: int,
    *,
    temperature: float = 1.0,
    logit_scale: float = 1.0,
    softcap: float | None = None,
    process_group: object | None = None,
    backend: str = "auto",
) -> TopK:
    r"""The k most probable next tokens of the teacher and their log-probabilities at T.

    With z = f(x) / T (f as in :func:`kd_loss`), returns ``indices`` (int32) and
    ``logprobs = z_i - logsumexp(z)`` (fp32) of the k largest z, both ``[..., k]``, sorted by
    descending probability, ties broken by the lower id. The normaliser and the selection come
    from one fused pass over the vocabulary; the ``[N, V]`` log-probabilities never exist.

    Top-k targets are biased: the mass outside the top-k is dropped or lumped (see the
    ``tail`` of :func:`sparse_kd_loss`); :func:`sample_targets` gives unbiased ones.

    With ``process_group`` the logits are a vocab-parallel slice (as in :func:`kd_loss`):
    each rank takes its local top-k, the k x world candidates and local normalisers are
    gathered and merged, and every rank returns the same global ids and log-probabilities.

    Example:
        >>> top = topk_logprobs(teacher_logits, 64, temperature=2.0)   # [B, T, 64] each
        >>> loss = sparse_kd_loss(student_logits, top.indices, top.logprobs,
        ...                       temperature=2.0, source_temperature=2.0)
    """
    check_float_tensor("teacher_logits", teacher_logits, allow_empty=process_group is not None)
    vocab = teacher_logits.shape[-1]
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"k must be an int, got {type(k).__name__}")
    shard = None
    if process_group is not None:
        from .distributed.comm import vocab_shard

        shard = vocab_shard(process_group, vocab,
                            [("the number of rows", teacher_logits.shape[:-1].numel()),
                             ("k", k)], device=teacher_logits.device)
        vocab = shard.total
    if not 1 <= k <= vocab:
        raise ValueError(f"k must lie in [1, V={vocab}], got {k}")
    t = check_positive("temperature", temperature)
    scale = check_positive("logit_scale", logit_scale)
    cap = check_positive("softcap", softcap, allow_none=True)
    be = resolve_backend(backend, teacher_logits.device, "topk")
    lead = teacher_logits.shape[:-1]
    if shard is not None:
        from .distributed import vocab_parallel as vp

        x = teacher_logits.detach().reshape(lead.numel(), teacher_logits.shape[-1])
        if be != "torch":
            check_kernel_dtype(be, teacher_logits=teacher_logits)
            x = x if x.stride(-1) == 1 else x.contiguous()
        z, ids, lse = local_topk_candidates(x, k, t, scale, softcap, shard.offset, be)
        idx, lp = vp.merge_topk(z, ids, lse, k, shard)
        return TopK(idx.reshape(*lead, k), lp.reshape(*lead, k))
    if be == "torch":
        idx, lp = reference.topk_logprobs(teacher_logits, k, temperature=t, logit_scale=scale,
                                          softcap=softcap)
        return TopK(idx, lp)
    check_kernel_dtype(be, teacher_logits=teacher_logits)
    x = teacher_logits.detach().reshape(-1, vocab)
    if x.stride(-1) != 1:
        x = x.contiguous()
    idx, lp = topk_op(x, k, t, scale, cap, be)
    return TopK(idx.reshape(*lead, k), lp.reshape(*lead, k))


def local_topk_candidates(x: Tensor, k: int, temperature: float, logit_scale: float,
                          softcap: float | None, offset: int, backend: str
                          ) -> tuple[Tensor, Tensor, Tensor]:
    """The top-k of a slice x [N, V_slice] of the vocabulary starting at id `offset`:
    (z = f(x) / T [N, k] descending, -inf padded; global ids [N, k], -1 padded; log-sum-exp
    of the slice's z [N], from its best id: z - logprob)."""
    n, width = x.shape
    kk = min(k, width)
    z = torch.full((n, k), -math.inf, dtype=torch.float32, device=x.device)
    ids = torch.full((n, k), -1, dtype=torch.int64, device=x.device)
    lse = torch.full((n,), -math.inf, dtype=torch.float32, device=x.device)
    if kk == 0 or n == 0:
        return z, ids, lse
    top = topk_logprobs(x, kk, temperature=temperature, logit_scale=logit_scale,
                        softcap=softcap, backend=backend)
    zl = reference.transform_logits(x.gather(1, top.indices.long()), logit_scale, softcap,
                                    temperature, torch.float32)
    z[:, :kk] = zl
    ids[:, :kk] = top.indices.long() + offset
    lse = torch.where(zl[:, 0] == -math.inf, zl[:, 0], zl[:, 0] - top.logprobs[:, 0])
    return z, ids, lse
