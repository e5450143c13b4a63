"""The benchmark harness: the CLI end to end at quick sizes (table, JSON, markdown, plots), its
JSON schema, the byte model, and that each peer computes the loss it stands for (the optional
peers are skipped, with the reason, where they are not installed)."""

from __future__ import annotations

import argparse
import json

import pytest
import torch
from helpers import LOSS_FLOOR, assert_close, logits

import distill_ops
from distill_ops import bench as benchmark
from distill_ops import cli
from distill_ops.bench import Shape
from distill_ops.bench import cases as peers

RESULT_FIELDS = {
    "op": str, "variant": str, "impl": str, "n": int, "v": int, "k": int, "hs": int, "ht": int,
    "dtype": str, "status": str, "fwd_ms": (float, type(None)),
    "fwd_spread_ms": (float, type(None)), "total_ms": (float, type(None)),
    "total_spread_ms": (float, type(None)), "peak_extra_mib": (float, type(None)),
    "out_mib": float, "floor_mib": float, "gbps": (float, type(None)),
    "frac_copy_bw": (float, type(None)), "frac_matmul": (float, type(None)),
    "tflops": (float, type(None)), "notes": str,
}


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    argv = ["bench", "--quick", "--reps", "1", "--no-progress", "--out", str(out)]
    assert cli.main(argv) == 0
    (md,) = out.glob("*.md")
    (js,) = out.glob("*.json")
    return out, md, json.loads(js.read_text())


def test_quick_run_covers_every_op_with_a_peer(quick_run):
    out, md, data = quick_run
    assert md.name.startswith("cpu-") and md.name.endswith(".md")
    rows = data["results"]
    for op in benchmark.OPS:
        ok = {r["impl"] for r in rows if r["op"] == op and r["status"] == "ok"}
        assert any(i.startswith("distill_ops") for i in ok), (op, ok)
        assert any(not i.startswith("distill_ops") for i in ok), (op, ok)
    variants = {(r["op"], r["variant"]) for r in rows}
    assert {("dense", d) for d in benchmark.DIVERGENCES} <= variants
    assert {("sparse", f"forward_kl tail={t}") for t in benchmark.TAILS} <= variants
    for r in rows:
        if r["status"] == "ok":
            assert r["total_ms"] > 0 and r["fwd_ms"] > 0 and r["floor_mib"] > 0
            assert 0 < r["frac_copy_bw"] and r["gbps"] > 0 and r["peak_extra_mib"] >= 0
        else:  # a peer that is not here says why
            assert r["status"] in ("missing", "error") and r["notes"]
    fused = [r for r in rows if r["op"].startswith("fused_linear") and r["status"] == "ok"
             and r["impl"] != "matmuls only"]
    assert fused and all(r["frac_matmul"] > 0 for r in fused)
    text = md.read_text()
    assert text.startswith("`distill-ops bench --quick")
    assert "| dense | forward_kl | N=256 V=32000 | float32 | distill_ops[cpu] |" in text
    assert "missing: " in text  # e.g. Liger without a GPU
    assert data["store"] and data["store"][0]["read_tokens_per_s"] > 0
    pytest.importorskip("matplotlib")
    plots = list((out / md.name.replace(".md", "-plots")).glob("*.png"))
    assert any("dense-forward_kl" in p.name and p.name.endswith("vs-V.png") for p in plots)
    assert any(p.name.endswith("vs-N.png") for p in plots)


def test_json_schema(quick_run):
    _, _, data = quick_run
    assert data["schema"] == benchmark.SCHEMA
    assert set(data) == {"schema", "created", "command", "environment", "config", "results",
                         "store"}
    env = data["environment"]
    for key in ("device", "device_type", "torch", "triton", "python", "cuda",
                "copy_bandwidth_gbps", "git_commit", "peers"):
        assert key in env, key
    assert set(env["peers"]) == {"trl", "liger-kernel", "torchtune"}
    assert env["copy_bandwidth_gbps"] > 0
    assert data["command"].startswith("distill-ops bench")
    cfg = data["config"]
    assert cfg["quick"] is True and cfg["dtype"] == "fp32" and cfg["reps"] == 1
    assert set(cfg["shapes"]) == set(benchmark.OPS)
    for r in data["results"]:
        assert set(r) == set(RESULT_FIELDS), set(r) ^ set(RESULT_FIELDS)
        for key, kind in RESULT_FIELDS.items():
            value = r[key]
            if isinstance(value, int) and not isinstance(value, bool) and kind is float:
                value = float(value)
            assert isinstance(value, kind), (key, value)
    for s in data["store"]:
        assert {"encoding", "k", "vocab", "tokens", "bytes_per_token", "read_tokens_per_s",
                "write_tokens_per_s"} <= set(s)


