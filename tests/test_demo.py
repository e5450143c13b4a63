"""`distill-ops demo` at a tiny size (seconds): the whole pipeline on the embedded default (a
slice of the standard library's source), the JSON it writes, determinism with a fixed seed,
the cache, a user corpus, and the CLI."""

from __future__ import annotations

import dataclasses
import json
import math
import time

import pytest
import torch

pytest.importorskip("tokenizers")

from distill_ops import cli
from distill_ops.demo import QUICK, RUNS, run_demo
from distill_ops.demo import data as demo_data
from distill_ops.demo.report import format_table as cli_table

TINY = dataclasses.replace(QUICK, corpus_bytes=80_000, vocab=300, context=16, batch=4,
                           teacher=(32, 1, 2), student=(16, 1, 2), teacher_steps=30,
                           student_steps=12, eval_every=6, eval_windows=8, angle_windows=4,
                           final_windows=16, teacher_eval_every=10, val_windows=8,
                           student_windows=20)
RUN_FIELDS = {"name": str, "targets": str, "heldout_loss": float, "perplexity": float,
              "ece": float, "grad_angle_deg": float, "tokens_per_s": float,
              "tokens_per_s_training": float}


def test_interleaved_timing_rotates_the_students_and_leaves_them_alone():
    """tokens/s: every round one step of each student in a rotated order (a slow spell of
    the machine falls on every row alike), one warm-up round, on copies."""
    from distill_ops.demo.steps import interleaved_tokens_per_s

    calls = []

    def loss_fn_of(run):
        def loss_fn(student, ids, windows):
            calls.append(run)
            return student(windows.float()).square().mean()
        return loss_fn

    runs = ["a", "b", "c"]
    students = {r: torch.nn.Linear(5, 3) for r in runs}
    before = {r: [p.clone() for p in m.parameters()] for r, m in students.items()}
    seen, train = torch.arange(8), torch.randn(8, 5)
    speed = interleaved_tokens_per_s(students, {r: loss_fn_of(r) for r in runs}, seen, train,
                                     batch=2, context=4, lr=1e-2, rounds=4,
                                     device=torch.device("cpu"), block=2)
    assert set(speed) == set(runs) and all(v > 0 for v in speed.values())
    order = "abc" "bca" "cab" "abc" "bca"  # rounds 0-4, each student two steps a round
    assert calls == [r for r in order for _ in range(2)]
    for r, m in students.items():
        assert all(torch.equal(p, q) for p, q in zip(m.parameters(), before[r], strict=True))


def test_pipeline_writes_every_run_with_its_metrics(tmp_path):
    lines = []
    threads = torch.get_num_threads()
    report = run_demo(cfg=TINY, out=str(tmp_path / "out"), cache=str(tmp_path / "cache"),
                      device="cpu", progress=False, log=lines.append)
    # quick mode on a CPU trains its students on one thread, then gives the rest back
    assert report["environment"]["student_threads"] == 1
    assert torch.get_num_threads() == threads
    data = json.loads((tmp_path / "out" / "demo.json").read_text())
    assert data["runs"] == json.loads(json.dumps(report["runs"]))
    assert [r["name"] for r in data["runs"]] == list(RUNS)
    for r in data["runs"]:
        for key, kind in RUN_FIELDS.items():
            assert isinstance(r[key], kind), (r["name"], key)
        assert {"ce": "ce", "dense": "dense", "sampled": "sampled"}.get(r["name"], "topk") \
            == r["targets"]
        assert (r["k"] == 12) == (r["targets"] == "topk")
        assert r["tail"] == ({"topk": r["name"].split("-")[-1], "sampled": "none"}
                             .get(r["targets"]))
        assert 0 <= r["ece"] <= 1 and r["perplexity"] > 1
    by = {r["name"]: r for r in data["runs"]}
    assert by["dense"]["grad_angle_deg"] < 1e-3  # the full-KD gradient against itself
    assert data["config"]["sampled_draws"] >= 12 and data["environment"]["corpus_files"] > 0
    assert "| sampled |" in (tmp_path / "out" / "demo.md").read_text()
    assert any("training the teacher" in x for x in lines)
    pytest.importorskip("matplotlib")
    assert (tmp_path / "out" / "demo-loss.png").stat().st_size > 0
    assert (tmp_path / "out" / "demo-calibration.png").stat().st_size > 0


def test_same_seed_same_results_and_the_teacher_comes_from_the_cache(tmp_path):
    """Two runs from empty caches (teacher trained twice, whatever the process's random state
    before) and a third from the first's cache give the same numbers."""
    kw = dict(cfg=TINY, out=None, device="cpu", progress=False,
              runs=("ce", "top12-bucket", "sampled"))
    logs = [[], [], []]
    a = run_demo(log=logs[0].append, cache=str(tmp_path / "c1"), **kw)
    torch.rand(7)  # a different global random state
    b = run_demo(log=logs[1].append, cache=str(tmp_path / "c2"), **kw)
    c = run_demo(log=logs[2].append, cache=str(tmp_path / "c1"), **kw)
    for other in (b, c):
        assert [r["heldout_loss"] for r in a["runs"]] == [r["heldout_loss"] for r in other["runs"]]
        assert [r["grad_angle_deg"] for r in a["runs"]] == \
            [r["grad_angle_deg"] for r in other["runs"]]
    assert any("training the teacher" in x for x in logs[1])
    assert not any("training the teacher" in x or "extracting" in x for x in logs[2])


