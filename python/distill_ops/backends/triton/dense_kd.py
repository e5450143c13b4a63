"""Triton kernels of the dense KD loss: one program per row, fused forward and gradient.

Pass 1 reads both rows once for the softmax statistics: each step of BLOCK logits is read as
groups of G = 8 neighbours (one thread's 16-byte load), and each group keeps an online
max/sum (no cross-thread reduction inside the loop); forward and reverse KL also accumulate
their cross term there, centred on the running maxima of both rows (see `_cross_shift`), so
their loss needs no second read. Jensen-Shannon and TVD need the normalised distributions for
their loss, so they make one more read. The last pass recomputes q and p and writes the
gradient in the student's dtype.

Every exponential is one `ex2` of x * log2(e) (`tl.exp` costs five instructions: a
multiply and a denormal range fix around the ex2), and a group's running maximum moves once
per step, not once per logit, so pass 1 needs one ex2 per logit and side instead of two.
The logits themselves stay in natural units: z = f(x) / T rounds exactly as PyTorch's does,
and differences near the maximum (z - M) are exact, so the fp32 error stays torch's even at
logits of 1e4 (logits pre-scaled to base 2 round at a coarser grid there). JSD's log of the
mixture is one `lg2.approx` on a GPU.

Byte account per logit (s, t: student and teacher rows; g: the gradient), against the floor
of three transfers (read s, read t, write g):
- forward / reverse KL: read s, t (statistics), read s, t again and write g: 5 transfers;
- JSD / TVD: one more read of s and t for the loss: 7 transfers;
- backward: `scale_rows_kernel` reads and writes g by grad_output: 2 more transfers, none
  for a plain `loss.backward()` (the forward applied the reduction's weight; _fused.py).
The second read of a row hits L2 only when the rows in flight fit in it (V = 128256 bf16 is
513 KB a row pair: ~100 programs in flight fill the H200's 60 MB).

Instruction account (sm_90, bf16, V = 128256, `python -m distill_ops.backends.triton.isa`): per
logit, pass 1 issues 24 instructions and 2.25 ex2 (66 and 4 before the per-group form and
the one-ex2 exponential), the gradient pass 25 and 2 (31 and 2); on an H200 each loop now
issues faster than its bytes arrive (tests/test_triton_isa.py holds that for every loop of
every divergence; bench/results/isa-2026-11-29.md has the tables).
"""

from __future__ import annotations

import contextlib
import dataclasses

import torch
import triton
import triton.language as tl

from ..extension import fused_outputs
from . import tuning
from .akl import akl_sums, akl_threshold
from .elementwise import (
    AB,
    AKL,
    FORWARD_KL,
    JSD,
    LN2,
    MIX_FLOOR,
    REVERSE_KL,
    SKEW_KL,
    SKEW_REVERSE_KL,
    TVD,
    _exp,
    _fast_log2,
    ab_fast,
    ab_fast_terms,
    research_terms,
)
from .rows import _load_z, _load_zt, _log_probs, cast_rne, transform_grad

FLT_MAX: tl.constexpr = tl.constexpr(3.4028234663852886e38)
# Pass 1's group width: one thread's vector of bf16 logits (16 bytes).
G: tl.constexpr = tl.constexpr(8)



@triton.jit
def _group_online(m, z):
    """One step of the running log-sum-exp of each group of G neighbouring logits.

    m [R]: the groups' running maxima, finite (they start at -FLT_MAX, so no -inf - -inf);
    z [R, G]: the step's logits, -inf allowed. Returns (new maxima, the factor e^(m - m')
    that rescales the old sums, e^(z - m') per element): one ex2 per logit plus one per
    group, where a per-logit running maximum needs two."""
    m_new = tl.maximum(m, tl.max(z, 1))
    alpha = _exp(m - m_new)
    e = _exp(z - m_new[:, None])
    return m_new, alpha, e


@triton.jit
def _cross_shift(c, a_w, f_w, d_w, d_o):
    """The centred KL cross term moved to new maxima (kd_math.h: OnlineKL).

    c = sum_j e_j u_j with e_j = exp(zw_j - mw) of the weighting side w (teacher for forward
    KL, student for reverse KL) and u_j = (zw_j - mw) - (zo_j - mo). When the maxima move by
    d_w and d_o every u_j moves by d_o - d_w and every e_j scales by f_w. Accumulating the raw
    zw_j - zo_j instead and subtracting mw - mo at the end cancels catastrophically for large
    logits and a small divergence (2e-5 of the loss, 3e-4 of the gradient at +-1e4). An
    infinite c (a logit the other side masks) stays infinite."""
    shifted = f_w * (c + a_w * (d_o - d_w))
    return tl.where(c == float("inf"), c, tl.where(a_w > 0, shifted, 0.0))


