"""AKL's head in the Triton dense kernel: the threshold search and the pass that splits
sum |p - q| into head and tail.

The head is every id whose teacher probability is at least tau, the largest tau with
mass(tau) = sum_{p_j >= tau} p_j >= head mass. mass falls as tau rises and only changes at
the row's own values, so tau is one of them, found by bisection, one read of the teacher row
a step. The search is bounded by the row statistics: tau <= max p = 1 / S_t, and
tau > (1 - head mass) / V, since the ids below tau hold at least 1 - head mass in fewer than V
values. It runs over one of two orders:

- p's fp32 bit pattern (p >= 0 orders as its bits): any teacher, with softcap or TAID's moved
  target. From (1 - m) / (2 V) to max p the range holds ~2^27 bit patterns at V = 128256,
  m = 1/2: 28 reads (31 without bounds).
- the teacher's own 16-bit logits, when the teacher row is bf16 or fp16 with neither softcap
  nor TAID: p rises with x, so {p >= tau} = {x >= x_tau}, and x takes at most 2^16 values;
  the bounds above in x keep those the row can reach: logits whose top lies ~13 / (scale / T)
  above zero leave 1 - 2 binades, ~150 values: 8 reads; a window across zero, <= 16. Both
  the search and the head/tail pass compare the logit x itself, exactly.

A head mass above 1 - 2^-10 searches the full range (the bound needs the fp32 sum of p within
(1 - m) / 2 of 1), and a head mass of 1 is the whole vocabulary with no search at all.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .elementwise import LOG2E, NEG_INF, _exp, taid_logit
from .rows import _load_z, transform_logits

# p's bit patterns: [0, 1.0 + 1 ulp).
ONE_PLUS_ULP_BITS: tl.constexpr = tl.constexpr(0x3F800001)
# The order keys of 16-bit floats from -inf's to just above +inf's (below and above them
# only NaNs): the lowest is the whole row (tau = -inf), as p's lowest (0) is.
KEY16_LO: tl.constexpr = tl.constexpr(-32641)
KEY16_HI: tl.constexpr = tl.constexpr(32641)
# Above this head mass the lower bound is not used (see the module's docstring).
BOUNDED_HEAD_MASS: tl.constexpr = tl.constexpr(1.0 - 2.0 ** -10)


@triton.jit
def _key16(x, IS_BF16: tl.constexpr):
    """The order key of the 16-bit float nearest x (fp32 scalar; truncated for bf16): the
    bits as a signed integer, the magnitude bits flipped where the sign is set, so keys
    order as the values do (-0 just below +0)."""
    if IS_BF16:
        b = x.to(tl.int32, bitcast=True) >> 16
    else:
        b = x.to(tl.float16).to(tl.int16, bitcast=True).to(tl.int32)
    return b ^ ((b >> 15) & 0x7FFF)


@triton.jit
def _value16(key, IS_BF16: tl.constexpr):
    """The 16-bit float whose order key is `key`, as fp32 (the inverse of _key16)."""
    b = key ^ ((key >> 15) & 0x7FFF)
    if IS_BF16:
        v = (b << 16).to(tl.float32, bitcast=True)
    else:
        v = b.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    return v


@triton.jit
def _akl_order(s_row, t_row, cols, n, scale_s, cap_s, scale_t, cap_t, inv_t, interp, M_t,
               log_st, HAS_CAP_S: tl.constexpr, HAS_CAP_T: tl.constexpr,
               HAS_INTERP: tl.constexpr, KEY16: tl.constexpr):
    """(the value the head test compares, the teacher's p) of the columns < n: the logit x
    itself when KEY16, else p. p is the loss passes' own: z = f(x) / T first, rounded as
    PyTorch rounds it, then shifted by the maximum; a shortcut through one FMA of the raw
    logit lost 0.1% of p at logits of 1e4 (the constant's rounding times x). The KEY16
    search's mass takes that shortcut (two instructions a logit fewer): p there only decides
    mass >= head mass, and its error, ~|z| 2^-24 of p (2e-6 at logits of 30, as the fp32
    sums' own rounding; 1e-3 at 1e4), moves the head's boundary only where the head mass
    lies that close to a cumulative mass of the row; the head/tail pass uses the exact p."""
    x = tl.load(t_row + cols, mask=cols < n, other=NEG_INF).to(tl.float32)
    if KEY16:
        order = x
        p = tl.exp2(x * ((scale_t * inv_t) * LOG2E) - (M_t + log_st) * LOG2E)
    else:
        zt = transform_logits(x, scale_t, cap_t, inv_t, HAS_CAP_T)
        if HAS_INTERP:
            zs = _load_z(s_row, cols, n, scale_s, cap_s, inv_t, HAS_CAP_S)
            zt = taid_logit(zs, zt, interp)
        p = _exp((zt - M_t) - log_st)
        order = p
    return order, p


@triton.jit
def akl_head_mass(s_row, t_row, n, tau, scale_s, cap_s, scale_t, cap_t, inv_t, interp, M_t,
                  log_st, HAS_CAP_S: tl.constexpr, HAS_CAP_T: tl.constexpr,
                  HAS_INTERP: tl.constexpr, KEY16: tl.constexpr, BLOCK: tl.constexpr):
    """One step of the threshold search: sum_j p_j over the columns < n whose order value
    (p, or the logit x when KEY16) is >= tau; one read of the teacher row."""
    offs = tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], tl.float32)
    for start in range(0, n, BLOCK):
        order, p = _akl_order(s_row, t_row, start + offs, n, scale_s, cap_s, scale_t, cap_t,
                              inv_t, interp, M_t, log_st, HAS_CAP_S, HAS_CAP_T, HAS_INTERP,
                              KEY16)
        acc += tl.where(order >= tau, p, 0.0)
    return tl.sum(acc, 0)


@triton.jit
def akl_threshold(s_row, t_row, n, head_mass, scale_s, cap_s, scale_t, cap_t, inv_t, interp,
                  M_t, log_st, HAS_CAP_S: tl.constexpr, HAS_CAP_T: tl.constexpr,
                  HAS_INTERP: tl.constexpr, KEY16: tl.constexpr, BLOCK: tl.constexpr):
    """The head threshold tau, in the order akl_sums compares (the module's docstring):
    bisection between bounds from the row statistics, lo always passing (mass >= head mass),
    hi always failing, until they are neighbours."""
    IS_BF16 = t_row.dtype.element_ty == tl.bfloat16
    bounded = head_mass <= BOUNDED_HEAD_MASS
    # The ids below tau hold >= 1 - m in fewer than n values: tau > (1 - m) / n; half that
    # leaves room for the fp32 sums, and half again for z's rounding in the 16-bit order.
    low_p = (1.0 - head_mass) / (2.0 * tl.maximum(n, 1).to(tl.float32))
    if KEY16:
        c = scale_t * inv_t
        x_lo = (M_t + log_st + tl.log(0.5 * low_p)) / c
        x_hi = M_t / c
        x_hi = x_hi + tl.abs(x_hi) * 0.0078125  # max x * c rounds to M_t: 2^-7 above it
        lo = tl.where(bounded, tl.maximum(_key16(x_lo, IS_BF16) - 1, KEY16_LO), KEY16_LO)
        hi = tl.minimum(_key16(x_hi, IS_BF16) + 2, KEY16_HI)
    else:
        lo = tl.where(bounded, low_p.to(tl.int32, bitcast=True), 0)
        top = tl.minimum(_exp(-log_st) * 1.0078125, 1.0)  # the row's max p, 2^-7 above
        hi = tl.minimum(top.to(tl.int32, bitcast=True) + 2, ONE_PLUS_ULP_BITS)
    # An empty row has no statistics to bound by; a head mass of 1 is the whole vocabulary,
    # whatever the rounding of its sum: no search.
    lo = tl.where(head_mass >= 1.0, hi - 1, tl.minimum(lo, hi - 1))
    while hi - lo > 1:
        mid = lo + (hi - lo) // 2
        if KEY16:
            tau = _value16(mid, IS_BF16)
        else:
            tau = mid.to(tl.float32, bitcast=True)
        ok = akl_head_mass(s_row, t_row, n, tau, scale_s, cap_s, scale_t, cap_t, inv_t,
                           interp, M_t, log_st, HAS_CAP_S, HAS_CAP_T, HAS_INTERP, KEY16,
                           BLOCK) >= head_mass
        lo = tl.where(ok, mid, lo)
        hi = tl.where(ok, hi, mid)
    if KEY16:
        tau = _value16(lo, IS_BF16)
        tau = tl.where(head_mass >= 1.0, float("-inf"), tau)
    else:
        tau = tl.where(head_mass >= 1.0, 0.0, lo.to(tl.float32, bitcast=True))
    return tau


@triton.jit
def akl_sums(s_row, t_row, n, tau, scale_s, cap_s, scale_t, cap_t, inv_t, interp, M_s,
             log_ss, M_t, log_st, HAS_CAP_S: tl.constexpr, HAS_CAP_T: tl.constexpr,
             HAS_INTERP: tl.constexpr, KEY16: tl.constexpr, BLOCK: tl.constexpr):
    """AKL's pass with its threshold tau: (forward KL, reverse KL, sum |p - q| over the head
    (order value >= tau), over the tail) of the columns < n. The order value is the search's
    own (the logit x itself, or p by _akl_order's formula), so both agree bit for bit; the
    tail's gap is the total's less the head's (the weight needs only those two)."""
    offs = tl.arange(0, BLOCK)
    acc_f = tl.zeros([BLOCK], tl.float32)
    acc_r = tl.zeros([BLOCK], tl.float32)
    acc_h = tl.zeros([BLOCK], tl.float32)
    acc_g = tl.zeros([BLOCK], tl.float32)
    for start in range(0, n, BLOCK):
        cols = start + offs
        zs = _load_z(s_row, cols, n, scale_s, cap_s, inv_t, HAS_CAP_S)
        x = tl.load(t_row + cols, mask=cols < n, other=NEG_INF).to(tl.float32)
        zt = transform_logits(x, scale_t, cap_t, inv_t, HAS_CAP_T)
        if HAS_INTERP:
            zt = taid_logit(zs, zt, interp)
        lq = (zs - M_s) - log_ss
        lp = (zt - M_t) - log_st
        q = _exp(lq)
        p = _exp(lp)
        if KEY16:
            head = x >= tau
        else:
            head = p >= tau
        acc_f += tl.where(p > 0, p * (lp - lq), 0.0)
        acc_r += tl.where(q > 0, q * (lq - lp), 0.0)
        gap = tl.abs(p - q)
        acc_h += tl.where(head, gap, 0.0)
        acc_g += gap
    g_head = tl.sum(acc_h, 0)
    # The tail by difference: the weight needs only g_head and the total, which stays exact.
    return tl.sum(acc_f, 0), tl.sum(acc_r, 0), g_head, tl.sum(acc_g, 0) - g_head