def test_a_user_corpus_and_the_cli(tmp_path, capsys):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for n in range(12):
        (corpus / f"doc{n}.txt").write_text(
            f"Document {n}. " + "the cat sat on the mat while the dog ran. " * 60)
    report = run_demo(cfg=TINY, corpus=str(corpus), out=None, cache=str(tmp_path / "c"),
                      device="cpu", progress=False, runs=("ce", "dense"), log=lambda _: None)
    assert report["config"]["corpus"] == str(corpus)
    assert len(report["runs"]) == 2
    # one file whose held-out tenth is a single window: it scores and selects the teacher
    one = tmp_path / "one.txt"
    one.write_text("the cat sat on the mat while the dog ran.\n" * 20)
    report = run_demo(cfg=TINY, corpus=str(one), out=None, cache=str(tmp_path / "c1"),
                      device="cpu", progress=False, runs=("ce",), log=lambda _: None)
    assert math.isfinite(report["teacher"]["heldout_loss"])


def test_cli_arguments_reach_the_demo(monkeypatch, tmp_path):
    seen = {}
    monkeypatch.setattr("distill_ops.demo.run_demo", lambda **kw: seen.update(kw))
    corpus = tmp_path / "x.txt"
    corpus.write_text("some text")
    assert cli.main(["demo", "--quick", "--corpus", str(corpus), "--out", str(tmp_path),
                     "--device", "cpu", "--no-progress"]) == 0
    assert seen == dict(quick=True, corpus=str(corpus), out=str(tmp_path), device="cpu",
                        cache=None, progress=False, runs=RUNS)
    assert cli.main(["demo", "--quick", "--divergence", "ab", "akl"]) == 0
    assert seen["runs"] == (*RUNS, "dense-ab", "dense-akl")


def test_research_divergence_rows(tmp_path):
    """dense-<divergence> rows train with that divergence and the log names the best."""
    lines = []
    report = run_demo(cfg=TINY, out=None, cache=str(tmp_path / "c"), device="cpu",
                      progress=False, runs=("dense", "dense-skew_kl", "dense-ab", "dense-akl"),
                      log=lines.append)
    runs = {r["name"]: r for r in report["runs"]}
    assert runs["dense-ab"]["divergence"] == "ab" and runs["dense"]["divergence"] == "forward_kl"
    assert all(r["targets"] == "dense" and math.isfinite(r["heldout_loss"])
               for r in runs.values())
    assert len({r["heldout_loss"] for r in runs.values()}) == 4
    assert any("best divergence on this corpus" in x for x in lines)


def test_teacher_checkpoint_transfer_set_and_held_out_split(tmp_path):
    """The teacher's weights are its best validation point (validation windows apart from the
    held-out windows that score every model); the students see `student_windows` distinct
    windows; the report says how the time was spent."""
    from distill_ops.demo.run import evaluate, prepare

    cfg = dataclasses.replace(TINY, teacher_steps=40)
    data = prepare(cfg, None, tmp_path / "c", torch.device("cpu"), False, lambda _: None)
    curve = data["teacher_curve"]
    assert [s for s, _ in curve] == [10, 20, 30, 40]
    files, root = demo_data.corpus_files(None, cfg.corpus_bytes)
    tok = data["tokenizer"]
    held_all = demo_data.windows(torch.tensor(tok.encode(demo_data.read_split(files, root)[1])
                                              .ids), cfg.context)
    val = held_all[1::2][:cfg.val_windows]
    assert torch.equal(data["held"], held_all[0::2])
    best = min(v for _, v in curve)
    assert evaluate(data["teacher"], val, torch.device("cpu"))["loss"] == pytest.approx(best)
    assert len(torch.unique(data["seen"])) == cfg.student_windows
    assert len(data["seen"]) == cfg.student_steps * cfg.batch
    report = run_demo(cfg=cfg, out=None, cache=str(tmp_path / "c"), device="cpu",
                      progress=False, runs=("ce", "dense"), log=lambda _: None)
    t = report["teacher"]
    assert t["best_step"] == min(curve, key=lambda x: x[1])[0]
    assert t["parameters"] > report["student_parameters"] > 0
    assert report["stage_seconds"]["students"] == pytest.approx(
        sum(r["seconds"] for r in report["runs"]))
    assert "vs CE" in cli_table(report)


def test_peak_memory_is_the_runs_high_water_mark(monkeypatch):
    """The demo's CPU peak memory: a 64 MiB tensor touched inside the block shows as at least
    that much growth, whether from the kernel's high-water mark or, where /proc/self/clear_refs
    cannot be written, from the sampling fallback."""
    import builtins

    from distill_ops.bench.measure import HighWaterRSS

    def grow(ms: float) -> int:
        with HighWaterRSS() as m:
            x = torch.ones(16 << 20)  # 64 MiB, written
            time.sleep(ms)  # the fallback samples every millisecond
            del x
        return m.extra

    assert grow(0.0) >= 60 << 20
    real_open = builtins.open

    def no_clear_refs(path, *a, **k):
        if str(path) == "/proc/self/clear_refs":
            raise PermissionError(path)
        return real_open(path, *a, **k)

    monkeypatch.setattr(builtins, "open", no_clear_refs)
    assert grow(0.05) >= 60 << 20
