"""Triton kernels of the dense KD loss: one program per row, fused forward and gradient.

Pass 1 reads both rows once for the softmax statistics, kept per lane with an online
max/sum (no scalar reduction inside the loop); forward and reverse KL also accumulate their
cross term there, centred on the running maxima of both rows (see `_cross_shift`), so their
loss needs no second read. Jensen-Shannon and TVD need the normalised distributions for
their loss, so they make one more read. The last pass recomputes q and p and writes the
gradient in the student's dtype.

Byte account per logit (s, t: student and teacher rows; g: the gradient), against the floor
of three transfers (read s, read t, write g):
- forward / reverse KL: read s, t (statistics), read s, t again and write g: 5 transfers;
- JSD / TVD: one more read of s and t for the loss: 7 transfers;
- backward: `scale_rows_kernel` reads and writes g by grad_output: 2 more transfers.
The second read of a row hits L2 only when the rows in flight fit in it (V = 128256 bf16 is
513 KB a row pair: ~100 programs in flight fill the H200's 60 MB).
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from .._ext import fused_outputs
from . import tuning

NEG_INF: tl.constexpr = tl.constexpr(float("-inf"))

FORWARD_KL: tl.constexpr = tl.constexpr(0)
REVERSE_KL: tl.constexpr = tl.constexpr(1)
JSD: tl.constexpr = tl.constexpr(2)
TVD: tl.constexpr = tl.constexpr(3)


@triton.jit
def _tanh(y):
    # tanh through exp: exact limits at +-inf; a short odd series near 0 avoids the
    # cancellation of 1 - 2 / (e^{2y} + 1).
    big = 1.0 - 2.0 / (tl.exp(2.0 * y) + 1.0)
    y2 = y * y
    small = y * (1.0 + y2 * (-1.0 / 3.0 + y2 * (2.0 / 15.0)))
    return tl.where(tl.abs(y) < 0.0625, small, big)


@triton.jit
def transform_logits(x, scale, cap, inv_t, HAS_CAP: tl.constexpr):
    """z = f(x) / T; f(x) = cap * tanh(scale * x / cap) or scale * x; -inf stays -inf."""
    x = x.to(tl.float32)
    if HAS_CAP:
        z = tl.where(x == NEG_INF, x, cap * _tanh(x * (scale / cap)) * inv_t)
    else:
        z = x * (scale * inv_t)
    return z


@triton.jit
def transform_grad(z, scale, cap, temperature, HAS_CAP: tl.constexpr):
    """f'(x) written through z = f(x) / T (0 at a masked -inf logit under a softcap)."""
    if HAS_CAP:
        th = z * (temperature / cap)
        g = tl.where(z == NEG_INF, 0.0, scale * (1.0 - th * th))
    else:
        g = tl.zeros_like(z) + scale
    return g


@triton.jit
def cast_rne(x, dtype: tl.constexpr):
    """x (fp32) in `dtype`, rounded to nearest even. GPUs convert to bf16 that way natively;
    spelling it out keeps the interpreter (which truncates) and the GPU bit-identical. An
    fp64 `x` is a compile error under every Triton: it means a constant promoted the maths."""
    tl.static_assert(x.dtype == tl.float32, "cast_rne takes fp32: an fp64 value leaked in")
    if dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        up = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        out = up.to(tl.uint16).to(tl.bfloat16, bitcast=True)
        out = tl.where(x != x, x.to(tl.bfloat16), out)
    else:
        out = x.to(dtype)
    return out


@triton.jit
def _load_z(row_ptr, cols, n, scale, cap, inv_t, HAS_CAP: tl.constexpr):
    """z = f(x) / T of the columns < n of one row (-inf elsewhere)."""
    x = tl.load(row_ptr + cols, mask=cols < n, other=NEG_INF)
    return transform_logits(x, scale, cap, inv_t, HAS_CAP)


