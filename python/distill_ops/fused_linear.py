"""Fused LM head + KD loss: the student's [N, V] logits never exist in full.

Tokens are processed a chunk at a time: the chunk's student logits (and, for a dense teacher,
its teacher logits) are projected in fp32, the fused dense or sparse kernel turns them into
per-row losses and d loss / d logits, and that gradient is pushed through the head at once
(grad_hidden = g W, grad_W += g^T h, grad_b += sum g). A bf16/fp16 head is upcast a
vocabulary tile (~32 MiB) at a time, never whole. Extra memory is a few [chunk, V] fp32
buffers and one tile, not [N, V] (nor [V, H] in fp32). With reduction "mean" or "sum" the
gradients are final after the forward and backward only scales them by grad_output; with
"none" (a per-row grad_output) backward runs the chunks again.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ._backend import resolve_backend
from ._reduction import valid_rows
from ._validation import (
    REDUCTIONS,
    TAIL_CODES,
    TAILS,
    LossScalars,
    check_choice,
    check_float_tensor,
    check_num_items,
    check_positive,
    check_row_tensors,
    check_same_device,
    check_sparse_targets,
    loss_scalars,
    resolve_vocab,
)
from .topk import TopK, topk_logprobs

__all__ = ["default_chunk_size", "fused_linear_kd_loss", "fused_linear_topk"]

_CHUNK_BUDGET = 256 << 20  # bytes of extra buffers per call
_TILE_BUDGET = 32 << 20  # bytes of one fp32 vocabulary tile of a bf16/fp16 head


def _tile_rows(v: int, h: int, dtype: torch.dtype) -> int:
    """Vocabulary rows per fp32 tile of a head: the whole head when it already is fp32
    (no copy), else tiles of about 32 MiB."""
    return v if dtype == torch.float32 else max(1, min(v, _TILE_BUDGET // (4 * h)))


def default_chunk_size(n: int, v: int, h: int = 0, dtype: torch.dtype = torch.float32,
                       buffers: int = 3) -> int:
    """Rows per token chunk so that the chunk's `buffers` fp32 [chunk, V] tensors, its fp32
    hidden states and one fp32 head tile stay under ~256 MiB in all."""
    tile = 0 if dtype == torch.float32 else 4 * h * _tile_rows(v, h, dtype)
    per_row = 4 * (v * buffers + 2 * h)
    return max(1, min(n, (_CHUNK_BUDGET - tile) // per_row))


def _fp32(x: Tensor | None) -> Tensor | None:
    return x if x is None or x.dtype == torch.float32 else x.float()


def _project(h: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
    """h @ w.T (+ b) in fp32; a bf16/fp16 head is upcast a vocabulary tile at a time, so the
    logits are never rounded to bf16 and no fp32 copy of the whole head exists."""
    h32 = _fp32(h)
    tile = _tile_rows(w.shape[0], w.shape[1], w.dtype)
    if tile >= w.shape[0]:
        out = h32 @ _fp32(w).t()
    else:
        out = torch.empty((h.shape[0], w.shape[0]), dtype=torch.float32, device=h.device)
        for v0 in range(0, w.shape[0], tile):
            out[:, v0:v0 + tile] = h32 @ _fp32(w[v0:v0 + tile]).t()
    if b is not None:
        out += _fp32(b)
    return out


def _head_grads(g: Tensor, h: Tensor, w: Tensor, gw: Tensor | None,
                want_h: bool) -> Tensor | None:
    """Accumulate gw += g^T h (fp32) and return g @ w (fp32) if want_h, tile by tile."""
    h32 = _fp32(h)
    tile = _tile_rows(w.shape[0], w.shape[1], w.dtype)
    gh = None
    for v0 in range(0, w.shape[0], tile):
        gt = g[:, v0:v0 + tile]
        if want_h:
            part = gt @ _fp32(w[v0:v0 + tile])
            gh = part if gh is None else gh.add_(part)
        if gw is not None:
            gw[v0:v0 + tile].addmm_(gt.t(), h32)
    return gh


@dataclass
class _Spec:
    sparse: bool
    sc: LossScalars
    tail: int
    source_temperature: float
    vocab: int
    chunk: int
    backend: str


def _chunks(
    spec: _Spec, h_s: Tensor, w_s: Tensor, b_s: Tensor | None, teacher: tuple,
    labels: Tensor | None, row_weight: Tensor | None, want: tuple[bool, bool, bool],
) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None]:
    """One pass over the token chunks: per-row losses, and (when row_weight is given) the
    gradients of sum_r row_weight_r * loss_r w.r.t. hidden, weight and bias (fp32)."""
    n = h_s.shape[0]
    rows = torch.empty(n, dtype=torch.float32, device=h_s.device)
    grads = row_weight is not None
    gh = torch.empty((n, h_s.shape[1]), dtype=torch.float32, device=h_s.device) \
        if grads and want[0] else None
    gw = torch.zeros(w_s.shape, dtype=torch.float32, device=h_s.device) \
        if grads and want[1] else None
    gb = torch.zeros(w_s.shape[0], dtype=torch.float32, device=h_s.device) \
        if grads and want[2] else None
    sc = spec.sc
    for a in range(0, n, spec.chunk):
        e = min(n, a + spec.chunk)
        logits = _project(h_s[a:e], w_s, b_s)
        lab = labels[a:e] if labels is not None else None
        if spec.sparse:
            idx, tlp = teacher
            r, g = torch.ops.distill_ops.sparse_kd(
                logits, idx[a:e], tlp[a:e], None, lab, sc.divergence, spec.tail,
                sc.temperature, spec.source_temperature, sc.beta, sc.hard_weight, sc.soft_coef,
                grads, spec.backend)
        else:
            h_t, w_t, b_t = teacher
            t_logits = _project(h_t[a:e], w_t, b_t)
            r, g = torch.ops.distill_ops.dense_kd(
                logits, t_logits, None, lab, sc.divergence, sc.temperature, sc.beta,
                sc.student_scale, sc.student_softcap, sc.teacher_scale, sc.teacher_softcap,
                sc.hard_weight, sc.soft_coef, spec.vocab, grads, spec.backend)
            del t_logits
        rows[a:e] = r
        del logits
        if grads:
            g = g * row_weight[a:e, None]
            part = _head_grads(g, h_s[a:e], w_s, gw, gh is not None)
            if gh is not None:
                gh[a:e] = part
            if gb is not None:
                gb += g.sum(0)
    return rows, gh, gw, gb


class _FusedLinearKD(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h_s, w_s, b_s, teacher_a, teacher_b, teacher_c, labels, row_weight,
                spec, reduction):
        teacher = (teacher_a, teacher_b) if spec.sparse else (teacher_a, teacher_b, teacher_c)
        want = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        per_row = reduction == "none"
        rows, gh, gw, gb = _chunks(spec, h_s, w_s, b_s, teacher, labels,
                                   None if per_row or not any(want) else row_weight, want)
        ctx.spec, ctx.per_row, ctx.want = spec, per_row, want
        if per_row:
            ctx.save_for_backward(h_s, w_s, b_s, teacher_a, teacher_b, teacher_c, labels)
            return rows
        ctx.save_for_backward(gh, gw, gb)
        return (rows * row_weight).sum()

    @staticmethod
    def backward(ctx, go):
        if ctx.per_row:
            h_s, w_s, b_s, ta, tb, tc, labels = ctx.saved_tensors
            teacher = (ta, tb) if ctx.spec.sparse else (ta, tb, tc)
            _, gh, gw, gb = _chunks(ctx.spec, h_s, w_s, b_s, teacher, labels, go.float(),
                                    ctx.want)
        else:
            gh, gw, gb = ctx.saved_tensors
            gh = gh * go if gh is not None else None
            gw = gw * go if gw is not None else None
            gb = gb * go if gb is not None else None
        return (gh, gw, gb) + (None,) * 7


def _check_head(name_h: str, h: object, name_w: str, w: object, name_b: str,
                b: object) -> tuple[Tensor, Tensor, Tensor | None]:
    h = check_float_tensor(name_h, h)
    w = check_float_tensor(name_w, w)
    if w.dim() != 2 or w.shape[1] != h.shape[-1]:
        raise ValueError(f"{name_w} must be [V, H] with H = {name_h}.shape[-1] = "
                         f"{h.shape[-1]}, got {tuple(w.shape)}")
    if b is not None:
        b = check_float_tensor(name_b, b)
        if b.shape != (w.shape[0],):
            raise ValueError(f"{name_b} must be [V] = [{w.shape[0]}], got {tuple(b.shape)}")
    return h, w, b


def fused_linear_kd_loss(
    student_hidden: Tensor,
    student_weight: Tensor,
    teacher_hidden: Tensor | None = None,
    teacher_weight: Tensor | None = None,
    *,
    teacher_indices: Tensor | None = None,
    teacher_logprobs: Tensor | None = None,
    student_bias: Tensor | None = None,
    teacher_bias: Tensor | None = None,
    chunk_size: int | None = None,
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
    tail: str = "bucket",
    source_temperature: float = 1.0,
    backend: str = "auto",
) -> Tensor:
    r"""KD loss from the student's hidden states and LM head, without its [N, V] logits.

    Equals ``kd_loss(h_s @ W_s.T + b_s, h_t @ W_t.T + b_t, ...)`` with a dense teacher
    (``teacher_hidden``, ``teacher_weight``), or ``sparse_kd_loss(h_s @ W_s.T + b_s,
    teacher_indices, teacher_logprobs, ...)`` with sparse targets; every option of those
    applies (``tail``/``source_temperature`` to the sparse form; logit scales, softcaps and
    ``vocab_size`` to the dense one). Tokens are processed ``chunk_size`` at a time
    (default: a few fp32 [chunk, V] buffers within ~256 MiB); only rows that count (label not
    ``ignore_index``, ``mask`` True) are projected, which costs one device-to-host read of
    their number. Gradients flow to ``student_hidden``, ``student_weight`` and
    ``student_bias``; the teacher gets none.

    Example:
        >>> loss = fused_linear_kd_loss(h_s, lm_head_s.weight, h_t, lm_head_t.weight,
        ...                             labels=labels, divergence="jsd", temperature=2.0)
        >>> loss.backward()
    """
    h_s, w_s, b_s = _check_head("student_hidden", student_hidden, "student_weight",
                                student_weight, "student_bias", student_bias)
    dense = teacher_hidden is not None or teacher_weight is not None
    sparse = teacher_indices is not None or teacher_logprobs is not None
    if dense == sparse:
        raise ValueError("pass either teacher_hidden and teacher_weight (a dense teacher) or "
                         "teacher_indices and teacher_logprobs (sparse targets), not "
                         f"{'both' if dense else 'neither'}")
    lead = h_s.shape[:-1]
    v_s = w_s.shape[0]
    check_row_tensors(lead, labels, mask, ignore_index)
    check_choice("reduction", reduction, REDUCTIONS)
    check_num_items(num_items_in_batch)
    if chunk_size is not None and (isinstance(chunk_size, bool)
                                   or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    sc = loss_scalars(
        divergence=divergence, temperature=temperature, beta=beta, hard_weight=hard_weight,
        soft_weight=soft_weight, scale_by_t2=scale_by_t2,
        student_logit_scale=student_logit_scale if dense else 1.0,
        teacher_logit_scale=teacher_logit_scale if dense else 1.0,
        student_softcap=student_softcap if dense else None,
        teacher_softcap=teacher_softcap if dense else None,
        has_labels=labels is not None,
    )
    if dense:
        if teacher_hidden is None or teacher_weight is None:
            raise ValueError("a dense teacher needs both teacher_hidden and teacher_weight")
        h_t, w_t, b_t = _check_head("teacher_hidden", teacher_hidden, "teacher_weight",
                                    teacher_weight, "teacher_bias", teacher_bias)
        if h_t.shape[:-1] != lead:
            raise ValueError(f"teacher_hidden must have student_hidden's leading dims "
                             f"{tuple(lead)}, got {tuple(h_t.shape)}")
        vocab = resolve_vocab(v_s, w_t.shape[0], vocab_size)
        device = check_same_device(student_hidden=h_s, student_weight=w_s, student_bias=b_s,
                                   teacher_hidden=h_t, teacher_weight=w_t, teacher_bias=b_t,
                                   labels=labels, mask=mask)
        tail_code, source_t = 0, 1.0
    else:
        if teacher_indices is None or teacher_logprobs is None:
            raise ValueError("sparse targets need both teacher_indices and teacher_logprobs")
        check_sparse_targets(lead, v_s, teacher_indices, teacher_logprobs)
        check_choice("tail", tail, TAILS)
        source_t = check_positive("source_temperature", source_temperature)
        tail_code, vocab = TAIL_CODES[tail], v_s
        device = check_same_device(student_hidden=h_s, student_weight=w_s, student_bias=b_s,
                                   teacher_indices=teacher_indices,
                                   teacher_logprobs=teacher_logprobs, labels=labels, mask=mask)
    be = resolve_backend(backend, device)
    if be == "torch":
        # The reference: materialised fp32 logits through reference.py (memory-hungry by
        # design; it is what the fused path is tested against).
        from . import reference

        logits = _project(h_s, w_s, b_s)
        common = dict(divergence=divergence, temperature=temperature, beta=beta, labels=labels,
                      ignore_index=ignore_index, mask=mask, hard_weight=hard_weight,
                      soft_weight=soft_weight, scale_by_t2=scale_by_t2, reduction=reduction,
                      num_items_in_batch=num_items_in_batch)
        if dense:
            t_logits = _project(h_t.detach(), w_t.detach(), b_t)
            return reference.kd_loss(
                logits, t_logits, vocab_size=vocab_size, student_logit_scale=student_logit_scale,
                teacher_logit_scale=teacher_logit_scale, student_softcap=student_softcap,
                teacher_softcap=teacher_softcap, **common)
        return reference.sparse_kd_loss(logits, teacher_indices, teacher_logprobs, tail=tail,
                                        source_temperature=source_temperature, **common)

    n = h_s.reshape(-1, h_s.shape[-1]).shape[0]
    valid = valid_rows(labels, mask, ignore_index)
    keep = None if valid is None else valid.nonzero().squeeze(1)  # the one host read
    def rows_of(x: Tensor) -> Tensor:
        x = x.reshape(n, *x.shape[len(lead):])
        return x if keep is None else x.index_select(0, keep)

    hs = rows_of(h_s)
    lab = rows_of(labels).to(torch.int64).contiguous() if sc.hard_weight > 0 else None
    if dense:
        teacher = (rows_of(h_t.detach()), w_t.detach(),
                   b_t.detach() if b_t is not None else None)
    else:
        teacher = (rows_of(teacher_indices).to(torch.int64).contiguous(),
                   rows_of(teacher_logprobs.detach()).float().contiguous(), None)
    m = hs.shape[0]
    widest = max(h_s.shape[-1], h_t.shape[-1] if dense else 0)
    spec = _Spec(sparse, sc, tail_code, source_t, vocab,
                 chunk_size or default_chunk_size(max(m, 1), v_s, widest, w_s.dtype), be)
    if reduction == "mean":
        denom = (torch.as_tensor(num_items_in_batch, device=device, dtype=torch.float32)
                 if num_items_in_batch is not None
                 else torch.full((), max(m, 1), dtype=torch.float32, device=device))
        weight = (1.0 / denom).expand(m)
    else:
        weight = torch.ones(m, dtype=torch.float32, device=device)
    out = _FusedLinearKD.apply(hs, w_s, b_s, *teacher, lab, weight, spec, reduction)
    if reduction != "none":
        return out
    full = out.new_zeros(n)
    full = full if keep is None else full.index_copy(0, keep, out)
    return (out if keep is None else full).reshape(lead)


def fused_linear_topk(
    hidden: Tensor,
    weight: Tensor,
    k: int,
    *,
    bias: Tensor | None = None,
    temperature: float = 1.0,
    logit_scale: float = 1.0,
    softcap: float | None = None,
    chunk_size: int | None = None,
    vocab_chunk: int = 32768,
    backend: str = "auto",
) -> TopK:
    r"""Teacher-side top-k straight from hidden states: ``topk_logprobs(hidden @ W.T + b, k)``
    without the [N, V] logits. Tiles of the vocabulary are projected in fp32 one at a time,
    each tile's top-k and log-sum-exp merged into a running top-k and normaliser.

    Ties: logits that are bitwise equal keep the lower id first, on every device and in
    every tile, as in :func:`topk_logprobs`. Logits equal only in exact arithmetic may differ
    in their last bits once different vocabulary tiles go through different matmul kernels
    (a GPU picks kernels by shape), and then rank by those bits.

    Example:
        >>> top = fused_linear_topk(teacher_hidden, teacher_lm_head.weight, 64)
    """
    h, w, b = _check_head("hidden", hidden, "weight", weight, "bias", bias)
    vocab = w.shape[0]
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"k must be an int, got {type(k).__name__}")
    if not 1 <= k <= vocab:
        raise ValueError(f"k must lie in [1, V={vocab}], got {k}")
    check_positive("temperature", temperature)
    if vocab_chunk < 1:
        raise ValueError(f"vocab_chunk must be >= 1, got {vocab_chunk}")
    lead = h.shape[:-1]
    hs = h.detach().reshape(-1, h.shape[-1])
    n = hs.shape[0]
    chunk = chunk_size or default_chunk_size(max(n, 1), min(vocab, vocab_chunk), h.shape[-1],
                                             w.dtype, buffers=2)
    ids_out, lp_out = [], []
    with torch.no_grad():
        for a in range(0, n, chunk):
            hc = hs[a:a + chunk]
            best_v = best_i = lse = None
            for c0 in range(0, vocab, vocab_chunk):
                c1 = min(vocab, c0 + vocab_chunk)
                logits = _project(hc, w[c0:c1], b[c0:c1] if b is not None else None)
                kk = min(k, c1 - c0)
                top = topk_logprobs(logits, kk, temperature=temperature,
                                    logit_scale=logit_scale, softcap=softcap, backend=backend)
                # The candidates' own z = f(x) / T, so that bitwise-equal logits give equal
                # keys in every tile (lp + lse_tile would round differently per tile), and the
                # tile's normaliser from its best id: lse_tile = z - lp (no second pass).
                z = _z_at(logits, top.indices, temperature, logit_scale, softcap)
                tile_lse = torch.where(z[:, 0] == float("-inf"), z[:, 0],
                                       z[:, 0] - top.logprobs[:, 0])
                ids = top.indices.long() + c0
                if best_v is None:
                    best_v, best_i, lse = z, ids, tile_lse
                    continue
                lse = torch.logaddexp(lse, tile_lse)
                cand_v = torch.cat([best_v, z], 1)
                cand_i = torch.cat([best_i, ids], 1)
                # Stable: among equal values the earlier (lower-id) tile stays first.
                order = torch.sort(cand_v, dim=1, descending=True, stable=True).indices[:, :k]
                best_v = cand_v.gather(1, order)
                best_i = cand_i.gather(1, order)
            ids_out.append(best_i.to(torch.int32))
            lp_out.append(best_v - lse[:, None])
    if not ids_out:
        empty = hs.new_empty((0, k))
        return TopK(empty.to(torch.int32).reshape(*lead, k), empty.float().reshape(*lead, k))
    return TopK(torch.cat(ids_out).reshape(*lead, k), torch.cat(lp_out).reshape(*lead, k))


def _z_at(logits: Tensor, ids: Tensor, temperature: float, logit_scale: float,
          softcap: float | None) -> Tensor:
    """z = f(x) / T of the logits at `ids` (per row), in fp32."""
    from .reference import transform_logits

    return transform_logits(logits.gather(1, ids.long()), logit_scale, softcap, temperature,
                            torch.float32)
