"""AKL's head threshold over a vocabulary split across ranks (the vocab-parallel paths of
kernel_rows.py and vocab_parallel.py).

The head is every id whose teacher probability is at least tau, the largest tau with
mass(tau) = sum_{p_j >= tau} p_j >= m (the head mass). mass only changes at the row's own
values, so tau is one of them: bisection over p's fp32 bit pattern (p >= 0 orders as its
bits), each step one all-reduce of the ranks' partial masses. The row statistics bound it:
tau <= max p = 1 / S_t, and tau > (1 - m) / V, since the ids below tau hold at least 1 - m
in fewer than V values. From (1 - m) / (2 V) (half of it: room for the sums' rounding) to
max p the range holds ~2^27 patterns at V = 128256, m = 1/2: 27-28 steps, not 31; the
one-device Triton kernel bounds its search the same way (backends/triton/akl.py).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

# p's bit patterns: [0, 1.0 + 1 ulp).
ONE_PLUS_ULP_BITS = 0x3F800001
# The order keys of 16-bit floats from -inf's to just above +inf's (only NaNs beyond).
KEY16_LO, KEY16_HI = -32641, 32641
# Above this head mass the lower bound is not used (it needs the sum of p within
# (1 - m) / 2 of 1).
BOUNDED_HEAD_MASS = 1.0 - 2.0 ** -10


def _bits(x: Tensor) -> Tensor:
    return x.to(torch.float32).view(torch.int32).to(torch.int64)


# narrow(tau_lo, tau_hi) -> the mass function for the search's remaining steps.
Narrow = Callable[[Tensor, Tensor], Callable[[Tensor], Tensor]]
# Steps over the whole row before a `narrow` hook takes over: p's range is then 1/64 of
# what it was (~1/8 of a binade at V = 32000), a few hundred values a row of 16000.
NARROW_AFTER = 6


def _bisect(mass: Callable[[Tensor], Tensor], head_mass: float, lo: Tensor, hi: Tensor,
            tau_of: Callable[[Tensor], Tensor], narrow: Narrow | None = None) -> Tensor:
    """The largest key in [lo, hi) per row whose tau_of(key) passes (mass >= head_mass), lo
    passing and hi failing by construction. The number of steps is set once from the widest
    row's range (one host sync), the same on every rank; a settled row (hi = lo + 1) asks
    about lo again and keeps it. After NARROW_AFTER steps `narrow(tau_of(lo), tau_of(hi))`
    returns the mass function for the rest: every later tau lies in [lo, hi), so values
    below lo never count and values at or above hi always do."""
    lo = torch.minimum(lo, hi - 1)  # no statistics to bound by (an empty row)
    widest = int((hi - lo).max()) if lo.numel() else 1  # host-sync-ok: the steps, once
    steps = math.ceil(math.log2(max(widest, 1)))
    for step in range(steps):
        if narrow is not None and step == NARROW_AFTER:
            mass = narrow(tau_of(lo), tau_of(hi))
        mid = (lo + hi) // 2
        ok = mass(tau_of(mid)) >= head_mass
        lo = torch.where(ok, mid, lo)
        hi = torch.where(ok, hi, torch.maximum(mid, lo + 1))
    return tau_of(lo)


def _p_of(bits: Tensor) -> Tensor:
    return bits.to(torch.int32).view(torch.float32)


def head_threshold(mass: Callable[[Tensor], Tensor], head_mass: float, log_st: Tensor,
                   vocab: int, narrow: Narrow | None = None) -> Tensor:
    """tau [n] fp32 over p for rows whose teacher log-sum log S_t (centred on the row
    maximum, so max p = 1 / S_t) is `log_st` [n]: `mass(tau)` returns every row's global mass
    at p >= tau [n] (each call one collective). A head mass of 1 is the whole vocabulary,
    whatever the rounding of its sum: tau = 0, no search. `narrow`: see _bisect."""
    n, dev = log_st.shape[0], log_st.device
    if head_mass >= 1.0:
        return torch.zeros(n, dtype=torch.float32, device=dev)
    top = torch.clamp(torch.exp(-log_st.double()) * (1.0 + 2.0 ** -7), max=1.0)
    hi = torch.clamp(_bits(top) + 2, max=ONE_PLUS_ULP_BITS)
    lo = torch.zeros_like(hi)
    if head_mass <= BOUNDED_HEAD_MASS:
        lo = lo + _bits(torch.tensor((1.0 - head_mass) / (2.0 * max(vocab, 1)), device=dev))
    return _bisect(mass, head_mass, lo, hi, _p_of, narrow)


def _key16(x: Tensor, bf16: bool) -> Tensor:
    """The order key of the 16-bit float nearest x (truncated for bf16): its bits as a
    signed integer, the magnitude bits flipped where the sign is set (backends/triton/akl.py
    has the same)."""
    if bf16:
        b = x.to(torch.float32).view(torch.int32).to(torch.int64) >> 16
    else:
        b = x.to(torch.float16).view(torch.int16).to(torch.int64)
    return b ^ ((b >> 15) & 0x7FFF)


def _value16(key: Tensor, bf16: bool) -> Tensor:
    b = key ^ ((key >> 15) & 0x7FFF)
    if bf16:
        return (b << 16).to(torch.int32).view(torch.float32)
    return b.to(torch.int16).view(torch.float16).to(torch.float32)


def head_threshold_key16(mass: Callable[[Tensor], Tensor], head_mass: float, m_t: Tensor,
                         log_st: Tensor, z_per_x: float, vocab: int, bf16: bool) -> Tensor:
    """tau [n] fp32 over the teacher's own 16-bit logits x (bf16 or fp16, no softcap, no
    TAID: p rises with x, so the head is x >= tau): bisection over x's 2^16 order keys,
    bounded by the row statistics in x (z = x * z_per_x, the global max z `m_t`): at most 16
    steps. `mass(tau)` returns every row's global mass at x >= tau. A head mass of 1 is
    tau = -inf, no search."""
    n, dev = log_st.shape[0], log_st.device
    if head_mass >= 1.0:
        return torch.full((n,), -math.inf, dtype=torch.float32, device=dev)
    m_t, log_st = m_t.double(), log_st.double()
    x_hi = m_t / z_per_x
    x_hi = x_hi + x_hi.abs() * 2.0 ** -7  # the max x times z_per_x rounds to m_t
    hi = torch.clamp(_key16(x_hi, bf16) + 2, max=KEY16_HI)
    lo = torch.full_like(hi, KEY16_LO)
    if head_mass <= BOUNDED_HEAD_MASS:
        low_p = (1.0 - head_mass) / (4.0 * max(vocab, 1))
        x_lo = (m_t + log_st + math.log(low_p)) / z_per_x
        lo = torch.clamp(_key16(x_lo, bf16) - 1, min=KEY16_LO)
    return _bisect(mass, head_mass, lo, hi, lambda k: _value16(k, bf16))
