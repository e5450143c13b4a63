"""AKL's head threshold over a vocabulary split across ranks (the vocab-parallel paths of
kernel_rows.py and vocab_parallel.py).

The head is every id whose teacher probability is at least tau, the largest tau with
mass(tau) = sum_{p_j >= tau} p_j >= m (the head mass). mass only changes at the row's own
values, so tau is one of them: a search over p's fp32 bit pattern (p >= 0 orders as its
bits), each step one all-reduce of the ranks' partial masses. The row statistics bound it:
tau <= max p = 1 / S_t, and tau > (1 - m) / V, since the ids below tau hold at least 1 - m
in fewer than V values. From (1 - m) / (2 V) (half of it: room for the sums' rounding) to
max p the range holds ~2^27 patterns at V = 128256, m = 1/2.

head_threshold bisects it: 27-28 steps, not 31 (the one-device Triton kernel bounds its
search the same way, backends/triton/akl.py); head_threshold_key16 bisects a 16-bit
teacher's own logits (<= 16 steps). head_threshold_exchange, for the C++ phases whose
stash holds p, takes ~8 collectives at V = 32000 in the bytes of ~25 bisection steps:
three quarter steps over the slice, steps over the few values left in range, cut around
where the masses say the crossing lies, and one exchange of the last few values.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

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


def _bisect(mass: Callable[[Tensor], Tensor], head_mass: float, lo: Tensor, hi: Tensor,
            tau_of: Callable[[Tensor], Tensor]) -> Tensor:
    """The largest key in [lo, hi) per row whose tau_of(key) passes (mass >= head_mass), lo
    passing and hi failing by construction. The number of steps is set once from the widest
    row's range (one host sync), the same on every rank; a settled row (hi = lo + 1) asks
    about lo again and keeps it."""
    lo = torch.minimum(lo, hi - 1)  # no statistics to bound by (an empty row)
    widest = int((hi - lo).max()) if lo.numel() else 1  # host-sync-ok: the steps, once
    steps = math.ceil(math.log2(max(widest, 1)))
    for _ in range(steps):
        mid = (lo + hi) // 2
        ok = mass(tau_of(mid)) >= head_mass
        lo = torch.where(ok, mid, lo)
        hi = torch.where(ok, hi, torch.maximum(mid, lo + 1))
    return tau_of(lo)


def _p_of(bits: Tensor) -> Tensor:
    return bits.to(torch.int32).view(torch.float32)


def _p_range(head_mass: float, log_st: Tensor, vocab: int) -> tuple[Tensor, Tensor]:
    """[lo, hi) as p's bit patterns [n]: lo passes, hi fails (module docstring)."""
    top = torch.clamp(torch.exp(-log_st.double()) * (1.0 + 2.0 ** -7), max=1.0)
    hi = torch.clamp(_bits(top) + 2, max=ONE_PLUS_ULP_BITS)
    lo = torch.zeros_like(hi)
    if head_mass <= BOUNDED_HEAD_MASS:
        low = torch.tensor((1.0 - head_mass) / (2.0 * max(vocab, 1)), device=log_st.device)
        lo = lo + _bits(low)
    return torch.minimum(lo, hi - 1), hi


def head_threshold(mass: Callable[[Tensor], Tensor], head_mass: float, log_st: Tensor,
                   vocab: int) -> Tensor:
    """tau [n] fp32 over p for rows whose teacher log-sum log S_t (centred on the row
    maximum, so max p = 1 / S_t) is `log_st` [n]: `mass(tau)` returns every row's global mass
    at p >= tau [n] (each call one collective). A head mass of 1 is the whole vocabulary,
    whatever the rounding of its sum: tau = 0, no search."""
    n, dev = log_st.shape[0], log_st.device
    if head_mass >= 1.0:
        return torch.zeros(n, dtype=torch.float32, device=dev)
    lo, hi = _p_range(head_mass, log_st, vocab)
    return _bisect(mass, head_mass, lo, hi, _p_of)


# head_threshold_exchange: quarter steps over the whole slice, then steps over the candidates
# gathered in the range they leave, until each row's range holds at most EXCHANGE_CUT values;
# then the ranks exchange those (EXCHANGE a rank at most) and read tau off them.
QUARTER_STEPS = 3
EXCHANGE = 8
EXCHANGE_CUT = EXCHANGE - 1  # a value's margin for the masses' rounding (see below)


