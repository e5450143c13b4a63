"""Element-wise pieces of the Triton loss kernels: constants, the fast exponential and log,
the mixtures, and the research divergences' per-logit terms (AB's cancellation-free element,
the skew KLs, TAID's target logit). dense_kd.py and sparse_kd.py build their passes from
these; kd_math.h holds the same maths for the C++ kernels."""

from __future__ import annotations

import os

import triton
import triton.language as tl

NEG_INF: tl.constexpr = tl.constexpr(float("-inf"))

FORWARD_KL: tl.constexpr = tl.constexpr(0)
REVERSE_KL: tl.constexpr = tl.constexpr(1)
JSD: tl.constexpr = tl.constexpr(2)
TVD: tl.constexpr = tl.constexpr(3)
SKEW_KL: tl.constexpr = tl.constexpr(4)
SKEW_REVERSE_KL: tl.constexpr = tl.constexpr(5)
AB: tl.constexpr = tl.constexpr(6)
AKL: tl.constexpr = tl.constexpr(7)
LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)
LN2: tl.constexpr = tl.constexpr(0.6931471805599453)
# JSD's mixture is floored at 2^-100 before its log: a term below it weighs < 1e-28.
MIX_FLOOR: tl.constexpr = tl.constexpr(2.0 ** -100)
# lg2.approx by inline PTX on a GPU; the interpreter cannot run PTX.
FAST_MATH: tl.constexpr = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") in ("", "0"))


@triton.jit
def _fast_log2(x):
    """log2(x) per element: the GPU's lg2.approx (relative error ~2^-22) instead of the
    ~20-instruction accurate libdevice call; numpy's log2 under the interpreter."""
    if FAST_MATH:
        out = tl.inline_asm_elementwise("lg2.approx.ftz.f32 $0, $1;", "=r,r", [x],
                                        dtype=tl.float32, is_pure=True, pack=1)
    else:
        out = tl.log2(x)
    return out


@triton.jit
def _exp(x):
    """e^x as one ex2 of x * log2(e): `tl.exp` adds a multiply and a denormal range fix
    around it (five instructions); here a result below 2^-126 may flush to 0."""
    return tl.exp2(x * LOG2E)


@triton.jit
def _log_mixture(lp, lq, log_b, log_1mb):
    """log(beta * p + (1 - beta) * q) by logaddexp."""
    a = log_b + lp
    b = log_1mb + lq
    hi = tl.maximum(a, b)
    lo = tl.minimum(a, b)
    return tl.where(hi == NEG_INF, hi, hi + tl.log(1.0 + tl.exp(lo - hi)))


@triton.jit
def taid_logit(zs, zt, t):
    """TAID's target logit (1 - t) z_s + t z_t for 0 < t < 1 (the launchers handle t = 0 and
    t = 1 without it): a -inf on either side stays -inf by IEEE arithmetic."""
    return (1.0 - t) * zs + t * zt


@triton.jit
def _exprel_small(x):
    """(e^x - 1) / x for |x| < 1/2: its series to x^7 (truncation < 3e-8 relative)."""
    acc = 1.0 / 40320.0
    acc = acc * x + 1.0 / 5040.0
    acc = acc * x + 1.0 / 720.0
    acc = acc * x + 1.0 / 120.0
    acc = acc * x + 1.0 / 24.0
    acc = acc * x + 1.0 / 6.0
    acc = acc * x + 0.5
    return acc * x + 1.0


@triton.jit
def _phi_small_over_x2(x):
    """(e^x - 1 - x) / x^2 for |x| < 1/2: its series to x^7 (truncation < 1e-8 relative)."""
    acc = 1.0 / 3628800.0
    acc = acc * x + 1.0 / 362880.0
    acc = acc * x + 1.0 / 40320.0
    acc = acc * x + 1.0 / 5040.0
    acc = acc * x + 1.0 / 720.0
    acc = acc * x + 1.0 / 120.0
    acc = acc * x + 1.0 / 24.0
    acc = acc * x + 1.0 / 6.0
    return acc * x + 0.5


@triton.jit
def ab_fast(a, b):
    """Whether AB's loss pass may take `ab_fast_terms`: each parameter at least a quarter
    of the other (w = b / (a + b) in [1/5, 4/5]); a scalar, so the kernels branch once a row."""
    return (4.0 * b >= a) & (4.0 * a >= b)


