"""Vocab-parallel losses through the fused kernels: the C++ CPU kernels (csrc/cpu/dense_vp.cpp,
sparse_vp.cpp) and the Triton ones (backends/triton/dense_vp.py, sparse_vp.py), which share
one row record, so that one orchestration here serves both.

Dense: phase 0 (each slice's maxima, sums, T = 1 sum, label logit and, for the KLs, the cross
term centred on the maxima), one all-gather of those six floats a row (seven for the KLs),
each rank's sums moved to the global maxima and added here (the bytes of a MAX and a SUM
all-reduce, one collective instead of two); JSD, TVD, the skew KLs and AB add phase 1 (the
slice's partial sums with the global statistics) and one SUM all-reduce of two; phase 2
writes the slice's gradient. Sparse: phase 0 (the slice's max, sum, mass off the support,
owned support ids and their logits), one all-gather of 4 + k floats a row (6 + k with the
hard term), the divergence over the k + 1 coarse classes in PyTorch ([N, k + 1]), phase 1
writes the gradient. No [N, V] temporary anywhere: every element goes through the kernels'
own maths.

AKL adds its head threshold's search (head.py: ~28 bisection steps at V = 128256, each one
all-reduce of a float a row) and one pass for both KLs and the head's and tail's gaps before
the gradient (the C++ phases first turn their stash into p, so that the search reads one fp32
stream and no exponential).

Which kernel runs (`choose_kernel`): `auto` takes the C++ kernel for CPU tensors and the
Triton one for CUDA tensors; float64 runs in PyTorch row chunks (vocab_parallel.py), as does
`backend="torch"`.
"""

from __future__ import annotations

import dataclasses
import math
import os

import torch
import torch.distributed as dist
from torch import Tensor

from ..backends.cpu import kd_params
from ..backends.extension import dtype_code, has_native, native, ptr
from ..dispatch import resolve_backend
from ..validation import check_kernel_dtype
from .coarse import coarse_divergence, rest_log_mass, rest_shift, sparse_grad_terms
from .comm import all_gather, all_reduce
from .head import (
    SearchSteps,
    head_threshold,
    head_threshold_exchange,
    head_threshold_key16,
)

FORWARD_KL, REVERSE_KL, JSD, TVD, AKL = 0, 1, 2, 3, 7
# The C++ phases' shortcuts (dense_vp.cpp and sparse_vp.cpp, "lean"), bitwise equal on one
# process to the plain phases (AKL to a rounding), which the tests compare them with by
# turning this off.
LEAN = True


def choose_kernel(backend: str, device: torch.device, divergence: int | None,
                  **tensors: Tensor) -> str:
    """The kernel of a vocab-parallel loss: "cpu" (C++), "triton", "cuda" (the CUDA C++
    phases: backend="cuda"; `auto` takes Triton's until a GPU has measured them), or
    "torch" (PyTorch row chunks). `auto` picks the fused kernel of the tensors' device
    (DISTILL_OPS_BACKEND overrides it as for the one-device ops); an explicit backend that
    cannot run there is the single-device ops' ValueError / TypeError. `divergence` is None
    for the sparse loss."""
    if backend == "torch":
        return "torch"
    wanted = backend if backend != "auto" else os.environ.get("DISTILL_OPS_BACKEND") or "auto"
    chosen = resolve_backend(backend, device)
    if backend != "auto":
        check_kernel_dtype(chosen, **tensors)
    if any(t.dtype == torch.float64 for t in tensors.values()):
        return "torch"
    if chosen == "cpu":
        return "cpu" if has_native() else "torch"
    if wanted == "cuda":
        return "cuda"
    if chosen in ("triton", "cuda"):
        try:
            import triton  # noqa: F401
        except ImportError:  # auto on a GPU without triton
            return "torch"
        return "triton"
    return "torch"


def _moved(m_local: Tensor, m: Tensor, factor: float = 1.0) -> Tensor:
    """exp((m_local - m) * factor): a slice's sums moved to the global maximum m, 0 from a
    slice with nothing (m_local = -inf)."""
    ok = m_local > -math.inf
    return torch.where(ok, torch.exp((torch.where(ok, m_local, m) - m) * factor),
                       torch.zeros((), dtype=m.dtype, device=m.device))


def local_label(labels: Tensor, offset: int, width: int) -> tuple[Tensor, Tensor]:
    """(whether each row's label lies in the slice [offset, offset + width), its column there,
    0 elsewhere)."""
    local = labels - offset
    mine = (local >= 0) & (local < width)
    return mine, torch.where(mine, local, torch.zeros_like(local))


