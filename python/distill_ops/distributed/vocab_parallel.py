"""Vocab-parallel losses and top-k: every rank holds a contiguous slice of the vocabulary.

The rows (tokens) are the same on every rank of the process group; the vocabulary is split,
rank r holding ids [offset_r, offset_r + V_r) (slices in rank order, possibly uneven). A row's
statistics are reduced over the group, never its logits:

- dense losses: one MAX all-reduce of the two row maxima, one SUM all-reduce of the two
  sums of exp(z - max) with the KL cross term (centred on the maxima) and the hard term's
  sum and label logit; JSD and TVD add one SUM of their two sums: at most 9 floats a row,
  whatever V is. Each rank then writes the gradient of its own slice.
- sparse losses: targets carry global ids; each rank reads the student logits of the ids it
  owns and sums the mass of its off-support ids. One MAX and one SUM all-reduce of 5 + k
  floats a row; every rank then evaluates the divergence over the k (+1) coarse classes
  identically and writes its slice's gradient.
- top-k: each rank's local top-k (values and global ids) and local log-sum-exp are gathered
  (k x world candidates a row) and merged; ties between bitwise-equal values keep the lower
  id, as everywhere.

The gradient of each rank is its slice of the unsharded gradient, computed in the forward;
backward scales it by grad_output. The losses run through the fused kernels in phases
around those all-reduces (kernel_rows.py: the C++ kernels on CPU tensors, the Triton ones on
CUDA tensors); float64 and backend="torch" run here, in fp32 (fp64) chunks of rows.
Shapes are agreed by one small all-gather per call (distributed.vocab_shard), which reads
its result on the host: a graph break under torch.compile.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import Tensor

from ..autograd import scale_saved_grad_
from ..backends.extension import has_native
from ..reduction import reduction_weight
from ..reference import (
    divergence_from_logprobs,
    taid_logits,
    transform_logits,
)
from ..validation import divergence_options
from . import kernel_rows
from .coarse import LOG_REST_FLOOR, coarse_divergence, rest_shift, sparse_grad_terms
from .comm import VocabShard, all_gather, all_reduce
from .head import head_threshold
from .kernel_rows import local_label

FORWARD_KL, REVERSE_KL, JSD, TVD, SKEW_KL, AKL = 0, 1, 2, 3, 4, 7
_CHUNK_BUDGET = 256 << 20  # bytes of [chunk, V_local] temporaries


def _chunk_rows(n: int, local: int, temporaries: int = 10) -> int:
    return max(1, min(max(n, 1), _CHUNK_BUDGET // (4 * temporaries * max(local, 1))))


def _compute_dtype(*xs: Tensor) -> torch.dtype:
    return torch.float64 if any(x.dtype == torch.float64 for x in xs) else torch.float32


def _row_max(z: Tensor) -> Tensor:
    if z.shape[1] == 0:
        return torch.full((z.shape[0],), -math.inf, dtype=z.dtype, device=z.device)
    return z.amax(1)


def _exp_shifted(z: Tensor, m: Tensor) -> Tensor:
    """exp(z - m[:, None]), 0 where z is -inf (also when m is)."""
    return torch.where(z == -math.inf, torch.zeros((), dtype=z.dtype, device=z.device),
                       torch.exp(z - m[:, None]))


class _SavedGradRows(torch.autograd.Function):
    """Per-row losses whose gradient w.r.t. `x` was computed in the forward: backward scales
    it by grad_output in place (as the fused single-device ops do). With `row_scale` (the
    reduction's weight, already in the gradient) it scales by grad_output / row_scale, which
    is exactly 1 under a plain backward: the CPU's scale_rows_ then leaves the rows alone."""

    @staticmethod
    def forward(ctx, x, compute, row_scale):
        rows, grad = compute(x, True)
        ctx.save_for_backward(grad)
        ctx.row_scale = row_scale
        ctx.set_materialize_grads(False)
        return rows

    @staticmethod
    def backward(ctx, go):
        (grad,) = ctx.saved_tensors
        if go is None:
            return None, None, None
        backend = "cpu" if grad.device.type == "cpu" and has_native() else None
        return scale_saved_grad_(grad, go, ctx.row_scale, backend), None, None


def folded_weight(x: Tensor, valid: Tensor | None, reduction: str,
                  num_items_in_batch) -> float | None:
    """The reduction's weight as a float where the gradient can carry it (CPU tensors that
    need a gradient: reading it costs no sync there), else None."""
    if not (x.requires_grad and torch.is_grad_enabled() and x.device.type == "cpu"):
        return None
    w = reduction_weight(x, valid, reduction, num_items_in_batch)
    w = None if w is None else float(w)  # host-sync-ok: a CPU tensor
    return w if w is not None and math.isfinite(w) and w > 0 else None


def saved_grad_rows(x: Tensor, compute, row_scale: float | None = None) -> Tensor:
    """rows of `compute(x, want_grad) -> (rows, grad or None)`, with the gradient attached
    when x needs one; `row_scale`: the factor compute already put on the gradient (the
    reduction's weight), which backward divides out of grad_output."""
    if x.requires_grad and torch.is_grad_enabled():
        return _SavedGradRows.apply(x, compute, row_scale)
    with torch.no_grad():
        return compute(x, False)[0]


# ----------------------------------------------------------------------------------------
# Dense


def dense_rows(xs: Tensor, xt: Tensor, valid: Tensor | None, labels: Tensor | None, sc,
               shard: VocabShard, vocab: int, want_grad: bool, backend: str = "auto",
               grad_scale: float = 1.0) -> tuple[Tensor, Tensor | None]:
    """Per-row loss [N] (fp32, fp64 for fp64 inputs) and, when `want_grad`, the gradient of
    each row's loss w.r.t. this rank's slice xs [N, V_local] (in xs's dtype) times
    `grad_scale`. Only global ids < `vocab` count (padded vocabularies). The fused kernels
    run it where `backend` has one (kernel_rows.choose_kernel), else PyTorch row chunks."""
    n, width = xs.shape
    lim = max(0, min(width, vocab - shard.offset))
    dt = _compute_dtype(xs, xt)
    kernel = kernel_rows.choose_kernel(backend, xs.device, sc.divergence, student_logits=xs,
                                       teacher_logits=xt)
    if kernel != "torch":
        return kernel_rows.dense_rows(xs, xt, valid, labels, sc, shard, lim, dt, want_grad,
                                      kernel, grad_scale)
    rows = torch.zeros(n, dtype=dt, device=xs.device)
    grad = torch.zeros_like(xs) if want_grad else None
    step = _chunk_rows(n, width)
    for a in range(0, n, step):
        e = min(n, a + step)
        r, g = _dense_chunk(xs[a:e, :lim], xt[a:e, :lim],
                            None if valid is None else valid[a:e],
                            None if labels is None else labels[a:e], sc, shard, dt, want_grad)
        rows[a:e] = r
        if want_grad:
            grad[a:e, :lim] = (g if grad_scale == 1.0 else g * grad_scale).to(xs.dtype)
    return rows, grad


def _dense_chunk(xs, xt, valid, labels, sc, shard, dt, want_grad):
    c = xs.shape[0]
    zero = torch.zeros((), dtype=dt, device=xs.device)
    if valid is not None:  # ignored rows may hold anything: no NaN may leak from them
        xs = torch.where(valid[:, None], xs.to(dt), zero)
        xt = torch.where(valid[:, None], xt.to(dt), zero)
    t = sc.temperature
    cap_s = sc.student_softcap or None
    cap_t = sc.teacher_softcap or None
    zs = transform_logits(xs, sc.student_scale, cap_s, t, dt)
    zt = taid_logits(zs, transform_logits(xt, sc.teacher_scale, cap_t, t, dt), sc.interp)
    g = shard.group

    mx = all_reduce(torch.stack([_row_max(zs), _row_max(zt)], 1), dist.ReduceOp.MAX, g)
    ms, mt = mx[:, 0], mx[:, 1]
    es, et = _exp_shifted(zs, ms), _exp_shifted(zt, mt)
    inf = torch.full((), math.inf, dtype=dt, device=xs.device)
    cols = [es.sum(1), et.sum(1)]
    if sc.divergence == FORWARD_KL:  # sum p-weight * (log p - log q), centred on the maxima
        u = torch.where(zs == -math.inf, inf, (zt - mt[:, None]) - (zs - ms[:, None]))
        cols.append(torch.where(et > 0, et * u, zero).sum(1))
    elif sc.divergence == REVERSE_KL:
        u = torch.where(zt == -math.inf, inf, (zs - ms[:, None]) - (zt - mt[:, None]))
        cols.append(torch.where(es > 0, es * u, zero).sum(1))
    hard = sc.hard_weight != 0.0
    if hard:  # cross-entropy at T = 1 on f(x) = z * T
        cols.append(_exp_shifted(zs * t, ms * t).sum(1))
        mine, lcol = local_label(labels, shard.offset, zs.shape[1])
        z_at = zs.gather(1, lcol[:, None])[:, 0] if zs.shape[1] else zero.expand(c)
        cols.append(torch.where(mine, z_at, zero))
    sums = all_reduce(torch.stack(cols, 1), dist.ReduceOp.SUM, g)
    log_ss, log_st = torch.log(sums[:, 0]), torch.log(sums[:, 1])
    # Shift by the maximum first, then by the log-sum: (z - m) is exact near the top, where
    # (m + log s) would round at the scale of m.
    lq = (zs - ms[:, None]) - log_ss[:, None]
    lp = (zt - mt[:, None]) - log_st[:, None]
    q, p = es / sums[:, 0:1], et / sums[:, 1:2]

    d = None
    if sc.divergence == FORWARD_KL:
        div = sums[:, 2] / sums[:, 1] - log_st + log_ss
        if want_grad:
            d = q - p
    elif sc.divergence == REVERSE_KL:
        div = sums[:, 2] / sums[:, 0] - log_ss + log_st
        if want_grad:
            d = torch.where(q > 0, q * ((lq - lp) - div[:, None]), zero)
    elif sc.divergence >= SKEW_KL:
        div, d = _research_chunk(sc, lp, lq, p, q, log_st, shard.total, g, want_grad)
    else:
        if sc.divergence == JSD:
            beta = sc.beta
            both = (p == 0) & (q == 0)
            lm = torch.logaddexp(torch.where(both, zero, lp + math.log(beta)),
                                 torch.where(both, zero, lq + math.log1p(-beta)))
            part = torch.stack([torch.where(p > 0, p * (lp - lm), zero).sum(1),
                                torch.where(q > 0, q * (lq - lm), zero).sum(1)], 1)
        else:
            sign = 0.5 * torch.sign(q - p)
            part = torch.stack([(q - p).abs().sum(1), (q * sign).sum(1)], 1)
        part = all_reduce(part, dist.ReduceOp.SUM, g)
        if sc.divergence == JSD:
            div = sc.beta * part[:, 0] + (1.0 - sc.beta) * part[:, 1]
            sum_qg = (1.0 - sc.beta) * part[:, 1]
            if want_grad:
                gj = torch.where(q > 0, (1.0 - sc.beta) * (lq - lm), zero)
                d = q * (gj - sum_qg[:, None])
        else:
            div = 0.5 * part[:, 0]
            if want_grad:
                d = q * (sign - part[:, 1][:, None])
    loss = sc.soft_coef * div
    if hard:
        log_s1 = torch.log(sums[:, -2])
        loss = loss + sc.hard_weight * ((ms - sums[:, -1]) * t + log_s1)
    if valid is not None:
        loss = torch.where(valid, loss, zero)
    if not want_grad:
        return loss, None
    gz = (sc.soft_coef / t) * d
    if hard:
        sm1 = torch.exp((zs * t - (ms * t)[:, None]) - log_s1[:, None])
        onehot = torch.zeros_like(gz).scatter_(1, lcol[:, None], mine[:, None].to(dt)) \
            if zs.shape[1] else torch.zeros_like(gz)
        gz = gz + sc.hard_weight * (sm1 - onehot)
    gx = gz * _transform_grad(zs, sc.student_scale, cap_s, t)
    if valid is not None:
        gx = torch.where(valid[:, None], gx, zero)
    return loss, gx


def _research_chunk(sc, lp: Tensor, lq: Tensor, p: Tensor, q: Tensor, log_st: Tensor,
                    vocab: int, group, want_grad: bool) -> tuple[Tensor, Tensor | None]:
    """The research divergences of a chunk from its global log-probabilities: (div [c], the
    gradient w.r.t. z_s of this rank's slice, or None)."""
    zero = torch.zeros((), dtype=lp.dtype, device=lp.device)
    if sc.divergence == AKL:
        head = p.float() >= _akl_threshold(p, sc.beta, log_st, vocab, group)[:, None]
        gap = (p - q).abs()
        part = all_reduce(torch.stack([
            torch.where(p > 0, p * (lp - lq), zero).sum(1),
            torch.where(q > 0, q * (lq - lp), zero).sum(1),
            torch.where(head, gap, zero).sum(1), torch.where(head, zero, gap).sum(1)], 1),
            dist.ReduceOp.SUM, group)
        total = part[:, 2] + part[:, 3]
        w = torch.where(total > 0, part[:, 2] / torch.where(total > 0, total, zero + 1),
                        zero + 0.5)
        rkl = part[:, 1]
        div = w * part[:, 0] + (1.0 - w) * rkl
        if not want_grad:
            return div, None
        return div, w[:, None] * (q - p) + (1.0 - w[:, None]) * torch.where(
            q > 0, q * ((lq - lp) - rkl[:, None]), zero)
    # Element-separable: this slice's terms and h = dL/dlog q by autograd, one all-reduce of
    # (loss, sum h), then dL/dz = h - q sum h.
    name, params = divergence_options(sc)
    with torch.enable_grad():
        lq_ = lq.detach().requires_grad_(want_grad)
        terms = divergence_from_logprobs(lp, lq_, name, **params)
        h = torch.autograd.grad(terms.sum(), lq_)[0] if want_grad else torch.zeros_like(lq)
    if name == "skew_reverse_kl":  # its "+ q" centres to 0 (q sums to one): less to cancel
        h = h - q
    part = all_reduce(torch.stack([terms.detach(), h.sum(1)], 1), dist.ReduceOp.SUM, group)
    return part[:, 0], (h - q * part[:, 1:2]) if want_grad else None


def _akl_threshold(p: Tensor, head_mass: float, log_st: Tensor, vocab: int, group) -> Tensor:
    """AKL's head threshold per row over the whole (sharded) vocabulary (head.py): exactly
    the smallest probability of the head; each bisection step one all-reduce of a float a
    row."""
    pf = p.float()

    def mass(tau: Tensor) -> Tensor:
        return all_reduce(torch.where(pf >= tau[:, None], pf, 0.0).sum(1, dtype=torch.float64),
                          dist.ReduceOp.SUM, group)

    return head_threshold(mass, head_mass, log_st, vocab)


def _transform_grad(z: Tensor, scale: float, cap: float | None, t: float) -> Tensor | float:
    """f'(x) through z = f(x) / T (0 at a masked -inf logit under a softcap)."""
    if cap is None:
        return scale
    th = z * (t / cap)
    return torch.where(z == -math.inf, torch.zeros((), dtype=z.dtype, device=z.device),
                       scale * (1.0 - th * th))


# ----------------------------------------------------------------------------------------
# Sparse


def sparse_rows(xs: Tensor, idx: Tensor, tlp: Tensor, valid: Tensor | None,
                labels: Tensor | None, divergence: int, tail: str, temperature: float,
                ratio: float, sc, shard: VocabShard, want_grad: bool, backend: str = "auto",
                grad_scale: float = 1.0) -> tuple[Tensor, Tensor | None]:
    """Per-row sparse loss [N] and the gradient of this rank's slice (times `grad_scale`);
    `idx` holds global ids (-1 pads), `tlp` the teacher log-probabilities, `ratio` =
    T_source / T. The fused kernels run it where `backend` has one
    (kernel_rows.choose_kernel), else row chunks."""
    n, width = xs.shape
    dt = _compute_dtype(xs, tlp)
    kernel = kernel_rows.choose_kernel(backend, xs.device, None, student_logits=xs)
    if kernel != "torch":
        return kernel_rows.sparse_rows(xs, idx, tlp, valid, labels, divergence, tail,
                                       temperature, ratio, sc, shard, dt, want_grad, kernel,
                                       grad_scale)
    rows = torch.zeros(n, dtype=dt, device=xs.device)
    grad = torch.zeros_like(xs) if want_grad else None
    step = _chunk_rows(n, width)
    for a in range(0, n, step):
        e = min(n, a + step)
        r, g = _sparse_chunk(xs[a:e], idx[a:e], tlp[a:e], None if valid is None else valid[a:e],
                             None if labels is None else labels[a:e], divergence, tail,
                             temperature, ratio, sc, shard, dt,
                             want_grad)
        rows[a:e] = r
        if want_grad:
            grad[a:e] = (g if grad_scale == 1.0 else g * grad_scale).to(xs.dtype)
    return rows, grad


def _sparse_chunk(xs, idx, tlp, valid, labels, divergence, tail, t, ratio, sc, shard, dt,
                  want_grad):
    hard_weight, soft_coef = sc.hard_weight, sc.soft_coef
    c, width = xs.shape
    k = idx.shape[1]
    zero = torch.zeros((), dtype=dt, device=xs.device)
    x = xs.to(dt)
    if valid is not None:
        x = torch.where(valid[:, None], x, zero)
    z = x / t
    g = shard.group
    m = all_reduce(_row_max(z)[:, None].contiguous(), dist.ReduceOp.MAX, g)[:, 0]
    e = _exp_shifted(z, m)

    # The ids this rank owns; column `width` of the [c, width + 1] helpers takes the rest.
    own = (idx >= shard.offset) & (idx < shard.offset + width)
    lid = torch.where(own, idx - shard.offset, torch.full_like(idx, width))
    on_sup = torch.zeros((c, width + 1), dtype=torch.bool, device=xs.device)
    on_sup.scatter_(1, lid, torch.ones_like(own))
    on_sup = on_sup[:, :width]
    z_pad = torch.cat([z, torch.zeros((c, 1), dtype=dt, device=z.device)], 1)
    cols = [e.sum(1), torch.where(on_sup, zero, e).sum(1), own.sum(1).to(dt)]
    hard = hard_weight != 0.0
    if hard:
        cols.append(_exp_shifted(z * t, m * t).sum(1))
        mine, lcol = local_label(labels, shard.offset, width)
        z_at = z.gather(1, lcol[:, None])[:, 0] if width else zero.expand(c)
        cols.append(torch.where(mine, z_at, zero))
    z_sup = torch.where(own, z_pad.gather(1, lid), zero)
    sums = all_reduce(torch.cat([torch.stack(cols, 1), z_sup], 1), dist.ReduceOp.SUM, g)
    s_all, s_rest, n_sup = sums[:, 0], sums[:, 1], sums[:, 2]
    z_sup = sums[:, -k:]
    log_s = torch.log(s_all)
    l_rest = torch.log(s_rest)
    rest_z = None
    if tail == "bucket":
        # A rest below the floor at m (its terms near or past underflow) again at its own
        # maximum: two more collectives, only where some row needs them (every rank sees the
        # same all-reduced sums, so every rank takes the branch).
        rare = (s_rest < math.exp(LOG_REST_FLOOR)) & (n_sup < shard.total)
        if bool(rare.any()):
            rest_z = torch.where(on_sup, torch.full((), -math.inf, dtype=dt,
                                                    device=z.device), z)
            m_r = all_reduce(_row_max(rest_z)[:, None].contiguous(), dist.ReduceOp.MAX, g)[:, 0]
            s_r = all_reduce(_exp_shifted(rest_z, m_r).sum(1)[:, None].contiguous(),
                             dist.ReduceOp.SUM, g)[:, 0]
            l_rest = torch.where(rare & (m_r > -math.inf), (m_r - m) + torch.log(s_r), l_rest)

    div, h, lq_sup, has_rest = coarse_divergence(idx, tlp, z_sup, m, log_s, l_rest, n_sup,
                                                  divergence, tail, ratio, sc, shard, dt,
                                                  want_grad)
    loss = soft_coef * div
    if hard:
        log_s1 = torch.log(sums[:, 3])
        loss = loss + hard_weight * ((m - sums[:, 4]) * t + log_s1)
    if valid is not None:
        loss = torch.where(valid, loss, zero)
    if not want_grad:
        return loss, None

    shift = rest_shift(m, l_rest, has_rest, dt)
    off, sup_grad = sparse_grad_terms(h, lq_sup, s_all, l_rest, has_rest, tail, shift)
    if rest_z is not None:  # e_j at the base m + shift (rest_shift makes it a dt number)
        e = _exp_shifted(z, (m.double() + shift).to(dt))
    dz = torch.zeros_like(z) if off is None else e * off[:, None]
    dz = torch.cat([dz, torch.zeros((c, 1), dtype=dt, device=z.device)], 1)
    dz.scatter_(1, lid, torch.where(own, sup_grad, zero))
    gx = (soft_coef / t) * dz[:, :width]
    if hard:
        sm1 = torch.exp((z - m[:, None]) * t - log_s1[:, None])
        onehot = torch.zeros_like(gx).scatter_(1, lcol[:, None], mine[:, None].to(dt)) \
            if width else torch.zeros_like(gx)
        gx = gx + hard_weight * (sm1 - onehot)
    if valid is not None:
        gx = torch.where(valid[:, None], gx, zero)
    return loss, gx


# ----------------------------------------------------------------------------------------
# Top-k


def merge_topk(z: Tensor, ids: Tensor, lse: Tensor, k: int, shard: VocabShard
               ) -> tuple[Tensor, Tensor]:
    """Merge every rank's local top-k candidates (z = f(x) / T values [N, k] in descending
    order, padded with -inf; global ids [N, k]) and local log-sum-exp [N] into the global
    top-k: (ids int32 [N, k], log-probabilities fp32 [N, k])."""
    n = z.shape[0]
    vals = all_gather(torch.cat([z, lse[:, None]], 1).float(), shard.group)  # [W, N, k + 1]
    gids = all_gather(ids.to(torch.int64), shard.group)  # [W, N, k]
    cand_v = vals[:, :, :k].permute(1, 0, 2).reshape(n, -1)
    cand_i = gids.permute(1, 0, 2).reshape(n, -1)
    # Rank order is id order: a stable sort keeps the lower id first among equal values.
    order = torch.sort(cand_v, dim=1, descending=True, stable=True).indices[:, :k]
    lse_all = torch.logsumexp(vals[:, :, k], dim=0)
    best = cand_v.gather(1, order)
    return cand_i.gather(1, order).to(torch.int32), best - lse_all[:, None]


__all__ = ["dense_rows", "merge_topk", "saved_grad_rows", "sparse_rows"]
