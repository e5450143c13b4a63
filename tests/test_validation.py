"""Bad input raises ValueError/TypeError naming the argument and what was seen."""

from __future__ import annotations

import pytest
import torch
from helpers import logits

import distill_ops


@pytest.fixture
def st():
    return logits(3, 50), logits(3, 50)


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"divergence": "kl"}, ValueError, "divergence must be one of"),
        ({"temperature": 0.0}, ValueError, "temperature must be finite and > 0, got 0.0"),
        ({"temperature": -1}, ValueError, "temperature"),
        ({"temperature": float("nan")}, ValueError, "temperature"),
        ({"temperature": "2"}, TypeError, "temperature must be a number"),
        ({"beta": 1.5}, ValueError, r"beta must lie in \[0, 1\], got 1.5"),
        ({"beta": None}, TypeError, "beta"),
        ({"reduction": "avg"}, ValueError, "reduction must be one of"),
        ({"hard_weight": 1.0}, ValueError, "hard_weight=1.0 > 0 needs labels"),
        ({"hard_weight": -1.0}, ValueError, "hard_weight must be finite and >= 0"),
        ({"soft_weight": -0.5}, ValueError, "soft_weight"),
        ({"scale_by_t2": 1}, TypeError, "scale_by_t2 must be a bool"),
        ({"student_logit_scale": 0}, ValueError, "student_logit_scale"),
        ({"teacher_softcap": -3.0}, ValueError, "teacher_softcap"),
        ({"vocab_size": 51}, ValueError, r"vocab_size must lie in \[1, 50\]"),
        ({"vocab_size": 0}, ValueError, "vocab_size"),
        ({"vocab_size": 3.0}, TypeError, "vocab_size must be an int"),
        ({"num_items_in_batch": 0}, ValueError, "num_items_in_batch must be > 0"),
        ({"num_items_in_batch": torch.ones(2)}, ValueError, "num_items_in_batch"),
        ({"backend": "jax"}, ValueError, "backend must be one of"),
        ({"backend": "cuda"}, ValueError, "backend='cuda' needs CUDA tensors"),
        ({"ignore_index": 1.5}, TypeError, "ignore_index must be an int"),
        ({"process_group": object()}, ValueError, "torch.distributed is not initialised"),
    ],
)
def test_bad_options(st, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        distill_ops.kd_loss(*st, **kwargs)


def test_bad_tensors():
    s, t = logits(3, 50), logits(3, 50)
    with pytest.raises(TypeError, match=r"student_logits must be a torch\.Tensor, got list"):
        distill_ops.kd_loss([1.0], t)
    with pytest.raises(TypeError, match=r"teacher_logits must be float32.*got torch\.int64"):
        distill_ops.kd_loss(s, torch.ones(3, 50, dtype=torch.long))
    with pytest.raises(ValueError, match=r"leading dims, got \(3, 50\) and \(4, 50\)"):
        distill_ops.kd_loss(s, logits(4, 50))
    with pytest.raises(ValueError, match="student_logits has V=50 but teacher_logits has V=60"):
        distill_ops.kd_loss(s, logits(3, 60))
    with pytest.raises(ValueError, match="0-d"):
        distill_ops.kd_loss(torch.tensor(1.0), torch.tensor(1.0))
    with pytest.raises(ValueError, match="empty vocabulary"):
        distill_ops.kd_loss(torch.ones(3, 0), torch.ones(3, 0))
    with pytest.raises(ValueError, match=r"labels must have the logits' leading shape \(3,\)"):
        distill_ops.kd_loss(s, t, labels=torch.zeros(4, dtype=torch.long))
    with pytest.raises(TypeError, match=r"labels must be an integer tensor, got torch\.float32"):
        distill_ops.kd_loss(s, t, labels=torch.zeros(3))
    with pytest.raises(ValueError, match=r"mask must be bool or hold only 0 and 1 .* 0\.5"):
        distill_ops.kd_loss(s, t, mask=torch.tensor([1.0, 0.5, 0.0]))
    with pytest.raises(ValueError, match="got the value 2"):
        distill_ops.sparse_kd_loss(s, torch.zeros(3, 1, dtype=torch.long), torch.zeros(3, 1),
                                   mask=torch.tensor([1, 2, 0]))
    with pytest.raises(ValueError, match="mask must have the logits' leading shape"):
        distill_ops.kd_loss(s, t, mask=torch.ones(2, dtype=torch.bool))


def test_label_out_of_range_is_an_error_on_cpu():
    s, t = logits(3, 50), logits(3, 50)
    labels = torch.tensor([1, 50, -100])
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 50\).*got 50"):
        distill_ops.kd_loss(s, t, labels=labels, hard_weight=1.0)
    # Without the hard term labels only select rows: any value is fine.
    distill_ops.kd_loss(s, t, labels=labels)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device for a mismatch")
def test_tensors_on_different_devices():
    s, t = logits(3, 50), logits(3, 50).cuda()
    with pytest.raises(ValueError, match="teacher_logits is on cuda"):
        distill_ops.kd_loss(s, t)


def test_triton_backend_needs_cuda_or_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    if torch.cuda.is_available():
        pytest.skip("CUDA present: CPU tensors on triton are then a device error")
    with pytest.raises(ValueError, match="backend='triton' needs CUDA tensors"):
        distill_ops.kd_loss(logits(2, 10), logits(2, 10), backend="triton")


def test_backend_env_override(monkeypatch):
    calls = []
    real = distill_ops.reference.kd_loss
    monkeypatch.setattr(distill_ops.reference, "kd_loss",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    s = logits(2, 10)
    distill_ops.kd_loss(s, logits(2, 10))
    assert calls == []
    monkeypatch.setenv("DISTILL_OPS_BACKEND", "torch")
    distill_ops.kd_loss(s, logits(2, 10))
    assert calls == [1]
    monkeypatch.setenv("DISTILL_OPS_BACKEND", "nope")
    with pytest.raises(ValueError, match="DISTILL_OPS_BACKEND must be one of"):
        distill_ops.kd_loss(s, logits(2, 10))


def test_float64_on_triton_is_a_type_error():
    if not torch.cuda.is_available():
        pytest.importorskip("triton")
        import os

        if os.environ.get("TRITON_INTERPRET") != "1":
            pytest.skip("triton backend unavailable on this machine")
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    s = logits(2, 10, dtype=torch.float64, device=dev)
    with pytest.raises(TypeError, match="backend='triton' takes fp32/bf16/fp16"):
        distill_ops.kd_loss(s, s, backend="triton")
    idx = torch.zeros(2, 1, dtype=torch.int64, device=dev)
    with pytest.raises(TypeError, match="takes fp32/bf16/fp16 student_logits, got float64"):
        distill_ops.sparse_kd_loss(s, idx, torch.zeros(2, 1, device=dev), backend="triton")
    with pytest.raises(TypeError, match="takes fp32/bf16/fp16 teacher_logits, got float64"):
        distill_ops.topk_logprobs(s, 3, backend="triton")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_float64_on_cuda_is_a_type_error():
    s = logits(2, 10, dtype=torch.float64, device="cuda")
    with pytest.raises(TypeError, match="backend='cuda' takes fp32/bf16/fp16"):
        distill_ops.kd_loss(s, s, backend="cuda")
