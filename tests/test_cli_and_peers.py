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
    assert "| forward_kl | 16 | 300 | float32 | distill_ops |" in out
    assert "| jsd | 16 | 300 | float32 | eager |" in out
    data = json.loads((tmp_path / "dense_kd.json").read_text())
    assert data["command"].startswith("distill-ops bench")
    assert data["environment"]["copy_bandwidth_gbps"] > 0
    impls = {(r["divergence"], r["impl"]) for r in data["results"]}
    assert {("forward_kl", "distill_ops"), ("forward_kl", "eager"), ("jsd", "distill_ops"),
            ("jsd", "eager"), ("jsd", "trl")} <= impls
    for r in data["results"]:
        if r["impl"] != "trl" or r["notes"] != "TRL not installed":
            assert r["median_ms"] > 0 and r["floor_mib"] > 0


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
