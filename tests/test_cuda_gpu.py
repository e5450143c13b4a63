"""The CUDA C++ kernels (csrc/cuda, backend="cuda") against the Triton kernels and the
float64 reference, on a GPU: both dense kernels (portable, and the sm_90 cluster kernel at
the row sizes that pick each cluster size), the sparse kernel for every tail and divergence,
top-k with ties, masked vocabularies and large k. Every other test file also runs its
options on backend="cuda" where a GPU is present.

Skipped without a CUDA GPU, or when distill_ops was built without nvcc: the kernels are
compiled on the development machines (CI fails on a compile error or warning) and run here.
"""

from __future__ import annotations

import pytest
import torch
from helpers import GRAD_RTOL, LOSS_FLOOR, LOSS_RTOL, assert_close, logits

import distill_ops
from distill_ops import reference, validation
from distill_ops.backends.extension import has_native, native

ON_GPU = torch.cuda.is_available()
BUILT = has_native() and native().has_cuda
pytestmark = pytest.mark.skipif(
    not (ON_GPU and BUILT),
    reason="needs a CUDA GPU" if not ON_GPU else "distill_ops was built without CUDA kernels")

DIVERGENCES = list(validation.DIVERGENCES)
TAILS = ["bucket", "renorm", "support", "none"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def hopper() -> bool:
    return ON_GPU and torch.cuda.get_device_capability()[0] >= 9


@pytest.fixture(params=["portable", "cluster"])
def dense_variant(request, monkeypatch):
    if request.param == "cluster" and not hopper():
        pytest.skip("the cluster kernel needs sm_90")
    monkeypatch.setenv("DISTILL_OPS_CUDA_DENSE", request.param)
    return request.param


def _loss_and_grad(fn, student, go=None):
    s = student.detach().clone().requires_grad_()
    loss = fn(s)
    go = torch.ones_like(loss) if go is None else go
    (g,) = torch.autograd.grad(loss, s, go)
    return loss, g


def _compare_dense(s, t, **kw):
    dtype = s.dtype
    go = None
    if kw.get("reduction") == "none":
        go = torch.rand(s.shape[:-1], device=s.device) + 0.5
    lc, gc = _loss_and_grad(lambda x: distill_ops.kd_loss(x, t, backend="cuda", **kw), s, go)
    lt, gt = _loss_and_grad(lambda x: distill_ops.kd_loss(x, t, backend="triton", **kw), s, go)
    l64, g64 = _loss_and_grad(lambda x: reference.kd_loss(x, t.double(), **kw), s.double(),
                              None if go is None else go.double())
    assert gc.dtype == dtype and gc.shape == s.shape
    assert_close(lc, l64, LOSS_RTOL[dtype], "cuda loss vs reference", LOSS_FLOOR)
    assert_close(gc, g64, GRAD_RTOL[dtype], "cuda grad vs reference")
    assert_close(lc, lt.double(), LOSS_RTOL[dtype], "cuda loss vs triton", LOSS_FLOOR)
    assert_close(gc, gt.double(), GRAD_RTOL[dtype], "cuda grad vs triton")


# V = 1000: one block per row (cluster size 1); 50257 (GPT-2): rows not 16-byte aligned;
# 128256 bf16: cluster size 8; 262144 fp32: cluster size 16 (non-portable).
@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize(("n", "v", "dtype"), [(7, 1000, torch.float32),
                                               (5, 1000, torch.bfloat16),
                                               (3, 50257, torch.float16),
                                               (4, 128256, torch.bfloat16),
                                               (2, 262144, torch.float32)], ids=str)
def test_dense_rows_of_every_size(seed, dense_variant, divergence, n, v, dtype):
    s = logits(n, v, dtype=dtype, device="cuda", spread=3.0)
    t = logits(n, v, dtype=dtype, device="cuda", spread=3.0)
    _compare_dense(s, t, divergence=divergence, temperature=2.0)


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dense_every_option(seed, dense_variant, divergence, dtype):
    n, v = 24, 3001
    s = logits(n, v, dtype=dtype, device="cuda")
    t = logits(n, v + 7, dtype=dtype, device="cuda")  # a padded teacher vocabulary
    s[0, :5] = float("-inf")
    t[0, :5] = float("-inf")
    s[1] *= 4000  # extreme logits
    labels = torch.randint(0, v, (n,), device="cuda")
    labels[::5] = -100
    mask = torch.rand(n, device="cuda") > 0.2
    for kw in (dict(temperature=0.7, beta=0.3),
               dict(temperature=2.0, labels=labels, hard_weight=0.4, soft_weight=0.6,
                    scale_by_t2=True),
               dict(temperature=1.0, mask=mask, reduction="sum"),
               dict(temperature=1.5, labels=labels, reduction="none"),
               dict(temperature=2.0, student_softcap=30.0, teacher_softcap=20.0,
                    student_logit_scale=0.8, teacher_logit_scale=1.2)):
        _compare_dense(s, t, divergence=divergence, vocab_size=v, **kw)


def test_dense_all_rows_ignored(seed, dense_variant):
    s = logits(4, 5000, device="cuda")
    labels = torch.full((4,), -100, device="cuda")
    loss, g = _loss_and_grad(lambda x: distill_ops.kd_loss(x, s, labels=labels, backend="cuda",
                                                           reduction="sum"), s)
    assert loss.item() == 0 and torch.count_nonzero(g) == 0


def _compare_sparse(s, idx, lp, **kw):
    dtype = s.dtype
    lc, gc = _loss_and_grad(
        lambda x: distill_ops.sparse_kd_loss(x, idx, lp, backend="cuda", **kw), s)
    lt, gt = _loss_and_grad(
        lambda x: distill_ops.sparse_kd_loss(x, idx, lp, backend="triton", **kw), s)
    l64, g64 = _loss_and_grad(
        lambda x: reference.sparse_kd_loss(x, idx, lp.double(), **kw), s.double())
    assert_close(lc, l64, max(LOSS_RTOL[dtype], 1e-4), "cuda loss vs reference", LOSS_FLOOR)
    assert_close(gc, g64, GRAD_RTOL[dtype], "cuda grad vs reference")
    assert_close(lc, lt.double(), max(LOSS_RTOL[dtype], 1e-4), "cuda vs triton", LOSS_FLOOR)
    assert_close(gc, gt.double(), GRAD_RTOL[dtype], "cuda grad vs triton")


@pytest.mark.parametrize("tail", TAILS)
@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize(("v", "k"), [(1000, 1), (32000, 64), (128256, 16)], ids=str)
def test_sparse_every_tail_and_divergence(seed, tail, divergence, v, k):
    n = 6
    s = logits(n, v, dtype=torch.bfloat16, device="cuda", spread=3.0)
    top = distill_ops.topk_logprobs(logits(n, v, device="cuda", spread=3.0), k,
                                    temperature=2.0)
    idx, lp = top.indices.clone(), top.logprobs.clone()
    if k > 1:
        idx[0, -1], lp[0, -1] = -1, float("-inf")  # padding
    _compare_sparse(s, idx, lp, tail=tail, divergence=divergence, temperature=1.5,
                    source_temperature=2.0)


@pytest.mark.parametrize("tail", TAILS)
def test_sparse_options(seed, tail):
    n, v, k = 20, 5003, 32
    s = logits(n, v, device="cuda")
    t = logits(n, v, device="cuda")
    top = distill_ops.topk_logprobs(t, k)
    labels = torch.randint(0, v, (n,), device="cuda")
    labels[::4] = -100
    for kw in (dict(labels=labels, hard_weight=0.3, temperature=2.0),
               dict(mask=torch.rand(n, device="cuda") > 0.3, reduction="none"),
               dict(beta=0.2, divergence="jsd", scale_by_t2=True, temperature=0.5)):
        _compare_sparse(s, top.indices, top.logprobs, tail=tail, **kw)
    # A support holding all but ~1e-9 of the teacher mass, and the whole vocabulary.
    sharp = logits(2, 300, device="cuda") * 20
    full = distill_ops.topk_logprobs(sharp, 300)
    _compare_sparse(logits(2, 300, device="cuda"), full.indices, full.logprobs, tail=tail)


@pytest.mark.parametrize("k", [1, 5, 64, 1000])
@pytest.mark.parametrize(("v", "dtype"), [(17, torch.float32), (32000, torch.bfloat16),
                                          (128256, torch.float16)], ids=str)
def test_topk_matches_triton_and_reference(seed, k, v, dtype):
    k = min(k, v)
    x = logits(9, v, dtype=dtype, device="cuda", spread=3.0)
    x[0, : v // 2] = float("-inf")  # a masked vocabulary
    x[1] = x[1].round()  # many ties: the lower id goes first
    for kw in (dict(temperature=2.0), dict(logit_scale=0.5, softcap=15.0)):
        c = distill_ops.topk_logprobs(x, k, backend="cuda", **kw)
        t = distill_ops.topk_logprobs(x, k, backend="triton", **kw)
        ri, rl = reference.topk_logprobs(x.double(), k, **kw)
        assert torch.equal(c.indices, t.indices)
        assert torch.equal(c.indices.long(), ri.long())
        torch.testing.assert_close(c.logprobs.double(), rl, rtol=1e-5, atol=1e-5)


def test_topk_large_k_and_limit(seed):
    x = logits(3, 20000, device="cuda")
    c = distill_ops.topk_logprobs(x, 8192, backend="cuda")
    ri, _ = reference.topk_logprobs(x.double(), 8192)
    assert torch.equal(c.indices.long(), ri.long())
    with pytest.raises(ValueError, match="k <= 8192"):
        distill_ops.topk_logprobs(x, 8193, backend="cuda")


def test_kernels_run_on_the_callers_stream_and_device(seed):
    s, t = logits(8, 4000, device="cuda"), logits(8, 4000, device="cuda")
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        a = distill_ops.kd_loss(s, t, backend="cuda")
        top = distill_ops.topk_logprobs(t, 16, backend="cuda")
        b = distill_ops.sparse_kd_loss(s, top.indices, top.logprobs, backend="cuda")
    stream.synchronize()
    torch.testing.assert_close(a, distill_ops.kd_loss(s, t, backend="triton"))
    torch.testing.assert_close(b, distill_ops.sparse_kd_loss(s, top.indices, top.logprobs,
                                                             backend="triton"))
