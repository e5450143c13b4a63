"""The CUDA dense kernels' maths (csrc/cuda/dense_math.cuh), run on the host in the portable
kernel's order (tests/cpp/dense_math_check.cpp: 512 threads over groups of 8 or 4 logits,
the row's tail one logit at a time, warp trees, the second pass, AKL's search, the gradient)
against the float64 reference: every divergence, the plain path and the general one
(softcap, TAID, the hard term), bf16 and fp32 group widths, odd V, -inf masked vocabulary,
extreme logits. The GPU runs the same header with ex2.approx / lg2.approx where the host has
exp2 / log2 (relative error ~2^-22): these tests hold the formulas and their merge order,
the GPU tests (tests/test_dense_kd.py) the instructions."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch
from helpers import build_host_driver, logits

from distill_ops import reference

DIVERGENCES = ["forward_kl", "reverse_kl", "jsd", "tvd", "skew_kl", "skew_reverse_kl", "ab",
               "akl"]


@pytest.fixture(scope="module")
def driver(tmp_path_factory) -> Path:
    return build_host_driver(tmp_path_factory.mktemp("dense_math"), "dense_math_check.cpp")


# AB's parameters for the test below (None: params()'s).
AB_PARAMS: list[tuple[float, float] | None] = [None]


def params(divergence: str) -> tuple[float, float]:
    """(beta, param2) as the op layer passes them to the kernels."""
    if divergence == "ab" and AB_PARAMS[0] is not None:
        return AB_PARAMS[0]
    return {"jsd": (0.3, 0.0), "skew_kl": (0.1, 0.0), "skew_reverse_kl": (0.2, 0.0),
            "ab": (0.7, 0.4), "akl": (0.5, 0.0)}.get(divergence, (0.5, 0.0))


def run(exe: Path, xs: torch.Tensor, xt: torch.Tensor, divergence: str, *, vec: int,
        temperature: float = 1.0, general: bool = False, cap: float = 0.0,
        interp: float = 1.0, hard_weight: float = 0.0, labels=None):
    rows, vocab = xs.shape
    beta, param2 = params(divergence)
    labels = labels if labels is not None else torch.full((rows,), -1)
    text = [f"{DIVERGENCES.index(divergence)} {int(general)} {vec} {rows} {vocab}",
            f"{temperature} {beta} {param2} 1 {cap} 1 {cap} {interp} {hard_weight} 1",
            " ".join(str(int(v)) for v in labels)]
    for x in (xs, xt):
        text += [" ".join(f"{v:.9g}" for v in row) for row in x.float().tolist()]
    out = subprocess.run([str(exe)], input="\n".join(text), capture_output=True, text=True,
                         check=True).stdout.splitlines()
    loss = torch.tensor([float(out[2 * r]) for r in range(rows)], dtype=torch.float64)
    grad = torch.tensor([[float(v) for v in out[2 * r + 1].split()] for r in range(rows)],
                        dtype=torch.float64)
    return loss, grad


def want(xs, xt, divergence, *, temperature=1.0, cap=0.0, interp=1.0, hard_weight=0.0,
         labels=None):
    s = xs.float().double().requires_grad_(True)
    beta, param2 = params(divergence)
    kw = {"beta": beta} if divergence == "jsd" else {}
    kw.update({"skew_kl": {"skew": beta}, "skew_reverse_kl": {"skew": beta},
               "ab": {"ab_alpha": beta, "ab_beta": param2},
               "akl": {"akl_head_mass": beta}}.get(divergence, {}))
    if cap:
        kw.update(student_softcap=cap, teacher_softcap=cap)
    loss = reference.kd_loss(s, xt.float().double(), divergence=divergence,
                             temperature=temperature, reduction="none",
                             teacher_interpolation=interp, hard_weight=hard_weight,
                             labels=labels, **kw)
    (g,) = torch.autograd.grad(loss.sum(), s)
    return loss.detach(), g


def check(got, ref, rtol=2e-5, atol=2e-6):
    for a, b in zip(got, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol)


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize(("vec", "dtype"), [(8, torch.bfloat16), (4, torch.float32)])
def test_plain_path_matches_reference(seed, driver, divergence, vec, dtype):
    """Odd V (a row tail after the groups), -inf masked ids on both sides, T = 2."""
    xs, xt = logits(3, 1203).to(dtype), logits(3, 1203).to(dtype)
    xs[0, :17] = xt[0, :17] = float("-inf")
    got = run(driver, xs, xt, divergence, vec=vec, temperature=2.0)
    check(got, want(xs, xt, divergence, temperature=2.0))


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("vec", [4, 8])
def test_general_path_matches_reference(seed, driver, divergence, vec):
    """Softcap, TAID and the hard label term at once; labels inside a group, in the row's
    tail (V = 1001: ids 1000 and up are the tail at either width) and at id 0."""
    xs, xt = logits(3, 1001) * 3, logits(3, 1001) * 3
    labels = torch.tensor([5, 1000, 0])
    kw = {"temperature": 1.5, "cap": 20.0, "interp": 0.7, "hard_weight": 0.3, "labels": labels}
    got = run(driver, xs, xt, divergence, vec=vec, general=True, **kw)
    check(got, want(xs, xt, divergence, **kw))


@pytest.mark.parametrize(("cap", "interp", "hard_weight"), [(30.0, 1.0, 0.0), (0.0, 0.4, 0.0),
                                                            (0.0, 1.0, 0.5)],
                         ids=["softcap", "taid", "hard"])
def test_general_path_one_option_at_a_time(seed, driver, cap, interp, hard_weight):
    xs, xt = logits(2, 517) * 2, logits(2, 517) * 2
    labels = torch.tensor([3, 511])
    kw = {"temperature": 2.0, "cap": cap, "interp": interp, "hard_weight": hard_weight,
          "labels": labels}
    for divergence in ("forward_kl", "jsd"):
        got = run(driver, xs, xt, divergence, vec=8, general=True, **kw)
        check(got, want(xs, xt, divergence, **kw))


@pytest.mark.parametrize("ab", [(0.5, 0.5), (1.0, 0.25), (1.0, 0.2499), (0.2, 0.9),
                                (0.05, 1.0)], ids=str)
def test_ab_both_loss_forms(seed, driver, ab):
    """AB's loss pass takes kd_math.h's one-series form where each parameter is at least a
    quarter of the other, the two-series form elsewhere (dense_second_sums): both sides of
    that line, rows whose scaled log-ratio spans the series' edge, a student within 1e-3 of
    its teacher (its loss to 2e-4 of itself: log q - log p carries each side's rounding) and
    -inf on either side."""
    xt = logits(3, 1001) * 1.5
    xs = xt.clone()
    xs[0] += torch.randn(1001) * (0.4 / sum(ab))
    xs[1] += torch.randn(1001) * 1e-3
    xs[2] += torch.randn(1001)
    xt[2, :30] = float("-inf")
    xs[2, 30:60] = float("-inf")
    xs[2, 60:90] = xt[2, 60:90] = float("-inf")
    AB_PARAMS[0] = ab
    try:
        (loss, grad), (ref_loss, ref_grad) = run(driver, xs, xt, "ab", vec=8), \
            want(xs, xt, "ab")
    finally:
        AB_PARAMS[0] = None
    for i, tol in enumerate((1e-5, 2e-4, 1e-5)):
        assert abs(loss[i] - ref_loss[i]) <= tol * ref_loss[i].abs(), (i, loss[i], ref_loss[i])
    torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd", "akl"])
def test_extreme_logits_stay_fp32_accurate(seed, driver, divergence):
    """Logits of +-1e4 (near one-hot rows on either side): the group form's centred cross
    term and z - max in natural units keep the loss and gradient to fp32 accuracy."""
    xs, xt = logits(4, 3001), logits(4, 3001)
    xs[1:3] *= 4000
    xt[2:4] *= 4000
    (loss, grad), (ref_loss, ref_grad) = run(driver, xs, xt, divergence, vec=4), \
        want(xs, xt, divergence)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
    # Reverse KL's gradient q (log q - log p - KL) cancels at the student's argmax: in fp32
    # to the KL's last bit (2^-9 at KL = 2.4e4), so each row's bar scales with its loss.
    bar = 1e-5 + 2.5e-7 * ref_loss.abs()[:, None]
    assert ((grad - ref_grad).abs() <= bar + 1e-4 * ref_grad.abs()).all()


def test_masked_teacher_mass_is_an_infinite_forward_kl(seed, driver):
    """The student masks an id the teacher weighs: forward KL is +inf, never NaN; a row
    whose ids are masked on both sides alike is finite."""
    xs, xt = logits(2, 600), logits(2, 600)
    xs[0, 7] = float("-inf")
    xs[1, :40] = xt[1, :40] = float("-inf")
    loss, _ = run(driver, xs, xt, "forward_kl", vec=8)
    assert loss[0].item() == float("inf")
    torch.testing.assert_close(loss[1:], want(xs[1:], xt[1:], "forward_kl")[0], rtol=2e-5,
                               atol=2e-6)


@pytest.fixture(scope="module")
def sparse_driver(tmp_path_factory) -> Path:
    return build_host_driver(tmp_path_factory.mktemp("sparse_stats"), "sparse_stats_check.cpp")


@pytest.mark.parametrize(("vec", "dtype"), [(8, torch.bfloat16), (4, torch.float32)])
def test_sparse_statistics_pass_matches_reference(seed, sparse_driver, vec, dtype):
    """The sparse kernel's one-read statistics (groups with one running maximum, the mass off
    the support summed from its own terms, the hard term's T = 1 sum, z at the label): the
    row's log-sum-exp, the off-support log mass (a support holding all but ~1e-7 of the mass
    in row 1: no cancellation), the T = 1 log-sum-exp, against float64. Odd V, masked ids."""
    rows, vocab, t, label = 3, 2005, 1.7, 1234
    x = logits(rows, vocab).to(dtype).float()
    x[2, :30] = float("-inf")
    support = torch.zeros(rows, vocab, dtype=torch.bool)
    for r in range(rows):
        support[r, torch.randperm(vocab)[:64]] = True
    top = x[1].argsort(descending=True)[:40]  # row 1: the support is the head
    support[1] = False
    support[1, top] = True
    x[1, top] += 18.0
    text = [f"{vec} {rows} {vocab} {t} {label}"]
    text += [" ".join(str(int(f)) for f in row) for row in support.tolist()]
    text += [" ".join(f"{v:.9g}" for v in row) for row in x.tolist()]
    out = subprocess.run([str(sparse_driver)], input="\n".join(text), capture_output=True,
                         text=True, check=True).stdout.splitlines()
    got = torch.tensor([[float(v) for v in line.split()] for line in out], dtype=torch.float64)
    z = x.double() / t
    want = torch.stack([torch.logsumexp(z, 1),
                        torch.logsumexp(z.masked_fill(support, float("-inf")), 1),
                        torch.logsumexp(z * t, 1), z[:, label]], 1)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=2e-6)
