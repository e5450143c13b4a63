"""sparse_kd_loss on every fused backend against the float64 reference: values, gradients,
every tail x divergence, re-tempering, and the limits (k = V, a support holding all mass)."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import device_for, kernel_backends
from helpers import GRAD_RTOL, LOSS_FLOOR, LOSS_RTOL, assert_close, fused_rows, logits

import distill_ops
from distill_ops import reference, validation

BACKENDS = kernel_backends()
TAILS = ["bucket", "renorm", "support", "none"]
DIVERGENCES = list(validation.DIVERGENCES)
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def targets(teacher: torch.Tensor, k: int, temperature: float = 1.0, n_pad: int = 0):
    """Top-k (ids, log-probabilities) of a teacher at `temperature`, float64, with the last
    `n_pad` slots of every other row turned into padding (-1)."""
    lp = torch.log_softmax(teacher.double() / temperature, dim=-1)
    val, idx = lp.topk(k, dim=-1)
    if n_pad:
        rows = idx.reshape(-1, k)
        rows[::2, k - n_pad:] = -1
    return idx, val


def run(backend, student, indices, tlp, **kw):
    s = student.detach().clone().requires_grad_()
    loss = distill_ops.sparse_kd_loss(s, indices, tlp, backend=backend, **kw)
    go = torch.rand_like(loss) + 0.5
    (g,) = torch.autograd.grad(loss, s, go)
    s64 = student.detach().to(torch.float64).requires_grad_()
    ref = reference.sparse_kd_loss(s64, indices, tlp.to(torch.float64), **kw)
    (g64,) = torch.autograd.grad(ref, s64, go.to(torch.float64))
    return loss, g, ref, g64


def check(backend, student, indices, tlp, **kw):
    loss, g, ref, g64 = run(backend, student, indices, tlp, **kw)
    assert g.dtype == student.dtype and g.shape == student.shape
    assert_close(loss, ref, LOSS_RTOL[student.dtype], "loss", LOSS_FLOOR)
    assert_close(g, g64, GRAD_RTOL[student.dtype], "grad")
    return loss, g


# (lead..., V, k): a single slot; V not a power of two; leading dims; k = 33 over a row that
# spans two Triton blocks.
SHAPES = [((1,), 7, 1), ((3,), 257, 16), ((2, 3), 500, 64), ((2,), 4099, 33)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("tail", TAILS)
@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_reference(seed, backend, tail, divergence, shape):
    lead, v, k = shape
    dev = device_for(backend)
    s = logits(*lead, v, device=dev)
    idx, tlp = targets(logits(*lead, v, device=dev), k, n_pad=min(3, k - 1))
    check(backend, s, idx, tlp.float(), tail=tail, divergence=divergence, temperature=1.5,
          source_temperature=1.5, beta=0.3)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("tail", TAILS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dtypes(seed, backend, tail, dtype):
    dev = device_for(backend)
    s = logits(4, 640, dtype=dtype, device=dev)
    idx, tlp = targets(logits(4, 640, device=dev), 32)
    check(backend, s, idx.to(torch.int32), tlp.to(dtype), tail=tail, divergence="jsd")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("tail", TAILS)
@pytest.mark.parametrize(("temperature", "source_temperature"), [(2.0, 1.0), (0.5, 1.0),
                                                                 (1.0, 2.0), (2.0, 2.0)])
def test_retempering(seed, backend, tail, temperature, source_temperature):
    dev = device_for(backend)
    s = logits(3, 400, device=dev)
    idx, tlp = targets(logits(3, 400, device=dev), 20, temperature=source_temperature)
    check(backend, s, idx, tlp.float(), tail=tail, temperature=temperature,
          source_temperature=source_temperature, scale_by_t2=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("tail", ["bucket", "renorm", "support"])
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_k_equal_to_v_is_the_dense_loss(seed, backend, tail, divergence):
    dev = device_for(backend)
    s, t = logits(4, 300, device=dev), logits(4, 300, device=dev)
    idx, tlp = targets(t, 300, temperature=2.0)
    a = s.clone().requires_grad_()
    sparse = distill_ops.sparse_kd_loss(a, idx, tlp.float(), tail=tail, divergence=divergence,
                                        temperature=2.0, source_temperature=2.0,
                                        backend=backend)
    sparse.backward()
    b = s.clone().requires_grad_()
    dense = distill_ops.kd_loss(b, t, divergence=divergence, temperature=2.0, backend=backend)
    dense.backward()
    assert_close(sparse, dense.double(), 1e-5, "loss", LOSS_FLOOR)
    assert_close(a.grad, b.grad.double(), 1e-4, "grad")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("gap", [30.0, 45.0, 120.0])
def test_support_holding_almost_all_mass(seed, backend, divergence, gap):
    """q_rest ~ e^-gap (30: 1e-9): summed over the off-support entries, not 1 - sum(q on
    support) (which in fp32 would be pure rounding), so the off-support gradient keeps its
    precision; at 45 Triton's fp64 difference of sums has lost its digits, at 120 the rest's
    terms at the row maximum are past fp32's range (seed 843519828 of the vocab-parallel
    lean test: an inf loss in the C++ kernel, a NaN gradient in float64): the rest summed
    at its own maximum. Row 2 has a support id far below the rest (Triton's column
    comparison with the ids)."""
    dev = device_for(backend)
    v, k = 800, 16
    s = logits(3, v, device=dev)
    t = logits(3, v, device=dev)
    idx, tlp = targets(t, k)
    s.scatter_(-1, idx, gap + logits(3, k, device=dev, spread=0.5))
    s[2, idx[2, -1]] = -2 * gap
    loss, g, ref, g64 = run(backend, s, idx, tlp.float(), tail="bucket", divergence=divergence)
    assert torch.isfinite(loss).all() and torch.isfinite(g).all()
    assert_close(loss, ref, 1e-5, "loss", LOSS_FLOOR)
    off = torch.ones_like(g, dtype=torch.bool).scatter(-1, idx, False)
    # Relative, but for the divergences whose off-support gradients are themselves ~e^-gap
    # (reverse KL, JSD, ...: 1e-52 at gap 120, past fp32's range, where fp32's 0 is right).
    assert_close(g[off], g64[off], 1e-4, "off-support grad", floor=1e-30)


@pytest.mark.parametrize("backend", ["cpu", "torch"])
@pytest.mark.parametrize("tail", TAILS)
def test_float64_rest_past_its_range(seed, backend, tail):
    """A float64 student whose rest lies 800 nats below its support (e^-800 is past float64's
    range): finite, and the float64 reference's loss and gradient."""
    v, k = 300, 12
    s = logits(3, v, dtype=torch.float64)
    idx, tlp = targets(logits(3, v), k)
    s.scatter_(-1, idx, 800.0 + logits(3, k, dtype=torch.float64, spread=0.5))
    loss, g, ref, g64 = run(backend, s, idx, tlp, tail=tail, divergence="forward_kl")
    assert torch.isfinite(loss).all() and torch.isfinite(g).all()
    assert_close(loss, ref, 1e-12, "loss", LOSS_FLOOR)
    assert_close(g, g64, 1e-12, "grad")


