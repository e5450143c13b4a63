"""The one-pass KL statistics of the CUDA dense kernels (OnlineKL, kd_math.h), run on the host:
the same header the GPU compiles, driven in the order the kernels merge their partials
(threads, warps, the sm_90 cluster's slices; tests/cpp/online_kl_check.cpp), against the
float64 reference. This is how the cross term's cancellation at large logits (found on the
H200) is held to fp32 accuracy without a GPU."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch
from helpers import build_host_driver, logits

from distill_ops import reference

MODES = {"forward_kl": 1, "reverse_kl": 2}


@pytest.fixture(scope="module")
def driver(tmp_path_factory) -> Path:
    return build_host_driver(tmp_path_factory.mktemp("online_kl"), "online_kl_check.cpp")


def online_kl(exe: Path, zs: torch.Tensor, zt: torch.Tensor, divergence: str,
              slices: int) -> torch.Tensor:
    """[rows, 2]: the KL of each row pushed in order, and merged in the kernels' order."""
    rows, vocab = zs.shape
    text = [f"{MODES[divergence]} {rows} {vocab} {slices}"]
    for z in (zs, zt):
        text += [" ".join(f"{x:.9g}" for x in row) for row in z.float().tolist()]
    out = subprocess.run([str(exe)], input="\n".join(text), capture_output=True, text=True,
                         check=True).stdout
    return torch.tensor([[float(x) for x in line.split()] for line in out.splitlines()],
                        dtype=torch.float64)


def ref_kl(zs: torch.Tensor, zt: torch.Tensor, divergence: str) -> torch.Tensor:
    return reference.kd_loss(zs.float().double(), zt.float().double(), divergence=divergence,
                             reduction="none")


@pytest.mark.parametrize("divergence", list(MODES))
@pytest.mark.parametrize("slices", [1, 8])
def test_kl_of_huge_logits_is_fp32_accurate_in_every_merge_order(seed, driver, divergence,
                                                                 slices):
    zs, zt = logits(6, 3001), logits(6, 3001)
    zs[1:3] *= 4000  # a near one-hot student: reverse KL of a few nats from terms ~1e4
    zt[3:5] *= 4000  # a near one-hot teacher: likewise for forward KL
    got = online_kl(driver, zs, zt, divergence, slices)
    want = ref_kl(zs, zt, divergence)
    # The kernels' tree of merges sums ~6 terms per thread: fp32 accuracy. One state pushed
    # 3001 times accumulates 3001 roundings (~1e-6 on ordinary rows too): fp32 summation.
    for col, bar in ((1, 2e-6), (0, 1e-5)):
        err = (got[:, col] - want).abs() / want.abs().clamp_min(1.0)
        assert err.max().item() <= bar, (col, err)


@pytest.mark.parametrize("divergence", list(MODES))
def test_masked_entries_give_the_reference_inf_or_value(seed, driver, divergence):
    """-inf on both sides is a masked token (no contribution); -inf on the side that is not
    the weighting side where the other has mass is an infinite KL, never NaN."""
    zs, zt = logits(4, 600), logits(4, 600)
    zs[0, :40] = zt[0, :40] = float("-inf")
    zs[1, 5] = float("-inf")  # forward KL: the teacher has mass the student masks
    zt[2, 9] = float("-inf")  # reverse KL: likewise the other way
    zs[3, :599] = float("-inf")  # one student token left
    got = online_kl(driver, zs, zt, divergence, 2)
    want = ref_kl(zs, zt, divergence)
    assert not torch.isnan(got).any()
    for col in range(2):
        finite = torch.isfinite(want)
        assert torch.equal(torch.isinf(got[:, col]), torch.isinf(want))
        err = (got[finite, col] - want[finite]).abs() / want[finite].abs().clamp_min(1.0)
        assert err.max().item() <= 2e-6, (col, err)
