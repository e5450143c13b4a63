"""Hypothesis fuzzing of kd_loss on the CPU backend against the float64 reference."""

from __future__ import annotations

import torch
from helpers import LOSS_FLOOR, assert_close
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import distill_ops
from distill_ops import reference


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=st.integers(1, 6),
    v=st.integers(1, 600),
    divergence=st.sampled_from(["forward_kl", "reverse_kl", "jsd", "tvd"]),
    temperature=st.floats(0.25, 4.0),
    beta=st.floats(0.0, 1.0),
    spread=st.floats(0.1, 4.0),
    hard_weight=st.sampled_from([0.0, 0.5]),
    softcap=st.sampled_from([None, 5.0]),
    masked_vocab=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_cpu_matches_reference_fuzzed(n, v, divergence, temperature, beta, spread, hard_weight,
                                      softcap, masked_vocab, seed):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(n, v, generator=g, dtype=torch.float64) * spread
    t = torch.randn(n, v, generator=g, dtype=torch.float64) * spread
    labels = torch.randint(0, v, (n,), generator=g)
    if masked_vocab and v > 1:
        banned = torch.rand(n, v, generator=g) < 0.2
        banned[torch.arange(n), labels] = False  # a label on a masked id has CE = +inf
        s[banned] = float("-inf")
        t[banned] = float("-inf")
    labels[torch.rand(n, generator=g) < 0.3] = -100
    kw = dict(divergence=divergence, temperature=temperature, beta=beta, labels=labels,
              hard_weight=hard_weight, student_softcap=softcap)

    s32 = s.float().requires_grad_()
    loss = distill_ops.kd_loss(s32, t.float(), backend="cpu", **kw)
    loss.backward()
    s64 = s.float().double().requires_grad_()
    ref = reference.kd_loss(s64, t.float().double(), **kw)
    ref.backward()
    assert_close(loss, ref, 1e-5, "loss", LOSS_FLOOR)
    err = (s32.grad.double() - s64.grad).abs().max().item()
    assert err <= 1e-5 * max(1.0, s64.grad.abs().max().item()), err
