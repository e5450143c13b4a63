"""gradcheck in float64, backward-only-scales, and torch.compile(fullgraph=True) over the ops."""

from __future__ import annotations

import pytest
import torch
from helpers import GRAD_FLOOR, fused_rows, logits, rel_err

import distill_ops
from distill_ops import validation

DIVERGENCES = list(validation.DIVERGENCES)


@pytest.mark.parametrize("divergence", DIVERGENCES[:7])  # AKL's weights: no gradient
def test_gradcheck_float64_reference(seed, divergence):
    # TVD's |q - p| has kinks where q_j == p_j; random logits keep finite differences clear.
    s = logits(3, 17, dtype=torch.float64).requires_grad_()
    t = logits(3, 17, dtype=torch.float64)
    labels = torch.tensor([3, -100, 16])

    def f(x):
        return distill_ops.kd_loss(
            x, t, divergence=divergence, temperature=1.7, beta=0.4, labels=labels,
            hard_weight=0.3, student_softcap=4.0, student_logit_scale=1.2, scale_by_t2=True,
            reduction="none", backend="torch",
        )

    assert torch.autograd.gradcheck(f, (s,), eps=1e-6, atol=1e-7, rtol=1e-5)


# AKL's weights and TAID's target carry no gradient by definition, so finite differences
# of their loss are not its gradient: the divergences whose gradient is the derivative.
@pytest.mark.parametrize("divergence", [0, 1, 2, 3, 4, 5, 6], ids=DIVERGENCES[:7])
def test_gradcheck_float64_cpu_kernel(seed, divergence):
    s = logits(3, 17, dtype=torch.float64).requires_grad_()
    t = logits(3, 17, dtype=torch.float64)
    valid = torch.tensor([True, False, True])
    labels = torch.tensor([3, 0, 16])
    # divergence, T, beta (skew, AB alpha), AB beta, TAID t, student scale/softcap, teacher
    # scale/softcap, hard weight, soft coefficient (T^2), vocab, compute_grad, row scale,
    # backend
    args = (t, valid, labels, divergence, 1.7, 0.4, 0.7, 1.0, 1.2, 4.0, 0.9, 0.0, 0.3, 1.7**2,
            17, True, None, "cpu")
    fused = fused_rows(torch.ops.distill_ops.dense_kd)
    assert torch.autograd.gradcheck(lambda x: fused.apply(x, *args), (s,), eps=1e-6,
                                    atol=1e-7, rtol=1e-5)


def test_backward_scales_the_saved_gradient(seed):
    s = logits(4, 100).requires_grad_()
    t = logits(4, 100)
    go = torch.tensor([0.0, 1.0, -2.0, 3.5])
    (g,) = torch.autograd.grad(distill_ops.kd_loss(s, t, reduction="none"), s, go)
    (g1,) = torch.autograd.grad(distill_ops.kd_loss(s, t, reduction="none"), s, torch.ones(4))
    torch.testing.assert_close(g, g1 * go[:, None], rtol=1e-6, atol=0)
    assert (g[0] == 0).all()


def test_second_backward_through_the_same_graph_fails_loudly(seed):
    """The saved gradient is scaled in place (one gradient of memory, not two): a second
    backward must raise, never return a double-scaled gradient."""
    s = logits(3, 50).requires_grad_()
    loss = distill_ops.kd_loss(s, logits(3, 50))
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_no_host_sync_in_the_op_layer():
    """The fused path must not read device values on the host: every such call would stall
    the GPU stream (and break a torch.compile graph)."""
    import inspect

    from distill_ops import autograd, dense_kd, fused_linear, reduction, sampling, sparse_kd, topk

    for mod in (dense_kd, sparse_kd, topk, sampling, fused_linear, autograd, reduction):
        src = inspect.getsource(mod)
        for bad in (".item()", ".tolist()", "torch.equal("):
            assert bad not in src, f"{bad} in {mod.__name__}"


