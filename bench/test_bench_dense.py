"""kd_loss (ours) against eager PyTorch, torch.compile of the same code, and TRL's
generalized_jsd_loss, forward + backward, on the CPU (or the GPU when one is present)."""

from __future__ import annotations

import pytest
import torch

from distill_ops import benchmark as harness

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SHAPES = [(2048, 32000), (512, 128256)]
TEMPERATURE = 2.0


@pytest.fixture(scope="module", params=SHAPES, ids=lambda s: f"N{s[0]}-V{s[1]}")
def inputs(request):
    n, v = request.param
    gen = torch.Generator().manual_seed(n + v)
    s = (torch.randn(n, v, generator=gen) * 2).to(DEVICE).requires_grad_()
    t = (torch.randn(n, v, generator=gen) * 2).to(DEVICE)
    return s, t


def _fwd_bwd(fn, s, t):
    def step():
        (g,) = torch.autograd.grad(fn(s, t), s)
        if DEVICE == "cuda":
            torch.cuda.synchronize()
        return g

    return step


@pytest.mark.parametrize("divergence", ["forward_kl", "jsd"])
@pytest.mark.parametrize("impl", ["distill_ops", "eager", "torch.compile", "trl"])
def test_dense_kd(benchmark, inputs, divergence, impl):
    s, t = inputs
    cases = {name: fn for name, fn, _ in
             harness.dense_cases(divergence, TEMPERATURE, include_compile=True)}
    if impl not in cases:
        pytest.skip(f"{impl} has no {divergence} peer")
    fn = cases[impl]
    if fn is None:
        pytest.skip(f"{impl} is not installed")
    benchmark.group = f"{divergence} N={s.shape[0]} V={s.shape[1]}"
    benchmark.extra_info["bytes_floor"] = 3 * s.numel() * s.element_size()
    benchmark.pedantic(_fwd_bwd(fn, s, t), rounds=5, warmup_rounds=1)