@triton.jit
def _cross_terms(e_w, zw, mw, zo, mo):
    """sum over each group of e_w * u; +inf where the other side is -inf and e_w > 0."""
    u = (zw - mw[:, None]) - (zo - mo[:, None])
    return tl.sum(tl.where(e_w > 0, e_w * u, 0.0), 1)


@triton.jit
def _row_weights(m):
    """Weights e^(m - max m) that fold the groups' sums into one row sum, and the maximum."""
    m_row = tl.max(m, 0)
    return m_row, tl.where(m == m_row, 1.0, _exp(m - m_row))


@triton.jit
def row_statistics(s_row, t_row, n, label, temperature, scale_s, cap_s, scale_t, cap_t, inv_t,
                   interp, DIVERGENCE: tl.constexpr, HAS_CAP_S: tl.constexpr,
                   HAS_CAP_T: tl.constexpr, HAS_INTERP: tl.constexpr, HAS_HARD: tl.constexpr,
                   BLOCK: tl.constexpr):
    """Pass 1 over the columns < n of one row: (M_s, S_s, M_t, S_t, C, S_1, z_y).

    M = max z (-FLT_MAX where the row holds nothing), S = sum_j exp(z_j - M) of each side;
    C = sum_j e_w,j ((zw_j - M_w) - (zo_j - M_o)), the KL cross term centred on the row maxima
    (forward / reverse KL only, else 0); S_1 = sum_j exp((z_s,j - M_s) T), the student's sum
    at T = 1, and z_y = z_s at the column `label` (hard term only, else 0). A step reads R
    groups of G neighbouring logits (one thread's vector load), each group with its own
    online maximum and sums, folded into the row's at the end."""
    R: tl.constexpr = BLOCK // G
    goffs = tl.arange(0, R)[:, None] * G + tl.arange(0, G)[None, :]
    m_s = tl.full([R], -FLT_MAX, tl.float32)
    m_t = tl.full([R], -FLT_MAX, tl.float32)
    a_s = tl.zeros([R], tl.float32)
    a_t = tl.zeros([R], tl.float32)
    cross = tl.zeros([R], tl.float32)
    a_1 = tl.zeros([R], tl.float32)
    z_y = tl.zeros([R], tl.float32)
    for start in range(0, n, BLOCK):
        cols = start + goffs
        zs = _load_z(s_row, cols, n, scale_s, cap_s, inv_t, HAS_CAP_S)
        zt = _load_zt(t_row, cols, n, scale_t, cap_t, inv_t, zs, interp, HAS_CAP_T, HAS_INTERP)
        ms_new, alpha_s, e_s = _group_online(m_s, zs)
        mt_new, alpha_t, e_t = _group_online(m_t, zt)
        if DIVERGENCE == FORWARD_KL:
            cross = _cross_shift(cross, a_t, alpha_t, mt_new - m_t, ms_new - m_s) \
                + _cross_terms(e_t, zt, mt_new, zs, ms_new)
        if DIVERGENCE == REVERSE_KL:
            cross = _cross_shift(cross, a_s, alpha_s, ms_new - m_s, mt_new - m_t) \
                + _cross_terms(e_s, zs, ms_new, zt, mt_new)
        if HAS_HARD:
            # The student's sums at T = 1 (logits z * T): the same maxima, scaled.
            alpha_1 = _exp((m_s - ms_new) * temperature)
            e_1 = _exp((zs - ms_new[:, None]) * temperature)
            a_1 = a_1 * alpha_1 + tl.sum(e_1, 1)
            z_y += tl.sum(tl.where(cols == label, zs, 0.0), 1)
        a_s = a_s * alpha_s + tl.sum(e_s, 1)
        a_t = a_t * alpha_t + tl.sum(e_t, 1)
        m_s = ms_new
        m_t = mt_new

    M_s, w_s = _row_weights(m_s)
    M_t, w_t = _row_weights(m_t)
    c_row = 0.0
    # Groups' cross terms moved to the row maxima (w_* = e^(m_group - M) are the scalings).
    if DIVERGENCE == FORWARD_KL:
        c_row = tl.sum(_cross_shift(cross, a_t, w_t, M_t - m_t, M_s - m_s), 0)
    if DIVERGENCE == REVERSE_KL:
        c_row = tl.sum(_cross_shift(cross, a_s, w_s, M_s - m_s, M_t - m_t), 0)
    sum_1 = 0.0
    if HAS_HARD:
        _, w_1 = _row_weights(m_s * temperature)
        sum_1 = tl.sum(a_1 * w_1, 0)
    return (M_s, tl.sum(a_s * w_s, 0), M_t, tl.sum(a_t * w_t, 0), c_row, sum_1,
            tl.sum(z_y, 0))