@pytest.mark.parametrize("backend", BACKENDS)
def test_support_with_all_the_teacher_mass_gives_no_nan(seed, backend):
    """Teacher log-probabilities summing to 1 (or a hair above, from rounding): the rest
    class is empty on the teacher side, never log of a negative number."""
    dev = device_for(backend)
    s = logits(3, 200, device=dev)
    idx = torch.stack([torch.randperm(200, device=dev)[:8] for _ in range(3)])
    tlp = torch.log_softmax(logits(3, 8, device=dev), -1)
    tlp[0] += 1e-6
    for tail in TAILS:
        loss, g = check(backend, s, idx, tlp, tail=tail, reduction="none")
        assert torch.isfinite(loss).all() and torch.isfinite(g).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("tail", TAILS)
def test_labels_mask_hard_term_and_reductions(seed, backend, tail):
    dev = device_for(backend)
    s = logits(2, 5, 300, device=dev)
    idx, tlp = targets(logits(2, 5, 300, device=dev), 24, n_pad=4)
    labels = torch.randint(0, 300, (2, 5), device=dev)
    labels[0, 2] = -100
    mask = torch.rand(2, 5, device=dev) > 0.2
    for reduction in ("mean", "sum", "none"):
        check(backend, s, idx, tlp.float(), tail=tail, labels=labels, mask=mask,
              hard_weight=0.4, soft_weight=0.6, reduction=reduction, temperature=2.0,
              source_temperature=1.0)
    check(backend, s, idx, tlp.float(), tail=tail, labels=labels, num_items_in_batch=17)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("tail", TAILS)
