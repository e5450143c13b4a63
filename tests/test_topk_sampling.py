"""topk_logprobs against the float64 reference on every backend, and sample_targets'
unbiasedness (targets and the gradients built from them)."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import ON_GPU, device_for, kernel_backends
from helpers import logits

import distill_ops
from distill_ops import reference
from distill_ops.backends import triton_interpreted

BACKENDS = kernel_backends()
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def check_topk(backend, x, k, **kw):
    top = distill_ops.topk_logprobs(x, k, backend=backend, **kw)
    ref_idx, ref_lp = reference.topk_logprobs(x.double(), k, **kw)
    assert top.indices.dtype == torch.int32 and top.logprobs.dtype == torch.float32
    assert top.indices.shape == (*x.shape[:-1], k)
    assert torch.equal(top.indices.cpu(), ref_idx.cpu())
    torch.testing.assert_close(top.logprobs.double().cpu(), ref_lp.cpu(), rtol=1e-5, atol=2e-6)
    return top


# (lead, V, k): one id; V not a power of two; k = V; leading dims; k = 100 and V spanning
# many 128-key blocks of the Triton kernel (its merges are the expensive path).
SHAPES = [((3,), 1, 1), ((4,), 1000, 1), ((2,), 257, 257), ((2, 3), 500, 64), ((3,), 1500, 100)]
# The interpreter runs tl.sort slowly: Triton gets every shape in fp32 and the reduced
# precisions on one shape (the kernel differs by dtype only in its load); the CPU gets all.
def _case(backend, dtype, shape):
    if isinstance(backend, str):
        return (backend, dtype, shape)
    return pytest.param(*backend.values, dtype, shape, marks=backend.marks)  # the cuda row


CASES = [
    _case(backend, dtype, shape)
    for backend in BACKENDS
    for dtype in DTYPES
    for shape in SHAPES
    if backend != "triton" or dtype == torch.float32 or shape == ((2, 3), 500, 64)
]


@pytest.mark.parametrize(("backend", "dtype", "shape"), CASES, ids=str)
def test_topk_matches_reference(seed, backend, dtype, shape):
    lead, v, k = shape
    x = logits(*lead, v, dtype=dtype, device=device_for(backend), spread=3.0)
    check_topk(backend, x, k, temperature=2.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_topk_options(seed, backend):
    x = logits(3, 600, device=device_for(backend), spread=10.0)
    check_topk(backend, x, 32, temperature=0.7, logit_scale=1.3, softcap=20.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_topk_ties_keep_the_lower_id_first(seed, backend):
    x = logits(2, 300, device=device_for(backend))
    x[:, [17, 3, 250, 40]] = 50.0  # four equal maxima
    x[1, 100:] = x[1, 99]  # a long run of equal values
    top = check_topk(backend, x, 8)
    assert top.indices[0, :4].tolist() == [3, 17, 40, 250]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("order", ["rising", "falling", "blocks"])
def test_topk_whatever_the_order_of_the_vocabulary(seed, backend, order):
    """The kernels skip steps that cannot beat the running k-th: rows whose largest values
    come last (every step merges), first (none does after the first) or in bursts."""
    v = 1000
    ramp = torch.linspace(0.0, 30.0, v, dtype=torch.float64)
    if order == "falling":
        ramp = ramp.flip(0)
    elif order == "blocks":
        ramp = (torch.arange(v) % 300 >= 240).double() * 20.0
    x = (ramp + torch.randn(3, v, dtype=torch.float64)).float().to(device_for(backend))
    check_topk(backend, x, 64, temperature=1.5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_topk_with_masked_vocabulary(seed, backend):
    """-inf entries rank last (by id); k above the number of finite entries returns them with
    log-probability -inf, never NaN."""
    x = logits(2, 64, device=device_for(backend))
    x[:, 10:] = float("-inf")
    top = check_topk(backend, x, 20)
    assert torch.isinf(top.logprobs[:, 10:]).all()
    assert not torch.isnan(top.logprobs).any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_topk_logprobs_feed_sparse_loss_to_the_dense_result(seed, backend):
    dev = device_for(backend)
    s, t = logits(3, 200, device=dev), logits(3, 200, device=dev)
    top = distill_ops.topk_logprobs(t, 200, temperature=2.0, backend=backend)
    sparse = distill_ops.sparse_kd_loss(s, top.indices, top.logprobs, temperature=2.0,
                                        source_temperature=2.0, backend=backend)
    dense = distill_ops.kd_loss(s, t, temperature=2.0, backend=backend)
    assert math.isclose(sparse.item(), dense.item(), rel_tol=1e-5)


@pytest.mark.parametrize(
    ("k", "kw", "exc", "match"),
    [
        (0, {}, ValueError, r"k must lie in \[1, V=50\], got 0"),
        (51, {}, ValueError, r"k must lie in \[1, V=50\], got 51"),
        (2.0, {}, TypeError, "k must be an int"),
        (5, {"temperature": 0.0}, ValueError, "temperature must be finite and > 0"),
        (5, {"softcap": -1.0}, ValueError, "softcap"),
        (5, {"backend": "gpu"}, ValueError, "backend must be one of"),
    ],
)
def test_topk_bad_inputs(k, kw, exc, match):
    with pytest.raises(exc, match=match):
        distill_ops.topk_logprobs(logits(3, 50), k, **kw)


def test_sample_targets_shape_padding_and_reproducibility(seed):
    x = logits(2, 3, 40)
    a = distill_ops.sample_targets(x, 16, generator=torch.Generator().manual_seed(7))
    b = distill_ops.sample_targets(x, 16, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a.indices, b.indices) and torch.equal(a.probs, b.probs)
    assert a.indices.shape == (2, 3, 16) and a.indices.dtype == torch.int32
    torch.testing.assert_close(a.probs.sum(-1), torch.ones(2, 3))
    assert ((a.indices == -1) == (a.probs == 0)).all()
    for row in a.indices.reshape(-1, 16):
        kept = row[row >= 0]
        assert len(torch.unique(kept)) == len(kept)
        assert (kept[1:] > kept[:-1]).all()  # ascending, unique
    # More draws than ids: the width is capped at V.
    assert distill_ops.sample_targets(logits(2, 5), 64).indices.shape == (2, 5)
    # One row (the cumulative sum's last column then aliases the whole tensor) and none.
    one = distill_ops.sample_targets(logits(1, 40), 8)
    torch.testing.assert_close(one.probs.sum(-1), torch.ones(1))
    assert distill_ops.sample_targets(logits(0, 40), 8).indices.shape == (0, 8)


def test_sampled_targets_are_unbiased(seed):
    """The mean of many independent draws converges to p: within 5 standard errors. (The
    rounds are rows of one call: every row is sampled independently.)"""
    x = logits(3, 60, spread=1.5)
    p = torch.softmax(x.double() / 1.5, -1)
    rounds, s = 3000, 24
    gen = torch.Generator().manual_seed(seed)
    tgt = distill_ops.sample_targets(x.repeat(rounds, 1), s, temperature=1.5, generator=gen)
    acc = torch.zeros(rounds * 3, 60, dtype=torch.float64)
    acc.scatter_add_(1, tgt.indices.clamp(min=0).long(), tgt.probs.double())
    mean = acc.reshape(rounds, 3, 60).mean(0)
    stderr = (p * (1 - p) / (s * rounds)).sqrt()
    assert ((mean - p).abs() <= 5 * stderr + 1e-12).all()


def test_mean_sparse_gradient_converges_to_the_dense_gradient(seed):
    """Forward KL against sampled targets (tail="none") is unbiased for the dense gradient
    q - p; top-k targets are not."""
    s, t = logits(2, 40), logits(2, 40)
    dense_s = s.clone().requires_grad_()
    distill_ops.kd_loss(dense_s, t, reduction="sum").backward()
    rounds = 4000
    gen = torch.Generator().manual_seed(seed)
    tgt = distill_ops.sample_targets(t.repeat(rounds, 1), 32, generator=gen)
    a = s.repeat(rounds, 1).requires_grad_()
    distill_ops.sparse_kd_loss(a, tgt.indices, tgt.logprobs, tail="none",
                               reduction="sum").backward()
    mean = a.grad.double().reshape(rounds, 2, 40).mean(0)
    err = (mean - dense_s.grad.double()).abs().max().item()
    assert err < 0.01, err
    top = distill_ops.topk_logprobs(t, 8)
    b = s.clone().requires_grad_()
    distill_ops.sparse_kd_loss(b, top.indices, top.logprobs, tail="renorm",
                               reduction="sum").backward()
    assert (b.grad.double() - dense_s.grad.double()).abs().max().item() > 2 * err


def test_sample_targets_of_a_nan_row_are_nan():
    x = logits(3, 30)
    x[1, 4] = float("nan")
    tgt = distill_ops.sample_targets(x, 8)
    assert torch.isnan(tgt.probs[1]).all() and not torch.isnan(tgt.probs[[0, 2]]).any()


def test_sample_targets_bad_inputs():
    with pytest.raises(ValueError, match="num_samples must be >= 1, got 0"):
        distill_ops.sample_targets(logits(2, 5), 0)
    with pytest.raises(TypeError, match="num_samples must be an int"):
        distill_ops.sample_targets(logits(2, 5), 3.0)
    with pytest.raises(TypeError, match=r"generator must be a torch\.Generator"):
        distill_ops.sample_targets(logits(2, 5), 3, generator=7)
    with pytest.raises(ValueError, match="temperature"):
        distill_ops.sample_targets(logits(2, 5), 3, temperature=-1.0)


def test_topk_under_torch_compile_fullgraph(seed):
    torch._dynamo.reset()
    x = logits(3, 4, 200)
    f = torch.compile(lambda t: distill_ops.topk_logprobs(t, 16, temperature=2.0,
                                                          backend="cpu"),
                      fullgraph=True, backend="aot_eager")
    got, want = f(x), distill_ops.topk_logprobs(x, 16, temperature=2.0, backend="cpu")
    assert torch.equal(got.indices, want.indices)
    torch.testing.assert_close(got.logprobs, want.logprobs)


def assert_inverse_cdf(draws, x, temperature, u):
    """draws[r, s] is the inverse CDF of softmax(x[r] / temperature) at u[r, s], computed as
    the kernels compute it: z = x * fp32(1 / T), e = exp(z - max) in fp32, cumulative sums
    in fp64, the first id whose sum exceeds u * total (searchsorted, right=True).

    Kernels evaluate exp (and may fuse z - max) with a different rounding from torch's, so an
    id's cumulative sum is known only to a bound: each term's relative error is at most
    2**-21 (two fp32 ulps of exp) plus 2**-23 (|z - m| + |z|) (the rounding of its argument),
    and the target u * total moves by at most u times the total's bound. A draw may differ
    from the oracle's only where every cumulative boundary between the two ids lies within
    those bounds of the target; anywhere else, one differing id fails. Rows without a
    distribution (NaN or all -inf) are the caller's to check."""
    v = x.shape[1]
    inv_t = torch.tensor(1.0 / temperature, dtype=torch.float32)
    z = x.float() * inv_t
    m = z.amax(-1, keepdim=True)
    e = torch.exp(z - m).double()
    cdf = torch.cumsum(e, -1)
    total = cdf[:, -1:]
    want = torch.searchsorted(cdf, u * total, right=True).clamp(max=v - 1)
    rel = 2.0**-21 + 2.0**-23 * ((z - m).abs() + z.abs()).double()
    err = torch.cumsum(torch.nan_to_num(e * rel, nan=0.0), -1)  # bound on each cdf[j]
    for r, s in (draws != want).nonzero().tolist():
        lo, hi = sorted((int(draws[r, s]), int(want[r, s])))
        target = float(u[r, s] * total[r, 0])
        band = err[r, lo:hi] + float(u[r, s]) * float(err[r, -1]) + 1e-12 * float(total[r, 0])
        gap = (cdf[r, lo:hi] - target).abs()
        assert bool((gap <= band).all()), (
            f"row {r} draw {s}: id {int(draws[r, s])} where the inverse CDF gives "
            f"{int(want[r, s])}; target {target:.17g}, boundaries {cdf[r, lo:hi].tolist()} "
            f"are {gap.tolist()} away (rounding allows {band.tolist()})")