def test_byte_model():
    s = Shape(2, 10, k=3, hs=4, ht=5)
    assert benchmark.bytes_floor("dense", s, 2) == (3 * 2 * 10 * 2, 40)
    assert benchmark.bytes_floor("sparse", s, 4) == (2 * 2 * 10 * 4 + 8 * 2 * 3, 80)
    assert benchmark.bytes_floor("topk", s, 2) == (40 + 48, 48)
    assert benchmark.bytes_floor("sample", s, 2) == (40 + 48, 48)
    student = (2 * 4 + 10 * 4) * 2
    assert benchmark.bytes_floor("fused_linear", s, 2) == (2 * student + (2 * 5 + 10 * 5) * 2,
                                                           student)
    assert benchmark.bytes_floor("fused_linear_sparse", s, 2) == (2 * student + 48, student)
    assert benchmark.bytes_floor("fused_linear_topk", s, 2) == ((2 * 5 + 10 * 5) * 2 + 48, 48)
    with pytest.raises(ValueError, match="unknown op"):
        benchmark.bytes_floor("x", s, 1)


def test_shape_options_of_the_cli():
    from distill_ops.cli import bench_commands as cli_bench

    args = argparse.Namespace(quick=True, shape=[(8, 100)], k=[4, 8], hidden=[16, 32])
    shapes = cli_bench._shapes(args, "cpu")
    assert shapes["dense"] == [Shape(8, 100)]
    assert shapes["sparse"] == [Shape(8, 100, 4), Shape(8, 100, 8)]
    assert shapes["fused_linear"] == [Shape(8, 100, 0, 16, 32)]
    assert shapes["fused_linear_topk"] == [Shape(8, 100, 4, 0, 32), Shape(8, 100, 8, 0, 32)]


@pytest.mark.parametrize("divergence", benchmark.DIVERGENCES)
def test_eager_dense_peers_compute_our_loss(seed, divergence):
    s, t = logits(6, 500), logits(6, 500)
    ours = distill_ops.kd_loss(s, t, divergence=divergence, temperature=2.0)
    peer = peers.eager_dense(divergence, 2.0)(s, t)
    assert_close(ours, peer.double(), 1e-5, divergence, LOSS_FLOOR)


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl"])
def test_torchtune_peers_give_our_gradient(seed, divergence):
    losses = peers.torchtune_losses()
    if losses is None:
        pytest.skip("torchtune is not installed (optional peer)")
    cases = {c.impl: c for c in peers.dense_cases(divergence, 2.0, torch.device("cpu"),
                                                      include_compile=False)}
    s, t = logits(6, 300), logits(6, 300)
    grads = []
    for impl in ("distill_ops[cpu]", "torchtune"):
        x = s.clone().requires_grad_()
        grads.append(torch.autograd.grad(cases[impl].fn(x, t), x)[0])
    assert_close(grads[1], grads[0].double(), 1e-4, divergence)


@pytest.mark.parametrize("tail", benchmark.TAILS)
def test_eager_sparse_peers_compute_our_loss(seed, tail):
    s, t = logits(5, 400), logits(5, 400)
    top = distill_ops.topk_logprobs(t, 16, temperature=2.0)
    ours = distill_ops.sparse_kd_loss(s, top.indices, top.logprobs, tail=tail,
                                      temperature=2.0, source_temperature=2.0)
    peer = peers.eager_sparse(tail, 2.0)(s, top.indices, top.logprobs)
    assert_close(ours, peer.double(), 1e-4, tail, LOSS_FLOOR)


@pytest.mark.parametrize("tail", ["bucket", "support"])
def test_trl_server_distillation_peer_computes_our_loss(seed, tail):
    peer = peers.trl_server_sparse(tail, 2.0)
    if peer is None:
        pytest.skip("TRL is not installed (optional peer)")
    s, t = logits(5, 400), logits(5, 400)
    top = distill_ops.topk_logprobs(t, 16, temperature=2.0)
    ours = distill_ops.sparse_kd_loss(s, top.indices, top.logprobs, tail=tail,
                                      temperature=2.0, source_temperature=2.0)
    assert_close(ours, peer(s, top.indices, top.logprobs).double(), 1e-4, tail, LOSS_FLOOR)


