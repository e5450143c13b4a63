"""Triton kernel of the sparse KD loss: one program per row, fused forward and gradient.

Pass 1 reads the student row for its maximum M, pass 2 for sum_j exp(z_j - M), accumulated in
fp64. The k targets are gathered and their exp(z_i - M) recomputed by the same instructions
(the kernel is compiled without FMA contraction), so the mass outside the support,
sum_all - sum_support in fp64, carries no cancellation even when the support holds all but
1e-9 of it. The divergence over the coarse classes is a [K] vector computation; the last pass
writes q_j * (g_rest - S) (or -S q_j, or 0) for every id, then, after a barrier, each support
id's own gradient over it.

Byte account per student logit: three reads (maximum, sum, gradient pass) and one write: 4
transfers against the floor of 2 (read, write). Merging the first two passes into an online
max / sum would save one read, but the rest mass is exact only because pass 2's terms are
bit-identical to the support's recomputed ones, which needs the final maximum first; keeping
the row on chip (the CUDA dense sm_90 kernel's cluster design) is the way to 2.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..extension import fused_outputs
from . import tuning
from .dense_kd import _device_ctx
from .elementwise import (
    AB,
    AKL,
    FORWARD_KL,
    JSD,
    NEG_INF,
    REVERSE_KL,
    SKEW_KL,
    SKEW_REVERSE_KL,
    TVD,
    _log_mixture,
    research_terms,
    taid_logit,
)
from .rows import cast_rne

BUCKET: tl.constexpr = tl.constexpr(0)
RENORM: tl.constexpr = tl.constexpr(1)
SUPPORT: tl.constexpr = tl.constexpr(2)
NONE: tl.constexpr = tl.constexpr(3)


@triton.jit
def _expm1(x):
    """exp(x) - 1 without cancellation near 0 (Taylor to x^5 where |x| < 0.1)."""
    small = x * (1.0 + x * 0.5 * (1.0 + x / 3.0 * (1.0 + x * 0.25 * (1.0 + x * 0.2))))
    return tl.where(tl.abs(x) < 0.1, small, tl.exp(x) - 1.0)


@triton.jit
def _lse(x):
    m = tl.max(x, 0)
    return tl.where(m == NEG_INF, m, m + tl.log(tl.sum(tl.where(x == NEG_INF, 0.0,
                                                                   tl.exp(x - m)), 0)))


# The rest's mass, sum_all - sum_support in fp64, carries the rounding of sum_all (~2^-54 of
# it at V = 32000, measured: 1.2e-6 relative error in a rest of 2^-34 of the row): below
# REST_FLOOR of sum_all (error <= ~3e-7 there) it is summed again over its own ids at its
# own maximum (_rest_at_own_max; a confident student's rows, and the only way past fp32's
# range).
REST_FLOOR: tl.constexpr = tl.constexpr(2.0 ** -30)


@triton.jit
def _rest_chunk(s_row, start, n, inv_t, sup_ptr, k, offset, z_min, n_in, repeats,
                BLOCK: tl.constexpr):
    """z = x / T of the columns start .. start + BLOCK that are off the support (-inf on it
    and past n). The columns below every support id's z (z_min) are off it; a chunk with as
    many columns at or above z_min as support ids in it (n_in; no id repeats) has no other;
    any other chunk compares its columns with the k ids (sup_ptr: the row's; column =
    id - offset)."""
    cols = start + tl.arange(0, BLOCK)
    z = tl.load(s_row + cols, mask=cols < n, other=NEG_INF).to(tl.float32) * inv_t
    z = tl.where(cols < n, z, NEG_INF)
    hi = z >= z_min
    n_hi = tl.sum(hi.to(tl.int32), 0)
    on = hi
    if (n_hi != n_in) | repeats:
        on = cols < 0
        for i in range(0, k):
            on = on | (cols == tl.load(sup_ptr + i) - offset)
    return tl.where(on, NEG_INF, z)


@triton.jit
def _rest_at_own_max(s_row, n, inv_t, sup_ptr, k, offset, ids, own, z_sup,
                     BLOCK: tl.constexpr):
    """(m_r, sum exp(z - m_r)) over the columns 0 .. n off the support, m_r their maximum
    (-inf, 0 where there are none): two more passes over the row, for the rows whose rest
    the fp64 difference cannot resolve. ids [KP] (owned where `own`), their z_sup."""
    z_min = tl.min(tl.where(own, z_sup, float("inf")), 0)
    n_own = tl.sum(own.to(tl.int32), 0)
    dup = tl.sum(tl.where(own[:, None] & own[None, :] & (ids[:, None] == ids[None, :]), 1, 0))
    repeats = dup != n_own
    m_lane = tl.full([BLOCK], NEG_INF, tl.float32)
    for start in range(0, n, BLOCK):
        n_in = tl.sum((own & (ids - offset >= start) & (ids - offset < start + BLOCK)).to(
            tl.int32), 0)
        z = _rest_chunk(s_row, start, n, inv_t, sup_ptr, k, offset, z_min, n_in, repeats, BLOCK)
        m_lane = tl.maximum(m_lane, z)
    m_r = tl.max(m_lane, 0)
    m_safe = tl.where(m_r == NEG_INF, 0.0, m_r)
    s_lane = tl.zeros([BLOCK], tl.float32)
    for start in range(0, n, BLOCK):
        n_in = tl.sum((own & (ids - offset >= start) & (ids - offset < start + BLOCK)).to(
            tl.int32), 0)
        z = _rest_chunk(s_row, start, n, inv_t, sup_ptr, k, offset, z_min, n_in, repeats, BLOCK)
        s_lane += tl.exp(z - m_safe)
    return m_r, tl.sum(s_lane, 0)


@triton.jit
def _class_terms(lp, lq, beta, param2, log_b, log_1mb, akl_w, DIVERGENCE: tl.constexpr):
    """Per-class (loss term, q_hat * dL/dq_hat) of the divergence; forward KL's is -p, finite
    where q_hat underflows. AKL's terms are its two KLs' ((loss: the forward KL's; the
    caller weighs), its gradient weighted by `akl_w`."""
    p = tl.exp(lp)
    q = tl.exp(lq)
    if DIVERGENCE == SKEW_KL or DIVERGENCE == SKEW_REVERSE_KL or DIVERGENCE == AB:
        term, qg = research_terms(lp, lq, p, q, beta, param2, True, DIVERGENCE)
        if DIVERGENCE == SKEW_REVERSE_KL:
            qg += q  # the "+ q" research_terms leaves out: a sparse student may not sum to 1
    elif DIVERGENCE == AKL:
        term = tl.where(p > 0, p * (lp - lq), 0.0)
        qg = -akl_w * p + (1.0 - akl_w) * tl.where(q > 0, q * (lq - lp + 1.0), 0.0)
    elif DIVERGENCE == FORWARD_KL:
        term = tl.where(p > 0, p * (lp - lq), 0.0)
        qg = -p
    elif DIVERGENCE == REVERSE_KL:
        term = tl.where(q > 0, q * (lq - lp), 0.0)
        qg = tl.where(q > 0, q * (lq - lp + 1.0), 0.0)
    elif DIVERGENCE == JSD:
        lm = _log_mixture(lp, lq, log_b, log_1mb)
        kq = tl.where(q > 0, q * (lq - lm), 0.0)
        term = beta * tl.where(p > 0, p * (lp - lm), 0.0) + (1.0 - beta) * kq
        qg = (1.0 - beta) * kq
    else:
        tl.static_assert(DIVERGENCE == TVD)
        term = 0.5 * tl.abs(q - p)
        qg = q * tl.where(q > p, 0.5, tl.where(q < p, -0.5, 0.0))
    return term, qg


@triton.jit
def _akl_classes(lp, lq, on, lp_rest, lq_rest, head_mass):
    """AKL over the coarse classes: (forward-KL weight w, the reverse KL). The head: the
    classes with less than head_mass strictly above them (the rest class is one)."""
    p = tl.where(on, tl.exp(lp), 0.0)
    q = tl.where(on, tl.exp(lq), 0.0)
    p_r = tl.exp(lp_rest)
    q_r = tl.exp(lq_rest)
    above = tl.sum(tl.where(p[None, :] > p[:, None], p[None, :], 0.0), 1) \
        + tl.where(p_r > p, p_r, 0.0)
    above_r = tl.sum(tl.where(p > p_r, p, 0.0), 0)
    every = head_mass >= 1.0
    head = (above < head_mass) | every
    head_r = (above_r < head_mass) | every
    gap = tl.where(on, tl.abs(p - q), 0.0)
    gap_r = tl.abs(p_r - q_r)
    g_head = tl.sum(tl.where(head, gap, 0.0), 0) + tl.where(head_r, gap_r, 0.0)
    total = tl.sum(gap, 0) + gap_r
    w = tl.where(total > 0, g_head / tl.where(total > 0, total, 1.0), 0.5)
    rkl = tl.sum(tl.where(on & (q > 0), q * (lq - lp), 0.0), 0) \
        + tl.where(q_r > 0, q_r * (lq_rest - lp_rest), 0.0)
    return w, rkl


@triton.jit
def sparse_kd_kernel(
    s_ptr, idx_ptr, tlp_ptr, valid_ptr, labels_ptr, loss_ptr, grad_ptr, row_scale_ptr,
    s_stride, vocab, k,
    temperature, ratio, beta, param2, interp, hard_weight, soft_coef,
    DIVERGENCE: tl.constexpr,
    TAIL: tl.constexpr,
    HAS_INTERP: tl.constexpr,
    HAS_VALID: tl.constexpr,
    HAS_HARD: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr,
    HAS_ROW_SCALE: tl.constexpr,
    BLOCK: tl.constexpr,
    KP: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    inv_t = 1.0 / temperature
    row_ok = tl.full([], 1, tl.int32) != 0
    if HAS_VALID:
        row_ok = tl.load(valid_ptr + row).to(tl.int32) != 0
    n = tl.where(row_ok, vocab, 0)
    s_row = s_ptr + row * s_stride
    offs = tl.arange(0, BLOCK)
    label = 0
    if HAS_HARD:
        label = tl.load(labels_ptr + row)

    # Pass 1: the row maximum. Pass 2: sum exp(z - M) in fp64 (+ T=1 sum, z at the label).
    m_lane = tl.full([BLOCK], NEG_INF, tl.float32)
    for start in range(0, n, BLOCK):
        cols = start + offs
        x = tl.load(s_row + cols, mask=cols < n, other=NEG_INF).to(tl.float32)
        m_lane = tl.maximum(m_lane, x * inv_t)
    M = tl.max(m_lane, 0)
    s_lane = tl.zeros([BLOCK], tl.float64)
    s1_lane = tl.zeros([BLOCK], tl.float32)
    zy_lane = tl.zeros([BLOCK], tl.float32)
    for start in range(0, n, BLOCK):
        cols = start + offs
        z = tl.load(s_row + cols, mask=cols < n, other=NEG_INF).to(tl.float32) * inv_t
        s_lane += tl.exp(z - M).to(tl.float64)
        if HAS_HARD:
            s1_lane += tl.exp((z - M) * temperature)
            zy_lane += tl.where(cols == label, z, 0.0)
    s_all = tl.sum(s_lane, 0)
    log_s = tl.log(s_all.to(tl.float32))

    # The targets: ids (-1 = padding; ids >= V make the row NaN), teacher log-probabilities.
    slots = tl.arange(0, KP)
    ids = tl.load(idx_ptr + row * k + slots, mask=slots < k, other=-1)
    ids = tl.where(row_ok, ids, -1)  # an ignored row reads no target
    ids_ok = tl.sum(tl.where(ids >= vocab, 1, 0), 0) == 0
    on = (ids >= 0) & (ids < vocab)
    n_sup = tl.sum(tl.where(on, 1, 0), 0)
    lt = tl.load(tlp_ptr + row * k + slots, mask=on, other=NEG_INF).to(tl.float32)
    z_sup = tl.load(s_row + ids, mask=on, other=NEG_INF).to(tl.float32) * inv_t
    e_sup = tl.where(on, tl.exp(z_sup - M), 0.0)

    # Teacher classes, re-tempered by ratio = T_source / T. A bucket row whose support is the
    # whole vocabulary has no rest class (its would-be mass is rounding residue).
    has_rest = n_sup < vocab
    if TAIL != BUCKET:
        has_rest = n_sup < 0
    covered = _lse(lt)
    r0 = tl.where(covered < 0, -_expm1(tl.minimum(covered, 0.0)), 0.0)
    # Guarded by a select, not by max(r0, tiny): a Python float below fp32's normal range
    # is an fp64 constant to Triton 3.6, which would turn the whole chain fp64.
    lp_rest = tl.where(has_rest & (r0 > 0), tl.log(tl.where(r0 > 0, r0, 1.0)), NEG_INF)
    renormalise = (ratio != 1.0) | ((n_sup == vocab) & (n_sup >= 0))
    if TAIL == RENORM or TAIL == SUPPORT:
        renormalise = n_sup >= 0
    lw = lt * ratio
    lw_rest = lp_rest * ratio
    hi = tl.maximum(tl.max(lw, 0), lw_rest)
    tot = tl.sum(tl.where(lw == NEG_INF, 0.0, tl.exp(lw - hi)), 0) + tl.where(
        lw_rest == NEG_INF, 0.0, tl.exp(lw_rest - hi))
    norm = tl.where(hi == NEG_INF, 0.0, hi + tl.log(tot))
    lp = tl.where(renormalise, lw - norm, lt)
    lp_rest = tl.where(renormalise, lw_rest - norm, lp_rest)

    # Student classes. The rest's mass is sum_all - sum_support in fp64: exact, because the
    # support terms are bit-identical to the ones pass 2 added.
    if TAIL == SUPPORT:
        lq = z_sup - _lse(z_sup)
    else:
        lq = tl.where(on, (z_sup - M) - log_s, NEG_INF)
    s_rest = (s_all - tl.sum(e_sup.to(tl.float64), 0)).to(tl.float32)
    shift = tl.zeros([], tl.float32)  # the rest's sum s_rest is at base = M + shift
    base = M
    if TAIL == BUCKET:
        if has_rest & (s_rest < REST_FLOOR * s_all.to(tl.float32)):
            m_r, s_rest = _rest_at_own_max(s_row, n, inv_t, idx_ptr + row * k, k, 0, ids, on,
                                           z_sup, BLOCK)
            shift = tl.where(m_r == NEG_INF, 0.0, m_r - M)
            base = tl.where(m_r == NEG_INF, M, m_r)  # exactly, not M + shift (rounded)
    lq_rest = tl.where(has_rest & (s_rest > 0), (shift + tl.log(s_rest)) - log_s, NEG_INF)

    if HAS_INTERP:  # TAID over the classes: the target moves from the student
        lp = tl.where(interp == 0.0, lq, taid_logit(lq, lp, interp))
        lp_rest = tl.where(interp == 0.0, lq_rest, taid_logit(lq_rest, lp_rest, interp))
        hi = tl.maximum(tl.max(tl.where(on, lp, NEG_INF), 0), lp_rest)
        tot = tl.sum(tl.where(on & (lp != NEG_INF), tl.exp(lp - hi), 0.0), 0) + tl.where(
            lp_rest == NEG_INF, 0.0, tl.exp(lp_rest - hi))
        norm = tl.where(hi == NEG_INF, 0.0, hi + tl.log(tot))
        lp = lp - norm
        lp_rest = lp_rest - norm

    log_b = 0.0
    log_1mb = 0.0
    if DIVERGENCE == JSD or DIVERGENCE == SKEW_KL or DIVERGENCE == SKEW_REVERSE_KL:
        log_b = tl.log(beta)
        log_1mb = tl.log(1.0 - beta)
    akl_w = 0.0
    rkl = 0.0
    if DIVERGENCE == AKL:
        akl_w, rkl = _akl_classes(lp, lq, on, lp_rest, lq_rest, beta)
    term, qg = _class_terms(lp, lq, beta, param2, log_b, log_1mb, akl_w, DIVERGENCE)
    term_r, qg_r = _class_terms(lp_rest, lq_rest, beta, param2, log_b, log_1mb, akl_w,
                                DIVERGENCE)
    div = tl.sum(tl.where(on, term, 0.0), 0) + term_r
    if DIVERGENCE == AKL:
        div = akl_w * div + (1.0 - akl_w) * rkl
    sum_qg = tl.sum(tl.where(on, qg, 0.0), 0) + qg_r

    loss = soft_coef * tl.where(ids_ok, div, float("nan"))
    log_s1 = 0.0
    ok = ids_ok
    if HAS_HARD:
        log_s1 = tl.log(tl.sum(s1_lane, 0))
        found = (label >= 0) & (label < vocab)
        ok = ok & found
        ce = (M - tl.sum(zy_lane, 0)) * temperature + log_s1
        loss += hard_weight * tl.where(found, ce, float("nan"))
    tl.static_assert(loss.dtype == tl.float32, "the sparse loss must stay fp32")
    tl.store(loss_ptr + row, tl.where(row_ok, loss, 0.0))

    if COMPUTE_GRAD:
        g_row = grad_ptr + row * vocab
        coef = soft_coef * inv_t
        hard = hard_weight
        if HAS_ROW_SCALE:  # the reduction's weight, applied here instead of in backward
            rs = tl.load(row_scale_ptr)
            coef *= rs
            hard *= rs
        # Off the support: dL/dz_j = e_j * off, e_j = exp(z_j - base) (q_j = e_j
        # exp(shift) / s_all, q_j / q_rest = e_j / s_rest).
        off = 0.0
        if TAIL != SUPPORT:
            off = -sum_qg / s_all.to(tl.float32)
        if TAIL == BUCKET:
            off = off * tl.exp(shift) + tl.where(s_rest > 0, qg_r / s_rest, 0.0)
        for start in range(0, vocab, BLOCK):
            cols = start + offs
            inb = cols < n
            z = tl.load(s_row + cols, mask=inb, other=NEG_INF).to(tl.float32) * inv_t
            gz = coef * tl.exp(z - base) * off
            if HAS_HARD:
                sm1 = tl.exp((z - M) * temperature - log_s1)
                gz += hard * (sm1 - tl.where(cols == label, 1.0, 0.0))
            gz = tl.where(ok, gz, float("nan"))
            gz = tl.where(inb, gz, 0.0)
            tl.store(g_row + cols, cast_rne(gz, grad_ptr.dtype.element_ty), mask=cols < vocab)
        # The support ids' own gradient, over what the loop wrote (same program: a barrier
        # orders the two stores).
        tl.debug_barrier()
        # q_hat * g is what _class_terms returned (forward KL's -p stays finite where q_hat
        # underflows); the support's q_j is its q_hat.
        gs = coef * (qg - tl.exp(lq) * sum_qg)
        if HAS_HARD:
            sm1 = tl.exp((z_sup - M) * temperature - log_s1)
            gs += hard * (sm1 - tl.where(ids == label, 1.0, 0.0))
        gs = tl.where(ok, gs, float("nan"))
        tl.store(g_row + ids, cast_rne(gs, grad_ptr.dtype.element_ty), mask=on)


def launch_config(vocab: int, k: int) -> tuple[int, int, int]:
    """(BLOCK, KP, num_warps) for a row of `vocab` columns and k targets."""
    block = min(2048, max(128, triton.next_power_of_2(vocab)))
    return block, max(16, triton.next_power_of_2(k)), max(4, min(8, block // 256))


_SPARSE_TUNED = tuning.tuned(sparse_kd_kernel, ["vocab", "k", "DIVERGENCE", "TAIL",
                                              "HAS_HARD", "COMPUTE_GRAD"])


def sparse_kd_forward(student, indices, teacher_logprobs, valid, labels, divergence, tail,
                      temperature, source_temperature, beta, param2, interp, hard_weight,
                      soft_coef, compute_grad, grad_dtype=None, row_scale=None):
    """Launch sparse_kd_kernel: (loss [N] fp32, grad [N, V] in the student's dtype or
    `grad_dtype`, times `row_scale` (a 0-dim fp32 tensor) when given, or an empty tensor)."""
    n, vocab = student.shape
    k = indices.shape[1]
    loss, grad = fused_outputs(student, False, compute_grad, grad_dtype)
    if n == 0:
        return loss, grad
    block, kp, num_warps = launch_config(vocab, k)
    if tuning.enabled(student):
        kernel, meta = _SPARSE_TUNED, {}
    else:
        kernel, meta = sparse_kd_kernel, {"BLOCK": block, "num_warps": num_warps}
    with _device_ctx(student):
        kernel[(n,)](
            student, indices, teacher_logprobs,
            valid.view(torch.uint8) if valid is not None else loss,
            labels if labels is not None else loss,
            loss, grad if compute_grad else loss,
            row_scale if row_scale is not None else loss,
            student.stride(0), vocab, k,
            temperature, source_temperature / temperature, beta, param2, interp, hard_weight,
            soft_coef, DIVERGENCE=divergence, TAIL=tail, HAS_INTERP=interp != 1.0,
            HAS_VALID=valid is not None,
            HAS_HARD=hard_weight != 0.0, COMPUTE_GRAD=compute_grad,
            HAS_ROW_SCALE=row_scale is not None, KP=kp,
            enable_fp_fusion=False, **meta,
        )
    return loss, grad
