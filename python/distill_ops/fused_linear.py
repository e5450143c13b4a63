"""Fused LM head + KD loss: the student's [N, V] logits never exist in full.

Tokens are processed a chunk at a time: the chunk's student logits (and, for a dense teacher,
its teacher logits) are projected to fp32, the fused dense or sparse kernel turns them into
per-row losses and d loss / d logits (g), and g is pushed through the head at once
(grad_hidden = g W, grad_W += g^T h, grad_b += sum g). The matmuls run in fp32 on the CPU and
on tensor cores in the head's dtype on a GPU (_head_matmul.py says exactly how). Extra
memory is a few [chunk, V] buffers, the grad_W accumulator and grad_hidden, never [N, V].
With reduction "mean" or "sum" the gradients are final after the forward up to one scalar
(the mean's 1/count times grad_output), applied in backward in place; with "none" (a per-row
grad_output) backward runs the chunks again.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from .backends import cpu as _cpu
from .backends import cuda as _cuda
from .backends import head_matmul as hm
from .dispatch import resolve_backend
from .distributed import vocab_parallel as vp
from .reduction import resolve_batchmean, valid_rows
from .topk import TopK, local_topk_candidates, topk_logprobs
from .validation import (
    REDUCTIONS,
    TAIL_CODES,
    TAILS,
    LossScalars,
    check_choice,
    check_num_items,
    check_positive,
    check_row_tensors,
    check_same_device,
    check_sparse_targets,
    check_teacher_logprobs,
    loss_scalars,
    resolve_vocab,
    teacher_wants_grad,
)

__all__ = ["default_chunk_size", "fused_linear_kd_loss", "fused_linear_topk"]

_CHUNK_BUDGET = 256 << 20  # bytes of chunk buffers per call on the CPU
_GPU_CHUNK_BUDGET = 1 << 30  # on a GPU: big chunks keep the matmuls efficient


def default_chunk_size(n: int, v: int, h: int = 0, dtype: torch.dtype = torch.float32,
                       buffers: int = 3, device: torch.device | str = "cpu") -> int:
    """Rows per token chunk so that the chunk's buffers fit a memory budget.

    CPU: `buffers` fp32 [chunk, V] tensors, fp32 hidden states and one fp32 head tile within
    ~256 MiB. GPU: `buffers` [chunk, V] tensors of 4 bytes (fp32 logits; the head-dtype
    gradient counts as half of one) within ~1 GiB, in multiples of 128 rows (the tensor-core
    tile), which at V = 128256 and a dense teacher is 768 rows."""
    if torch.device(device).type == "cuda":
        rows = _GPU_CHUNK_BUDGET // (4 * v * buffers + 4 * h)
        rows = max(128, rows // 128 * 128)
        return max(1, min(n, rows))
    tile = 0 if dtype == torch.float32 else 4 * h * hm.tile_rows(v, h, dtype)
    per_row = 4 * (v * buffers + 2 * h)
    return max(1, min(n, (_CHUNK_BUDGET - tile) // per_row))


@dataclass
class _Spec:
    sparse: bool
    sc: LossScalars
    tail: int
    source_temperature: float
    vocab: int
    chunk: int
    backend: str
    mode: str  # _head_matmul mode
    shard: object = None  # distributed.VocabShard of a vocab-parallel head
    entropy: Tensor | None = None  # [rows]: filled with the student's entropy at T when given


def _chunk_loss(spec: _Spec, logits: Tensor, teacher_rows, labels: Tensor | None,
                grads: bool, grad_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """The fused loss kernel on one chunk of fp32 logits: (rows [c], g [c, V] in grad_dtype).
    The launchers are called directly (no dispatcher: this runs inside our autograd)."""
    sc = spec.sc
    if spec.shard is not None:
        # The LM head's matmul may run on the cuda backend; the loss's phases take the
        # device's vocab-parallel kernel then (there is no CUDA C++ one).
        vp_backend = "auto" if spec.backend == "cuda" else spec.backend
        if spec.sparse:
            r, g = vp.sparse_rows(logits, *teacher_rows, None, labels, sc.divergence,
                                  TAILS[spec.tail], sc.temperature,
                                  spec.source_temperature / sc.temperature, sc, spec.shard,
                                  grads, vp_backend)
        else:
            r, g = vp.dense_rows(logits, teacher_rows, None, labels, sc, spec.shard,
                                 spec.vocab, grads, vp_backend)
        return r, (g.to(grad_dtype) if grads else g)
    sparse_args = (logits, *teacher_rows, None, labels, sc.divergence, spec.tail,
                   sc.temperature, spec.source_temperature, sc.beta, sc.param2, sc.interp,
                   sc.hard_weight, sc.soft_coef, grads)
    if spec.backend == "triton":
        from .backends.triton import dense_kd as tdense
        from .backends.triton import sparse_kd as tsparse

        if spec.sparse:
            return tsparse.sparse_kd_forward(*sparse_args, grad_dtype)
        return tdense.dense_kd_forward(logits, teacher_rows, None, labels, sc, spec.vocab,
                                       grads, grad_dtype)
    impl = _cuda if spec.backend == "cuda" else _cpu
    if spec.sparse:
        r, g = impl.sparse_kd_forward(*sparse_args)
    else:
        r, g = impl.dense_kd_forward(logits, teacher_rows, None, labels, sc, spec.vocab, grads)
    # One rounding of the fp32 gradient, as the Triton kernel's own store makes it.
    return r, (g.to(grad_dtype) if grads else g)


def _chunks(
    spec: _Spec, h_s: Tensor, w_s: Tensor, b_s: Tensor | None, teacher: tuple,
    labels: Tensor | None, row_weight: Tensor | None, want: tuple[bool, bool, bool],
) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None]:
    """One pass over the token chunks: per-row losses and, when `row_weight` is given, the
    gradients of sum_r row_weight_r * loss_r w.r.t. hidden, weight and bias. A 0-dim
    row_weight (the same weight for every row) is left out: the gradients come back unscaled,
    to be multiplied by it once."""
    n = h_s.shape[0]
    mode = spec.mode
    rows = torch.empty(n, dtype=torch.float32, device=h_s.device)
    grads = row_weight is not None
    per_row = grads and row_weight.dim() == 1
    gh = hm.hidden_grad_buffer(n, w_s, mode) if grads and want[0] else None
    gw = hm.weight_grad_buffer(w_s, mode) if grads and want[1] else None
    gb = torch.zeros(w_s.shape[0], dtype=torch.float32, device=h_s.device) \
        if grads and want[2] else None
    gdt = hm.grad_dtype(w_s, mode)
    for a in range(0, n, spec.chunk):
        e = min(n, a + spec.chunk)
        logits = hm.project(h_s[a:e], w_s, b_s, mode)
        if spec.entropy is not None:
            spec.entropy[a:e] = _entropy_rows(logits, spec)
        lab = labels[a:e] if labels is not None else None
        if spec.sparse:
            idx, tlp = teacher
            teacher_rows = (idx[a:e], tlp[a:e])
        else:
            h_t, w_t, b_t = teacher
            teacher_rows = hm.project(h_t[a:e], w_t, b_t, mode)
        r, g = _chunk_loss(spec, logits, teacher_rows, lab, grads, gdt)
        del logits, teacher_rows
        rows[a:e] = r
        if grads:
            if per_row:
                g.mul_(row_weight[a:e, None].to(g.dtype))
            # A row whose loss is NaN (a NaN or +inf in its logits) gets NaN gradients, where
            # the divergence's own guards could leave g finite: its hidden state is scaled by
            # NaN for grad_W, its grad_hidden row too ([chunk, H] work, no host sync).
            poison = torch.where(torch.isnan(r), torch.full_like(r, float("nan")),
                                 torch.ones_like(r))
            h_c = h_s[a:e] * poison[:, None].to(h_s.dtype)
            part = hm.head_grads(g, h_c, w_s, gw, gh is not None, mode)
            if gh is not None:
                gh[a:e] = part * poison[:, None].to(part.dtype)
            if gb is not None:
                gb += g.sum(0, dtype=torch.float32) + (poison - 1).sum()
    if gh is not None and spec.shard is not None:
        # Each rank's g W_r is its slice's share of grad_hidden: the sum is the gradient.
        from .distributed.comm import all_reduce

        gh.copy_(all_reduce(gh.float(), torch.distributed.ReduceOp.SUM, spec.shard.group))
    return rows, gh, gw, gb


def _entropy_rows(logits: Tensor, spec: _Spec) -> Tensor:
    """H(q) = log sum_j e^{z_j} - sum_j q_j z_j of the student's z = f(x) / T per row, over
    the ids that count (the whole row over the group when vocab-parallel)."""
    from .reference import transform_logits

    sc = spec.sc
    lim = spec.vocab - (spec.shard.offset if spec.shard is not None else 0)
    z = transform_logits(logits[:, :max(0, lim)], sc.student_scale, sc.student_softcap or None,
                         sc.temperature, torch.float32)
    m = vp._row_max(z)
    if spec.shard is not None:
        from .distributed.comm import all_reduce

        m = all_reduce(m.contiguous(), torch.distributed.ReduceOp.MAX, spec.shard.group)
    e = vp._exp_shifted(z, m)
    zc = torch.where(e > 0, z - m[:, None], torch.zeros((), device=z.device))
    sums = torch.stack([e.sum(1), torch.linalg.vecdot(e, zc)], 1)
    if spec.shard is not None:
        sums = all_reduce(sums, torch.distributed.ReduceOp.SUM, spec.shard.group)
    return torch.log(sums[:, 0]) - sums[:, 1] / sums[:, 0]


class _FusedLinearKD(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h_s, w_s, b_s, teacher_a, teacher_b, teacher_c, labels, weight,
                spec, reduction):
        """`weight`: a 0-dim tensor, every row's weight in the returned sum (1 / count for
        "mean", 1 for "sum"); for "none" the rows come back as they are."""
        teacher = (teacher_a, teacher_b) if spec.sparse else (teacher_a, teacher_b, teacher_c)
        want = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        per_row = reduction == "none"
        rows, gh, gw, gb = _chunks(spec, h_s, w_s, b_s, teacher, labels,
                                   None if per_row or not any(want) else weight, want)
        ctx.spec, ctx.per_row, ctx.want = spec, per_row, want
        if per_row:
            ctx.save_for_backward(h_s, w_s, b_s, teacher_a, teacher_b, teacher_c, labels)
            return rows
        ctx.save_for_backward(gh, gw, gb, weight)
        return rows.sum() * weight

    @staticmethod
    def backward(ctx, go):
        if ctx.per_row:
            h_s, w_s, b_s, ta, tb, tc, labels = ctx.saved_tensors
            teacher = (ta, tb) if ctx.spec.sparse else (ta, tb, tc)
            _, gh, gw, gb = _chunks(ctx.spec, h_s, w_s, b_s, teacher, labels, go.float(),
                                    ctx.want)
        else:
            # One in-place multiply per gradient by the scalar (weight x grad_output), on the
            # device; the saved buffers are this graph's own (a second backward through it
            # fails in autograd's version check instead of scaling twice).
            gh, gw, gb, weight = ctx.saved_tensors
            factor = weight * go
            gh = gh.mul_(factor.to(gh.dtype)) if gh is not None else None
            gw = gw.mul_(factor.to(gw.dtype)) if gw is not None else None
            gb = gb.mul_(factor) if gb is not None else None
        return (gh, gw, gb) + (None,) * 7


def _autocast_operands(*names: str) -> Callable:
    """Under torch.autocast, the LM-head ops take the operands autocast would give a linear
    layer (fp32 hidden states, heads and biases cast to the autocast dtype) and still
    project them to fp32 logits, never rounded to that dtype: the GPU's tensor-core path,
    on every device. Without autocast, the call is unchanged."""
    def wrap(fn: Callable) -> Callable:
        sig = inspect.signature(fn)

        @functools.wraps(fn)
        def inner(*args, **kwargs):
            first = args[0] if args else next(iter(kwargs.values()), None)
            if not isinstance(first, Tensor):
                return fn(*args, **kwargs)
            kind = first.device.type
            if not torch.is_autocast_enabled(kind):
                return fn(*args, **kwargs)
            dt = torch.get_autocast_dtype(kind)
            bound = sig.bind(*args, **kwargs)
            for name in names:
                value = bound.arguments.get(name)
                if isinstance(value, Tensor) and value.dtype == torch.float32:
                    bound.arguments[name] = value.to(dt)
            with torch.autocast(kind, enabled=False):
                return fn(*bound.args, **bound.kwargs)
        return inner
    return wrap


@_autocast_operands("student_hidden", "student_weight", "teacher_hidden", "teacher_weight",
                    "student_bias", "teacher_bias")
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
    skew: float = 0.1,
    ab_alpha: float = 0.5,
    ab_beta: float = 0.5,
    akl_head_mass: float = 0.5,
    teacher_interpolation: float = 1.0,
    process_group: object | None = None,
    return_entropy: bool = False,
    backend: str = "auto",
) -> Tensor | tuple[Tensor, Tensor]:
    r"""KD loss from the student's hidden states and LM head, without its [N, V] logits.

    Equals ``kd_loss(h_s @ W_s.T + b_s, h_t @ W_t.T + b_t, ...)`` with a dense teacher
    (``teacher_hidden``, ``teacher_weight``), or ``sparse_kd_loss(h_s @ W_s.T + b_s,
    teacher_indices, teacher_logprobs, ...)`` with sparse targets; every option of those
    applies (``tail``/``source_temperature`` to the sparse form; logit scales, softcaps and
    ``vocab_size`` to the dense one; every divergence and its parameter, and
    ``teacher_interpolation``, to both). Tokens are processed ``chunk_size`` at a time
    (default: a few fp32 [chunk, V] buffers within ~256 MiB); only rows that count (label not
    ``ignore_index``, ``mask`` True) are projected, which costs one device-to-host read of
    their number. Gradients flow to ``student_hidden``, ``student_weight`` and
    ``student_bias``; the teacher gets none, and a teacher tensor that requires grad is a
    ValueError that says so (freeze or detach the teacher).

    With ``process_group`` the heads are vocab-parallel (each rank holds a contiguous slice
    of the rows of both weights and biases, the same hidden states; ``teacher_indices`` are
    global ids): the loss is the unsharded one, each rank gets its slice of the weight and
    bias gradients, and ``student_hidden``'s gradient is all-reduced over the group (do not
    all-reduce it again in a tensor-parallel region around this call).

    ``return_entropy=True`` also returns the student's entropy at T per token (leading dims,
    no gradient, 0 where the row does not count): what TRL logs, for one more read a chunk.

    Example:
        >>> loss = fused_linear_kd_loss(h_s, lm_head_s.weight, h_t, lm_head_t.weight,
        ...                             labels=labels, divergence="jsd", temperature=2.0)
        >>> loss.backward()
    """
    h_s, w_s, b_s = hm.check_head("student_hidden", student_hidden, "student_weight",
                                student_weight, "student_bias", student_bias,
                                process_group is not None)
    dense = teacher_hidden is not None or teacher_weight is not None
    sparse = teacher_indices is not None or teacher_logprobs is not None
    if dense == sparse:
        raise ValueError("pass either teacher_hidden and teacher_weight (a dense teacher) or "
                         "teacher_indices and teacher_logprobs (sparse targets), not "
                         f"{'both' if dense else 'neither'}")
    lead = h_s.shape[:-1]
    v_s = w_s.shape[0]
    for name, t in (("teacher_hidden", teacher_hidden), ("teacher_weight", teacher_weight),
                    ("teacher_bias", teacher_bias), ("teacher_logprobs", teacher_logprobs)):
        if isinstance(t, Tensor) and teacher_wants_grad(t):
            raise ValueError(
                f"{name} requires grad, but fused_linear_kd_loss gives the teacher no "
                "gradient (its head's logits never exist): detach the teacher, or for mutual "
                "or online distillation project its logits and use kd_loss, which returns the "
                "teacher's exact gradient")
    mask = check_row_tensors(lead, labels, mask, ignore_index)
    valid = valid_rows(labels, mask, ignore_index)
    check_choice("reduction", reduction, REDUCTIONS)
    check_num_items(num_items_in_batch)
    reduction, num_items_in_batch = resolve_batchmean(
        reduction, lead, labels is not None or mask is not None, num_items_in_batch)
    if chunk_size is not None and (isinstance(chunk_size, bool)
                                   or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    research = dict(skew=skew, ab_alpha=ab_alpha, ab_beta=ab_beta, akl_head_mass=akl_head_mass,
                    teacher_interpolation=teacher_interpolation)
    sc = loss_scalars(
        divergence=divergence, temperature=temperature, beta=beta, hard_weight=hard_weight,
        soft_weight=soft_weight, scale_by_t2=scale_by_t2,
        student_logit_scale=student_logit_scale if dense else 1.0,
        teacher_logit_scale=teacher_logit_scale if dense else 1.0,
        student_softcap=student_softcap if dense else None,
        teacher_softcap=teacher_softcap if dense else None,
        has_labels=labels is not None, **research,
    )
    if dense:
        if teacher_hidden is None or teacher_weight is None:
            raise ValueError("a dense teacher needs both teacher_hidden and teacher_weight")
        h_t, w_t, b_t = hm.check_head("teacher_hidden", teacher_hidden, "teacher_weight",
                                    teacher_weight, "teacher_bias", teacher_bias,
                                    process_group is not None)
        if h_t.shape[:-1] != lead:
            raise ValueError(f"teacher_hidden must have student_hidden's leading dims "
                             f"{tuple(lead)}, got {tuple(h_t.shape)}")
        if process_group is None:
            vocab = resolve_vocab(v_s, w_t.shape[0], vocab_size)
        device = check_same_device(student_hidden=h_s, student_weight=w_s, student_bias=b_s,
                                   teacher_hidden=h_t, teacher_weight=w_t, teacher_bias=b_t,
                                   labels=labels, mask=mask)
        tail_code, source_t = 0, 1.0
    else:
        if teacher_indices is None or teacher_logprobs is None:
            raise ValueError("sparse targets need both teacher_indices and teacher_logprobs")
        if process_group is None:
            check_sparse_targets(lead, v_s, teacher_indices, teacher_logprobs)
            check_teacher_logprobs(teacher_indices, teacher_logprobs, valid)
        check_choice("tail", tail, TAILS)
        source_t = check_positive("source_temperature", source_temperature)
        tail_code, vocab = TAIL_CODES[tail], v_s
        device = check_same_device(student_hidden=h_s, student_weight=w_s, student_bias=b_s,
                                   teacher_indices=teacher_indices,
                                   teacher_logprobs=teacher_logprobs, labels=labels, mask=mask)
    shard = None
    if process_group is not None:
        from .distributed.comm import vocab_shard

        checks = [("student_weight and teacher_weight slices differ in rows (both must cover "
                   "the same ids)", not dense or w_t.shape[0] == v_s)]
        k_facts = [] if dense else [("k", teacher_indices.shape[-1]
                                           if isinstance(teacher_indices, Tensor) else -1)]
        shard = vocab_shard(process_group, v_s, [("the number of rows", lead.numel()),
                                                 *k_facts], checks, device=device)
        if dense:
            vocab = resolve_vocab(shard.total, shard.total, vocab_size)
        else:
            check_sparse_targets(lead, shard.total, teacher_indices, teacher_logprobs)
            vocab = shard.total
    be = resolve_backend(backend, device, "sparse" if sparse else "dense")
    if be == "torch" and shard is not None:
        be = "cpu" if device.type == "cpu" else "triton"
    if be == "torch":
        # The reference: materialised fp32 logits through reference.py (memory-hungry by
        # design; it is what the fused path is tested against).
        from . import reference

        logits = hm.project(h_s, w_s, b_s, "fp32")
        common = dict(divergence=divergence, temperature=temperature, beta=beta, labels=labels,
                      ignore_index=ignore_index, mask=mask, hard_weight=hard_weight,
                      soft_weight=soft_weight, scale_by_t2=scale_by_t2, reduction=reduction,
                      num_items_in_batch=num_items_in_batch, **research)
        if dense:
            t_logits = hm.project(h_t.detach(), w_t.detach(), b_t, "fp32")
            loss = reference.kd_loss(
                logits, t_logits, vocab_size=vocab_size, student_logit_scale=student_logit_scale,
                teacher_logit_scale=teacher_logit_scale, student_softcap=student_softcap,
                teacher_softcap=teacher_softcap, **common)
        else:
            loss = reference.sparse_kd_loss(logits, teacher_indices, teacher_logprobs,
                                            tail=tail, source_temperature=source_temperature,
                                            **common)
        if not return_entropy:
            return loss
        with torch.no_grad():
            z = reference.transform_logits(logits[..., :vocab], sc.student_scale,
                                           student_softcap if dense else None, temperature,
                                           torch.float32)
            lq = torch.log_softmax(z, -1)
            ent = -(lq.exp() * torch.where(lq.exp() > 0, lq, 0.0)).sum(-1)
        return loss, ent if valid is None else torch.where(valid.reshape(lead), ent, 0.0)

    n = h_s.reshape(-1, h_s.shape[-1]).shape[0]
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
    mode = hm.matmul_mode(device)
    if chunk_size is None:
        # [chunk, V] buffers: fp32 student (and teacher) logits, and the gradient.
        g_share = torch.empty((), dtype=hm.grad_dtype(w_s, mode)).element_size() / 4
        buffers = 3 if mode == "fp32" else (2 if dense else 1) + g_share
        chunk_size = default_chunk_size(max(m, 1), v_s, widest, w_s.dtype, buffers, device)
    spec = _Spec(sparse, sc, tail_code, source_t, vocab, chunk_size, be, mode, shard,
                 hs.new_zeros(m, dtype=torch.float32) if return_entropy else None)
    if reduction == "mean":
        denom = (torch.as_tensor(num_items_in_batch, device=device, dtype=torch.float32)
                 if num_items_in_batch is not None
                 else torch.full((), max(m, 1), dtype=torch.float32, device=device))
        weight = (1.0 / denom).reshape(())
    else:
        weight = torch.ones((), dtype=torch.float32, device=device)
    out = _FusedLinearKD.apply(hs, w_s, b_s, *teacher, lab, weight, spec, reduction)

    def per_token(rows: Tensor) -> Tensor:
        full = rows if keep is None else rows.new_zeros(n).index_copy(0, keep, rows)
        return full.reshape(lead)

    if reduction == "none":
        out = per_token(out)
    return (out, per_token(spec.entropy)) if return_entropy else out


@_autocast_operands("hidden", "weight", "bias")
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
    vocab_chunk: int | None = None,
    process_group: object | None = None,
    backend: str = "auto",
) -> TopK:
    r"""Teacher-side top-k straight from hidden states: ``topk_logprobs(hidden @ W.T + b, k)``
    without the [N, V] logits. A chunk of tokens is projected to fp32 logits (on a GPU on
    tensor cores in the head's dtype, the whole vocabulary at once: ``vocab_chunk`` defaults
    to V there, with chunks of ~1 GiB of logits; on the CPU tiles of 32768 ids) and each
    tile's top-k and log-sum-exp are merged into a running top-k and normaliser on the device.

    Ties: logits that are bitwise equal keep the lower id first, on every device and in
    every tile, as in :func:`topk_logprobs`. Logits equal only in exact arithmetic may differ
    in their last bits once different vocabulary tiles go through different matmul kernels
    (a GPU picks kernels by shape), and then rank by those bits.

    With ``process_group`` each rank holds a contiguous slice of the head's rows
    (vocab-parallel, rank order) and the same hidden states: each takes its local top-k and
    normaliser, and the k x world candidates are merged; every rank returns the global result.

    Example:
        >>> top = fused_linear_topk(teacher_hidden, teacher_lm_head.weight, 64)
    """
    h, w, b = hm.check_head("hidden", hidden, "weight", weight, "bias", bias,
                          process_group is not None)
    vocab = w.shape[0]
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"k must be an int, got {type(k).__name__}")
    shard, offset = None, 0
    if process_group is not None:
        from .distributed.comm import vocab_shard

        shard = vocab_shard(process_group, vocab,
                            [("the number of rows", h.shape[:-1].numel()),
                             ("k", k)], device=h.device)
        offset = shard.offset
    total = shard.total if shard is not None else vocab
    if not 1 <= k <= total:
        raise ValueError(f"k must lie in [1, V={total}], got {k}")
    check_positive("temperature", temperature)
    mode = hm.matmul_mode(h.device)
    if vocab_chunk is None:
        vocab_chunk = vocab if mode == "head" else 32768
    if isinstance(vocab_chunk, bool) or not isinstance(vocab_chunk, int) or vocab_chunk < 1:
        raise ValueError(f"vocab_chunk must be a positive int, got {vocab_chunk!r}")
    lead = h.shape[:-1]
    hs = h.detach().reshape(-1, h.shape[-1])
    n = hs.shape[0]
    chunk = chunk_size or default_chunk_size(max(n, 1), min(vocab, vocab_chunk), h.shape[-1],
                                             w.dtype, buffers=2 if mode == "fp32" else 1,
                                             device=h.device)
    ids_out, lp_out = [], []
    with torch.no_grad():
        for a in range(0, n, chunk):
            hc = hs[a:a + chunk]
            if shard is None and vocab_chunk >= vocab:  # one tile, one device: no merge
                top = topk_logprobs(hm.project(hc, w, b, mode), k, temperature=temperature,
                                    logit_scale=logit_scale, softcap=softcap, backend=backend)
                ids_out.append(top.indices)
                lp_out.append(top.logprobs)
                continue
            # A vocab-parallel rank whose slice holds no ids offers no candidates.
            best_v = torch.full((hc.shape[0], k), float("-inf"), device=hc.device)
            best_i = torch.full((hc.shape[0], k), -1, dtype=torch.int64, device=hc.device)
            lse = torch.full((hc.shape[0],), float("-inf"), device=hc.device)
            for c0 in range(0, vocab, vocab_chunk):
                c1 = min(vocab, c0 + vocab_chunk)
                logits = hm.project(hc, w[c0:c1], b[c0:c1] if b is not None else None, mode)
                # The candidates' own z = f(x) / T (bitwise-equal logits give equal keys in
                # every tile) and the tile's normaliser, from its best id (no second pass).
                z, ids, tile_lse = local_topk_candidates(
                    logits, k, temperature, logit_scale, softcap, c0 + offset, backend)
                if c0 == 0:
                    best_v, best_i, lse = z, ids, tile_lse
                    continue
                lse = torch.logaddexp(lse, tile_lse)
                cand_v = torch.cat([best_v, z], 1)
                cand_i = torch.cat([best_i, ids], 1)
                # Stable: among equal values the earlier (lower-id) tile stays first.
                order = torch.sort(cand_v, dim=1, descending=True, stable=True).indices[:, :k]
                best_v = cand_v.gather(1, order)
                best_i = cand_i.gather(1, order)
            if shard is not None:
                idx, lp = vp.merge_topk(best_v, best_i, lse, k, shard)
            else:
                idx, lp = best_i.to(torch.int32), best_v - lse[:, None]
            ids_out.append(idx)
            lp_out.append(lp)
    if not ids_out:
        empty = hs.new_empty((0, k))
        return TopK(empty.to(torch.int32).reshape(*lead, k), empty.float().reshape(*lead, k))
    return TopK(torch.cat(ids_out).reshape(*lead, k), torch.cat(lp_out).reshape(*lead, k))
