"""The maths of the fused LM-head losses' GPU path, checked on the CPU.

On a GPU the head's matmuls run on tensor cores in the head's dtype (_head_matmul.py, mode
"head"): bf16/fp16 operands, fp32 accumulation, fp32 logits, the logit gradient rounded once
to the head's dtype, grad_W accumulated across chunks in the head's dtype. Forcing
DISTILL_OPS_HEAD_MATMUL=head here runs exactly those roundings (bf16 and fp16 products are
exact in fp32, so fp32 arithmetic on the rounded operands is the tensor cores' arithmetic up
to summation order). The reference is float64 on the same bf16/fp16 operands.

Tolerances, from the roundings: the loss comes from fp32 logits (1e-5 relative, as the fp32
path); each gradient element carries one rounding of g (2^-9 relative for bf16, 2^-11 fp16)
and, for grad_hidden and grad_W, one rounding of the result; grad_W adds one rounding per
chunk, so after c chunks its error is at most ~(c + 2) * 2^-9 and typically sqrt(c) times one.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import device_for, kernel_backends
from helpers import assert_close

import distill_ops
from distill_ops import reference
from distill_ops.backends import head_matmul as hm

BACKENDS = kernel_backends()
UNIT = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-10}  # one rounding (2 ulp-halves)


@pytest.fixture
def head_mode(monkeypatch):
    monkeypatch.setenv("DISTILL_OPS_HEAD_MATMUL", "head")


def _head(n, h, v, dtype, device, scale=1.0):
    hid = (torch.randn(n, h, device=device) * scale).to(dtype)
    w = (torch.randn(v, h, device=device) / math.sqrt(h) * 3).to(dtype)
    b = (torch.randn(v, device=device) * 0.1).to(dtype)
    return hid, w, b


def _grads(fn, *xs):
    xs = [x.detach().clone().requires_grad_() for x in xs]
    loss = fn(*xs)
    loss.backward()
    return loss, [x.grad for x in xs]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd", "tvd"])
def test_tensor_core_maths_dense_teacher(seed, head_mode, backend, dtype, divergence):
    dev = device_for(backend)
    hs, ws, bs = _head(11, 32, 301, dtype, dev)
    ht, wt, bt = _head(11, 48, 301, dtype, dev)
    labels = torch.randint(0, 301, (11,), device=dev)
    labels[3] = -100
    kw = dict(divergence=divergence, temperature=2.0, labels=labels, hard_weight=0.3,
              chunk_size=4)  # 3 chunks of the 10 counted rows
    loss, (gh, gw, gb) = _grads(
        lambda a, w, b: distill_ops.fused_linear_kd_loss(
            a, w, ht, wt, student_bias=b, teacher_bias=bt, backend=backend, **kw),
        hs, ws, bs)
    kw.pop("chunk_size")
    ref, (rh, rw, rb) = _grads(
        lambda a, w, b: reference.kd_loss(a @ w.T + b, ht.double() @ wt.double().T + bt.double(),
                                          **kw),
        hs.double(), ws.double(), bs.double())
    assert gh.dtype == dtype and gw.dtype == dtype
    assert_close(loss, ref, 1e-5, "loss", 0.1)
    u = UNIT[dtype]
    assert_close(gb, rb, 2 * u, "grad bias")
    assert_close(gh, rh, 3 * u, "grad hidden")
    assert_close(gw, rw, (3 + 2) * u, "grad weight")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("tail", ["bucket", "renorm", "support", "none"])
def test_tensor_core_maths_sparse_targets(seed, head_mode, backend, tail):
    dev = device_for(backend)
    dtype = torch.bfloat16
    hs, ws, _ = _head(9, 32, 257, dtype, dev)
    t = torch.randn(9, 257, device=dev) * 2
    top = distill_ops.topk_logprobs(t, 16, backend="cpu" if dev.type == "cpu" else backend)
    kw = dict(tail=tail, temperature=1.5, source_temperature=1.0, reduction="sum",
              chunk_size=3)
    loss, (gh, gw) = _grads(
        lambda a, w: distill_ops.fused_linear_kd_loss(
            a, w, teacher_indices=top.indices, teacher_logprobs=top.logprobs, backend=backend,
            **kw), hs, ws)
    kw.pop("chunk_size")
    ref, (rh, rw) = _grads(
        lambda a, w: reference.sparse_kd_loss(a @ w.T, top.indices, top.logprobs, **kw),
        hs.double(), ws.double())
    u = UNIT[dtype]
    assert_close(loss, ref, 1e-5, "loss", 0.1)
    assert_close(gh, rh, 3 * u, "grad hidden")
    assert_close(gw, rw, (3 + 2) * u, "grad weight")


def test_weight_gradient_accumulated_in_bf16_stays_within_its_bound(seed, head_mode):
    """grad_W summed over 64 one-row chunks in bf16: within the (c + 2) * 2^-9 worst case and,
    in practice, a few roundings (this is the error the GPU path trades for half the
    accumulator's memory and traffic)."""
    hs, ws, _ = _head(64, 32, 200, torch.bfloat16, "cpu")
    ht, wt, _ = _head(64, 32, 200, torch.bfloat16, "cpu")
    _, (gw,) = _grads(lambda w: distill_ops.fused_linear_kd_loss(hs, w, ht, wt, chunk_size=1),
                      ws)
    _, (rw,) = _grads(lambda w: reference.kd_loss(hs.double() @ w.T,
                                                  ht.double() @ wt.double().T), ws.double())
    err = (gw.double() - rw).norm() / rw.norm()
    assert err <= 66 * 2.0**-9
    assert err <= 8 * 2.0**-9, f"grad_W error {err:.2e} over 64 chunks"


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp32_head_in_head_mode_is_the_fp32_path(seed, monkeypatch, backend):
    """An fp32 head computes in fp32 in both modes: the results agree to fp32 rounding."""
    dev = device_for(backend)
    hs, ws, bs = _head(7, 16, 150, torch.float32, dev)
    ht, wt, _ = _head(7, 16, 150, torch.float32, dev)
    out = {}
    for mode in hm.MODES:
        monkeypatch.setenv("DISTILL_OPS_HEAD_MATMUL", mode)
        out[mode] = _grads(lambda a, w, b: distill_ops.fused_linear_kd_loss(
            a, w, ht, wt, student_bias=b, divergence="jsd", chunk_size=3, backend=backend),
            hs, ws, bs)
    (la, ga), (lb, gb) = out["fp32"], out["head"]
    torch.testing.assert_close(la, lb, rtol=1e-6, atol=1e-7)
    for x, y in zip(ga, gb, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
def test_per_row_reduction_in_head_mode(seed, head_mode, backend):
    """reduction='none' recomputes in backward with per-row weights on the bf16 gradient."""
    dev = device_for(backend)
    hs, ws, _ = _head(6, 16, 100, torch.bfloat16, dev)
    ht, wt, _ = _head(6, 16, 100, torch.bfloat16, dev)
    go = torch.rand(6, device=dev) + 0.5
    a = hs.detach().clone().requires_grad_()
    rows = distill_ops.fused_linear_kd_loss(a, ws, ht, wt, reduction="none", chunk_size=4,
                                            backend=backend)
    (rows * go).sum().backward()
    b = hs.double().requires_grad_()
    ref = reference.kd_loss(b @ ws.double().T, ht.double() @ wt.double().T, reduction="none")
    (ref * go.double()).sum().backward()
    assert_close(rows, ref, 1e-5, "rows", 0.1)
    assert_close(a.grad, b.grad, 4 * UNIT[torch.bfloat16], "grad hidden")


def test_out_dtype_matmul_is_emulated_exactly_on_the_cpu(seed):
    """mm_f32 of bf16 operands on the CPU = the fp32 product of the rounded operands."""
    a = torch.randn(5, 64).to(torch.bfloat16)
    b = torch.randn(64, 7).to(torch.bfloat16)
    got = hm.mm_f32(a, b)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), a.double() @ b.double(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b == "triton"])
def test_triton_kernel_writes_the_bf16_gradient_as_one_rne_rounding(seed, backend):
    """The loss kernel's own bf16 store from fp32 logits equals its fp32 gradient rounded to
    nearest even: the one rounding the GPU path makes of g."""
    from distill_ops.backends.triton import dense_kd as tdense
    from distill_ops.validation import loss_scalars

    dev = device_for(backend)
    s = torch.randn(4, 333, device=dev) * 3
    t = torch.randn(4, 333, device=dev) * 3
    sc = loss_scalars(divergence="jsd", temperature=1.5, beta=0.5, hard_weight=0.0,
                      soft_weight=1.0, scale_by_t2=False, student_logit_scale=1.0,
                      teacher_logit_scale=1.0, student_softcap=None, teacher_softcap=None,
                      has_labels=False)
    _, g32 = tdense.dense_kd_forward(s, t, None, None, sc, 333, True)
    _, g16 = tdense.dense_kd_forward(s, t, None, None, sc, 333, True, torch.bfloat16)
    assert g16.dtype == torch.bfloat16
    assert torch.equal(g16, g32.to(torch.bfloat16))