def _loss_fn(s, t, labels):
    return distill_ops.kd_loss(s, t, divergence="jsd", beta=0.3, temperature=2.0, labels=labels,
                               hard_weight=0.5, backend="cpu")


def test_torch_compile_fullgraph_matches_eager(seed):
    torch._dynamo.reset()
    s = logits(2, 5, 300)
    t = logits(2, 5, 300)
    labels = torch.randint(0, 300, (2, 5))
    labels[0, 0] = -100

    s1 = s.clone().requires_grad_()
    eager = _loss_fn(s1, t, labels)
    eager.backward()

    compiled = torch.compile(_loss_fn, fullgraph=True, backend="aot_eager")
    s2 = s.clone().requires_grad_()
    out = compiled(s2, t, labels)
    out.backward()
    torch.testing.assert_close(out, eager, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(s2.grad, s1.grad, rtol=1e-6, atol=1e-9)


@pytest.mark.serial
@pytest.mark.timeout(900)
def test_torch_compile_inductor(seed):
    """The default inductor backend too (generates C++ for the code around the op)."""
    torch._dynamo.reset()
    s = logits(6, 200).requires_grad_()
    t = logits(6, 200)
    compiled = torch.compile(
        lambda a, b: distill_ops.kd_loss(a, b, divergence="reverse_kl", backend="cpu") * 2.0,
        fullgraph=True,
    )
    out = compiled(s, t)
    out.backward()
    ref = distill_ops.kd_loss(s.detach(), t, divergence="reverse_kl", backend="cpu") * 2.0
    torch.testing.assert_close(out.detach(), ref, rtol=1e-6, atol=1e-7)
    assert torch.isfinite(s.grad).all()


def test_opcheck():
    """torch.library's own consistency checks of the registered ops: schema, fake impl,
    autograd registration. Its AOT-dispatch check is left to the compile tests above: it
    returns the op's gradient output to the caller while backward scales that same buffer in
    place, which kd_loss never does (it drops that output)."""
    s = logits(3, 40).requires_grad_()
    t = logits(3, 40)
    valid = torch.tensor([True, False, True])
    labels = torch.tensor([1, 2, 3])
    args = (s, t, valid, labels, 2, 1.5, 0.5, 0.0, 1.0, 1.0, 0.0, 1.0, 0.0, 0.2, 1.0, 40, True,
            torch.tensor(0.5), "cpu")
    torch.library.opcheck(torch.ops.distill_ops.dense_kd.default, args,
                          test_utils=("test_schema", "test_autograd_registration",
                                      "test_faketensor"))
    torch.library.opcheck(torch.ops.distill_ops.scale_rows_.default,
                          (logits(3, 40), torch.rand(3), "cpu"))


@pytest.mark.serial
@pytest.mark.timeout(900)
@pytest.mark.parametrize("compile_backend", ["aot_eager", "inductor"])
def test_torch_compile_dynamic_shapes(seed, compile_backend):
    """dynamic=True: symbolic row counts and symbolic float options trace without a break."""
    torch._dynamo.reset()
    f = torch.compile(
        lambda a, b, temp: distill_ops.kd_loss(a, b, temperature=temp, backend="cpu"),
        fullgraph=True, dynamic=True, backend=compile_backend,
    )
    for n in (5, 9):
        s = logits(n, 150).requires_grad_()
        t = logits(n, 150)
        out = f(s, t, 1.5)
        out.backward()
        s_ref = s.detach().clone().requires_grad_()
        ref = distill_ops.kd_loss(s_ref, t, temperature=1.5, backend="cpu")
        ref.backward()
        torch.testing.assert_close(out.detach(), ref.detach(), rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(s.grad, s_ref.grad, rtol=1e-6, atol=1e-9)


@pytest.mark.serial
@pytest.mark.timeout(900)
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (Triton through "
                    "inductor; torch.compile cannot trace the interpreter's kernels)")
def test_torch_compile_inductor_over_the_triton_ops_on_gpu(seed):
    """fullgraph inductor over every op on CUDA tensors (the triton backend): equal to eager."""
    torch._dynamo.reset()
    s = logits(6, 1000, device="cuda", dtype=torch.bfloat16)
    t = logits(6, 1000, device="cuda", dtype=torch.bfloat16)
    top = distill_ops.topk_logprobs(t, 32, temperature=2.0)

    def f(a):
        dense = distill_ops.kd_loss(a, t, divergence="jsd", temperature=2.0)
        sparse = distill_ops.sparse_kd_loss(a, top.indices, top.logprobs, temperature=2.0,
                                            source_temperature=2.0)
        return dense + sparse, distill_ops.topk_logprobs(a, 8).logprobs

    a = s.clone().requires_grad_()
    loss, lp = f(a)
    loss.backward()
    b = s.clone().requires_grad_()
    loss_c, lp_c = torch.compile(f, fullgraph=True)(b)
    loss_c.backward()
    torch.testing.assert_close(loss_c, loss, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(lp_c, lp)
    torch.testing.assert_close(b.grad, a.grad)


def _plain_backward_case(op: str, case: str):
    """(student, loss(x, backend)) for one reduction case."""
    s = logits(5, 300).requires_grad_()
    t = logits(5, 300)
    kw = {"labels": torch.tensor([1, -100, 7, 299, 0])}
    if case == "mean":
        kw = {}
    elif case == "sum":
        kw["reduction"] = "sum"
    elif case == "num_items":
        kw["num_items_in_batch"] = 7
    elif case == "num_items_tensor":
        kw["num_items_in_batch"] = torch.tensor(11)
    if op == "dense":
        def f(x, backend):
            return distill_ops.kd_loss(x, t, divergence="jsd", temperature=1.5, backend=backend,
                                       **kw)
    else:
        top = distill_ops.topk_logprobs(t, 9, temperature=1.5, backend="torch")

        def f(x, backend):
            return distill_ops.sparse_kd_loss(x, top.indices, top.logprobs, temperature=1.5,
                                              backend=backend, **kw)
    return s, f


@pytest.mark.parametrize("op", ["dense", "sparse"])
@pytest.mark.parametrize("case", ["mean", "mean-masked", "sum", "num_items", "num_items_tensor"])
def test_plain_backward_moves_no_gradient_bytes(seed, monkeypatch, op, case):
    """On the Triton backend the forward folds the reduction's weight into the gradient, so
    a plain loss.backward() asks the scale kernel for factors of exactly 1, which it skips;
    a scaled loss (x 0.5) still scales. Gradients equal the torch reference either way."""
    from distill_ops.backends.triton import dense_kd as tdense

    factors = []
    launch = tdense.scale_rows_

    def spy(grad, scale):
        factors.append(scale.clone())
        launch(grad, scale)

    monkeypatch.setattr(tdense, "scale_rows_", spy)
    s, f = _plain_backward_case(op, case)
    f(s, "triton").backward()
    assert len(factors) == 1 and (factors[0] == 1.0).all(), factors
    s_ref = s.detach().clone().requires_grad_()
    f(s_ref, "torch").backward()
    assert rel_err(s.grad, s_ref.grad, GRAD_FLOOR) <= 1e-5

    factors.clear()
    s2 = s.detach().clone().requires_grad_()
    (0.5 * f(s2, "triton")).backward()
    assert len(factors) == 1 and (factors[0] == 0.5).all(), factors
    assert rel_err(s2.grad, 0.5 * s_ref.grad, GRAD_FLOOR) <= 1e-5


def test_scale_kernel_skips_rows_of_factor_one(seed):
    """The Triton scale kernel leaves rows scaled by exactly 1 as they are and scales the
    others (in fp32, one rounding)."""
    from distill_ops.backends.triton import dense_kd as tdense

    g = logits(4, 5000).to(torch.bfloat16)
    scale = torch.tensor([1.0, 0.25, 1.0, -3.0])
    out = g.clone()
    tdense.scale_rows_(out, scale)
    torch.testing.assert_close(out, (g.float() * scale[:, None]).to(torch.bfloat16), rtol=0,
                               atol=0)