@triton.jit
def _ab_series(r, w):
    """w (psi(r) - w psi(w r)), psi(x) = (e^x - 1 - x) / x^2, for |r| < 1/2 and w in
    [1/5, 4/5]: w sum_k (1 - w^(k+1)) r^k / (k+2)! to r^7 (truncation < 1.2e-8 of the sum,
    which is at least 0.074 w there). The coefficients are loop-invariant scalars."""
    w2 = w * w
    w4 = w2 * w2
    acc = (w - w * w4 * w4) * (1.0 / 362880.0)
    acc = acc * r + (w - w4 * w4) * (1.0 / 40320.0)
    acc = acc * r + (w - w4 * w2 * w) * (1.0 / 5040.0)
    acc = acc * r + (w - w4 * w2) * (1.0 / 720.0)
    acc = acc * r + (w - w4 * w) * (1.0 / 120.0)
    acc = acc * r + (w - w4) * (1.0 / 24.0)
    acc = acc * r + (w - w2 * w) * (1.0 / 6.0)
    acc = acc * r + (w - w2) * 0.5
    return acc


@triton.jit
def ab_terms(lp, lq, a, b, WANT_LOSS: tl.constexpr):
    """The alpha-beta divergence's element (A - G) / (a b) (0 unless WANT_LOSS) and its
    dL/dlog q = q^b (q^a - p^a) / a, both without cancellation (kd_math.h: ab_loss and
    ab_dlogq have the derivations). Three exponentials serve both: U = p^s, W = q^s and
    G = p^a q^b (s = a + b). The divisions by the parameters are scalar reciprocals, taken
    once (a division of a block by a scalar costs a reciprocal per element).

    This is the form for any a, b > 0: around the side with the smaller weight, two series,
    exact as either parameter tends to 0; the loss pass takes `ab_fast_terms` where
    `ab_fast` admits the parameters. Without WANT_LOSS, h alone (`ab_ah`)."""
    s = a + b
    inv_a = 1.0 / a
    loss = tl.zeros_like(lp)
    if WANT_LOSS:
        pinf = lp == NEG_INF
        qinf = lq == NEG_INF
        lp0 = tl.where(pinf, 0.0, lp)
        lq0 = tl.where(qinf, 0.0, lq)
        wq = _exp(s * lq0)  # q^s
        g = _exp(a * lp0 + b * lq0)  # p^a q^b
        # h: p^a q^b expm1(a d) / a, d = log q - log p.
        d = lq0 - lp0
        x = a * d
        small_x = tl.abs(x) < 0.5
        h = tl.where(small_x, g * d * _exprel_small(tl.where(small_x, x, 0.0)),
                     (wq - g) * inv_a)
        h = tl.where(qinf, 0.0, tl.where(pinf, wq * inv_a, h))
        up = _exp(s * lp0)  # p^s
        # Around the side with the smaller weight w = min(a, b) / s: U its p^s (or q^s),
        # V the other's, r = s log(V / U); A - G = w U phi(r) - U phi(w r).
        around_p = b <= a
        w = tl.where(around_p, b, a) * (1.0 / s)
        u = tl.where(around_p, up, wq)
        v = tl.where(around_p, wq, up)
        r = s * tl.where(around_p, d, -d)
        wr = w * r
        small_r = tl.abs(r) < 0.5
        small_wr = tl.abs(wr) < 0.5
        rs = tl.where(small_r, r, 0.0)
        wrs = tl.where(small_wr, wr, 0.0)
        u_phi_r = tl.where(small_r, u * rs * rs * _phi_small_over_x2(rs), v - u - u * r)
        u_phi_wr = tl.where(small_wr, u * wrs * wrs * _phi_small_over_x2(wrs), g - u - u * wr)
        amg = tl.where((r < 0.0) & (wr <= -1.0), (1.0 - w) * u + w * v - g,
                       w * u_phi_r - u_phi_wr)
        loss = amg * (1.0 / (a * b))
        loss = tl.where(pinf, wq * (1.0 / (a * s)), tl.where(qinf, up * (1.0 / (b * s)), loss))
        loss = tl.where(pinf & qinf, 0.0, loss)
    else:
        h = ab_ah(lp, lq, a, b) * inv_a
    return loss, h