@pytest.mark.parametrize("beta", [0.0, 0.3, 0.5, 1.0])
def test_jsd_equals_trl_generalized_jsd(seed, beta):
    trl_jsd = peers.trl_jsd()
    if trl_jsd is None:
        pytest.skip("TRL is not installed (optional peer)")
    s, t = logits(2, 4, 300, dtype=torch.float64), logits(2, 4, 300, dtype=torch.float64)
    labels = torch.randint(0, 300, (2, 4))
    labels[0, 0] = -100
    ours = distill_ops.kd_loss(s, t, divergence="jsd", beta=beta, temperature=1.5,
                               labels=labels, backend="cpu")
    theirs = trl_jsd(s, t, labels=labels, beta=beta, temperature=1.5)
    # TRL's "batchmean" with labels divides the summed elementwise divergence by the number
    # of valid tokens: the same as our mean over valid rows.
    torch.testing.assert_close(ours, theirs, rtol=1e-9, atol=1e-12)


def test_fused_linear_peers_compute_our_loss(seed):
    hs, ws, ht, wt = benchmark.make_inputs("fused_linear", Shape(24, 300, hs=8, ht=12),
                                           torch.float32, torch.device("cpu"), 2.0)
    cases = {c.impl: c.fn for c in peers.fused_linear_cases(2.0, torch.device("cpu"))}
    ours = cases["distill_ops"](hs, ws, ht, wt)
    assert_close(ours, cases["eager"](hs, ws, ht, wt).double(), 1e-4, "eager", LOSS_FLOOR)
    if cases.get("trl") is not None:
        assert_close(ours, cases["trl"](hs, ws, ht, wt).double(), 1e-4, "trl", LOSS_FLOOR)


def test_budget_stops_new_cases_but_keeps_the_rows():
    results, env = benchmark.run(["topk"], {"topk": [Shape(4, 100, 3)]}, reps=1,
                                 include_compile=False, budget_s=0.0)
    assert results and env["copy_bandwidth_gbps"] > 0
    for r in results:
        assert r.status == "missing" and r.total_ms is None
    assert any("--budget" in r.notes for r in results)


def test_world_mode_reports_time_and_bytes_per_row(tmp_path):
    """`bench --world 2` (gloo here): every vocab-parallel case, its time, the single-process
    time beside it, and the bytes each rank sends per row (a few floats for dense)."""
    argv = ["bench", "--world", "2", "--shape", "64x400", "--k", "8", "--reps", "1",
            "--out", str(tmp_path)]
    assert cli.main(argv) == 0
    (path,) = tmp_path.glob("cpu-world2-*.json")
    rows = json.loads(path.read_text())["rows"]
    assert {r["op"] for r in rows} == {"dense", "sparse", "topk"}
    for r in rows:
        assert r["world"] == 2 and r["fwd_bwd_ms"] > 0 and r["single_ms"] > 0
    dense = [r for r in rows if r["op"] == "dense"]
    assert all(r["bytes_per_row"] <= 9 * 4 + 1 for r in dense)
    # the slice alone timed alternately with the vocab-parallel call, their per-rep ratio
    assert all(r["slice_ms"] > 0 and r["vs_slice"] > 0 for r in dense)


def test_timed_pair_alternates_and_takes_the_median_ratio():
    from distill_ops.bench.world import _timed_pair

    calls = []
    a, b = (lambda: calls.append("a")), (lambda: calls.append("b"))
    ta, tb, ratio = _timed_pair(a, b, torch.device("cpu"), 3)
    assert calls == ["a", "b"] * 4  # a warm-up of each, then alternating
    assert ta > 0 and tb > 0 and ratio > 0


def test_auto_backend_is_the_fastest_measured_for_the_gpu_model(tmp_path, monkeypatch):
    """backend='auto' on a GPU reads auto_backends.json (shipped with the package) by GPU
    model and op family; the harness writes that table from what it measured."""
    from distill_ops import dispatch as _backend
    from distill_ops.backends.extension import has_native, native

    cuda_built = has_native() and native().has_cuda
    assert _backend._auto_cuda("NVIDIA H200", "dense") == "triton"
    assert _backend._auto_cuda("NVIDIA H200", "sparse") == ("cuda" if cuda_built else "triton")
    assert _backend._auto_cuda("Some Other GPU", "dense") == "triton"

    def res(op, impl, ms, n=8):
        return benchmark.Result(op, "forward_kl", impl, n, 100, 0, 0, 0, "bf16", "ok",
                                total_ms=ms)
    results = [res("dense", "distill_ops[triton]", 1.0), res("dense", "distill_ops[cuda]", 2.0),
               res("dense", "distill_ops[triton]", 3.0, 16),
               res("dense", "distill_ops[cuda]", 2.5, 16),
               res("dense", "distill_ops[triton]", 1.0, 32),
               res("dense", "distill_ops[cuda]", 1.5, 32), res("dense", "eager", 0.1),
               res("topk", "distill_ops[cuda]", 1.0), res("topk", "distill_ops[triton]", 2.0)]
    assert benchmark.fastest_backends(results) == {"dense": "triton", "topk": "cuda"}
    table = tmp_path / "auto.json"
    benchmark.write_auto_table(table, "GPU X", results, "today")
    benchmark.write_auto_table(table, "GPU Y", results[-2:], "later")
    data = json.loads(table.read_text())["devices"]
    assert data["GPU X"] == {"dense": "triton", "topk": "cuda", "measured": "today"}
    assert data["GPU Y"] == {"topk": "cuda", "measured": "later"}


