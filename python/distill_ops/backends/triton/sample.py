"""Triton kernel of inverse-CDF sampling: one program per row, no [N, V] intermediate.

torch's path on a GPU materialises exp(z - max) and its fp64 cumulative sum ([N, V] at 8
bytes a logit) and searches it; torch.multinomial checks its arguments on the host. Here each
program reads its row three times (the maximum; the fp64 sum of exp(z - max), the total;
then the cumulative sums a block at a time, fp64, carried across blocks) and, for the S
sorted uniform targets u_s * total, counts the cumulative sums at or below each: the draw's
id (searchsorted with right=True). The cumulative sums are the fp64 sums of the same fp32
terms whose total the targets scale, so the draws are exactly the inverse CDF of those
probabilities (unbiased up to fp64 rounding at the boundaries). Blocks that hold no target
skip the [S, BLOCK] comparison.

Byte account per logit: three reads (the floor is one); draws and totals are per row.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .dense_kd import _device_ctx
from .elementwise import NEG_INF

MAX_DRAWS = 1024  # more draws than this per row take torch's path


@triton.jit
def sample_cdf_kernel(x_ptr, u_ptr, draws_ptr, total_ptr, x_stride, vocab, n_draws, inv_t,
                      BLOCK: tl.constexpr, SP: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * x_stride
    offs = tl.arange(0, BLOCK)
    m_lane = tl.full([BLOCK], NEG_INF, tl.float32)
    for start in range(0, vocab, BLOCK):
        cols = start + offs
        z = tl.load(x_row + cols, mask=cols < vocab, other=NEG_INF).to(tl.float32) * inv_t
        m_lane = tl.maximum(m_lane, z)
    m = tl.max(m_lane, 0)
    s_lane = tl.zeros([BLOCK], tl.float64)
    for start in range(0, vocab, BLOCK):
        cols = start + offs
        z = tl.load(x_row + cols, mask=cols < vocab, other=NEG_INF).to(tl.float32) * inv_t
        s_lane += tl.where(z == NEG_INF, 0.0, tl.exp(z - m)).to(tl.float64)
    total = tl.sum(s_lane, 0)
    tl.store(total_ptr + row, total)

    slots = tl.arange(0, SP)
    # Sorted uniforms in [0, 1); slots past n_draws aim beyond the end and are not stored.
    t = tl.load(u_ptr + row * n_draws + slots, mask=slots < n_draws, other=2.0) * total
    found = tl.zeros([SP], tl.int64)
    carry = tl.zeros([], tl.float64)
    for start in range(0, vocab, BLOCK):
        cols = start + offs
        inb = cols < vocab
        z = tl.load(x_row + cols, mask=inb, other=NEG_INF).to(tl.float32) * inv_t
        e = tl.where(z == NEG_INF, 0.0, tl.exp(z - m)).to(tl.float64)
        block_sum = tl.sum(e, 0)
        nvalid = tl.sum(inb.to(tl.int64), 0)
        above = t >= carry + block_sum  # targets past this block: every entry counts
        inside = (t >= carry) & ~above
        count = tl.where(above, nvalid, 0)
        if tl.sum(inside.to(tl.int32), 0) > 0:
            cdf = tl.cumsum(e, 0) + carry
            hits = (cdf[None, :] <= t[:, None]) & inb[None, :]
            count += tl.where(inside, tl.sum(hits.to(tl.int64), 1), 0)
        found += count
        carry += block_sum
    draws = tl.minimum(found, vocab - 1)
    tl.store(draws_ptr + row * n_draws + slots, draws, mask=slots < n_draws)


def launch_config(n_draws: int) -> tuple[int, int]:
    """(BLOCK, SP): SP slots for the draws, blocks small enough that the [SP, BLOCK]
    comparison stays at 16k elements."""
    sp = max(16, triton.next_power_of_2(n_draws))
    return max(32, min(1024, 16384 // sp)), sp


def draw(x: torch.Tensor, temperature: float, u: torch.Tensor
         ) -> tuple[torch.Tensor, torch.Tensor]:
    """(draws [R, S] int64, total [R, 1] fp64) of rows x [R, V] for uniforms u [R, S] (fp64),
    as sampling._draw returns them (the draws of sorted uniforms: the same multiset)."""
    n, vocab = x.shape
    s = u.shape[1]
    us = torch.sort(u, dim=1).values.contiguous()
    draws = torch.empty((n, s), dtype=torch.int64, device=x.device)
    total = torch.empty((n, 1), dtype=torch.float64, device=x.device)
    if n == 0:
        return draws, total
    xc = x if x.stride(-1) == 1 else x.contiguous()
    block, sp = launch_config(s)
    with _device_ctx(x):
        sample_cdf_kernel[(n,)](xc, us, draws, total, xc.stride(0), vocab, s,
                                1.0 / temperature, BLOCK=block, SP=sp, num_warps=4)
    return draws, total