def test_all_ignored_rows_give_zero_loss_and_grad(seed, backend, tail):
    dev = device_for(backend)
    s = logits(3, 100, device=dev)
    s[1] = float("-inf")
    idx, tlp = targets(logits(3, 100, device=dev), 10)
    labels = torch.full((3,), -100, device=dev)
    loss, g, _, _ = run(backend, s, idx, tlp.float(), tail=tail, labels=labels,
                        reduction="none")
    assert (loss == 0).all() and (g == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("tail", ["bucket", "renorm", "none"])
def test_all_padding_row(seed, backend, tail):
    """No target at all: bucket puts all the teacher mass on "rest"; renorm/none have no
    teacher mass (loss 0 for forward KL)."""
    dev = device_for(backend)
    s = logits(2, 100, device=dev)
    idx, tlp = targets(logits(2, 100, device=dev), 5)
    idx[1] = -1
    check(backend, s, idx, tlp.float(), tail=tail, reduction="none")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("tail", TAILS)
def test_masked_student_vocab(seed, backend, tail):
    dev = device_for(backend)
    s = logits(3, 500, device=dev)
    idx, tlp = targets(logits(3, 500, device=dev), 12)
    banned = torch.rand(3, 500, device=dev) < 0.3
    banned.scatter_(-1, idx, False)
    s[banned] = float("-inf")
    loss, g = check(backend, s, idx, tlp.float(), tail=tail, divergence="jsd")
    assert torch.isfinite(loss).all() and torch.isfinite(g).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_sampled_style_targets_with_tail_none(seed, backend):
    """Targets that are themselves a distribution over their ids (as sampled targets are)."""
    dev = device_for(backend)
    s = logits(4, 256, device=dev)
    idx = torch.stack([torch.randperm(256, device=dev)[:10] for _ in range(4)])
    probs = torch.rand(4, 10, device=dev)
    probs /= probs.sum(-1, keepdim=True)
    check(backend, s, idx, probs.log(), tail="none", divergence="forward_kl")


def test_sparse_module_wrapper(seed):
    s = logits(2, 50)
    idx, tlp = targets(logits(2, 50), 5)
    crit = distill_ops.SparseKDLoss(tail="renorm", temperature=2.0)
    a = crit(s, idx, tlp)
    b = distill_ops.sparse_kd_loss(s, idx, tlp, tail="renorm", temperature=2.0)
    assert torch.equal(a, b) and "renorm" in repr(crit)


@pytest.mark.parametrize("tail", range(4), ids=TAILS)
# AKL's weights carry no gradient by definition: see test_autograd_and_compile.
@pytest.mark.parametrize("divergence", [0, 1, 2, 3, 4, 5, 6], ids=DIVERGENCES[:7])
def test_gradcheck_float64_cpu_kernel(seed, tail, divergence):
    s = logits(3, 13, dtype=torch.float64).requires_grad_()
    idx, tlp = targets(logits(3, 13), 5, n_pad=1)
    valid = torch.tensor([True, False, True])
    labels = torch.tensor([3, 0, 12])
    args = (idx, tlp, valid, labels, divergence, tail, 1.7, 1.2, 0.4, 0.7, 1.0, 0.3, 1.1, True,
            None, "cpu")
    fused = fused_rows(torch.ops.distill_ops.sparse_kd)
    assert torch.autograd.gradcheck(lambda x: fused.apply(x, *args), (s,), eps=1e-6,
                                    atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("tail", TAILS)
def test_gradcheck_float64_reference(seed, tail):
    s = logits(2, 11, dtype=torch.float64).requires_grad_()
    idx, tlp = targets(logits(2, 11), 4, n_pad=1)
    assert torch.autograd.gradcheck(
        lambda x: distill_ops.sparse_kd_loss(x, idx, tlp, tail=tail, divergence="jsd",
                                             temperature=1.3, reduction="none",
                                             backend="torch"),
        (s,), eps=1e-6, atol=1e-7, rtol=1e-5)


def test_torch_compile_fullgraph_matches_eager(seed):
    torch._dynamo.reset()
    s = logits(2, 4, 300)
    idx, tlp = targets(logits(2, 4, 300), 16)

    def f(x):
        return distill_ops.sparse_kd_loss(x, idx, tlp.float(), tail="bucket",
                                          divergence="reverse_kl", temperature=2.0,
                                          backend="cpu")

    a = s.clone().requires_grad_()
    eager = f(a)
    eager.backward()
    b = s.clone().requires_grad_()
    out = torch.compile(f, fullgraph=True, backend="aot_eager")(b)
    out.backward()
    torch.testing.assert_close(out, eager, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(b.grad, a.grad, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize(
    ("change", "exc", "match"),
    [
        ({"tail": "zero"}, ValueError, "tail must be one of"),
        ({"divergence": "xent"}, ValueError, "divergence must be one of"),
        ({"source_temperature": 0.0}, ValueError, "source_temperature must be finite and > 0"),
        ({"indices": "float"}, TypeError, "indices must be an integer tensor"),
        ({"indices": "too_big"}, ValueError, r"indices must be -1 \(padding\) or lie in \[0, 50\)"),
        ({"indices": "dup"}, ValueError, "indices must be unique within a row: row 1"),
        ({"indices": "short"}, ValueError, "indices and teacher_logprobs must have the same"),
        ({"indices": "k_too_big"}, ValueError, r"k \(the last dim of indices\) must lie in"),
        ({"teacher_logprobs": "int"}, TypeError, "teacher_logprobs must be a float tensor"),
        ({"indices": "rows"}, ValueError, "indices must be"),
    ],
)
def test_bad_inputs(change, exc, match):
    s = logits(3, 50)
    idx, tlp = targets(logits(3, 50), 6)
    kw = {k: v for k, v in change.items() if k not in ("indices", "teacher_logprobs")}
    what = change.get("indices")
    if what == "float":
        idx = idx.double()
    elif what == "too_big":
        idx[0, 0] = 50
    elif what == "dup":
        idx[1, 2] = idx[1, 0]
    elif what == "short":
        idx = idx[:, :5]
    elif what == "k_too_big":
        idx = torch.arange(51).expand(3, 51)
        tlp = torch.zeros(3, 51)
    elif what == "rows":
        idx, tlp = idx[:2], tlp[:2]
    if change.get("teacher_logprobs") == "int":
        tlp = torch.zeros(3, 6, dtype=torch.long)
    with pytest.raises(exc, match=match):
        distill_ops.sparse_kd_loss(s, idx, tlp, **kw)


def test_no_tail_mass_is_exact_for_reverse_kl_with_renorm():
    """renorm keeps the student normalised over the full V: its support mass is < 1, so the
    'reverse KL' over the support is not a divergence and can be negative (documented)."""
    s = torch.zeros(1, 10, dtype=torch.float64)
    idx = torch.tensor([[0, 1]])
    tlp = torch.log(torch.tensor([[0.5, 0.5]], dtype=torch.float64))
    loss = distill_ops.sparse_kd_loss(s, idx, tlp, tail="renorm", divergence="reverse_kl")
    # q = 0.1 on each support id: sum 0.1 * log(0.1 / 0.5) * 2
    assert math.isclose(loss.item(), 2 * 0.1 * math.log(0.2), rel_tol=1e-12)