@triton.jit
def _ab_h_parts(lp, lq, a, b):
    """(d, W, G, a h) with d = log q - log p, W = q^s, G = p^a q^b and a h = q^b (q^a - p^a)
    = G expm1(a d): the series of expm1(x) / x for |x| < 1/2, W - G beyond. -inf needs no
    select: p = 0 makes d = +inf and G = 0, so a h = W; q = 0 makes W = G = 0 (d = -inf or
    NaN never takes the series)."""
    d = lq - lp
    s = a + b
    # s * LOG2E, the same scalar as ab_fast_terms' U = p^s: its direct form's cancellation
    # (~40x) turns a mismatch of the two scales into a bias (the interpreter rounded
    # (a + b) * LOG2E apart from s * LOG2E: +1e-5 on each direct element, +1e-6 a loss).
    wq = tl.exp2(lq * (s * LOG2E))
    g = tl.exp2(lp * (a * LOG2E) + lq * (b * LOG2E))
    x = a * d
    return d, wq, g, tl.where(tl.abs(x) < 0.5, (g * x) * _exprel_small(x), wq - g)


@triton.jit
def ab_ah(lp, lq, a, b):
    """a h = q^b (q^a - p^a), AB's dL/dlog q times a (`_ab_h_parts`)."""
    _d, _wq, _g, ah = _ab_h_parts(lp, lq, a, b)
    return ah


@triton.jit
def ab_fast_terms(lp, lq, a, b):
    """(a b times AB's element, a h) for the parameters `ab_fast` admits: the loss pass
    scales its two sums once a row. The element is U F(r) with U = p^s, r = s d, w = b / s
    and F(r) = (1 - w) + w e^r - e^(w r), taken as w r^2 (psi(r) - w psi(w r)) from one
    series for |r| < 1/2 and directly beyond, where F(r) >= w (1 - w) / 11 bounds the
    cancellation by ~110 ulp (at w = 1/5 or 4/5, |r| = 1/2; ~50 at w = 1/2). -inf needs no
    select: e^-inf = 0 gives the one-sided limits (w W, (1 - w) U, 0) and r is then +-inf or
    NaN, which takes the direct form."""
    s = a + b
    w = b * (1.0 / s)
    d, wq, g, ah = _ab_h_parts(lp, lq, a, b)
    up = tl.exp2(lp * (s * LOG2E))
    r = s * d
    f = tl.where(tl.abs(r) < 0.5, (up * (r * r)) * _ab_series(r, w),
                 (1.0 - w) * up + (w * wq - g))
    return f, ah


@triton.jit
def research_terms(lp, lq, p, q, prm, prm2, WANT_LOSS: tl.constexpr,
                   DIVERGENCE: tl.constexpr):
    """(loss term (0 unless WANT_LOSS), h = dL/dlog q) of the element-separable research
    divergences: skew KL, skew reverse KL (skew = prm in (0, 1): skew 0 runs as the plain KL)
    and AB (a = prm, b = prm2). The skew KLs' mixture is one lg2 of the linear sum, floored
    at 2^-100 like JSD's: it is at least skew times the weighting side's probability, so
    only terms below ~1e-30 meet the floor. Skew reverse KL's h leaves out its "+ q", which
    the centring removes (q sums to one) and which would only add rounding."""
    if DIVERGENCE == SKEW_KL:
        m = tl.maximum(prm * p + (1.0 - prm) * q, MIX_FLOOR)
        term = tl.zeros_like(p)
        if WANT_LOSS:
            term = tl.where(p > 0, p * (lp - LN2 * _fast_log2(m)), 0.0)
        h = -(1.0 - prm) * p * (q / m)
    elif DIVERGENCE == SKEW_REVERSE_KL:
        m = tl.maximum(prm * q + (1.0 - prm) * p, MIX_FLOOR)
        kq = tl.where(q > 0, q * (lq - LN2 * _fast_log2(m)), 0.0)
        term = kq
        h = kq - prm * q * (q / m)
    else:
        term, h = ab_terms(lp, lq, prm, prm2, WANT_LOSS)
    return term, h