@triton.jit
def _online(m, z):
    """One step of a per-lane online logsumexp: returns (new max, rescale factor, exp(z - max))."""
    m_new = tl.maximum(m, z)
    alpha = tl.where(m_new == NEG_INF, 1.0, tl.exp(m - m_new))
    e = tl.where(z == NEG_INF, 0.0, tl.exp(z - m_new))
    return m_new, alpha, e


@triton.jit
def _step(m_old, m_new):
    """m_new - m_old, 0 where equal (-inf to -inf is no move, not NaN)."""
    return tl.where(m_new == m_old, 0.0, m_new - m_old)


@triton.jit
def _cross_shift(c, a_w, f_w, d_w, d_o):
    """The centred KL cross term moved to new maxima (kd_math.h: OnlineKL).

    c = sum_j e_j u_j with e_j = exp(zw_j - mw) of the weighting side w (teacher for forward
    KL, student for reverse KL) and u_j = (zw_j - mw) - (zo_j - mo). When the maxima move by
    d_w and d_o every u_j moves by d_o - d_w and every e_j scales by f_w. Accumulating the raw
    zw_j - zo_j instead and subtracting mw - mo at the end cancels catastrophically for large
    logits and a small divergence (2e-5 of the loss, 3e-4 of the gradient at +-1e4)."""
    return tl.where((a_w > 0) & (f_w > 0), f_w * (c + a_w * (d_o - d_w)), 0.0)


@triton.jit
def _cross_term(e_w, zw, mw, zo, mo):
    """e_w * u of one element; +inf where the other side is -inf (an infinite KL)."""
    u = tl.where(zo == NEG_INF, float("inf"), (zw - mw) - (zo - mo))
    return tl.where(e_w > 0, e_w * u, 0.0)


@triton.jit
def _lane_weights(m):
    """Per-lane weights exp(m - max m) that fold per-lane sums into one row sum."""
    m_row = tl.max(m, 0)
    w = tl.where(m == NEG_INF, 0.0, tl.exp(m - m_row))
    return m_row, w


@triton.jit
def _log_mixture(lp, lq, log_b, log_1mb):
    """log(beta * p + (1 - beta) * q) by logaddexp."""
    a = log_b + lp
    b = log_1mb + lq
    hi = tl.maximum(a, b)
    lo = tl.minimum(a, b)
    return tl.where(hi == NEG_INF, hi, hi + tl.log(1.0 + tl.exp(lo - hi)))


