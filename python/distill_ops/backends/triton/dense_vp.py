"""The dense KD loss of vocab-parallel logits on a GPU: each rank holds a slice of the
vocabulary and the row statistics are global. One kernel, three phases, with the Python
layer's all-reduces of a few floats a row between them (distributed/vocab_parallel.py), on
the same row record as the C++ CPU kernel (csrc/cpu/dense_vp.cpp; fp64, 8 fields a row):

- phase 0 (statistics): the slice's maxima M_s, M_t (-inf where it holds nothing), its sums
  S_s, S_t of exp(z - M), the student's T = 1 sum, z_s at the label where the label is in
  the slice, and for the KLs their cross term centred on the maxima (so their loss needs no
  second read): dense_kd's pass 1 (`row_statistics`), the same instructions;
- phase 1 (JSD, TVD, skew KLs, AB): with the global maxima and log-sums in the record, the
  slice's partial sums (A, B) of the loss and of sum_j h_j (dense_kd's `loss_sums`);
- phase 2: with the global divergence and sum_j h_j too, dL/dx of the slice in the student's
  dtype (dense_kd's `soft_grad` and `store_grad`);
- AKL: phase 3, one step of the bisection for its head threshold tau (field 7): the slice's
  teacher mass at p >= tau, or, for a 16-bit teacher without softcap or TAID, at x >= tau
  over its own logits (distributed/head.py: at most 16 steps, ~28 over p at V = 128256; one
  all-reduce of a float a row each, as the one-device kernel's reads of the row); phase 4
  with the global tau: both KLs and the head's and tail's sum |p - q| (fields 5, 6, 7, 4);
  phase 2 reads the head weight from field 7.

Bytes per logit: the fused kernel on one device reads s and t twice (statistics, gradient)
and writes g; the vocab-parallel form does the same for the KLs and adds one read of s and t
for the others, as the one-device kernel does for them too.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .akl import akl_head_mass, akl_sums
from .dense_kd import (
    _device_ctx,
    launch_config,
    loss_sums,
    row_statistics,
    soft_grad,
    store_grad,
)
from .elementwise import AKL, NEG_INF
from .rows import _log_probs

# The record: 8 fp64 fields a row, csrc/cpu/dense_vp.cpp's VpField: phase 0 writes M_s, S_s,
# M_t, S_t, S_1, z_y, C; phase 1 reads global M_s, log S_s, M_t, log S_t and writes A, B into
# fields 5, 6; phase 2 reads log S_1 (field 4), the divergence and sum_j h_j (fields 5, 6).
FIELDS = 8


@triton.jit
def dense_vp_kernel(
    s_ptr, t_ptr, valid_ptr, labels_ptr, rec_ptr, grad_ptr,
    s_stride, t_stride, g_stride, width,
    temperature, beta, scale_s, cap_s, scale_t, cap_t, hard_weight, soft_coef, param2, interp,
    PHASE: tl.constexpr,
    DIVERGENCE: tl.constexpr,
    HAS_CAP_S: tl.constexpr,
    HAS_CAP_T: tl.constexpr,
    HAS_INTERP: tl.constexpr,
    HAS_VALID: tl.constexpr,
    HAS_HARD: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    inv_t = 1.0 / temperature
    n = width
    if HAS_VALID:  # an ignored row reads nothing and writes zeros
        n = tl.where(tl.load(valid_ptr + row) != 0, width, 0)
    s_row = s_ptr + row * s_stride
    t_row = t_ptr + row * t_stride
    f = rec_ptr + row * 8
    label = -1  # the local column of the label, -1 where it lies in another slice
    if HAS_HARD:
        label = tl.load(labels_ptr + row)
    if PHASE == 0:
        M_s, sum_s, M_t, sum_t, c_row, sum_1, z_y = row_statistics(
            s_row, t_row, n, label, temperature, scale_s, cap_s, scale_t, cap_t, inv_t,
            interp, DIVERGENCE, HAS_CAP_S, HAS_CAP_T, HAS_INTERP, HAS_HARD, BLOCK)
        # A slice without mass (empty, ignored, all -inf) has maximum -inf: the Python layer
        # moves its sums to the global maximum by exp(M - M_global) = 0. A NaN sum stays.
        tl.store(f + 0, tl.where(sum_s == 0.0, NEG_INF, M_s).to(tl.float64))
        tl.store(f + 1, sum_s.to(tl.float64))
        tl.store(f + 2, tl.where(sum_t == 0.0, NEG_INF, M_t).to(tl.float64))
        tl.store(f + 3, sum_t.to(tl.float64))
        tl.store(f + 4, sum_1.to(tl.float64))
        tl.store(f + 5, z_y.to(tl.float64))
        tl.store(f + 6, c_row.to(tl.float64))
    else:
        M_s = tl.load(f + 0).to(tl.float32)
        log_ss = tl.load(f + 1).to(tl.float32)
        M_t = tl.load(f + 2).to(tl.float32)
        log_st = tl.load(f + 3).to(tl.float32)
        offs = tl.arange(0, BLOCK)
        # AKL's head over a 16-bit teacher's own logits (akl.py; distributed/head.py).
        KEY16 = (t_ptr.dtype.element_ty.primitive_bitwidth == 16) and (not HAS_CAP_T) \
            and (not HAS_INTERP)
        if PHASE == 1:
            a, b = loss_sums(s_row, t_row, n, scale_s, cap_s, scale_t, cap_t, inv_t, interp,
                             M_s, log_ss, M_t, log_st, beta, param2, DIVERGENCE, HAS_CAP_S,
                             HAS_CAP_T, HAS_INTERP, BLOCK)
            tl.store(f + 5, a.to(tl.float64))
            tl.store(f + 6, b.to(tl.float64))
        elif PHASE == 3:
            # AKL's threshold search, one bisection step: the slice's teacher mass at p >= tau
            # (x >= tau with KEY16).
            mass = akl_head_mass(s_row, t_row, n, tl.load(f + 7).to(tl.float32), scale_s,
                                 cap_s, scale_t, cap_t, inv_t, interp, M_t, log_st, HAS_CAP_S,
                                 HAS_CAP_T, HAS_INTERP, KEY16, BLOCK)
            tl.store(f + 5, mass.to(tl.float64))
        elif PHASE == 4:
            # AKL with the global threshold: both KLs and the head's and tail's sum |p - q|.
            fkl, rkl, g_head, g_tail = akl_sums(s_row, t_row, n, tl.load(f + 7).to(tl.float32),
                                                scale_s, cap_s, scale_t, cap_t, inv_t, interp,
                                                M_s, log_ss, M_t, log_st, HAS_CAP_S, HAS_CAP_T,
                                                HAS_INTERP, KEY16, BLOCK)
            tl.store(f + 5, fkl.to(tl.float64))
            tl.store(f + 6, rkl.to(tl.float64))
            tl.store(f + 7, g_head.to(tl.float64))
            tl.store(f + 4, g_tail.to(tl.float64))
        else:
            log_s1 = tl.load(f + 4).to(tl.float32)
            div = tl.load(f + 5).to(tl.float32)
            sum_qg = tl.load(f + 6).to(tl.float32)
            akl_w = 0.0
            if DIVERGENCE == AKL:  # the head's weight, sum_qg its reverse KL
                akl_w = tl.load(f + 7).to(tl.float32)
            g_row = grad_ptr + row * g_stride
            for start in range(0, width, BLOCK):
                cols = start + offs
                zs, lq, lp = _log_probs(s_row, t_row, cols, n, scale_s, cap_s, scale_t, cap_t,
                                        inv_t, interp, M_s, log_ss, M_t, log_st, HAS_CAP_S,
                                        HAS_CAP_T, HAS_INTERP)
                d = soft_grad(lq, lp, div, sum_qg, akl_w, beta, param2, DIVERGENCE)
                store_grad(g_row, cols, n, width, zs, d, soft_coef * inv_t, hard_weight, M_s,
                           log_s1, label, temperature, scale_s, cap_s, HAS_HARD, HAS_CAP_S,
                           False, True)


def dense_vp_phase(phase: int, student: torch.Tensor, teacher: torch.Tensor,
                   valid: torch.Tensor | None, labels: torch.Tensor | None, rec: torch.Tensor,
                   grad: torch.Tensor | None, sc) -> None:
    """Run one phase over every row of this rank's slices student, teacher [N, W] (rows
    unit-stride), reading and writing the record rec [N, 8] (fp64, on their device); labels
    are local columns (-1: not in this slice); phase 2 writes grad [N, W]."""
    n, width = student.shape
    if n == 0:
        return
    block, num_warps = launch_config(width)
    dummy = rec
    with _device_ctx(student):
        dense_vp_kernel[(n,)](
            student, teacher,
            valid.view(torch.uint8) if valid is not None else dummy,
            labels if labels is not None else dummy,
            rec, grad if grad is not None else dummy,
            student.stride(0), teacher.stride(0), width if grad is None else grad.stride(0),
            width,
            sc.temperature, sc.beta, sc.student_scale, sc.student_softcap, sc.teacher_scale,
            sc.teacher_softcap, sc.hard_weight, sc.soft_coef, sc.param2, sc.interp,
            PHASE=phase,
            DIVERGENCE=sc.divergence,
            HAS_CAP_S=sc.student_softcap > 0,
            HAS_CAP_T=sc.teacher_softcap > 0,
            HAS_INTERP=sc.interp != 1.0,
            HAS_VALID=valid is not None,
            HAS_HARD=sc.hard_weight != 0.0,
            BLOCK=block, num_warps=num_warps,
        )