def _kernel_labels(labels: Tensor, offset: int, width: int) -> Tensor:
    """The kernels' form: the label's column in the slice, -1 where it lies elsewhere."""
    mine, col = local_label(labels.to(torch.int64), offset, width)
    return torch.where(mine, col, torch.full_like(col, -1)).contiguous()


def _reducer(group, dt: torch.dtype):
    def reduce(x: Tensor, op) -> Tensor:  # a copy in the compute dtype (works in place)
        return all_reduce(x.to(dt, copy=True).contiguous(), op, group).to(torch.float64)

    return reduce


def _grad_scalars(sc, grad_scale: float):
    """The loss scalars of the gradient phase: the hard and soft weights times `grad_scale`
    (the reduction's weight folded into the gradient; the loss keeps `sc`'s)."""
    if grad_scale == 1.0:
        return sc
    return dataclasses.replace(sc, soft_coef=sc.soft_coef * grad_scale,
                               hard_weight=sc.hard_weight * grad_scale)


def dense_rows(xs: Tensor, xt: Tensor, valid: Tensor | None, labels: Tensor | None, sc,
               shard, lim: int, dt: torch.dtype, want_grad: bool, kernel: str,
               grad_scale: float = 1.0) -> tuple[Tensor, Tensor | None]:
    """vocab_parallel.dense_rows through `kernel` ("cpu", "triton" or "cuda"): per-row loss
    [N] and the gradient of this rank's slice (zeros past column `lim`, the ids that count)
    times `grad_scale`, which the gradient phase folds into its coefficients."""
    sc_grad = _grad_scalars(sc, grad_scale)
    n, dev = xs.shape[0], xs.device
    s, t = xs[:, :lim], xt[:, :lim]
    s = s if s.stride(-1) == 1 else s.contiguous()
    t = t if t.stride(-1) == 1 else t.contiguous()
    hard = sc.hard_weight != 0.0
    lab = _kernel_labels(labels, shard.offset, lim) if hard else None
    rec = torch.zeros(n, 8, dtype=torch.float64, device=dev)
    g_local = torch.empty((n, lim), dtype=xs.dtype, device=dev) if want_grad else None

    if kernel == "cpu":
        params, params_grad = kd_params(sc), kd_params(sc_grad)
        # Lean phases read rows whose z is exact where they lie and carry per-logit work in
        # the gradient buffer when it holds their accumulation type (fp32 here: fp64 runs in
        # row chunks): dense_vp.cpp, "lean phases".
        stash = LEAN and g_local is not None and g_local.dtype == torch.float32

        def phase(k: int, g: Tensor | None = None, cand: Tensor | None = None,
                  aux: Tensor | None = None) -> None:
            g = g_local if stash else g
            s_in = s if cand is None else cand  # phases 7, 10, 11: the candidates' buffer
            native().dense_vp_cpu(k, ptr(s_in), dtype_code(s_in), s_in.stride(0), ptr(t),
                                  dtype_code(t),
                                  t.stride(0), ptr(valid), ptr(lab), ptr(rec), ptr(aux),
                                  ptr(g) if g is not None else 0,
                                  dtype_code(g) if g is not None else 0, n, lim,
                                  params_grad if k == 2 else params, LEAN,
                                  torch.get_num_threads())
    elif kernel == "cuda":
        from ..backends.cuda import _stream

        stash = False

        def phase(k: int, g: Tensor | None = None) -> None:
            native().dense_vp_cuda(k, ptr(s), dtype_code(s), s.stride(0), ptr(t), dtype_code(t),
                                   t.stride(0), ptr(valid), ptr(lab), ptr(rec), ptr(g),
                                   g.stride(0) if g is not None else 0, n, lim,
                                   kd_params(sc_grad if k == 2 else sc), _stream(s))
    else:
        from ..backends.triton.dense_vp import dense_vp_phase

        stash = False

        def phase(k: int, g: Tensor | None = None) -> None:
            dense_vp_phase(k, s, t, valid, lab, rec, g, sc_grad if k == 2 else sc)

    reduce = _reducer(shard.group, dt)
    phase(0)
    zero = torch.zeros((), dtype=torch.float64, device=dev)
    kl = sc.divergence in (FORWARD_KL, REVERSE_KL)
    ms, mt, sums = _global_sums(rec, sc.divergence, sc.temperature, kl, shard.group, dt)
    log_s1 = torch.log(sums[:, 2])
    log_ss, log_st = torch.log(sums[:, 0]), torch.log(sums[:, 1])
    rec[:, 0], rec[:, 1] = ms, log_ss
    rec[:, 2], rec[:, 3], rec[:, 4] = mt, log_st, log_s1
    akl_w = None
    if kl:  # KL = c / S_w - log S_w + log S_o: no sums pass
        div = sums[:, 4] / sums[:, 1] - log_st + log_ss if sc.divergence == FORWARD_KL \
            else sums[:, 4] / sums[:, 0] - log_ss + log_st
        sum_h = torch.zeros_like(div)
    elif sc.divergence == AKL:  # the global head threshold, then both KLs and the gaps
        key16 = t.dtype if kernel == "triton" and t.dtype in (torch.bfloat16, torch.float16) \
            and not sc.teacher_softcap and sc.interp == 1.0 else None
        rec[:, 7] = _akl_threshold(phase, rec, sc, shard.total, key16, reduce,
                                   g_local if stash else None, shard.group, dt)
        phase(4)
        part = reduce(rec[:, [5, 6, 7, 4]], dist.ReduceOp.SUM)
        fkl, rkl, g_head, g_tail = part.unbind(1)
        total = g_head + g_tail
        akl_w = torch.where(total > 0, g_head / torch.where(total > 0, total, 1.0), 0.5)
        div, sum_h = akl_w * fkl + (1.0 - akl_w) * rkl, rkl
        rec[:, 4] = log_s1  # phase 4 wrote the tail's gap there
    else:
        phase(1)
        part = reduce(rec[:, 5:7], dist.ReduceOp.SUM)
        div, sum_h = part[:, 0], part[:, 1]
    a, b = div, sum_h
    if sc.divergence == JSD:
        div, sum_h = sc.beta * a + (1.0 - sc.beta) * b, (1.0 - sc.beta) * b
    elif sc.divergence == TVD:
        div = 0.5 * a
    loss = sc.soft_coef * div
    if hard:
        loss = loss + sc.hard_weight * ((ms - sums[:, 3]) * sc.temperature + log_s1)
    if valid is not None:
        loss = torch.where(valid, loss, zero)
    if not want_grad:
        return loss.to(dt), None
    rec[:, 5], rec[:, 6] = div, sum_h
    if akl_w is not None:
        rec[:, 7] = akl_w
    phase(2, g_local)
    if lim == xs.shape[1]:  # the whole slice counts: the kernel wrote the gradient itself
        return loss.to(dt), g_local
    grad = torch.zeros_like(xs)
    grad[:, :lim] = g_local
    return loss.to(dt), grad


