"""The sparse KD loss of vocab-parallel student logits on a GPU: each rank holds a slice
[N, W] of the vocabulary (global ids offset .. offset + W), the k teacher targets are global
ids. One kernel, two phases, around the Python layer's two all-reduces and its divergence
over the k + 1 coarse classes (distributed/kernel_rows.py), on the C++ CPU kernel's record
(csrc/cpu/sparse_vp.cpp; fp64, 8 fields a row, and z at the support [N, k]):

- phase 0 (statistics), z = x / T: the slice's maximum m (-inf where it holds nothing), its
  sum exp(z - m) in fp64, the part of it off the support (the sum less the owned support
  ids' terms, recomputed by the same instructions: the kernel is compiled without FMA
  contraction, so the difference is exact, as in sparse_kd.py), the number of support ids
  the slice owns, the hard term's T = 1 sum and z at the label (if the slice has it), and z
  at each owned support id (0 elsewhere). An ignored row counts as logits of 0.
- phase 1 (gradient), with the global maximum, the off-support coefficient, the owned support
  ids' own gradients and the hard term's log-sum: every column's e_j * off (+ the hard term),
  then, after a barrier, each owned support id's value over it.

Bytes per student logit: phase 0 reads the row twice (maximum, sums), phase 1 once and
writes the gradient: the one-device kernel's four transfers.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .dense_kd import _device_ctx
from .elementwise import NEG_INF
from .rows import cast_rne
from .sparse_kd import REST_FLOOR, _rest_at_own_max

FIELDS = 8  # m, sum, rest, owned, sum at T = 1, z at the label; in: m, off, base, -, log S1


@triton.jit
def sparse_vp_kernel(
    s_ptr, idx_ptr, valid_ptr, labels_ptr, rec_ptr, zsup_ptr, sup_ptr, grad_ptr,
    s_stride, width, k, offset, temperature, hard_weight,
    PHASE: tl.constexpr,
    HAS_VALID: tl.constexpr,
    HAS_HARD: tl.constexpr,
    BLOCK: tl.constexpr,
    KP: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    inv_t = 1.0 / temperature
    n = width  # the columns read: none for an ignored row (its logits count as 0)
    if HAS_VALID:
        n = tl.where(tl.load(valid_ptr + row).to(tl.int32) != 0, width, 0)
    s_row = s_ptr + row * s_stride
    f = rec_ptr + row * 8
    offs = tl.arange(0, BLOCK)
    label = -1  # the local column of the label, -1 where it lies in another slice
    if HAS_HARD:
        label = tl.where(n > 0, tl.load(labels_ptr + row), -1)
    slots = tl.arange(0, KP)
    ids = tl.load(idx_ptr + row * k + slots, mask=slots < k, other=-1)
    col = ids - offset
    own = (ids >= 0) & (col >= 0) & (col < width)
    col = tl.where(own, col, 0)
    z_sup = tl.load(s_row + col, mask=own & (col < n), other=0.0).to(tl.float32) * inv_t

    if PHASE == 0:
        m_lane = tl.full([BLOCK], NEG_INF, tl.float32)
        for start in range(0, width, BLOCK):
            cols = start + offs
            x = tl.load(s_row + cols, mask=cols < n, other=0.0)
            z = tl.where(cols < width, x.to(tl.float32) * inv_t, NEG_INF)
            m_lane = tl.maximum(m_lane, z)
        m = tl.max(m_lane, 0)
        m_safe = tl.where(m == NEG_INF, 0.0, m)  # an empty slice: every term exp(-inf) = 0
        s_lane = tl.zeros([BLOCK], tl.float64)
        s1_lane = tl.zeros([BLOCK], tl.float32)
        zy_lane = tl.zeros([BLOCK], tl.float32)
        for start in range(0, width, BLOCK):
            cols = start + offs
            x = tl.load(s_row + cols, mask=cols < n, other=0.0)
            z = tl.where(cols < width, x.to(tl.float32) * inv_t, NEG_INF)
            s_lane += tl.exp(z - m_safe).to(tl.float64)
            if HAS_HARD:
                s1_lane += tl.exp((z - m_safe) * temperature)
                zy_lane += tl.where(cols == label, z, 0.0)
        s_all = tl.sum(s_lane, 0)
        e_sup = tl.where(own, tl.exp(z_sup - m_safe), 0.0)
        tl.store(f + 0, m.to(tl.float64))
        tl.store(f + 1, s_all)
        rest = s_all - tl.sum(e_sup.to(tl.float64), 0)
        if (m != NEG_INF) & (rest < tl.minimum(REST_FLOOR * s_all, 0.5)):
            # Below the floor, at the rest's own maximum, as its log-mass relative to m (< 0;
            # distributed/coarse.py rest_log_mass reads either form)
            m_r, r_sum = _rest_at_own_max(s_row, n, inv_t, idx_ptr + row * k, k, offset,
                                          ids, own, z_sup, BLOCK)
            rest = tl.where(r_sum > 0, ((m_r - m) + tl.log(r_sum)).to(tl.float64), 0.0)
        tl.store(f + 2, rest)
        tl.store(f + 3, tl.sum(tl.where(own, 1.0, 0.0), 0).to(tl.float64))
        tl.store(f + 4, tl.sum(s1_lane, 0).to(tl.float64))
        tl.store(f + 5, tl.sum(zy_lane, 0).to(tl.float64))
        tl.store(zsup_ptr + row * k + slots, tl.where(own, z_sup, 0.0).to(tl.float64),
                 mask=slots < k)
    else:
        m = tl.load(f + 0).to(tl.float32)
        base = tl.load(f + 2).to(tl.float32)  # the off-support e_j's: m, or the rest's mass
        off = tl.load(f + 1).to(tl.float32)
        log_s1 = tl.load(f + 4).to(tl.float32)
        g_row = grad_ptr + row * width
        for start in range(0, width, BLOCK):
            cols = start + offs
            inb = cols < n
            z = tl.load(s_row + cols, mask=inb, other=NEG_INF).to(tl.float32) * inv_t
            gz = off * tl.exp(z - base)
            if HAS_HARD:
                gz += hard_weight * (tl.exp((z - m) * temperature - log_s1)
                                     - tl.where(cols == label, 1.0, 0.0))
            gz = tl.where(inb, gz, 0.0)
            tl.store(g_row + cols, cast_rne(gz, grad_ptr.dtype.element_ty), mask=cols < width)
        # The owned support ids' own gradient, over what the loop wrote (same program: a
        # barrier orders the two stores).
        tl.debug_barrier()
        gs = tl.load(sup_ptr + row * k + slots, mask=own, other=0.0).to(tl.float32)
        if HAS_HARD:
            gs += hard_weight * (tl.exp((z_sup - m) * temperature - log_s1)
                                 - tl.where(col == label, 1.0, 0.0))
        tl.store(g_row + col, cast_rne(gs, grad_ptr.dtype.element_ty), mask=own & (col < n))


def launch_config(width: int, k: int) -> tuple[int, int, int]:
    """(BLOCK, KP, num_warps) for a slice of `width` columns and k targets."""
    block = min(2048, max(128, triton.next_power_of_2(max(width, 1))))
    return block, max(16, triton.next_power_of_2(k)), max(4, min(8, block // 256))


def sparse_vp_phase(phase: int, student: torch.Tensor, ids: torch.Tensor, offset: int,
                    valid: torch.Tensor | None, labels: torch.Tensor | None, rec: torch.Tensor,
                    zsup: torch.Tensor, sup_grad: torch.Tensor | None,
                    grad: torch.Tensor | None, temperature: float, hard_weight: float) -> None:
    """One phase over every row of this rank's slice student [N, W] (unit column stride):
    ids [N, k] int64 global ids (-1 pads), rec [N, 8] and zsup [N, k] fp64; phase 1 reads
    sup_grad [N, k] (fp64) and writes grad [N, W] (contiguous)."""
    n, width = student.shape
    k = ids.shape[1]
    if n == 0:
        return
    block, kp, num_warps = launch_config(width, k)
    with _device_ctx(student):
        sparse_vp_kernel[(n,)](
            student, ids,
            valid.view(torch.uint8) if valid is not None else rec,
            labels if labels is not None else rec,
            rec, zsup, sup_grad if sup_grad is not None else rec,
            grad if grad is not None else rec,
            student.stride(0), width, k, offset, temperature, hard_weight,
            PHASE=phase, HAS_VALID=valid is not None, HAS_HARD=hard_weight != 0.0,
            BLOCK=block, KP=kp, num_warps=num_warps, enable_fp_fusion=False,
        )
