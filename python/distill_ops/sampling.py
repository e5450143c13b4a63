"""Unbiased sampled teacher targets (Anshumann et al. 2025, "Sparse Logit Sampling")."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from .backends.extension import DTYPE_CODES, has_native, native
from .validation import check_float_tensor, check_positive

__all__ = ["SparseTargets", "sample_targets"]

# Rows of the distribution materialised at once: bounds the working set (fp32 softmax and
# fp64 cumulative sums) to ~192 MiB.
_CHUNK_ELEMENTS = 1 << 24


class SparseTargets(NamedTuple):
    """Sampled targets: unique ids (int32, -1 pads) and their empirical probabilities
    count / num_samples (fp32, 0 on padding), both ``[..., K]`` with K = min(num_samples, V)."""

    indices: Tensor
    probs: Tensor

    @property
    def logprobs(self) -> Tensor:
        """log(probs), -inf on padding: what :func:`sparse_kd_loss` takes (with tail="none")."""
        return torch.log(self.probs)


def sample_targets(
    teacher_logits: Tensor,
    num_samples: int,
    *,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
) -> SparseTargets:
    r"""Draw ``num_samples`` ids with replacement from p = softmax(x / T); keep each distinct
    id with probability count / num_samples.

    The estimate is unbiased: E[probs_i] = p_i for every id, so a loss linear in the targets
    (forward KL's cross-entropy, and its gradient q - p) is unbiased too, where top-k targets
    drop the tail mass. The cost is variance, shrinking as 1 / num_samples, and ids that
    differ from row to row. Use the result with ``sparse_kd_loss(..., tail="none")``.

    Runs on the logits' device with no host synchronisation, a chunk of rows at a time.
    Reproducible with ``generator``.

    Example:
        >>> tgt = sample_targets(teacher_logits, 64, temperature=1.0)
        >>> loss = sparse_kd_loss(student_logits, tgt.indices, tgt.logprobs, tail="none")
    """
    check_float_tensor("teacher_logits", teacher_logits)
    if isinstance(num_samples, bool) or not isinstance(num_samples, int):
        raise TypeError(f"num_samples must be an int, got {type(num_samples).__name__}")
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    t = check_positive("temperature", temperature)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    vocab = teacher_logits.shape[-1]
    lead = teacher_logits.shape[:-1]
    x = teacher_logits.detach().reshape(-1, vocab)
    width = min(num_samples, vocab)
    idx_parts, prob_parts = [], []
    rows = max(1, _CHUNK_ELEMENTS // vocab)
    for start in range(0, x.shape[0], rows):
        # Inverse-CDF sampling: the unnormalised cumulative distribution (exp(z - max) in
        # fp32, summed in fp64), uniform draws scaled by its total, a search. Unlike
        # torch.multinomial (whose argument checks read the device on some paths), nothing
        # here waits for the device.
        chunk = x[start:start + rows]
        u = torch.rand((chunk.shape[0], num_samples), generator=generator, dtype=torch.float64,
                       device=chunk.device)
        draws, total = _draw(chunk, t, u)
        # A row with NaN logits (or only -inf ones) has no distribution: its targets say so
        # (NaN probabilities, so any loss built on them is NaN) instead of looking valid.
        broken = torch.isnan(total)
        idx, p = _unique_counts(draws, width)
        p = torch.where(broken, torch.full_like(p, float("nan")), p)
        idx_parts.append(idx)
        prob_parts.append(p)
    if not idx_parts:
        empty = x.new_empty((0, width))
        return SparseTargets(empty.to(torch.int32).reshape(*lead, width),
                             empty.float().reshape(*lead, width))
    idx = torch.cat(idx_parts).reshape(*lead, width)
    probs = torch.cat(prob_parts).reshape(*lead, width)
    return SparseTargets(idx, probs)


def _draw(x: Tensor, t: float, u: Tensor) -> tuple[Tensor, Tensor]:
    """(draws [R, S] int64, total [R, 1] fp64) for rows x [R, V] and uniforms u [R, S]."""
    vocab = x.shape[1]
    if x.device.type == "cpu" and x.dtype != torch.float64 and has_native():
        xc = x if x.stride(-1) == 1 else x.contiguous()
        draws = torch.empty(u.shape, dtype=torch.int64)
        total = torch.empty((x.shape[0], 1), dtype=torch.float64)
        native().sample_cdf_cpu(xc.data_ptr(), DTYPE_CODES[xc.dtype], xc.stride(0), xc.shape[0],
                                vocab, 1.0 / t, u.data_ptr(), u.shape[1], draws.data_ptr(),
                                total.data_ptr(), torch.get_num_threads())
        return draws, total
    if x.is_cuda:
        from .backends.triton import sample as triton_sample

        if u.shape[1] <= triton_sample.MAX_DRAWS:
            return triton_sample.draw(x, t, u)
    z = x.float() / t
    cdf = torch.cumsum(torch.exp(z - z.amax(dim=-1, keepdim=True)), dim=-1, dtype=torch.float64)
    del z
    total = cdf[:, -1:]
    draws = torch.searchsorted(cdf, u * total, right=True).clamp_(max=vocab - 1)
    return draws, total


def _unique_counts(draws: Tensor, width: int) -> tuple[Tensor, Tensor]:
    """Per row of draws [R, S]: distinct ids in ascending order, padded with -1, and their
    frequencies, computed with sorts and scatters (no data-dependent shapes, no sync)."""
    n_rows, n_samples = draws.shape
    ids = torch.sort(draws, dim=-1).values
    first = torch.ones_like(ids, dtype=torch.bool)
    first[:, 1:] = ids[:, 1:] != ids[:, :-1]
    group = torch.cumsum(first.to(torch.int64), dim=-1) - 1  # slot of each draw's id
    counts = torch.zeros((n_rows, n_samples), dtype=torch.float32, device=draws.device)
    counts.scatter_add_(1, group, torch.ones_like(counts))
    out_ids = torch.full((n_rows, n_samples), -1, dtype=torch.int64, device=draws.device)
    out_ids.scatter_(1, group, ids)
    probs = counts / n_samples
    return out_ids[:, :width].to(torch.int32), probs[:, :width]
