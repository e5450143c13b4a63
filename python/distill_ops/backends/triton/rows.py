"""Loading a row's logits in the Triton loss kernels: f(x) / T with the optional softcap, its
derivative, TAID's moved teacher, the normalised log-probabilities of both sides once the row
statistics are known, and the round-to-nearest-even store. dense_kd.py, akl.py and the
vocab-parallel phases build their passes on these."""

from __future__ import annotations

import triton
import triton.language as tl

from .elementwise import NEG_INF, taid_logit


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
def _load_zt(t_row, cols, n, scale_t, cap_t, inv_t, zs, interp, HAS_CAP_T: tl.constexpr,
             HAS_INTERP: tl.constexpr):
    """The teacher side's z: f(x_t) / T, moved toward the student's zs under TAID."""
    zt = _load_z(t_row, cols, n, scale_t, cap_t, inv_t, HAS_CAP_T)
    if HAS_INTERP:
        zt = taid_logit(zs, zt, interp)
    return zt


@triton.jit
def _log_probs(s_row, t_row, cols, n, scale_s, cap_s, scale_t, cap_t, inv_t, interp, M_s,
               log_ss, M_t, log_st, HAS_CAP_S: tl.constexpr, HAS_CAP_T: tl.constexpr,
               HAS_INTERP: tl.constexpr):
    """(z_s, log q, log p) of the columns < n, once the row statistics are known."""
    zs = _load_z(s_row, cols, n, scale_s, cap_s, inv_t, HAS_CAP_S)
    zt = _load_zt(t_row, cols, n, scale_t, cap_t, inv_t, zs, interp, HAS_CAP_T, HAS_INTERP)
    return zs, (zs - M_s) - log_ss, (zt - M_t) - log_st