@triton.jit
def dense_kd_kernel(
    s_ptr, t_ptr, valid_ptr, labels_ptr, loss_ptr, grad_ptr,
    s_stride, t_stride, g_stride, vocab, grad_cols,
    temperature, beta, scale_s, cap_s, scale_t, cap_t, hard_weight, soft_coef,
    DIVERGENCE: tl.constexpr,
    HAS_CAP_S: tl.constexpr,
    HAS_CAP_T: tl.constexpr,
    HAS_VALID: tl.constexpr,
    HAS_HARD: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr,
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

    # Pass 1: per-lane online softmax statistics (+ KL cross terms, + T=1 statistics).
    m_s = tl.full([BLOCK], NEG_INF, tl.float32)
    m_t = tl.full([BLOCK], NEG_INF, tl.float32)
    a_s = tl.zeros([BLOCK], tl.float32)
    a_t = tl.zeros([BLOCK], tl.float32)
    cross = tl.zeros([BLOCK], tl.float32)
    a_1 = tl.zeros([BLOCK], tl.float32)
    z_y = tl.zeros([BLOCK], tl.float32)
    for start in range(0, n, BLOCK):
        cols = start + offs
        zs = _load_z(s_row, cols, n, scale_s, cap_s, inv_t, HAS_CAP_S)
        zt = _load_z(t_row, cols, n, scale_t, cap_t, inv_t, HAS_CAP_T)
        ms_new, alpha_s, e_s = _online(m_s, zs)
        mt_new, alpha_t, e_t = _online(m_t, zt)
        if DIVERGENCE == FORWARD_KL:
            cross = _cross_shift(cross, a_t, alpha_t, _step(m_t, mt_new),
                                 _step(m_s, ms_new)) + _cross_term(e_t, zt, mt_new, zs, ms_new)
        if DIVERGENCE == REVERSE_KL:
            cross = _cross_shift(cross, a_s, alpha_s, _step(m_s, ms_new),
                                 _step(m_t, mt_new)) + _cross_term(e_s, zs, ms_new, zt, mt_new)
        if HAS_HARD:
            alpha_1 = tl.where(ms_new == NEG_INF, 1.0, tl.exp((m_s - ms_new) * temperature))
            e_1 = tl.where(zs == NEG_INF, 0.0, tl.exp((zs - ms_new) * temperature))
            a_1 = a_1 * alpha_1 + e_1
            z_y += tl.where(cols == label, zs, 0.0)
        a_s = a_s * alpha_s + e_s
        a_t = a_t * alpha_t + e_t
        m_s = ms_new
        m_t = mt_new

    M_s, w_s = _lane_weights(m_s)
    M_t, w_t = _lane_weights(m_t)
    sum_s = tl.sum(a_s * w_s, 0)
    sum_t = tl.sum(a_t * w_t, 0)
    log_ss = tl.log(sum_s)
    log_st = tl.log(sum_t)

    div = 0.0
    sum_qg = 0.0
    log_b = tl.log(beta)
    log_1mb = tl.log(1.0 - beta)
    # Lanes' cross terms moved to the row maxima (w_* = exp(m_lane - M) are the scalings).
    if DIVERGENCE == FORWARD_KL:
        c_row = _cross_shift(cross, a_t, w_t, _step(m_t, M_t), _step(m_s, M_s))
        div = tl.sum(c_row, 0) / sum_t - log_st + log_ss
    if DIVERGENCE == REVERSE_KL:
        c_row = _cross_shift(cross, a_s, w_s, _step(m_s, M_s), _step(m_t, M_t))
        div = tl.sum(c_row, 0) / sum_s - log_ss + log_st
    if DIVERGENCE == JSD or DIVERGENCE == TVD:
        # Pass 2: the loss and sum_j q_j g_j need the normalised distributions.
        acc_a = tl.zeros([BLOCK], tl.float32)
        acc_b = tl.zeros([BLOCK], tl.float32)
        for start in range(0, n, BLOCK):
            cols = start + offs
            zs = _load_z(s_row, cols, n, scale_s, cap_s, inv_t, HAS_CAP_S)
            zt = _load_z(t_row, cols, n, scale_t, cap_t, inv_t, HAS_CAP_T)
            lq = (zs - M_s) - log_ss
            lp = (zt - M_t) - log_st
            q = tl.exp(lq)
            p = tl.exp(lp)
            if DIVERGENCE == JSD:
                lm = _log_mixture(lp, lq, log_b, log_1mb)
                acc_a += tl.where(p > 0, p * (lp - lm), 0.0)
                acc_b += tl.where(q > 0, q * (lq - lm), 0.0)
            else:
                acc_a += tl.abs(q - p)
                acc_b += q * tl.where(q > p, 0.5, tl.where(q < p, -0.5, 0.0))
        if DIVERGENCE == JSD:
            kl_q = tl.sum(acc_b, 0)
            div = beta * tl.sum(acc_a, 0) + (1.0 - beta) * kl_q
            sum_qg = (1.0 - beta) * kl_q
        else:
            div = 0.5 * tl.sum(acc_a, 0)
            sum_qg = tl.sum(acc_b, 0)

    loss = soft_coef * div
    log_s1 = 0.0
    found = True
    if HAS_HARD:
        # Cross-entropy at T = 1 on f(x) = z * T.
        _, w_1 = _lane_weights(m_s * temperature)
        log_s1 = tl.log(tl.sum(a_1 * w_1, 0))
        found = (label >= 0) & (label < vocab)
        ce = (M_s - tl.sum(z_y, 0)) * temperature + log_s1
        loss += hard_weight * tl.where(found, ce, float("nan"))
    if HAS_VALID:
        loss = tl.where(n > 0, loss, 0.0)
    tl.store(loss_ptr + row, loss)

    if COMPUTE_GRAD:
        g_row = grad_ptr + row * g_stride
        coef = soft_coef * inv_t
        for start in range(0, grad_cols, BLOCK):
            cols = start + offs
            inb = cols < n
            zs = _load_z(s_row, cols, n, scale_s, cap_s, inv_t, HAS_CAP_S)
            zt = _load_z(t_row, cols, n, scale_t, cap_t, inv_t, HAS_CAP_T)
            lq = (zs - M_s) - log_ss
            lp = (zt - M_t) - log_st
            q = tl.exp(lq)
            p = tl.exp(lp)
            if DIVERGENCE == FORWARD_KL:
                d = q - p
            if DIVERGENCE == REVERSE_KL:
                d = tl.where(q > 0, q * ((lq - lp) - div), 0.0)
            if DIVERGENCE == JSD:
                lm = _log_mixture(lp, lq, log_b, log_1mb)
                g = tl.where(q > 0, (1.0 - beta) * (lq - lm), 0.0)
                d = q * (g - sum_qg)
            if DIVERGENCE == TVD:
                d = q * (tl.where(q > p, 0.5, tl.where(q < p, -0.5, 0.0)) - sum_qg)
            gz = coef * d
            if HAS_HARD:
                sm1 = tl.exp((zs - M_s) * temperature - log_s1)
                gz += hard_weight * (sm1 - tl.where(cols == label, 1.0, 0.0))
                gz = tl.where(found, gz, float("nan"))
            gx = gz * transform_grad(zs, scale_s, cap_s, temperature, HAS_CAP_S)
            gx = tl.where(inb, gx, 0.0)
            tl.store(g_row + cols, cast_rne(gx, grad_ptr.dtype.element_ty), mask=cols < grad_cols)


@triton.jit
def scale_rows_kernel(g_ptr, scale_ptr, out_ptr, scale_stride, n_cols, BLOCK: tl.constexpr):
    """out[r, :] = g[r, :] * scale[r]: the backward of every fused loss."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    inb = cols < n_cols
    c = tl.load(scale_ptr + row * scale_stride).to(tl.float32)
    g = tl.load(g_ptr + row * n_cols + cols, mask=inb, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * n_cols + cols, cast_rne(g * c, out_ptr.dtype.element_ty), mask=inb)


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
                     grad_dtype: torch.dtype | None = None):
    """Launch dense_kd_kernel: returns (loss [N] fp32, grad [N, V_s] in the student's dtype or
    `grad_dtype`, or an empty tensor)."""
    n, grad_cols = student.shape
    loss, grad = fused_outputs(student, False, compute_grad, grad_dtype)
    if n == 0:
        return loss, grad
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
            student.stride(0), teacher.stride(0), grad_cols, vocab, grad_cols,
            sc.temperature, sc.beta, sc.student_scale, sc.student_softcap, sc.teacher_scale,
            sc.teacher_softcap, sc.hard_weight, sc.soft_coef,
            DIVERGENCE=sc.divergence,
            HAS_CAP_S=sc.student_softcap > 0,
            HAS_CAP_T=sc.teacher_softcap > 0,
            HAS_VALID=valid is not None,
            HAS_HARD=sc.hard_weight != 0.0,
            COMPUTE_GRAD=compute_grad,
            **meta,
        )
    return loss, grad


def scale_rows_(grad, scale):
    """grad *= scale[:, None] in place, computed in fp32."""
    n, n_cols = grad.shape
    if grad.numel() == 0:
        return
    block = min(4096, triton.next_power_of_2(n_cols))
    with _device_ctx(grad):
        scale_rows_kernel[(n, triton.cdiv(n_cols, block))](
            grad, scale, grad, scale.stride(0), n_cols, BLOCK=block, num_warps=4
        )
