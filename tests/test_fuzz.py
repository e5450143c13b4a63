"""Fuzzing the public API and the CLI: random shapes, dtypes, option values and garbage files.
Every outcome is either a correct result (against the float64 reference) or a clear error: a
ValueError/TypeError naming what is wrong (the API), one line on stderr and exit 1 or 2 (the
CLI). Never a crash, a hang, a traceback or a plausible wrong number."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import distill_ops
from distill_ops import reference

FUZZ = settings(max_examples=60, deadline=None, derandomize=False,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 2e-2, torch.float64: 1e-8}
NUMBERS = st.sampled_from([1.0, 2.0, 0.5, 0.0, -1.0, math.nan, math.inf, 3, "2", None, True])
OPTION_NAMES = ("student_logits", "teacher_logits", "divergence", "temperature", "beta",
                "labels", "mask", "reduction", "backend", "hard_weight", "soft_weight",
                "indices", "teacher_logprobs", "tail", "k", "num_items_in_batch", "vocab_size",
                "source_temperature", "logit_scale", "softcap", "ignore_index")


def _clear(exc: Exception) -> None:
    text = str(exc)
    assert text and "\n" not in text.strip(), repr(text)
    assert any(name in text for name in OPTION_NAMES) or "backend=" in text, text


@st.composite
def dense_case(draw):
    n = draw(st.integers(1, 5))
    v = draw(st.integers(1, 40))
    dtype = draw(st.sampled_from(DTYPES))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    s = (torch.randn(n, v, generator=gen, dtype=torch.float64) * 3).to(dtype)
    t = (torch.randn(n, v + draw(st.sampled_from([0, 0, 0, 1])), generator=gen,
                     dtype=torch.float64) * 3).to(dtype)
    kw = {
        "divergence": draw(st.sampled_from(["forward_kl", "reverse_kl", "jsd", "tvd", "kl"])),
        "temperature": draw(st.one_of(st.floats(0.25, 4.0), NUMBERS)),
        "beta": draw(st.one_of(st.floats(0.0, 1.0), st.sampled_from([1.5, -0.1, None]))),
        "reduction": draw(st.sampled_from(["mean", "sum", "none", "batchmean", "avg"])),
        "backend": draw(st.sampled_from(["auto", "cpu", "torch", "cuda", "nope"])),
    }
    lab = draw(st.sampled_from(["none", "ok", "ignored", "range", "shape", "float"]))
    if lab != "none":
        labels = torch.randint(0, v, (n,), generator=gen)
        if lab == "ignored":
            labels[0] = -100
        elif lab == "range":
            labels[0] = v + 3
        elif lab == "shape":
            labels = labels[:-1] if n > 1 else torch.zeros(2, dtype=torch.long)
        elif lab == "float":
            labels = labels.float()
        kw["labels"] = labels
        kw["hard_weight"] = draw(st.sampled_from([0.0, 0.5]))
    m = draw(st.sampled_from(["none", "bool", "int01", "weights"]))
    if m != "none":
        keep = torch.rand(n, generator=gen) > 0.3
        kw["mask"] = {"bool": keep, "int01": keep.long(),
                      "weights": keep.float() * 0.5}[m]
    return s, t, kw


@FUZZ
@given(case=dense_case())
def test_kd_loss_is_right_or_refuses_clearly(case):
    s, t, kw = case
    try:
        out = distill_ops.kd_loss(s, t, **kw)
    except (ValueError, TypeError) as exc:
        _clear(exc)
        return
    assert out.dtype in (torch.float32, torch.float64)
    ref_kw = {k: v for k, v in kw.items() if k != "backend"}
    want = reference.kd_loss(s.double(), t.double(), **ref_kw)
    torch.testing.assert_close(out.double(), want, rtol=TOL[s.dtype], atol=TOL[s.dtype],
                               equal_nan=True)


@st.composite
def sparse_case(draw):
    n = draw(st.integers(1, 4))
    v = draw(st.integers(2, 40))
    k = draw(st.integers(1, v))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    s = torch.randn(n, v, generator=gen) * 2
    top = reference.topk_logprobs(torch.randn(n, v, generator=gen) * 2, k)
    idx, lp = top[0].long(), top[1]
    what = draw(st.sampled_from(["ok", "ok", "pad", "probs", "positive", "nan", "dup", "range",
                                 "shape"]))
    if what == "pad" and k > 1:
        idx[:, -1] = -1
        lp[:, -1] = -math.inf
    elif what == "probs":
        lp = lp.exp()
    elif what == "positive":
        lp = lp + 1.0
    elif what == "nan":
        lp[0, 0] = math.nan
    elif what == "dup" and k > 1:
        idx[0, 1] = idx[0, 0]
    elif what == "range":
        idx[0, 0] = v + 1
    elif what == "shape":
        lp = lp[:, :-1] if k > 1 else lp[:1]
    kw = {
        "tail": draw(st.sampled_from(["bucket", "renorm", "support", "none", "rest"])),
        "divergence": draw(st.sampled_from(["forward_kl", "reverse_kl", "jsd", "tvd"])),
        "temperature": draw(st.one_of(st.floats(0.5, 2.0), NUMBERS)),
        "source_temperature": draw(st.sampled_from([1.0, 2.0, 0.0])),
        "reduction": draw(st.sampled_from(["mean", "sum", "none", "batchmean"])),
        "backend": draw(st.sampled_from(["auto", "cpu", "torch"])),
    }
    return s, idx, lp, kw


@FUZZ
@given(case=sparse_case())
def test_sparse_kd_loss_is_right_or_refuses_clearly(case):
    s, idx, lp, kw = case
    try:
        out = distill_ops.sparse_kd_loss(s, idx, lp, **kw)
    except (ValueError, TypeError) as exc:
        _clear(exc)
        return
    ref_kw = {k: v for k, v in kw.items() if k != "backend"}
    want = reference.sparse_kd_loss(s.double(), idx, lp.double(), **ref_kw)
    torch.testing.assert_close(out.double(), want, rtol=1e-4, atol=1e-4)


@FUZZ
@given(n=st.integers(1, 4), v=st.integers(1, 30), k=st.sampled_from([0, 1, 3, 31, "3"]),
       temperature=st.one_of(st.floats(0.5, 2.0), NUMBERS),
       backend=st.sampled_from(["auto", "cpu", "torch", "triton"]))
def test_topk_logprobs_is_right_or_refuses_clearly(n, v, k, temperature, backend):
    x = torch.randn(n, v) * 2
    try:
        top = distill_ops.topk_logprobs(x, k, temperature=temperature, backend=backend)
    except (ValueError, TypeError) as exc:
        _clear(exc)
        return
    idx, lp = reference.topk_logprobs(x.double(), k, temperature=temperature)
    assert torch.equal(top.indices, idx)
    torch.testing.assert_close(top.logprobs.double(), lp, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------
# The CLI, in process: every outcome exits 0, 1 or 2 with at most one line on stderr.

GARBAGE = [b"", b"\x00\xff\xfe garbage", b"{not json\n", b'{"choices": []}\n',
           b'{"choices": [{"logprobs": {"content": [{"token": 1}]}}]}\n', b"[]\n" * 3,
           b'{"id": "x", "choices": [{"logprobs": {"content": [{"token": "a", "logprob": '
           b'"high"}]}}]}\n']


@pytest.mark.parametrize("payload", GARBAGE, ids=range(len(GARBAGE)))
@pytest.mark.parametrize("fmt", ["openai", "vllm"])
def test_the_cli_survives_garbage_files(tmp_path, capsys, payload, fmt):
    from tokenizers import Tokenizer, models, pre_tokenizers

    from distill_ops import cli

    tok = Tokenizer(models.WordLevel({"a": 0, "b": 1, "<unk>": 2}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    f = tmp_path / "in.jsonl"
    f.write_bytes(payload)
    code = _run(cli, ["ingest", str(f), "--format", fmt, "--tokenizer",
                      str(tmp_path / "tokenizer.json"), "--out", str(tmp_path / "o"),
                      "--k", "2", "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 1 and len(err.splitlines()) == 1 and err.startswith("distill-ops ingest:")
    bad_store = tmp_path / "store"
    bad_store.mkdir()
    (bad_store / "manifest.json").write_bytes(payload)
    code = _run(cli, ["inspect", str(bad_store), "--json"])
    err = capsys.readouterr().err.strip()
    assert code == 1 and len(err.splitlines()) == 1 and err.startswith("distill-ops inspect:")


@FUZZ
@given(argv=st.lists(st.sampled_from(
    ["--reps", "--k", "--temperature", "--shape", "--op", "--budget", "--world", "--hidden",
     "0", "-1", "nan", "x", "12", "3x0", "dense", "--nope", "1e999"]), min_size=1, max_size=5))
def test_bad_bench_arguments_are_usage_errors(argv):
    import contextlib
    import io

    from distill_ops import cli

    if not any(a.startswith("-") for a in argv) or argv[-1].startswith("--"):
        argv = [*argv, "--reps", "0"]  # always something wrong: never start a benchmark
    if "0" not in argv and "-1" not in argv and "nan" not in argv and "x" not in argv:
        argv = [*argv, "--k", "0"]
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = _run(cli, ["bench", *argv])
    lines = err.getvalue().strip().splitlines()
    assert code == 2, (argv, err.getvalue())
    assert len(lines) == 1 and lines[0].startswith("distill-ops bench: error: "), lines


def _run(cli, argv) -> int:
    try:
        return cli.main(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
