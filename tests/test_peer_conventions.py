"""Peers' conventions that users port code from: F.kl_div's and TRL's reduction="batchmean",
and 0/1 masks of any dtype (Hugging Face attention masks, TRL completion masks)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import device_for, kernel_backends
from helpers import LOSS_FLOOR, assert_close, logits

import distill_ops

BACKENDS = kernel_backends()


def _sparse_args(s, t, k=5):
    top = distill_ops.topk_logprobs(t, k, backend="torch")
    return top.indices, top.logprobs


@pytest.mark.parametrize("backend", [*BACKENDS, "torch"])
def test_batchmean_without_labels_divides_by_the_first_dimension_like_kl_div(seed, backend):
    dev = device_for(backend) if backend != "torch" else torch.device("cpu")
    s, t = logits(3, 4, 50, device=dev), logits(3, 4, 50, device=dev)
    ours = distill_ops.kd_loss(s, t, reduction="batchmean", backend=backend)
    peer = F.kl_div(F.log_softmax(s.double(), -1), F.log_softmax(t.double(), -1),
                    reduction="batchmean", log_target=True)
    assert_close(ours, peer, 1e-5, "batchmean", LOSS_FLOOR)
    total = distill_ops.kd_loss(s, t, reduction="sum", backend=backend)
    torch.testing.assert_close(ours, total / 3, rtol=1e-6, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_batchmean_with_labels_or_a_mask_is_the_mean_over_counted_tokens(seed, backend):
    dev = device_for(backend)
    s, t = logits(2, 6, 40, device=dev), logits(2, 6, 40, device=dev)
    labels = torch.randint(0, 40, (2, 6), device=dev)
    labels[0, :4] = -100
    mask = labels != -100
    mean = distill_ops.kd_loss(s, t, labels=labels, backend=backend)
    for kw in ({"labels": labels}, {"mask": mask}):
        torch.testing.assert_close(
            distill_ops.kd_loss(s, t, reduction="batchmean", backend=backend, **kw), mean)
    idx, lp = _sparse_args(s, t)
    torch.testing.assert_close(
        distill_ops.sparse_kd_loss(s, idx, lp, reduction="batchmean", mask=mask,
                                   backend=backend),
        distill_ops.sparse_kd_loss(s, idx, lp, mask=mask, backend=backend))
    n = torch.tensor(17.0, device=dev)
    torch.testing.assert_close(
        distill_ops.kd_loss(s, t, reduction="batchmean", num_items_in_batch=n, backend=backend),
        distill_ops.kd_loss(s, t, reduction="sum", backend=backend) / 17)


def test_batchmean_of_the_fused_lm_head_equals_the_logits_form(seed):
    h, w = logits(2, 5, 8), logits(30, 8) * 0.3
    ht, wt = logits(2, 5, 12), logits(30, 12) * 0.3
    fused = distill_ops.fused_linear_kd_loss(h, w, ht, wt, reduction="batchmean")
    plain = distill_ops.kd_loss(h @ w.T, ht @ wt.T, reduction="batchmean")
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8, torch.float32,
                                   torch.bfloat16])
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_01_mask_of_any_dtype_equals_the_bool_mask(seed, backend, dtype):
    dev = device_for(backend)
    s, t = logits(7, 33, device=dev), logits(7, 33, device=dev)
    keep = torch.tensor([1, 0, 1, 1, 0, 0, 1], dtype=torch.bool, device=dev)
    idx, lp = _sparse_args(s, t)
    for reduction in ("mean", "none"):
        s1 = s.clone().requires_grad_()
        s2 = s.clone().requires_grad_()
        a = distill_ops.kd_loss(s1, t, mask=keep, reduction=reduction, backend=backend)
        b = distill_ops.kd_loss(s2, t, mask=keep.to(dtype), reduction=reduction,
                                backend=backend)
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        a.sum().backward()
        b.sum().backward()
        torch.testing.assert_close(s1.grad, s2.grad, rtol=0, atol=0)
        torch.testing.assert_close(
            distill_ops.sparse_kd_loss(s, idx, lp, mask=keep, reduction=reduction,
                                       backend=backend),
            distill_ops.sparse_kd_loss(s, idx, lp, mask=keep.to(dtype), reduction=reduction,
                                       backend=backend), rtol=0, atol=0)


def test_a_mask_of_weights_is_refused_naming_the_value():
    s, t = logits(3, 20), logits(3, 20)
    with pytest.raises(ValueError, match="mask must be bool or hold only 0 and 1"):
        distill_ops.fused_linear_kd_loss(logits(3, 4), logits(20, 4), logits(3, 4),
                                         logits(20, 4), mask=torch.tensor([0.3, 1.0, 1.0]))
    with pytest.raises(ValueError, match="got the value -1"):
        distill_ops.kd_loss(s, t, mask=torch.tensor([1, -1, 0]))
