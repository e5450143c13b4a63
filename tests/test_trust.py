"""Bad input never yields a plausible number: non-finite rows propagate, invalid targets are
refused, and the CLI answers a mistake in one line."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
from conftest import device_for, kernel_backends
from helpers import logits

import distill_ops
from distill_ops import validation
from distill_ops.validation import check_teacher_logprobs

BACKENDS = [*kernel_backends(), "torch"]
DIVERGENCES = validation.DIVERGENCES


def _device(backend):
    return torch.device("cpu") if backend == "torch" else device_for(backend)


@pytest.mark.parametrize("bad", [math.nan, math.inf], ids=["nan", "inf"])
@pytest.mark.parametrize("side", ["student", "teacher"])
@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_non_finite_logit_makes_its_row_non_finite_and_leaves_the_others(
        seed, backend, divergence, side, bad):
    dev = _device(backend)
    s, t = logits(4, 37, device=dev), logits(4, 37, device=dev)
    (s if side == "student" else t)[2, 5] = bad
    s.requires_grad_()
    rows = distill_ops.kd_loss(s, t, divergence=divergence, reduction="none", backend=backend)
    (g,) = torch.autograd.grad(rows.sum(), s)
    assert torch.isnan(rows[2]), rows
    assert not torch.isfinite(g[2]).all()
    others = [0, 1, 3]
    assert torch.isfinite(rows[others]).all() and torch.isfinite(g[others]).all()
    s2 = s.detach().clone().requires_grad_()
    mean = distill_ops.kd_loss(s2, t, divergence=divergence, backend=backend)
    mean.backward()
    assert torch.isnan(mean) and torch.isfinite(s2.grad[others]).all()
    assert not torch.isfinite(s2.grad[2]).all()


@pytest.mark.parametrize("bad", [math.nan, math.inf], ids=["nan", "inf"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_non_finite_student_logit_makes_its_sparse_row_non_finite(seed, backend, bad):
    dev = _device(backend)
    s = logits(3, 41, device=dev)
    top = distill_ops.topk_logprobs(logits(3, 41, device=dev), 5, backend="torch")
    s[0, 9] = bad
    s.requires_grad_()
    rows = distill_ops.sparse_kd_loss(s, top.indices, top.logprobs, reduction="none",
                                      backend=backend)
    (g,) = torch.autograd.grad(rows.sum(), s)
    assert torch.isnan(rows[0]) and not torch.isfinite(g[0]).all()
    assert torch.isfinite(rows[1:]).all() and torch.isfinite(g[1:]).all()


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("side", ["student", "teacher"])
def test_a_non_finite_hidden_state_makes_the_fused_lm_head_row_non_finite(seed, side,
                                                                          divergence):
    hs, ws = logits(4, 8), logits(30, 8) * 0.3
    ht, wt = logits(4, 12), logits(30, 12) * 0.3
    (hs if side == "student" else ht)[2, 1] = math.nan
    hs.requires_grad_()
    ws.requires_grad_()
    rows = distill_ops.fused_linear_kd_loss(hs, ws, ht, wt, divergence=divergence,
                                            reduction="none")
    rows.sum().backward()
    assert torch.isnan(rows[2]) and torch.isfinite(rows[[0, 1, 3]]).all()
    assert not torch.isfinite(hs.grad[2]).all() and torch.isfinite(hs.grad[[0, 1, 3]]).all()
    assert not torch.isfinite(ws.grad).all()  # a sum over rows, one of them NaN: like torch


@pytest.mark.parametrize("bad", [math.nan, math.inf], ids=["nan", "inf"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_non_finite_teacher_logit_makes_its_top_k_row_non_finite(seed, backend, bad):
    dev = _device(backend)
    t = logits(3, 40, device=dev)
    t[1, 5] = bad
    top = distill_ops.topk_logprobs(t, 4, backend=backend)
    assert torch.isnan(top.logprobs[1]).all()
    assert torch.isfinite(top.logprobs[[0, 2]]).all()
    h = logits(3, 8)
    h[1, 2] = bad
    top = distill_ops.fused_linear_topk(h, logits(40, 8), 4)
    assert not torch.isfinite(top.logprobs[1]).any() and torch.isfinite(top.logprobs[0]).all()


def test_a_masked_vocabulary_entry_is_still_legal():
    s, t = logits(2, 20), logits(2, 20)
    s[:, 3] = -math.inf
    t[:, 3] = -math.inf
    assert torch.isfinite(distill_ops.kd_loss(s, t, reduction="none")).all()


@pytest.mark.parametrize("make", [
    lambda lp: lp.exp(),  # probabilities passed as log-probabilities
    lambda lp: lp + 2.0,  # values above 0
    lambda lp: torch.full_like(lp, math.log(0.6)),  # each <= 0, but 3 x 0.6 of mass
    lambda lp: torch.where(torch.arange(lp.shape[-1]) == 1, math.nan, lp),
], ids=["probs", "positive", "mass", "nan"])
def test_invalid_teacher_targets_are_refused_on_the_cpu(seed, make):
    s = logits(4, 30)
    top = distill_ops.topk_logprobs(logits(4, 30), 3)
    bad = make(top.logprobs)
    with pytest.raises(ValueError, match="teacher_logprobs"):
        distill_ops.sparse_kd_loss(s, top.indices, bad)
    with pytest.raises(ValueError, match="teacher_logprobs"):
        distill_ops.fused_linear_kd_loss(logits(4, 6), logits(30, 6), teacher_indices=top.indices,
                                         teacher_logprobs=bad)


def test_stored_rounding_is_not_refused(seed):
    """Top-k log-probabilities a store rounded (compact: 0.02 nats in the head) still pass."""
    s = logits(4, 30)
    top = distill_ops.topk_logprobs(logits(4, 30, spread=6.0), 3)
    nudged = (top.logprobs + 0.015).clamp(max=0.01)
    assert torch.isfinite(distill_ops.sparse_kd_loss(s, top.indices, nudged))


def test_where_a_check_would_sync_invalid_target_rows_become_nan(seed, monkeypatch):
    """The GPU path (emulated: the check returns the bad rows instead of raising)."""
    from distill_ops import sparse_kd

    monkeypatch.setattr(sparse_kd, "check_teacher_logprobs",
                        lambda i, lp, counted=None: check_teacher_logprobs(
                            i, lp, counted, raise_errors=False))
    s = logits(3, 30).requires_grad_()
    top = distill_ops.topk_logprobs(logits(3, 30), 4)
    lp = top.logprobs.clone()
    lp[1] = lp[1].exp()
    rows = distill_ops.sparse_kd_loss(s, top.indices, lp, reduction="none")
    (g,) = torch.autograd.grad(rows.sum(), s)
    assert torch.isnan(rows[1]) and not torch.isfinite(g[1]).all()
    assert torch.isfinite(rows[[0, 2]]).all() and torch.isfinite(g[[0, 2]]).all()


def test_the_store_writer_refuses_probabilities(tmp_path):
    from distill_ops.store import TopKWriter

    top = distill_ops.topk_logprobs(logits(5, 40), 4)
    with TopKWriter(tmp_path / "s", vocab_size=40, k=4, temperature=1.0) as w:
        with pytest.raises(ValueError, match="probabilities passed as log-probabilities"):
            w.append(0, top.indices, top.logprobs.exp())
        w.append(1, top.indices, top.logprobs)


# ----------------------------------------------------------------------------------------
# The CLI: one line, the right exit code, no traceback.

def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "distill_ops.cli", *args], capture_output=True,
                          text=True, timeout=300, cwd=cwd)


@pytest.mark.parametrize(("args", "code", "says"), [
    (["bench", "--reps", "0"], 2, "--reps: must be an integer >= 1, got 0"),
    (["bench", "--k", "0"], 2, "--k: must be an integer >= 1"),
    (["bench", "--temperature", "-1"], 2, "--temperature: must be a finite number > 0"),
    (["bench", "--shape", "12"], 2, "--shape: must be NxV"),
    (["bench", "--op", "nope"], 2, "invalid choice: 'nope'"),
    (["extract", "--teacher", "/missing/teacher", "--data", "x", "--out", "y"], 2,
     "--teacher /missing/teacher: no such directory"),
    (["ingest", "/missing.jsonl", "--format", "openai", "--tokenizer", "t", "--out", "o"], 2,
     "/missing.jsonl: no such file"),
    (["inspect", "/missing/store"], 2, "/missing/store: no such directory"),
    (["demo", "--corpus", "/missing/corpus"], 2, "--corpus /missing/corpus"),
    (["inspect", "."], 1, "no target store at ."),
])
def test_a_cli_mistake_is_one_line_on_stderr(tmp_path, args, code, says):
    proc = _cli(*args, cwd=tmp_path)
    assert proc.returncode == code, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"distill-ops {args[0]}: error: ") and says in lines[0]
    assert "Traceback" not in proc.stderr


def test_bench_on_a_missing_gpu_is_a_usage_error():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    proc = _cli("bench", "--device", "cuda")
    assert proc.returncode == 2 and "no CUDA device is available" in proc.stderr


def test_ingest_that_stores_nothing_fails(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    junk = tmp_path / "junk.jsonl"
    junk.write_text("not json\n{\"also\": \"no logprobs\"}\n")
    tok = tmp_path / "tokenizer.json"
    _word_tokenizer(tok)
    for f, why in ((empty, "no lines"), (junk, "malformed")):
        proc = _cli("ingest", str(f), "--format", "openai", "--tokenizer", str(tok), "--out",
                    str(tmp_path / f"store-{f.stem}"), "--k", "2", "--no-progress")
        assert proc.returncode == 1, proc.stderr
        assert proc.stderr.strip().startswith("distill-ops ingest: error: no sequence stored")
        assert why in proc.stderr


def test_ingest_names_the_line_of_an_invalid_logprob(tmp_path):
    tok = tmp_path / "tokenizer.json"
    _word_tokenizer(tok)
    good = {"token": "a", "logprob": -0.1, "top_logprobs": [{"token": "b", "logprob": -2.5}]}
    bad = {"token": "a", "logprob": 3.0, "top_logprobs": [{"token": "b", "logprob": -2.0}]}
    lines = [{"id": f"r{i}", "choices": [{"logprobs": {"content": [good, e]}}]}
             for i, e in enumerate([good, bad])]
    f = tmp_path / "api.jsonl"
    f.write_text("".join(json.dumps(x) + "\n" for x in lines))
    proc = _cli("ingest", str(f), "--format", "openai", "--tokenizer", str(tok), "--out",
                str(tmp_path / "store"), "--k", "2", "--no-progress")
    assert proc.returncode == 1
    assert "api.jsonl:2: logprobs must be log-probabilities (<= 0)" in proc.stderr


def test_inspect_json_of_an_empty_store_is_valid_json(tmp_path):
    from distill_ops.store import TopKWriter

    with TopKWriter(tmp_path / "s", vocab_size=10, k=2, temperature=1.0):
        pass
    proc = _cli("inspect", str(tmp_path / "s"), "--json")
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)  # a bare NaN would not parse as strict JSON
    assert info["sequences"] == 0 and info["bytes_per_token"] is None
    assert info["verified"] is True
    text = _cli("inspect", str(tmp_path / "s")).stdout
    assert "--no-verify" not in text


def test_a_traceback_on_request(tmp_path):
    import os

    env = dict(os.environ, DISTILL_OPS_TRACEBACK="1")
    proc = subprocess.run([sys.executable, "-m", "distill_ops.cli", "inspect", "."],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert proc.returncode == 1 and "Traceback" in proc.stderr


def _word_tokenizer(path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({"a": 0, "b": 1, "c": 2, "<unk>": 3}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(path))


# ----------------------------------------------------------------------------------------
# The teacher's gradient (mutual and online distillation): exact, or a clear refusal.

@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_a_teacher_that_requires_grad_gets_its_exact_gradient(seed, divergence):
    s, t = logits(5, 31), logits(5, 31)
    labels = torch.randint(0, 31, (5,))
    labels[1] = -100
    kw = dict(divergence=divergence, temperature=2.0, beta=0.3, labels=labels,
              student_logit_scale=0.7, teacher_logit_scale=1.3, teacher_softcap=4.0,
              scale_by_t2=True, mask=torch.tensor([1, 1, 0, 1, 1]))
    s1, t1 = s.clone().requires_grad_(), t.clone().requires_grad_()
    distill_ops.kd_loss(s1, t1, **kw).backward()
    s64, t64 = s.double().requires_grad_(), t.double().requires_grad_()
    from distill_ops import reference

    reference.kd_loss(s64, t64, **kw).backward()
    torch.testing.assert_close(t1.grad.double(), t64.grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(s1.grad.double(), s64.grad, rtol=1e-5, atol=1e-7)
    assert t1.grad[1].abs().sum() == 0 and t1.grad[2].abs().sum() == 0  # ignored rows


def test_the_teachers_forward_kl_gradient_is_f_kl_divs(seed):
    import torch.nn.functional as F

    s, t = logits(4, 23), logits(4, 23)
    t1 = t.clone().requires_grad_()
    distill_ops.kd_loss(s, t1, temperature=1.5, reduction="batchmean").backward()
    t2 = t.double().requires_grad_()
    F.kl_div(F.log_softmax(s.double() / 1.5, -1), F.log_softmax(t2 / 1.5, -1),
             reduction="batchmean", log_target=True).backward()
    # fp32 against fp64: absolute slack scaled by the largest entry, as below
    torch.testing.assert_close(t1.grad.double(), t2.grad, rtol=1e-5,
                               atol=1e-5 * t2.grad.abs().max().item())


def test_sparse_teacher_logprobs_that_require_grad_get_their_gradient(seed):
    from distill_ops import reference

    s = logits(4, 30)
    top = distill_ops.topk_logprobs(logits(4, 30), 5)
    for tail in ("bucket", "renorm", "support", "none"):
        lp1 = top.logprobs.clone().requires_grad_()
        distill_ops.sparse_kd_loss(s, top.indices, lp1, tail=tail, temperature=2.0,
                                   source_temperature=1.5).backward()
        lp2 = top.logprobs.double().requires_grad_()
        reference.sparse_kd_loss(s.double(), top.indices, lp2, tail=tail, temperature=2.0,
                                 source_temperature=1.5).backward()
        assert lp1.grad is not None and lp1.grad.abs().sum() > 0
        # fp32 against fp64: a small entry is a difference of terms the size of the largest
        # (seed 609621212: 3.7e-8 off on an entry of 3e-3, the largest 5.4e-2), so the
        # absolute slack scales with the largest entry (~80 fp32 ulps of it)
        torch.testing.assert_close(lp1.grad.double(), lp2.grad, rtol=1e-5,
                                   atol=1e-5 * lp2.grad.abs().max().item())


def test_a_detached_teacher_takes_the_fused_kernel(seed, monkeypatch):
    from distill_ops import dense_kd

    calls = []
    real = dense_kd.dense_kd
    monkeypatch.setattr(dense_kd, "dense_kd", lambda *a: calls.append(1) or real(*a))
    s, t = logits(3, 20).requires_grad_(), logits(3, 20)
    distill_ops.kd_loss(s, t).backward()
    assert calls  # the kernel ran: no cost for a teacher that needs no gradient
    calls.clear()
    distill_ops.kd_loss(s, t.requires_grad_())
    assert not calls  # the teacher wants a gradient: autograd through both sides


def test_the_fused_lm_head_refuses_a_teacher_that_requires_grad():
    hs, ws = logits(3, 6).requires_grad_(), logits(20, 6)
    ht, wt = logits(3, 8), logits(20, 8).requires_grad_()
    with pytest.raises(ValueError, match="teacher_weight requires grad, but "
                                         "fused_linear_kd_loss gives the teacher no gradient"):
        distill_ops.fused_linear_kd_loss(hs, ws, ht, wt)
    with torch.no_grad():  # no gradient asked for anywhere: nothing to refuse
        distill_ops.fused_linear_kd_loss(hs, ws, ht, wt)
    distill_ops.fused_linear_kd_loss(hs, ws, ht, wt.detach())
