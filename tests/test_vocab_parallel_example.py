"""examples/vocab_parallel_distill.py at a tiny size on gloo: 4 ranks (tensor parallel 2 x data
parallel 2) write the teacher's vocab-parallel top-k into one store and train a student with a
vocab-parallel head under DDP; the losses equal those of 2 ranks without tensor parallelism
(same data split), step for step, and go down."""

from __future__ import annotations

from dist_helpers import run_ranks
from helpers import load_example


def _run(rank, world, tp, out):
    return load_example("vocab_parallel_distill").main(["--tp", str(tp), "--out", out])


def test_tp2_dp2_equals_tp1_dp2_and_learns(tmp_path):
    tp2 = run_ranks(_run, 4, 2, str(tmp_path / "tp2"), timeout=240)
    tp1 = run_ranks(_run, 2, 1, str(tmp_path / "tp1"), timeout=240)
    for r in tp2 + tp1:
        assert r["sequences"] == 16 and r["store_k"] == 16
    a, b = tp2[0]["losses"], tp1[0]["losses"]
    assert all(abs(x - y) <= 1e-5 * abs(y) for x, y in zip(a, b, strict=True)), (a, b)
    assert all(r["losses"] == a for r in tp2)  # every rank reports the same global loss
    assert a[-1] < a[0] - 0.01, a