@dataclass
class SearchSteps:
    """The collectives of head_threshold_exchange, each returning global results for the
    rows asked about (`rows`: int64 indices; lo, hi [r] bit patterns of p):

    - quarter(i, lo, hi) -> [n, 3]: the masses at p >= the inner quarter points
      lo + (hi - lo) * k // 4 (k = 1, 2, 3), over the whole slice (i = 0, 1, ...);
    - gather(lo, hi, room) (no collective): each rank gathers its values in [lo, hi) for the
      calls below; no row holds more than `room` there (None: no bound) but for the
      masses' rounding;
    - inner(rows, lo, hi, points) -> [r, 3]: the masses at p >= points [r, 3] (bit
      patterns, lo < points < hi);
    - exchange(rows, lo, hi) -> [world, r, 1 + EXCHANGE]: each rank's count of values in
      [lo, hi) and the first EXCHANGE of them (any order; zeros past the count)."""

    quarter: Callable[[int, Tensor, Tensor], Tensor]
    gather: Callable[[Tensor, Tensor, int | None], None]
    inner: Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]
    exchange: Callable[[Tensor, Tensor, Tensor], Tensor]


def _values_within(m_lo: Tensor, m_hi: Tensor, lo: Tensor) -> Tensor:
    """The most values [lo, hi) can hold [n]: its mass over the least of them, p(lo) (inf or
    NaN where p(lo) = 0)."""
    return (m_lo - m_hi) / _p_of(lo).double()