def test_assert_inverse_cdf_fails_a_sampler_off_by_one(seed):
    """The oracle's rounding allowance is per boundary: a sampler that returns a neighbour
    away from any boundary fails."""
    x = logits(6, 500, spread=2.0)
    u = torch.rand(6, 64, dtype=torch.float64)
    z = x.float() * torch.tensor(1 / 1.5, dtype=torch.float32)
    cdf = torch.cumsum(torch.exp(z - z.amax(-1, keepdim=True)).double(), -1)
    right = torch.searchsorted(cdf, u * cdf[:, -1:], right=True).clamp(max=499)
    assert_inverse_cdf(right, x, 1.5, u)
    with pytest.raises(AssertionError, match="inverse CDF gives"):
        assert_inverse_cdf((right + 1).clamp(max=499), x, 1.5, u)


def test_cpu_sampler_draws_the_inverse_cdf(seed):
    """The C++ CPU sampler against the torch formulation of the same draws (exp(z - max) in
    fp32, cumulative sums in fp64, a search): the same ids but where rounding at a boundary
    allows its neighbour, and never a masked one."""
    from distill_ops.sampling import _draw

    x = logits(40, 3000, spread=2.0)
    x[:, ::7] = float("-inf")  # zero-probability ids
    x[3] = float("-inf")  # a row without a distribution
    u = torch.rand(40, 100, dtype=torch.float64)
    draws, total = _draw(x, 2.0, u)
    ok = torch.ones(40, dtype=torch.bool)
    ok[3] = False
    assert torch.isnan(total[3]).all() and not torch.isnan(total[ok]).any()
    assert_inverse_cdf(draws[ok], x[ok], 2.0, u[ok])
    assert (draws[ok] % 7 != 0).all()


