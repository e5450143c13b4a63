"""Triton kernel of teacher-side top-k: one program per row, one pass over the vocabulary.

Each entry becomes one int64 key: its value's order-preserving 32-bit pattern above
(2^32 - 1 - id), so one descending sort orders by value, then by lower id on ties. A step
reads S x KP logits. Its maximum value is compared with the running KP-th (a float test,
one reduction a step): most steps stop there. Otherwise the step's keys are cut to their KP
largest (`tl.topk`, sorted) and merged into the running list: reverse them, take the
elementwise maximum with the running list (the KP largest of both, as a bitonic sequence),
sort that descending. The log-sum-exp at T accumulates in the same loop with one running
maximum per group of G = 8 neighbours (dense_kd's `_group_online`: one ex2 per logit).

Byte account per logit: one read, the floor. What limited it (H200, 2026-11-28: 5.6 ms for a
2 GB read, 11x the floor) was compute: a step of only KP = 64 logits with two int64 warp
reductions (the step's largest key, the running list's smallest), two `tl.exp` per logit
(five instructions each), and a merge at every step that held a key above the K-th. On
random-order logits a merge happens at about k (1 + ln(steps / k)) steps whatever their width,
so wider steps cut the steps, not the merges. Not timed on a GPU yet.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .dense_kd import (
    FLT_MAX,
    G,
    _device_ctx,
    _group_online,
    _row_weights,
)
from .elementwise import NEG_INF
from .rows import transform_logits

LOW32: tl.constexpr = tl.constexpr(0xFFFFFFFF)
INT64_MIN: tl.constexpr = tl.constexpr(-(2**63))


@triton.jit
def _keys(z, cols):
    bits = z.to(tl.int32, bitcast=True)
    ordered = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)
    return (ordered.to(tl.int64) << 32) | (LOW32 - cols.to(tl.int64))


@triton.jit
def _key_value(key):
    """The logit a key holds (-inf for the empty key INT64_MIN)."""
    hi = (key >> 32).to(tl.int32)
    bits = tl.where(hi >= 0, hi, hi ^ 0x7FFFFFFF)
    return tl.where(key == INT64_MIN, NEG_INF, bits.to(tl.float32, bitcast=True))


@triton.jit
def topk_kernel(
    x_ptr, idx_ptr, lp_ptr, x_stride, vocab, k,
    scale, cap, temperature,
    HAS_CAP: tl.constexpr,
    KP: tl.constexpr,
    S: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    inv_t = 1.0 / temperature
    x_row = x_ptr + row * x_stride
    offs = tl.arange(0, KP)
    # A step reads S x KP logits as R groups of G neighbours (one thread's 16-byte load).
    R: tl.constexpr = S * KP // G
    tile = tl.arange(0, R)[:, None] * G + tl.arange(0, G)[None, :]
    best = tl.full([KP], INT64_MIN, tl.int64)
    thr_key = tl.min(best, 0)  # the KP-th key: what a candidate has to beat
    thr_z = _key_value(thr_key)
    m_g = tl.full([R], -FLT_MAX, tl.float32)
    a_g = tl.zeros([R], tl.float32)
    for start in range(0, vocab, S * KP):
        cols = start + tile
        inb = cols < vocab
        z = transform_logits(tl.load(x_row + cols, mask=inb, other=NEG_INF), scale, cap, inv_t,
                             HAS_CAP)
        # Log-sum-exp at T: one running maximum per group, moved once per step.
        m_new, alpha, e = _group_online(m_g, z)
        a_g = a_g * alpha + tl.sum(e, 1)
        m_g = m_new
        # Most steps end here: no value reaches the running KP-th (a value equal to it may
        # still win on a lower id, so the keys decide those).
        if tl.max(tl.max(z, 1), 0) >= thr_z:
            keys = tl.where(inb, _keys(z, cols), INT64_MIN)
            cand = tl.topk(tl.reshape(keys, [S * KP]), KP)  # sorted descending
            if tl.max(cand, 0) > thr_key:
                merged = tl.maximum(best, tl.flip(cand, 0))
                best = tl.sort(merged, 0, descending=True)
                thr_key = tl.min(best, 0)
                thr_z = _key_value(thr_key)
    M, w = _row_weights(m_g)
    log_s = tl.log(tl.sum(a_g * w, 0))
    z_best = _key_value(best)
    ids = LOW32 - (best & LOW32)
    out = offs < k
    tl.store(idx_ptr + row * k + offs, ids.to(tl.int32), mask=out)
    tl.store(lp_ptr + row * k + offs, (z_best - M) - log_s, mask=out)


def launch_config(k: int) -> tuple[int, int, int]:
    """(KP, S, num_warps): the running list holds KP >= k keys; a step reads S x KP logits
    (256 at least: one 16-byte bf16 load per thread of a warp)."""
    kp = max(64, triton.next_power_of_2(k))
    return kp, max(1, 256 // kp), max(1, min(8, kp // 64))


def topk_forward(x, k: int, temperature: float, logit_scale: float, softcap: float):
    """Launch topk_kernel on rows x [N, V]: (indices int32 [N, k], logprobs fp32 [N, k])."""
    n, vocab = x.shape
    idx = torch.empty((n, k), dtype=torch.int32, device=x.device)
    lp = torch.empty((n, k), dtype=torch.float32, device=x.device)
    if n == 0:
        return idx, lp
    kp, steps, num_warps = launch_config(k)
    with _device_ctx(x):
        topk_kernel[(n,)](x, idx, lp, x.stride(0), vocab, k, logit_scale,
                          softcap if softcap > 0 else 1.0, temperature, HAS_CAP=softcap > 0,
                          KP=kp, S=steps, num_warps=num_warps)
    return idx, lp