def test_plots_draw_the_bandwidth_floor(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    import matplotlib.axes

    labels = []
    real = matplotlib.axes.Axes.plot
    monkeypatch.setattr(matplotlib.axes.Axes, "plot",
                        lambda self, *a, **kw: (labels.append(kw.get("label")),
                                                real(self, *a, **kw))[1])
    rows = [benchmark.Result("dense", "forward_kl", "distill_ops[cpu]", 64, v, 0, 0, 0, "fp32",
                             "ok", total_ms=float(v) / 1000, peak_extra_mib=1.0,
                             floor_mib=v / 100) for v in (1000, 4000)]
    files = benchmark.plot(rows, tmp_path, copy_gbps=40.0)
    assert files and "bandwidth floor (40 GB/s)" in labels


def test_every_cli_flag_has_help_and_there_is_a_version(capsys):
    parser = cli.build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert set(commands.choices) == {"bench", "extract", "demo", "ingest", "inspect"}
    for name, sub in commands.choices.items():
        for action in sub._actions:
            if not isinstance(action, argparse._HelpAction):
                assert action.help, f"distill-ops {name} {action.option_strings or action.dest}"
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"distill-ops {distill_ops.__version__}"


def test_the_faster_cuda_dense_kernel_is_recorded_and_picked(tmp_path, monkeypatch):
    """The benchmark times both CUDA dense designs as cuda:portable and cuda:cluster: the
    family's backend is cuda, dense_cuda_variant the design that won more cases, and the
    launcher runs that design on the GPU model unless DISTILL_OPS_CUDA_DENSE or a
    cuda_dense_variant block says otherwise."""
    from distill_ops import dispatch
    from distill_ops.backends import cuda as cuda_backend
    from distill_ops.bench import report

    def res(impl, ms, n=8):
        return benchmark.Result("dense", "forward_kl", impl, n, 100, 0, 0, 0, "bf16", "ok",
                                total_ms=ms)
    results = [res("distill_ops[triton]", 3.0), res("distill_ops[cuda:portable]", 2.0),
               res("distill_ops[cuda:cluster]", 1.0),
               res("distill_ops[triton]", 3.0, 16), res("distill_ops[cuda:portable]", 1.5, 16),
               res("distill_ops[cuda:cluster]", 1.0, 16),
               res("distill_ops[cuda:portable]", 0.5, 32)]  # no cluster row: not compared
    assert benchmark.fastest_backends(results) == {"dense": "cuda"}
    assert report.fastest_cuda_dense_variant(results) == "cluster"
    assert report.fastest_cuda_dense_variant(results[:1]) is None
    table = tmp_path / "auto.json"
    benchmark.write_auto_table(table, "GPU Z", results, "today")
    assert json.loads(table.read_text())["devices"]["GPU Z"] == {
        "dense": "cuda", "dense_cuda_variant": "cluster", "measured": "today"}

    monkeypatch.setattr(dispatch, "_auto_table",
                        lambda: {"GPU Z": {"dense_cuda_variant": "portable"}})
    dispatch.measured_cuda_dense_variant.cache_clear()
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "GPU Z")
    monkeypatch.delenv("DISTILL_OPS_CUDA_DENSE", raising=False)
    dev = torch.device("cuda", 0)
    try:
        assert cuda_backend.dense_variant(dev) == cuda_backend.DENSE_VARIANTS["portable"]
        with cuda_backend.cuda_dense_variant("cluster"):
            assert cuda_backend.dense_variant(dev) == cuda_backend.DENSE_VARIANTS["cluster"]
            monkeypatch.setenv("DISTILL_OPS_CUDA_DENSE", "auto")
            assert cuda_backend.dense_variant(dev) == cuda_backend.DENSE_VARIANTS["auto"]
        monkeypatch.setenv("DISTILL_OPS_CUDA_DENSE", "fast")
        with pytest.raises(ValueError, match="DISTILL_OPS_CUDA_DENSE"):
            cuda_backend.dense_variant(dev)
        with pytest.raises(ValueError, match="variant"), cuda_backend.cuda_dense_variant("x"):
            pass
    finally:
        dispatch.measured_cuda_dense_variant.cache_clear()
    monkeypatch.delenv("DISTILL_OPS_CUDA_DENSE")
    assert dispatch.measured_cuda_dense_variant("GPU unknown") is None