def _global_sums(rec: Tensor, divergence: int, temperature: float, kl: bool, group,
                 dt: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    """The global maxima of both sides and the sums of phase 0's record moved to them: one
    all-gather of every rank's record (six floats a row, seven for the KLs: the bytes a MAX
    and a SUM all-reduce of them would send, in one collective, not two), each rank's
    sums moved to the global maxima here in float64 and added in rank order."""
    fields = [0, 1, 2, 3, 4, 5, 6] if kl else [0, 1, 2, 3, 4, 5]
    table = all_gather(rec[:, fields].to(dt).contiguous(), group).to(torch.float64)
    ms, mt = table[:, :, 0].amax(0), table[:, :, 2].amax(0)
    zero = torch.zeros((), dtype=torch.float64, device=rec.device)
    cols = [table[:, :, 1] * _moved(table[:, :, 0], ms),
            table[:, :, 3] * _moved(table[:, :, 2], mt),
            table[:, :, 4] * _moved(table[:, :, 0], ms, temperature), table[:, :, 5]]
    if kl:  # the centred cross term moved to the global maxima (kd_math.h: cross_shift)
        w, o = (2, 0) if divergence == FORWARD_KL else (0, 2)
        m_w, m_o = (mt, ms) if divergence == FORWARD_KL else (ms, mt)
        f_w = _moved(table[:, :, w], m_w)
        a_w = table[:, :, w + 1]
        shift = torch.where(table[:, :, w] > -math.inf,
                            (m_o - table[:, :, o]) - (m_w - table[:, :, w]), zero)
        c = table[:, :, 6]
        cols.append(torch.where(torch.isinf(c), c, torch.where(
            (a_w > 0) & (f_w > 0), f_w * (c + a_w * shift), zero)))
    sums = torch.stack(cols, -1).sum(0)  # [n, 4 or 5]
    return ms, mt, sums


def _akl_threshold(phase, rec: Tensor, sc, vocab: int, key16: torch.dtype | None,
                   reduce, stash: Tensor | None = None, group=None,
                   dt: torch.dtype = torch.float32) -> Tensor:
    """AKL's head threshold per row over the whole vocabulary (head.py). Without a stash each
    bisection step is the kernel's phase 3 (the slice's mass at p >= tau, tau in field 7; at
    x >= tau over the teacher's own logits where `key16` names its 16-bit dtype: the Triton
    phases without softcap or TAID) and one all-reduce of a float a row. Where the C++ phases
    stash in the gradient buffer (`stash`), head_threshold_exchange runs on p there
    (dense_vp.cpp, phases 7-11, with their own record `aux`): the first quarter step writes
    p into it from the teacher's row (phase 5 alone where no step runs)."""
    if stash is None:
        def mass(tau: Tensor) -> Tensor:
            rec[:, 7] = tau.to(torch.float64)
            phase(3)
            return reduce(rec[:, 5:6], dist.ReduceOp.SUM)[:, 0]

        if key16 is not None:
            tau = head_threshold_key16(mass, sc.beta, rec[:, 2], rec[:, 3],
                                       sc.teacher_scale / sc.temperature, vocab,
                                       key16 == torch.bfloat16)
        else:
            tau = head_threshold(mass, sc.beta, rec[:, 3], vocab)
        return tau.to(torch.float64)

    n = rec.shape[0]
    aux = torch.zeros(n, 16, dtype=torch.float64, device=rec.device)
    cand: list[Tensor] = []

    def quarter(i: int, lo: Tensor, hi: Tensor) -> Tensor:
        aux[:, 0], aux[:, 1] = lo.to(torch.float64), hi.to(torch.float64)
        phase(8 if i == 0 else 9, aux=aux)
        return reduce(aux[:, 2:5], dist.ReduceOp.SUM)

    def gather(lo: Tensor, hi: Tensor, room: int | None) -> None:
        # As many candidates a row as the masses allow, else the width: a buffer small enough
        # for the allocator to keep from call to call (a fresh [n, width] one page-faults).
        aux[:, 0], aux[:, 1] = lo.to(torch.float64), hi.to(torch.float64)
        width = stash.shape[1]
        cap = width if room is None else min(width, room + room // 64 + 64)
        cand.append(stash.new_empty(stash.shape[0], cap))
        phase(10, aux=aux, cand=cand[0])
        if cap < width and bool((aux[:, 6] > cap).any()):  # host-sync-ok: rounding's way out
            cand[0] = torch.empty_like(stash)
            phase(10, aux=aux, cand=cand[0])

    def inner(rows: Tensor, lo: Tensor, hi: Tensor, points: Tensor) -> Tensor:
        aux[rows, 0], aux[rows, 1] = lo.to(torch.float64), hi.to(torch.float64)
        aux[rows, 8:11] = points.to(torch.float64)
        phase(7, aux=aux, cand=cand[0])
        return reduce(aux[rows, 2:5], dist.ReduceOp.SUM)

    def exchange(rows: Tensor, lo: Tensor, hi: Tensor) -> Tensor:
        aux[rows, 0], aux[rows, 1] = lo.to(torch.float64), hi.to(torch.float64)
        phase(11, aux=aux, cand=cand[0])
        return all_gather(aux[rows, 7:16].to(dt).contiguous(), group).to(torch.float64)

    steps = SearchSteps(quarter, gather, inner, exchange)
    tau = head_threshold_exchange(steps, sc.beta, rec[:, 3], vocab)
    if sc.beta >= 1.0:  # no step ran (a head mass of 1): the stash to p alone
        phase(5)
    return tau.to(torch.float64)


def sparse_rows(xs, idx, tlp, valid, labels, divergence, tail, t, ratio, sc, shard, dt,
                want_grad, kernel, grad_scale: float = 1.0):
    """vocab_parallel.sparse_rows through `kernel` ("cpu", "triton" or "cuda"); the gradient
    times `grad_scale` (folded into the gradient phase's coefficients)."""
    sc_grad = _grad_scalars(sc, grad_scale)
    n, width = xs.shape
    dev = xs.device
    k = idx.shape[1]
    s = xs if xs.stride(-1) == 1 else xs.contiguous()
    ids = idx.to(torch.int64).contiguous()
    hard = sc.hard_weight != 0.0
    lab = _kernel_labels(labels, shard.offset, width) if hard else None
    vld = None if valid is None else valid.contiguous()
    rec = torch.zeros(n, 8, dtype=torch.float64, device=dev)
    zsup = torch.zeros(n, k, dtype=torch.float64, device=dev)
    grad = torch.empty((n, width), dtype=xs.dtype, device=dev) if want_grad else None

    if kernel == "cpu":
        # Lean phases: phase 0 leaves its exponentials in an fp32 gradient for phase 1 to
        # rescale (sparse_vp.cpp), so it gets the gradient buffer too.
        stash = LEAN and grad is not None and grad.dtype == torch.float32

        def phase(p: int, sup: Tensor | None = None, g: Tensor | None = None) -> None:
            g = grad if stash else g
            native().sparse_vp_cpu(p, ptr(s), dtype_code(s), s.stride(0), ptr(ids), k,
                                   shard.offset, ptr(vld), ptr(lab), ptr(rec), ptr(zsup),
                                   ptr(sup) if sup is not None else 0,
                                   ptr(g) if g is not None else 0,
                                   dtype_code(g) if g is not None else 0, n, width, float(t),
                                   float((sc_grad if p == 1 else sc).hard_weight), LEAN,
                                   torch.get_num_threads())
    elif kernel == "cuda":
        from ..backends.cuda import _stream

        def phase(p: int, sup: Tensor | None = None, g: Tensor | None = None) -> None:
            native().sparse_vp_cuda(p, ptr(s), dtype_code(s), s.stride(0), ptr(ids), k,
                                    shard.offset, ptr(vld), ptr(lab), ptr(rec), ptr(zsup),
                                    ptr(sup) if sup is not None else 0,
                                    ptr(g) if g is not None else 0, n, width, float(t),
                                    float((sc_grad if p == 1 else sc).hard_weight), _stream(s))
    else:
        from ..backends.triton.sparse_vp import sparse_vp_phase

        def phase(p: int, sup: Tensor | None = None, g: Tensor | None = None) -> None:
            sparse_vp_phase(p, s, ids, shard.offset, vld, lab, rec, zsup, sup, g, float(t),
                            float((sc_grad if p == 1 else sc).hard_weight))

    phase(0)
    # One all-gather of each rank's record and support logits (the bytes of a MAX and a SUM
    # all-reduce, one collective), the sums moved to the global max here (as the dense path).
    fields = [0, 1, 2, 3, 4, 5] if hard else [0, 1, 2, 3]
    table = all_gather(torch.cat([rec[:, fields], zsup], 1).to(dt).contiguous(),
                       shard.group).to(torch.float64)
    m_loc = table[:, :, 0]
    m = m_loc.amax(0)
    zero = torch.zeros((), dtype=torch.float64, device=dev)
    f = _moved(m_loc, m)
    cols = [table[:, :, 1] * f, table[:, :, 3]]
    if hard:
        cols += [table[:, :, 4] * _moved(m_loc, m, t), table[:, :, 5]]
    sums = torch.cat([torch.stack(cols, -1), table[:, :, len(fields):]], -1).sum(0)
    s_all, n_sup = sums[:, 0], sums[:, 1]
    l_rest = rest_log_mass(m_loc, table[:, :, 2], m)
    log_s = torch.log(s_all)
    div, h, lq_sup, has_rest = coarse_divergence(idx, tlp, sums[:, -k:].to(dt), m.to(dt),
                                                  log_s.to(dt), l_rest.to(dt), n_sup.to(dt),
                                                  divergence, tail, ratio, sc, shard, dt,
                                                  want_grad)
    loss = sc.soft_coef * div.to(torch.float64)
    log_s1 = torch.log(sums[:, 2]) if hard else None
    if hard:
        loss = loss + sc.hard_weight * ((m - sums[:, 3]) * t + log_s1)
    if valid is not None:
        loss = torch.where(valid, loss, zero)
    if not want_grad:
        return loss.to(dt), None
    shift = rest_shift(m, l_rest, has_rest, dt)
    off, sup_grad = sparse_grad_terms(h, lq_sup, s_all.to(dt), l_rest.to(dt), has_rest, tail,
                                      shift)
    coef = sc_grad.soft_coef / t
    rec[:, 0] = m
    rec[:, 1] = 0.0 if off is None else coef * off.to(torch.float64)
    rec[:, 2] = m + shift  # the off-support e_j's base
    if hard:
        rec[:, 4] = log_s1
    phase(1, (coef * sup_grad).to(torch.float64).contiguous(), grad)
    return loss.to(dt), grad
