"""The benchmark CLI runs end to end, and our losses equal the peers' where they define the
same quantity (TRL is optional: skipped, with the reason, where it is not installed)."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import LOSS_FLOOR, assert_close, logits

import distill_ops
from distill_ops import benchmark, cli


def test_bench_cli_writes_table_and_json(tmp_path, capsys):
    assert cli.main(["bench", "--shape", "16x300", "--reps", "1", "--no-compile",
                     "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "| dense | forward_kl | 16 | 300 | - | float32 | distill_ops |" in out
    assert "| sparse | forward_kl | 16 | 300 | 64 | float32 | eager |" in out
    assert "| topk | k=64 | 16 | 300 | 64 | float32 | distill_ops |" in out
    data = json.loads((tmp_path / "bench.json").read_text())
    assert data["command"].startswith("distill-ops bench")
    assert data["environment"]["copy_bandwidth_gbps"] > 0
    rows = {(r["op"], r["variant"], r["impl"]) for r in data["results"]}
    assert {("dense", "forward_kl", "distill_ops"), ("dense", "forward_kl", "eager"),
            ("dense", "jsd", "distill_ops"), ("dense", "jsd", "eager"), ("dense", "jsd", "trl"),
            ("sparse", "forward_kl", "distill_ops"), ("sparse", "forward_kl", "eager"),
            ("topk", "k=64", "distill_ops"), ("topk", "k=64", "eager")} <= rows
    for r in data["results"]:
        if r["impl"] != "trl" or r["notes"] != "TRL not installed":
            assert r["median_ms"] > 0 and r["floor_mib"] > 0


def test_byte_model():
    assert benchmark.bytes_floor("dense", 2, 10, 0, 2) == (120, 40)
    assert benchmark.bytes_floor("sparse", 2, 10, 3, 4) == (2 * 2 * 10 * 4 + 8 * 2 * 3, 80)
    assert benchmark.bytes_floor("topk", 2, 10, 3, 2) == (40 + 48, 48)
    with pytest.raises(ValueError, match="unknown op"):
        benchmark.bytes_floor("x", 1, 1, 1, 1)


@pytest.mark.parametrize("tail_peer", ["sparse"])
def test_eager_sparse_peer_computes_our_bucket_loss(seed, tail_peer):
    s, t = logits(5, 400), logits(5, 400)
    top = distill_ops.topk_logprobs(t, 16, temperature=2.0)
    ours = distill_ops.sparse_kd_loss(s, top.indices, top.logprobs, tail="bucket",
                                      temperature=2.0, source_temperature=2.0)
    peer = benchmark.eager_sparse_bucket(s, top.indices, top.logprobs, 2.0)
    assert_close(ours, peer.double(), 1e-4, tail_peer, LOSS_FLOOR)


@pytest.mark.parametrize("divergence", ["forward_kl", "jsd"])
def test_eager_peers_compute_the_same_loss(seed, divergence):
    s, t = logits(6, 500), logits(6, 500)
    ours = distill_ops.kd_loss(s, t, divergence=divergence, temperature=2.0)
    if divergence == "forward_kl":
        peer = benchmark.eager_forward_kl(s, t, 2.0)
    else:
        peer = benchmark.eager_jsd(s, t, 2.0)
    assert_close(ours, peer.double(), 1e-5, divergence, LOSS_FLOOR)


@pytest.mark.parametrize("beta", [0.0, 0.3, 0.5, 1.0])
def test_jsd_equals_trl_generalized_jsd(seed, beta):
    trl_jsd = benchmark.trl_jsd()
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
