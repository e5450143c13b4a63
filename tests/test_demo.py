"""`distill-ops demo`: teacher top-k -> compact store -> students, on synthetic models."""

from __future__ import annotations

from distill_ops import cli
from distill_ops.demo import run_demo


def test_demo_students_approach_the_teacher():
    lines: list[str] = []
    out = run_demo(vocab=512, hidden=16, tokens=1024, k=32, steps=40, log=lines.append)
    assert out["kl_sparse"] < 0.25 * out["kl_initial"]
    assert out["kl_dense"] < 0.25 * out["kl_initial"]
    assert any("read back exactly: True" in line for line in lines)


def test_demo_cli(capsys):
    assert cli.main(["demo", "--vocab", "256", "--hidden", "8", "--tokens", "256", "--k", "8",
                     "--steps", "3"]) == 0
    assert "held-out KL: initial" in capsys.readouterr().out