@pytest.mark.skipif(not (ON_GPU or triton_interpreted()), reason="needs Triton (a GPU or the "
                    "interpreter)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize(("n", "v", "s"), [(5, 3001, 37), (3, 1, 4), (2, 700, 1),
                                           (4, 257, 1024)])
def test_triton_sampler_draws_the_inverse_cdf_of_the_same_uniforms(seed, dtype, n, v, s):
    """The GPU sampler (triton/sample.py) and torch's fp64 cumulative-sum search give the same
    multiset of draws for the same uniforms: masked ids, a one-id vocabulary, one draw, the
    most draws the kernel takes."""
    from distill_ops.backends.triton import sample as triton_sample

    dev = "cuda" if ON_GPU else "cpu"
    x = (torch.randn(n, v, device=dev) * 3).to(dtype)
    if v > 20:
        x[0, :10] = float("-inf")
    u = torch.rand(n, s, dtype=torch.float64, device=dev)
    got, total = triton_sample.draw(x, 1.3, u)
    # The kernel draws for the sorted uniforms, slot by slot.
    us = torch.sort(u, 1).values
    assert_inverse_cdf(got.cpu(), x.cpu(), 1.3, us.cpu())
    z = x.float() / 1.3
    cdf = torch.cumsum(torch.exp(z - z.amax(-1, keepdim=True)), -1, dtype=torch.float64)
    torch.testing.assert_close(total, cdf[:, -1:], rtol=1e-6, atol=0)