@triton.jit
def _loss_loop(s_row, t_row, n, scale_s, cap_s, scale_t, cap_t, inv_t, interp, M_s, log_ss,
               M_t, log_st, beta, param2, DIVERGENCE: tl.constexpr, HAS_CAP_S: tl.constexpr,
               HAS_CAP_T: tl.constexpr, HAS_INTERP: tl.constexpr, AB_FAST: tl.constexpr,
               BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    acc_a = tl.zeros([BLOCK], tl.float32)
    acc_b = tl.zeros([BLOCK], tl.float32)
    for start in range(0, n, BLOCK):
        cols = start + offs
        _zs, lq, lp = _log_probs(s_row, t_row, cols, n, scale_s, cap_s, scale_t, cap_t,
                                inv_t, interp, M_s, log_ss, M_t, log_st, HAS_CAP_S,
                                HAS_CAP_T, HAS_INTERP)
        if DIVERGENCE == JSD or DIVERGENCE == TVD:
            q = _exp(lq)
            p = _exp(lp)
            if DIVERGENCE == JSD:
                lm = LN2 * _fast_log2(tl.maximum(beta * p + (1.0 - beta) * q, MIX_FLOOR))
                acc_a += tl.where(p > 0, p * (lp - lm), 0.0)
                acc_b += tl.where(q > 0, q * (lq - lm), 0.0)
            else:
                acc_a += tl.abs(q - p)
                acc_b += q * tl.where(q > p, 0.5, tl.where(q < p, -0.5, 0.0))
        else:
            if AB_FAST:
                term, h = ab_fast_terms(lp, lq, beta, param2)
            else:
                term, h = research_terms(lp, lq, _exp(lp), _exp(lq), beta, param2, True,
                                         DIVERGENCE)
            acc_a += term
            acc_b += h
    a_sum = tl.sum(acc_a, 0)
    b_sum = tl.sum(acc_b, 0)
    if AB_FAST:  # ab_fast_terms' sums are a b A and a B
        a_sum = a_sum * (1.0 / (beta * param2))
        b_sum = b_sum * (1.0 / beta)
    return a_sum, b_sum


@triton.jit
def loss_sums(s_row, t_row, n, scale_s, cap_s, scale_t, cap_t, inv_t, interp, M_s, log_ss,
              M_t, log_st, beta, param2, DIVERGENCE: tl.constexpr, HAS_CAP_S: tl.constexpr,
              HAS_CAP_T: tl.constexpr, HAS_INTERP: tl.constexpr, BLOCK: tl.constexpr):
    """Pass 2 of the divergences whose loss needs the normalised distributions: (A, B) over
    the columns < n. JSD: A = sum p log(p/m), B = sum q log(q/m); TVD: A = sum |q - p|,
    B = sum q sign(q - p) / 2; skew KLs and AB: A = sum of the loss terms, B = sum_j h_j
    (h = dL/dlog q). `combine_sums` turns them into the divergence and the gradient's sum.
    AB branches once on its parameters (elementwise.ab_fast) between two loops."""
    if DIVERGENCE == AB:
        if ab_fast(beta, param2):
            a, b = _loss_loop(s_row, t_row, n, scale_s, cap_s, scale_t, cap_t, inv_t, interp,
                              M_s, log_ss, M_t, log_st, beta, param2, DIVERGENCE, HAS_CAP_S,
                              HAS_CAP_T, HAS_INTERP, True, BLOCK)
        else:
            a, b = _loss_loop(s_row, t_row, n, scale_s, cap_s, scale_t, cap_t, inv_t, interp,
                              M_s, log_ss, M_t, log_st, beta, param2, DIVERGENCE, HAS_CAP_S,
                              HAS_CAP_T, HAS_INTERP, False, BLOCK)
    else:
        a, b = _loss_loop(s_row, t_row, n, scale_s, cap_s, scale_t, cap_t, inv_t, interp,
                          M_s, log_ss, M_t, log_st, beta, param2, DIVERGENCE, HAS_CAP_S,
                          HAS_CAP_T, HAS_INTERP, False, BLOCK)
    return a, b


@triton.jit
def combine_sums(a, b, beta, DIVERGENCE: tl.constexpr):
    """(divergence, sum_j q_j g_j of its gradient) from loss_sums' (A, B), summed over the
    whole row (over every rank's slice when the vocabulary is split)."""
    if DIVERGENCE == JSD:
        div = beta * a + (1.0 - beta) * b
        sum_qg = (1.0 - beta) * b
    elif DIVERGENCE == TVD:
        div = 0.5 * a
        sum_qg = b
    else:
        div = a
        sum_qg = b
    return div, sum_qg


@triton.jit
def soft_grad(lq, lp, div, sum_qg, akl_w, beta, param2, DIVERGENCE: tl.constexpr):
    """d divergence / d z_s per element (times T), given the row's divergence, sum_qg and
    AKL's head weight."""
    q = _exp(lq)
    if DIVERGENCE == FORWARD_KL:
        d = q - _exp(lp)
    if DIVERGENCE == REVERSE_KL:
        d = tl.where(q > 0, q * ((lq - lp) - div), 0.0)
    if DIVERGENCE == JSD:
        p = _exp(lp)
        lm = LN2 * _fast_log2(tl.maximum(beta * p + (1.0 - beta) * q, MIX_FLOOR))
        g = tl.where(q > 0, (1.0 - beta) * (lq - lm), 0.0)
        d = q * (g - sum_qg)
    if DIVERGENCE == TVD:
        p = _exp(lp)
        d = q * (tl.where(q > p, 0.5, tl.where(q < p, -0.5, 0.0)) - sum_qg)
    if DIVERGENCE == SKEW_KL or DIVERGENCE == SKEW_REVERSE_KL or DIVERGENCE == AB:
        _term, h = research_terms(lp, lq, _exp(lp), q, beta, param2, False, DIVERGENCE)
        d = h - q * sum_qg
    if DIVERGENCE == AKL:
        d = akl_w * (q - _exp(lp)) \
            + (1.0 - akl_w) * tl.where(q > 0, q * ((lq - lp) - sum_qg), 0.0)
    return d


@triton.jit
def store_grad(g_row, cols, n, grad_cols, zs, d, coef, hard, M_s, log_s1, label, temperature,
               scale_s, cap_s, HAS_HARD: tl.constexpr, HAS_CAP_S: tl.constexpr,
               CHECK_LABEL: tl.constexpr, found):
    """dL/dx of a block: coef * d plus the hard term's softmax-at-T=1 minus its one-hot, times
    f'(x) / T's factor; 0 at columns >= n (< grad_cols), NaN rows where a checked label is
    not found; written in the gradient's dtype."""
    gz = coef * d
    if HAS_HARD:
        sm1 = _exp((zs - M_s) * temperature - log_s1)
        gz += hard * (sm1 - tl.where(cols == label, 1.0, 0.0))
        if CHECK_LABEL:
            gz = tl.where(found, gz, float("nan"))
    gx = gz * transform_grad(zs, scale_s, cap_s, temperature, HAS_CAP_S)
    gx = tl.where(cols < n, gx, 0.0)
    tl.store(g_row + cols, cast_rne(gx, g_row.dtype.element_ty), mask=cols < grad_cols)


@triton.jit
def dense_kd_kernel(
    s_ptr, t_ptr, valid_ptr, labels_ptr, loss_ptr, grad_ptr, row_scale_ptr,
    s_stride, t_stride, g_stride, vocab, grad_cols,
    temperature, beta, scale_s, cap_s, scale_t, cap_t, hard_weight, soft_coef, param2, interp,
    DIVERGENCE: tl.constexpr,
    HAS_CAP_S: tl.constexpr,
    HAS_CAP_T: tl.constexpr,
    HAS_INTERP: tl.constexpr,
    HAS_VALID: tl.constexpr,
    HAS_HARD: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr,
    HAS_ROW_SCALE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    inv_t = 1.0 / temperature
    n = vocab
    if HAS_VALID:
        # An ignored row reads nothing: its loops run over zero columns.
        n = tl.where(tl.load(valid_ptr + row) != 0, vocab, 0)
    s_row = s_ptr + row * s_stride
    t_row = t_ptr + row * t_stride
    offs = tl.arange(0, BLOCK)
    label = 0
    if HAS_HARD:
        label = tl.load(labels_ptr + row)

    # Pass 1: per-group online softmax statistics (+ KL cross terms, + T=1 sums).
    M_s, sum_s, M_t, sum_t, c_row, sum_1, z_y = row_statistics(
        s_row, t_row, n, label, temperature, scale_s, cap_s, scale_t, cap_t, inv_t, interp,
        DIVERGENCE, HAS_CAP_S, HAS_CAP_T, HAS_INTERP, HAS_HARD, BLOCK)
    log_ss = tl.log(sum_s)
    log_st = tl.log(sum_t)

    div = 0.0
    sum_qg = 0.0
    if DIVERGENCE == FORWARD_KL:
        div = c_row / sum_t - log_st + log_ss
    if DIVERGENCE == REVERSE_KL:
        div = c_row / sum_s - log_ss + log_st
    if DIVERGENCE != FORWARD_KL and DIVERGENCE != REVERSE_KL and DIVERGENCE != AKL:
        # Pass 2: the loss and sum_j q_j g_j (h_j = dL/dlog q_j) need the normalised
        # distributions.
        a, b = loss_sums(s_row, t_row, n, scale_s, cap_s, scale_t, cap_t, inv_t, interp, M_s,
                         log_ss, M_t, log_st, beta, param2, DIVERGENCE, HAS_CAP_S, HAS_CAP_T,
                         HAS_INTERP, BLOCK)
        div, sum_qg = combine_sums(a, b, beta, DIVERGENCE)
    akl_w = 0.0
    if DIVERGENCE == AKL:
        # The head threshold (akl.py), then pass 2: both KLs and the head's and tail's
        # sum |p - q|. A 16-bit teacher with neither softcap nor TAID is searched over its
        # own logits' 2^16 values.
        KEY16 = (t_ptr.dtype.element_ty.primitive_bitwidth == 16) and (not HAS_CAP_T) \
            and (not HAS_INTERP)
        tau = akl_threshold(s_row, t_row, n, beta, scale_s, cap_s, scale_t, cap_t, inv_t,
                            interp, M_t, log_st, HAS_CAP_S, HAS_CAP_T, HAS_INTERP, KEY16, BLOCK)
        fkl, rkl, g_head, g_tail = akl_sums(s_row, t_row, n, tau, scale_s, cap_s, scale_t,
                                            cap_t, inv_t, interp, M_s, log_ss, M_t, log_st,
                                            HAS_CAP_S, HAS_CAP_T, HAS_INTERP, KEY16, BLOCK)
        total = g_head + g_tail
        akl_w = tl.where(total > 0, g_head / tl.where(total > 0, total, 1.0), 0.5)
        sum_qg = rkl
        div = akl_w * fkl + (1.0 - akl_w) * sum_qg

    loss = soft_coef * div
    # A NaN or +inf logit makes its side's sum NaN, and the row's loss NaN whatever the
    # divergence's own guards (0 * log 0) would hide; the op layer turns a NaN row loss into
    # a NaN gradient row (autograd.propagate_nan_rows).
    loss = tl.where((log_ss != log_ss) | (log_st != log_st), float("nan"), loss)
    log_s1 = 0.0
    found = True
    if HAS_HARD:
        # Cross-entropy at T = 1 on f(x) = z * T.
        log_s1 = tl.log(sum_1)
        found = (label >= 0) & (label < vocab)
        ce = (M_s - z_y) * temperature + log_s1
        loss += hard_weight * tl.where(found, ce, float("nan"))
    if HAS_VALID:
        loss = tl.where(n > 0, loss, 0.0)
    tl.store(loss_ptr + row, loss)

    if COMPUTE_GRAD:
        g_row = grad_ptr + row * g_stride
        coef = soft_coef * inv_t
        hard = hard_weight
        if HAS_ROW_SCALE:  # the reduction's weight, applied here instead of in backward
            rs = tl.load(row_scale_ptr)
            coef *= rs
            hard *= rs
        for start in range(0, grad_cols, BLOCK):
            cols = start + offs
            zs, lq, lp = _log_probs(s_row, t_row, cols, n, scale_s, cap_s, scale_t, cap_t,
                                    inv_t, interp, M_s, log_ss, M_t, log_st, HAS_CAP_S,
                                    HAS_CAP_T, HAS_INTERP)
            d = soft_grad(lq, lp, div, sum_qg, akl_w, beta, param2, DIVERGENCE)
            store_grad(g_row, cols, n, grad_cols, zs, d, coef, hard, M_s, log_s1, label,
                       temperature, scale_s, cap_s, HAS_HARD, HAS_CAP_S, True, found)


@triton.jit
def scale_rows_kernel(g_ptr, scale_ptr, scale_stride, n_cols, BLOCK: tl.constexpr):
    """g[r, :] *= scale[r] in place: the backward of every fused loss. A factor of exactly 1
    (a plain loss.backward() after the forward applied the reduction's weight) leaves the
    row as it is: no bytes move."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    inb = cols < n_cols
    c = tl.load(scale_ptr + row * scale_stride).to(tl.float32)
    if c != 1.0:
        g = tl.load(g_ptr + row * n_cols + cols, mask=inb, other=0.0).to(tl.float32)
        tl.store(g_ptr + row * n_cols + cols, cast_rne(g * c, g_ptr.dtype.element_ty), mask=inb)


def launch_config(vocab: int) -> tuple[int, int]:
    """(BLOCK, num_warps) for a row of `vocab` columns."""
    block = min(4096, max(128, triton.next_power_of_2(vocab)))
    return block, max(4, min(16, block // 256))


def _device_ctx(t: torch.Tensor):
    # Triton launches on the current device: make it the tensors' one.
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


_DENSE_TUNED = tuning.tuned(dense_kd_kernel, ["vocab", "DIVERGENCE", "HAS_HARD",
                                            "COMPUTE_GRAD"])


def dense_kd_forward(student, teacher, valid, labels, sc, vocab: int, compute_grad: bool,
                     grad_dtype: torch.dtype | None = None, row_scale=None):
    """Launch dense_kd_kernel: returns (loss [N] fp32, grad [N, V_s] in the student's dtype or
    `grad_dtype`, times `row_scale` (a 0-dim fp32 tensor) when given, or an empty tensor)."""
    n, grad_cols = student.shape
    loss, grad = fused_outputs(student, False, compute_grad, grad_dtype)
    if n == 0:
        return loss, grad
    if sc.interp == 0.0:  # TAID at t = 0: the target is the student itself
        teacher = student
        sc = dataclasses.replace(sc, teacher_scale=sc.student_scale,
                                 teacher_softcap=sc.student_softcap, interp=1.0)
    if tuning.enabled(student):
        kernel, meta = _DENSE_TUNED, {}
    else:
        block, num_warps = launch_config(vocab)
        kernel, meta = dense_kd_kernel, {"BLOCK": block, "num_warps": num_warps}
    with _device_ctx(student):
        kernel[(n,)](
            student, teacher,
            valid.view(torch.uint8) if valid is not None else loss,
            labels if labels is not None else loss,
            loss, grad if compute_grad else loss,
            row_scale if row_scale is not None else loss,
            student.stride(0), teacher.stride(0), grad_cols, vocab, grad_cols,
            sc.temperature, sc.beta, sc.student_scale, sc.student_softcap, sc.teacher_scale,
            sc.teacher_softcap, sc.hard_weight, sc.soft_coef, sc.param2, sc.interp,
            DIVERGENCE=sc.divergence,
            HAS_CAP_S=sc.student_softcap > 0,
            HAS_CAP_T=sc.teacher_softcap > 0,
            HAS_INTERP=sc.interp != 1.0,
            HAS_VALID=valid is not None,
            HAS_HARD=sc.hard_weight != 0.0,
            COMPUTE_GRAD=compute_grad,
            HAS_ROW_SCALE=row_scale is not None,
            **meta,
        )
    return loss, grad


def scale_rows_(grad, scale):
    """grad *= scale[:, None] in place, computed in fp32 (rows scaled by exactly 1 skipped)."""
    n, n_cols = grad.shape
    if grad.numel() == 0:
        return
    block = min(4096, triton.next_power_of_2(n_cols))
    with _device_ctx(grad):
        scale_rows_kernel[(n, triton.cdiv(n_cols, block))](
            grad, scale, scale.stride(0), n_cols, BLOCK=block, num_warps=4
        )