def _quarter_points(lo: Tensor, hi: Tensor) -> Tensor:
    """[n, 3]: the inner quarter points lo + (hi - lo) * k // 4 (as head_search.h's)."""
    return torch.stack([lo + (hi - lo) * k // 4 for k in (1, 2, 3)], 1)


def _narrow(lo: Tensor, hi: Tensor, m_lo: Tensor, m_hi: Tensor, points: Tensor,
            masses: Tensor, head_mass: float) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The part of [lo, hi) cut at points [n, 3] (ascending) where the mass crosses
    head_mass: its ends, their masses, and which part (0-3) it is."""
    ends = torch.cat([lo[:, None], points, hi[:, None]], 1)
    at = torch.cat([m_lo[:, None], masses, m_hi[:, None]], 1)
    part = (masses >= head_mass).long().cumprod(1).sum(1)[:, None]  # inner points passing
    new_lo = ends.gather(1, part)[:, 0]
    new_hi = torch.maximum(ends.gather(1, part + 1)[:, 0], new_lo + 1)
    return new_lo, new_hi, at.gather(1, part)[:, 0], at.gather(1, part + 1)[:, 0], part[:, 0]


def _window(lo: Tensor, hi: Tensor, m_lo: Tensor, m_hi: Tensor, head_mass: float,
            quarters: Tensor) -> Tensor:
    """Three cut points [n, 3] in (lo, hi): around where the mass would cross head_mass were
    the range's values spread evenly over its bit patterns, 1 / sqrt(count) of the range to
    either side (the crossing's spread were they placed at random); the quarter points in
    rows marked `quarters` and rows without a count."""
    span = (hi - lo).double()
    count = _values_within(m_lo, m_hi, lo)
    est = lo.double() + span * torch.nan_to_num((m_lo - head_mass) / (m_lo - m_hi), 0.5).clamp(0, 1)
    side = span * torch.nan_to_num(count.rsqrt(), 0.25).clamp(max=0.25)
    cut = torch.stack([est - side, est, est + side], 1).round().long()
    cut = torch.where((quarters | ~torch.isfinite(count))[:, None], _quarter_points(lo, hi), cut)
    return torch.minimum(torch.maximum(cut, lo[:, None] + 1), hi[:, None] - 1)


def _read_off(table: Tensor, m_hi: Tensor, lo: Tensor, head_mass: float) -> tuple[Tensor, Tensor]:
    """tau [r] from an exchange's table [world, r, 1 + EXCHANGE] (head_threshold_exchange),
    and which rows it could not settle (a rank held more than EXCHANGE)."""
    counts, values = table[:, :, 0], table[:, :, 1:]
    kept = torch.arange(EXCHANGE, device=table.device) < counts[:, :, None]
    vals = torch.where(kept, values, -1.0).permute(1, 0, 2).reshape(table.shape[1], -1)
    vals = vals.sort(1, descending=True).values
    real = vals >= 0
    reach = real & ((m_hi[:, None] + torch.cumsum(torch.where(real, vals, 0.0), 1)) >= head_mass)
    last = (real.long().sum(1) - 1).clamp(min=0)  # the smallest: all of them in
    found = vals.gather(1, torch.where(reach.any(1), reach.long().argmax(1), last)[:, None])[:, 0]
    found = torch.where(real.any(1), found, _p_of(lo).double())
    return found.to(torch.float32), (counts > EXCHANGE).any(0)


def head_threshold_exchange(steps: SearchSteps, head_mass: float, log_st: Tensor,
                            vocab: int) -> Tensor:
    """head_threshold's tau [n] fp32, in ~8 collectives at V = 32000, not ~27.

    Each step narrows [lo, hi) (lo passes, hi fails) to the part between two of its cut
    points where the mass crosses the head mass, and keeps the global masses at its ends
    (M_lo unknown at first: 1). The values inside number at most (M_lo - M_hi) / p(lo) (each
    is at least p(lo)). The quarter steps cut at even points; the later ones close around
    the crossing's estimate (_window), and after a step that missed it, evenly again. Once
    that bound is below EXCHANGE_CUT in every row (or hi = lo + 1, one pattern left), every
    rank holds at most that many there: they exchange them, and tau is the first value, in
    descending order, at which M_hi plus the values so far reaches the head mass (the
    largest p with mass(p) >= head mass, as the bisection finds; the masses' fp32 rounding,
    ~1e-7 of the row, cannot move the bound by a value). Rows whose exchange comes back
    fuller than EXCHANGE (not expected) cut on to one pattern. Ties count as values: a row
    whose boundary value repeats more than EXCHANGE_CUT times cuts on to one pattern."""
    n, dev = log_st.shape[0], log_st.device
    if head_mass >= 1.0:
        return torch.zeros(n, dtype=torch.float32, device=dev)
    lo, hi = _p_range(head_mass, log_st, vocab)
    m_lo = torch.ones(n, dtype=torch.float64, device=dev)
    m_hi = torch.zeros(n, dtype=torch.float64, device=dev)
    for i in range(QUARTER_STEPS):
        points = _quarter_points(lo, hi)
        masses = steps.quarter(i, lo, hi).to(torch.float64)
        lo, hi, m_lo, m_hi, _ = _narrow(lo, hi, m_lo, m_hi, points, masses, head_mass)
    bound = float(_values_within(m_lo, m_hi, lo).max())  # host-sync-ok: the buffer's size
    steps.gather(lo, hi, math.ceil(bound) if math.isfinite(bound) else None)
    tau = _p_of(lo)
    final = hi - lo <= 1  # rows whose tau is lo's pattern
    to_one = torch.zeros(n, dtype=torch.bool, device=dev)  # rows that cut on to one pattern
    missed = torch.zeros(n, dtype=torch.bool, device=dev)  # the last window missed: quarters
    while True:
        # host-sync-ok: which rows still search, a few times a call (the steps are collectives)
        todo = ~final & (to_one | ~(_values_within(m_lo, m_hi, lo) <= EXCHANGE_CUT))
        if bool(todo.any()):
            r = todo.nonzero()[:, 0]
            points = _window(lo[r], hi[r], m_lo[r], m_hi[r], head_mass, missed[r])
            masses = steps.inner(r, lo[r], hi[r], points).to(torch.float64)
            lo[r], hi[r], m_lo[r], m_hi[r], part = _narrow(lo[r], hi[r], m_lo[r], m_hi[r],
                                                           points, masses, head_mass)
            missed[r] = ~missed[r] & ((part == 0) | (part == 3))
            final |= hi - lo <= 1
            continue
        r = (~final).nonzero()[:, 0]
        if r.numel() == 0:
            break
        table = steps.exchange(r, lo[r], hi[r]).to(torch.float64)  # [world, r, 1 + EXCHANGE]
        found, full = _read_off(table, m_hi[r], lo[r], head_mass)
        tau[r] = torch.where(full, tau[r], found)
        final[r] = ~full
        to_one[r] = full
    return torch.where(final & (hi - lo <= 1), _p_of(lo), tau)


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
